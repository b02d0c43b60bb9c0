// Weight-only int8 and bf16 matmuls for XLA's CPU backend, called from JAX through jax.ffi.
//
//   y[M, N] fp32 = x[M, K] fp32 @ w[K, N]  (* scale[N] for int8: one scale per output channel)
//
// Activations and sums stay fp32 (the weights are widened, never the activations narrowed), so
// the result differs from an fp32 matmul of the dequantized weights only by fp32 rounding.
// AVX-512 VNNI / AVX512-BF16 dot instructions would need int8 / bf16 activations, which the
// weight-only scheme does not have; decode is bound by reading the weights, which this does
// at 1 or 2 bytes per weight.
//
// The instruction set is chosen at run time (AVX-512, AVX2+FMA, portable C++ that the compiler
// vectorizes, e.g. NEON on arm64); `set_isa` lowers it (tests run every path on one machine).
// Work is split over output columns on XLA's own intra-op thread pool (the cores JAX uses):
// the calling thread works too, and waits on a futex, never spinning.
//
// Built by setup.py as the Python extension `codegen_repl.model._cpu_matmul`; the module hands
// the FFI handlers to Python as capsules for jax.ffi.register_ffi_target.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// ------------------------------------------------------------------ portable (any CPU)

namespace generic {

inline float widen(int8_t v) { return static_cast<float>(v); }
inline float widen(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;  // bf16 is the top half of an fp32
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Plain loops over contiguous columns that compilers vectorize (NEON on arm64, SSE2 on x86).
template <typename W>
void columns(const float* x, const W* w, const float* scale, float* y, int64_t M, int64_t K,
             int64_t N, int64_t n0, int64_t n1) {
  const int64_t width = n1 - n0;
  for (int64_t m = 0; m < M; ++m) std::memset(y + m * N + n0, 0, width * sizeof(float));
  for (int64_t k = 0; k < K; ++k) {
    const W* row = w + k * N + n0;
    for (int64_t m = 0; m < M; ++m) {
      const float xv = x[m * K + k];
      float* out = y + m * N + n0;
      for (int64_t j = 0; j < width; ++j) out[j] += xv * widen(row[j]);
    }
  }
  if (scale != nullptr)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = n0; j < n1; ++j) y[m * N + j] *= scale[j];
}

void columns_int8(const float* x, const int8_t* w, const float* scale, float* y, int64_t M,
                  int64_t K, int64_t N, int64_t n0, int64_t n1) {
  columns(x, w, scale, y, M, K, N, n0, n1);
}

void columns_bf16(const float* x, const uint16_t* w, const float* scale, float* y, int64_t M,
                  int64_t K, int64_t N, int64_t n0, int64_t n1) {
  columns(x, w, scale, y, M, K, N, n0, n1);
}

}  // namespace generic

// ------------------------------------------------------------------ x86-64 SIMD

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CODEGEN_X86 1

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
#endif
namespace avx512 {
using V = __m512;
constexpr int64_t LANES = 16;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vset1(float v) { return _mm512_set1_ps(v); }
inline V vfma(V a, V b, V acc) { return _mm512_fmadd_ps(a, b, acc); }
inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V wload(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
inline V wload(const uint16_t* p) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
#include "matmul_body.h"
}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2 {
using V = __m256;
constexpr int64_t LANES = 8;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vset1(float v) { return _mm256_set1_ps(v); }
inline V vfma(V a, V b, V acc) { return _mm256_fmadd_ps(a, b, acc); }
inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
inline V wload(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
inline V wload(const uint16_t* p) {
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
#include "matmul_body.h"
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // x86-64

// ------------------------------------------------------------------ run-time dispatch

using Int8Fn = void (*)(const float*, const int8_t*, const float*, float*, int64_t, int64_t,
                        int64_t, int64_t, int64_t);
using Bf16Fn = void (*)(const float*, const uint16_t*, const float*, float*, int64_t, int64_t,
                        int64_t, int64_t, int64_t);

struct Kernels {
  const char* isa;
  Int8Fn int8;
  Bf16Fn bf16;
};

constexpr Kernels kGeneric{"generic", generic::columns_int8, generic::columns_bf16};

bool cpu_has(const char* isa) {
#ifdef CODEGEN_X86
  __builtin_cpu_init();
  if (std::strcmp(isa, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (std::strcmp(isa, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return std::strcmp(isa, "generic") == 0;
}

// The best kernels this CPU runs, or the named (lower) ones; nullptr when the CPU lacks them.
const Kernels* kernels_for(const char* isa) {
#ifdef CODEGEN_X86
  static constexpr Kernels kAvx512{"avx512", avx512::columns_int8, avx512::columns_bf16};
  static constexpr Kernels kAvx2{"avx2", avx2::columns_int8, avx2::columns_bf16};
  if (isa == nullptr) isa = cpu_has("avx512") ? "avx512" : cpu_has("avx2") ? "avx2" : "generic";
  if (!cpu_has(isa)) return nullptr;
  if (std::strcmp(isa, "avx512") == 0) return &kAvx512;
  if (std::strcmp(isa, "avx2") == 0) return &kAvx2;
#else
  if (isa == nullptr) isa = "generic";
  if (!cpu_has(isa)) return nullptr;
#endif
  return &kGeneric;
}

std::atomic<const Kernels*> active{kernels_for(nullptr)};

// ------------------------------------------------------------------ threads

// Column chunks: multiples of 64 columns (a cache line of int8 weights), at least two per
// worker for balance, at most 2048 columns so that 4 weight rows stay in L1.
struct Job {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> unfinished;
  int64_t chunk, n;
  explicit Job(int64_t chunks, int64_t chunk_cols, int64_t cols)
      : unfinished(chunks), chunk(chunk_cols), n(cols) {}
};

template <typename F>
void work(Job& job, int64_t chunks, const F& columns) {
  for (int64_t c; (c = job.next.fetch_add(1)) < chunks;) {
    columns(c * job.chunk, std::min(job.n, (c + 1) * job.chunk));
    if (job.unfinished.fetch_sub(1) == 1) job.unfinished.notify_all();
  }
}

template <typename F>
void parallel_columns(ffi::ThreadPool& pool, int64_t M, int64_t K, int64_t N, F columns) {
  static const int64_t cap = [] {
    const char* env = std::getenv("CODEGEN_CPU_MATMUL_THREADS");  // 0 or unset: the pool's size
    return env ? std::max<int64_t>(0, std::atoll(env)) : 0;
  }();
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (cap > 0) threads = std::min(threads, cap);
  // Under ~64k multiply-adds a second thread costs more than it saves.
  const int64_t workers = (M * K * N < (1 << 16)) ? 1 : threads;
  int64_t chunk = (N + 2 * workers - 1) / (2 * workers);
  chunk = std::clamp<int64_t>((chunk + 63) / 64 * 64, 64, 2048);
  const int64_t chunks = (N + chunk - 1) / chunk;
  auto job = std::make_shared<Job>(chunks, chunk, N);
  // Helpers that start after the work is gone find no chunk and return; the shared_ptr keeps
  // the job alive for them (and `columns` is only called while the caller still waits).
  for (int64_t t = 1; t < std::min(workers, chunks); ++t)
    pool.Schedule([job, chunks, columns] { work(*job, chunks, columns); });
  work(*job, chunks, columns);
  for (int64_t left; (left = job->unfinished.load()) != 0;) job->unfinished.wait(left);
}

// ------------------------------------------------------------------ FFI handlers

ffi::Error check_shapes(ffi::AnyBuffer::Dimensions x, ffi::AnyBuffer::Dimensions w,
                        ffi::AnyBuffer::Dimensions y, int64_t scale) {
  if (x.size() != 2 || w.size() != 2 || y.size() != 2)
    return ffi::Error::InvalidArgument("codegen matmul: x, w and y must be 2-D");
  if (x[1] != w[0] || y[0] != x[0] || y[1] != w[1] || (scale >= 0 && scale != w[1]))
    return ffi::Error::InvalidArgument("codegen matmul: x [M, K] @ w [K, N] -> y [M, N], "
                                       "scale [N]: shapes do not match");
  return ffi::Error::Success();
}

ffi::Error MatmulInt8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                      ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  auto dims = scale.dimensions();
  if (dims.size() != 1) return ffi::Error::InvalidArgument("codegen matmul: scale must be 1-D");
  ffi::Error shapes = check_shapes(x.dimensions(), w.dimensions(), y->dimensions(), dims[0]);
  if (shapes.failure()) return shapes;
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], N = w.dimensions()[1];
  const Int8Fn fn = active.load()->int8;
  const float* xp = x.typed_data();
  const int8_t* wp = w.typed_data();
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  parallel_columns(pool, M, K, N, [=](int64_t n0, int64_t n1) {
    fn(xp, wp, sp, yp, M, K, N, n0, n1);
  });
  return ffi::Error::Success();
}

ffi::Error MatmulBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  ffi::Error shapes = check_shapes(x.dimensions(), w.dimensions(), y->dimensions(), -1);
  if (shapes.failure()) return shapes;
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], N = w.dimensions()[1];
  const Bf16Fn fn = active.load()->bf16;
  const float* xp = x.typed_data();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  float* yp = y->typed_data();
  parallel_columns(pool, M, K, N, [=](int64_t n0, int64_t n1) {
    fn(xp, wp, nullptr, yp, M, K, N, n0, n1);
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CodegenMatmulInt8, MatmulInt8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CodegenMatmulBf16, MatmulBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// ------------------------------------------------------------------ Python module

PyObject* handlers(PyObject*, PyObject*) {
  return Py_BuildValue("{s:N,s:N}", "int8",
                       PyCapsule_New(reinterpret_cast<void*>(CodegenMatmulInt8), nullptr,
                                     nullptr),
                       "bf16",
                       PyCapsule_New(reinterpret_cast<void*>(CodegenMatmulBf16), nullptr,
                                     nullptr));
}

PyObject* isa(PyObject*, PyObject*) { return PyUnicode_FromString(active.load()->isa); }

PyObject* set_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  const bool best = std::strcmp(name, "best") == 0;
  const Kernels* chosen = kernels_for(best ? nullptr : name);
  if (chosen == nullptr) {
    PyErr_Format(PyExc_ValueError,
                 "instruction set %R is not available on this CPU; use 'best', 'avx512', "
                 "'avx2' or 'generic' (x86-64) or 'generic' (others)",
                 arg);
    return nullptr;
  }
  active.store(chosen);
  return PyUnicode_FromString(chosen->isa);
}

PyMethodDef methods[] = {
    {"handlers", handlers, METH_NOARGS, "{'int8': capsule, 'bf16': capsule} XLA FFI handlers"},
    {"isa", isa, METH_NOARGS, "The instruction set the kernels use: avx512, avx2 or generic"},
    {"set_isa", set_isa, METH_O, "Use 'best' or a named instruction set; returns its name"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_matmul",
                      "Weight-only int8/bf16 CPU matmuls for jax.ffi", -1, methods};

PyMODINIT_FUNC PyInit__cpu_matmul() { return PyModule_Create(&module); }
