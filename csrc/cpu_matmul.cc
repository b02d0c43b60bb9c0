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
// Work is split into blocks of whole weight rows (and, for wide outputs, column ranges) on
// XLA's own intra-op thread pool (the cores JAX uses), so that each thread streams contiguous
// memory: the calling thread works too, and waits on a futex, never spinning.
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
#include <limits>
#include <memory>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// ------------------------------------------------------------------ portable (any CPU)

namespace generic {

inline float widen(int8_t v) { return static_cast<float>(v); }
inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;  // bf16 is the top half of an fp32
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Plain loops over contiguous columns that compilers vectorize (NEON on arm64, SSE2 on x86).
// y[m, n0:n1] = (scale[n] *) sum_{k0 <= k < k1} x[m, k] w[k, n]  (see matmul_body.h).
template <typename W>
void block(const float* x, const W* w, const float* scale, float* y, int64_t M, int64_t K,
           int64_t N, int64_t k0, int64_t k1, int64_t n0, int64_t n1) {
  const int64_t width = n1 - n0;
  for (int64_t m = 0; m < M; ++m) std::memset(y + m * N + n0, 0, width * sizeof(float));
  for (int64_t k = k0; k < k1; ++k) {
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

void block_int8(const float* x, const int8_t* w, const float* scale, float* y, int64_t M,
                int64_t K, int64_t N, int64_t k0, int64_t k1, int64_t n0, int64_t n1) {
  block(x, w, scale, y, M, K, N, k0, k1, n0, n1);
}

void block_bf16(const float* x, const uint16_t* w, const float* scale, float* y, int64_t M,
                int64_t K, int64_t N, int64_t k0, int64_t k1, int64_t n0, int64_t n1) {
  block(x, w, scale, y, M, K, N, k0, k1, n0, n1);
}

void block_f32(const float* x, const float* w, const float* scale, float* y, int64_t M,
               int64_t K, int64_t N, int64_t k0, int64_t k1, int64_t n0, int64_t n1) {
  block(x, w, scale, y, M, K, N, k0, k1, n0, n1);
}

// y[m, n0:n1] = (scale[n] *) (y + partial[0] + ... + partial[parts - 1])[m, n0:n1].
void add_up(float* y, const float* partial, int64_t parts, const float* scale, int64_t M,
            int64_t N, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = n0; j < n1; ++j) {
      float acc = y[m * N + j];
      for (int64_t p = 0; p < parts; ++p) acc += partial[p * M * N + m * N + j];
      y[m * N + j] = scale != nullptr ? acc * scale[j] : acc;
    }
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
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
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
inline V wload(const float* p) { return _mm512_loadu_ps(p); }
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
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
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
inline V wload(const float* p) { return _mm256_loadu_ps(p); }
#include "matmul_body.h"
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// AMX intrinsics: g++ >= 11, clang >= 12 (older compilers build without the AMX path).
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#define CODEGEN_AMX 1
#include "matmul_amx.h"
#endif
#endif  // x86-64

// ------------------------------------------------------------------ run-time dispatch

template <typename W>
using BlockFn = void (*)(const float*, const W*, const float*, float*, int64_t, int64_t, int64_t,
                         int64_t, int64_t, int64_t, int64_t);
using AddUpFn = void (*)(float*, const float*, int64_t, const float*, int64_t, int64_t, int64_t,
                         int64_t);

struct Kernels {
  const char* isa;
  BlockFn<int8_t> int8;
  BlockFn<uint16_t> bf16;
  BlockFn<float> f32;
  AddUpFn add_up;
  bool amx = false;  // int8/bf16 products of many rows (prefills) on AMX tiles (matmul_amx.h)
};

constexpr Kernels kGeneric{"generic", generic::block_int8, generic::block_bf16, generic::block_f32,
                           generic::add_up};

bool cpu_has(const char* isa) {
#ifdef CODEGEN_X86
  __builtin_cpu_init();
  if (std::strcmp(isa, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (std::strcmp(isa, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
#ifdef CODEGEN_AMX
  if (std::strcmp(isa, "amx") == 0) return cpu_has("avx512") && amx::enable();
#endif
  return std::strcmp(isa, "generic") == 0;
}

// The best kernels this CPU runs, or the named (lower) ones; nullptr when the CPU lacks them.
const Kernels* kernels_for(const char* isa) {
#ifdef CODEGEN_X86
  static constexpr Kernels kAvx512{"avx512", avx512::block_int8, avx512::block_bf16,
                                    avx512::block_f32, avx512::add_up};
  static constexpr Kernels kAvx2{"avx2", avx2::block_int8, avx2::block_bf16, avx2::block_f32,
                                 avx2::add_up};
  static constexpr Kernels kAmx{"amx", avx512::block_int8, avx512::block_bf16, avx512::block_f32,
                                avx512::add_up, true};
  if (isa == nullptr)
    isa = cpu_has("amx")      ? "amx"
          : cpu_has("avx512") ? "avx512"
          : cpu_has("avx2")   ? "avx2"
                              : "generic";
  if (!cpu_has(isa)) return nullptr;
  if (std::strcmp(isa, "amx") == 0) return &kAmx;
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

// How a product is cut into blocks, weight rows [k0, k1) x columns [n0, n1), for the pool.
// Decoding reads every weight once, so what matters is how the weights stream from memory:
// a block of whole rows is one contiguous run, which the hardware prefetchers follow at full
// speed (cutting only columns, as the first version did, made every thread read short pieces
// of every row: 13 GB/s of weights where whole rows stream at 16-18 GB/s on a 2-core AVX-512
// machine that reads 19.5 GB/s, bench/decode.py `kernels`' stream). Columns are cut only as
// far as the block's sums (rows x columns fp32) must stay in L1; rows are cut so that every
// worker gets blocks (2 per worker for balance), and the row slices' partial sums are added up
// in slice order (the same result whichever thread finished first). Any order of the sums
// keeps fp32's summation bound, gamma(K + 2) (cpu_matmul.py).
struct Plan {
  int64_t slices;         // K cut into this many row ranges
  int64_t slice_rows;     // weight rows per slice (a multiple of 4; the last may be shorter)
  int64_t blocks;         // N cut into this many column ranges
  int64_t block_columns;  // columns per range (a multiple of 64; the last may be shorter)
};

constexpr int64_t kSumBytes = 32 << 10;  // a block's partial sums: L1-sized
constexpr int64_t kMinSliceRows = 64;    // fewer rows per slice: adding up costs more

Plan plan(int64_t M, int64_t K, int64_t N, int64_t workers) {
  Plan p{};
  p.block_columns = std::max<int64_t>(64, kSumBytes / (4 * M) / 64 * 64);
  if (p.block_columns >= N) p.block_columns = N;
  p.blocks = (N + p.block_columns - 1) / p.block_columns;
  p.slices = 1;
  if (workers > 1) {
    const int64_t wanted = (2 * workers + p.blocks - 1) / p.blocks;
    p.slices = std::clamp<int64_t>(wanted, 1, std::max<int64_t>(1, K / kMinSliceRows));
  }
  p.slice_rows = std::max<int64_t>(4, ((K + p.slices - 1) / p.slices + 3) / 4 * 4);
  p.slices = std::max<int64_t>(1, (K + p.slice_rows - 1) / p.slice_rows);
  return p;
}

// Workers to plan for: CODEGEN_CPU_MATMUL_THREADS or `set_threads` (0: the pool's size). More
// than the pool has only cuts the product finer (tests use it to run every split anywhere).
std::atomic<int64_t> planned_threads{[] {
  const char* env = std::getenv("CODEGEN_CPU_MATMUL_THREADS");
  return env ? std::max<int64_t>(0, std::atoll(env)) : 0;
}()};

int64_t worker_count(ffi::ThreadPool& pool, int64_t M, int64_t K, int64_t N) {
  const int64_t planned = planned_threads.load();
  const int64_t threads = planned > 0 ? planned : std::max<int64_t>(1, pool.num_threads());
  // Under ~64k multiply-adds a second thread costs more than it saves.
  return (M * K * N < (1 << 16)) ? 1 : threads;
}

// The partial sums of row slices 1.. (slice 0 sums into y): per calling thread, kept between
// calls (no allocation, so no page faults, per decode step). The caller waits for its helpers,
// so the buffer outlives every use.
float* scratch(int64_t floats) {
  thread_local std::unique_ptr<float[]> buffer;
  thread_local int64_t size = 0;
  if (floats > size) {
    buffer.reset(new float[floats]);
    size = floats;
  }
  return buffer.get();
}

struct Job {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> unfinished;
  std::unique_ptr<std::atomic<int64_t>[]> slices_left;  // per column range
  explicit Job(int64_t tasks, int64_t blocks, int64_t slices)
      : unfinished(tasks), slices_left(new std::atomic<int64_t>[blocks]) {
    for (int64_t b = 0; b < blocks; ++b) slices_left[b].store(slices);
  }
};

template <typename W>
struct Product {
  const Kernels* kernels;
  BlockFn<W> block;
  const float* x;
  const W* w;
  const float* scale;
  float* y;
  float* partial;  // [slices - 1, M, N]
  int64_t M, K, N;
  Plan p;

  // Task t: row slice t / blocks, column range t % blocks (slices in memory order).
  void run(Job& job, int64_t t) const {
    const int64_t s = t / p.blocks, b = t % p.blocks;
    const int64_t k0 = s * p.slice_rows, k1 = std::min(K, k0 + p.slice_rows);
    const int64_t n0 = b * p.block_columns, n1 = std::min(N, n0 + p.block_columns);
    if (p.slices == 1) {
      block(x, w, scale, y, M, K, N, k0, k1, n0, n1);
      return;
    }
    float* sums = s == 0 ? y : partial + (s - 1) * M * N;
    block(x, w, nullptr, sums, M, K, N, k0, k1, n0, n1);
    if (job.slices_left[b].fetch_sub(1) == 1)  // the last slice of this column range adds up
      kernels->add_up(y, partial, p.slices - 1, scale, M, N, n0, n1);
  }
};

template <typename W>
void work(Job& job, int64_t tasks, const Product<W>& product) {
  for (int64_t t; (t = job.next.fetch_add(1)) < tasks;) {
    product.run(job, t);
    if (job.unfinished.fetch_sub(1) == 1) job.unfinished.notify_all();
  }
}

template <typename W>
void parallel_product(ffi::ThreadPool& pool, Product<W> product) {
  if (product.M == 0 || product.N == 0) return;
  const int64_t workers = worker_count(pool, product.M, product.K, product.N);
  product.p = plan(product.M, product.K, product.N, workers);
  const Plan& p = product.p;
  if (p.slices > 1) product.partial = scratch((p.slices - 1) * product.M * product.N);
  const int64_t tasks = p.slices * p.blocks;
  auto job = std::make_shared<Job>(tasks, p.blocks, p.slices);
  // Helpers that start after the work is gone find no task and return; the shared_ptr keeps
  // the job alive for them (and the product's buffers are only used while the caller waits).
  const int64_t threads = std::min({workers, tasks, std::max<int64_t>(1, pool.num_threads())});
  for (int64_t t = 1; t < threads; ++t)
    pool.Schedule([job, tasks, product] { work(*job, tasks, product); });
  work(*job, tasks, product);
  for (int64_t left; (left = job->unfinished.load()) != 0;) job->unfinished.wait(left);
}

#ifdef CODEGEN_AMX
// Products of at least this many rows take AMX tiles (`set_amx_rows`: cpu_matmul.py sets
// MAX_ROWS + 1); fewer stream the weights through the vector kernels above, which read them at
// memory speed for decode steps (AMX would first widen and repack every weight it reads).
std::atomic<int64_t> amx_min_rows{17};

// x [M, K] @ w [K, N] on AMX tiles (matmul_amx.h), in passes of rows (see `pass`); the
// 128-column panels of a pass are tasks on the pool.
template <typename W>
void amx_product(ffi::ThreadPool& pool, const float* x, const W* w, const float* scale, float* y,
                 int64_t M, int64_t K, int64_t N) {
  const int64_t k_pad = (K + amx::kTileK - 1) / amx::kTileK * amx::kTileK;
  const int64_t part_bytes = amx::kParts * k_pad * 2;  // per row of x
  // At most 512 rows per pass (a task's sums: 256 KB), and parts of x under 24 MB.
  const int64_t pass = std::clamp<int64_t>((24 << 20) / part_bytes / amx::kRowBlock *
                                               amx::kRowBlock, amx::kRowBlock, 512);
  const int64_t tasks = (N + amx::kColumns - 1) / amx::kColumns;
  const int64_t threads = std::min(
      {worker_count(pool, M, K, N), tasks, std::max<int64_t>(1, pool.num_threads())});
  for (int64_t m0 = 0; m0 < M; m0 += pass) {
    const int64_t rows = std::min(pass, M - m0);
    const int64_t rows_pad = (rows + amx::kRowBlock - 1) / amx::kRowBlock * amx::kRowBlock;
    auto* parts = reinterpret_cast<uint16_t*>(scratch((rows_pad * part_bytes + 3) / 4));
    amx::split(x + m0 * K, rows, K, parts, rows_pad, k_pad);
    const amx::Product<W> product{w, scale, y + m0 * N, parts, rows, K, N, rows_pad, k_pad};
    auto job = std::make_shared<Job>(tasks, 1, 1);
    auto run = [job, tasks, product] {
      amx::work(job->next, tasks, product, [&job] {
        if (job->unfinished.fetch_sub(1) == 1) job->unfinished.notify_all();
      });
    };
    for (int64_t t = 1; t < threads; ++t) pool.Schedule(decltype(run)(run));
    run();
    for (int64_t left; (left = job->unfinished.load()) != 0;) job->unfinished.wait(left);
  }
}
#endif

// Whether a product of M rows (K deep) takes AMX tiles with these kernels (K = 0: the vector
// kernels write the zeros).
bool takes_amx(const Kernels* kernels, int64_t M, int64_t K) {
#ifdef CODEGEN_AMX
  return kernels->amx && M >= amx_min_rows.load() && K > 0;
#else
  (void)kernels, (void)M, (void)K;
  return false;
#endif
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
  const Kernels* kernels = active.load();
#ifdef CODEGEN_AMX
  if (takes_amx(kernels, x.dimensions()[0], x.dimensions()[1])) {
    amx_product<int8_t>(pool, x.typed_data(), w.typed_data(), scale.typed_data(),
                        y->typed_data(), x.dimensions()[0], x.dimensions()[1], w.dimensions()[1]);
    return ffi::Error::Success();
  }
#endif
  parallel_product<int8_t>(pool, {kernels, kernels->int8, x.typed_data(), w.typed_data(),
                                  scale.typed_data(), y->typed_data(), nullptr,
                                  x.dimensions()[0], x.dimensions()[1], w.dimensions()[1]});
  return ffi::Error::Success();
}

ffi::Error MatmulBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  ffi::Error shapes = check_shapes(x.dimensions(), w.dimensions(), y->dimensions(), -1);
  if (shapes.failure()) return shapes;
  const Kernels* kernels = active.load();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
#ifdef CODEGEN_AMX
  if (takes_amx(kernels, x.dimensions()[0], x.dimensions()[1])) {
    amx_product<uint16_t>(pool, x.typed_data(), wp, nullptr, y->typed_data(), x.dimensions()[0],
                          x.dimensions()[1], w.dimensions()[1]);
    return ffi::Error::Success();
  }
#endif
  parallel_product<uint16_t>(pool, {kernels, kernels->bf16, x.typed_data(), wp, nullptr,
                                    y->typed_data(), nullptr, x.dimensions()[0],
                                    x.dimensions()[1], w.dimensions()[1]});
  return ffi::Error::Success();
}

ffi::Error MatmulF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> y) {
  ffi::Error shapes = check_shapes(x.dimensions(), w.dimensions(), y->dimensions(), -1);
  if (shapes.failure()) return shapes;
  const Kernels* kernels = active.load();
  parallel_product<float>(pool, {kernels, kernels->f32, x.typed_data(), w.typed_data(), nullptr,
                                 y->typed_data(), nullptr, x.dimensions()[0], x.dimensions()[1],
                                 w.dimensions()[1]});
  return ffi::Error::Success();
}

// rows[i, :] = fp32(table[ids[i], :]) for a bf16 table [V, H], with jnp.take's rules: an id in
// [-V, 0) counts from the end, one outside [-V, V) gives NaNs ("fill"). XLA's CPU backend has
// no bf16 gather: it widens the whole table for a lookup (and hoists that out of a decode loop,
// 200 MB for 350M's embedding per decode chunk); this reads only the rows asked for.
ffi::Error TakeRowsBf16(ffi::Buffer<ffi::BF16> table, ffi::Buffer<ffi::S32> ids,
                        ffi::ResultBuffer<ffi::F32> rows) {
  auto dims = table.dimensions(), out = rows->dimensions();
  if (dims.size() != 2 || out.size() != 2 || out[0] != static_cast<int64_t>(ids.element_count()) ||
      out[1] != dims[1])
    return ffi::Error::InvalidArgument(
        "codegen take_rows: table [V, H], ids [n] -> rows [n, H]: shapes do not match");
  const int64_t vocab = dims[0], width = dims[1];
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(table.typed_data());
  float* y = rows->typed_data();
  for (int64_t i = 0; i < out[0]; ++i) {
    int64_t id = ids.typed_data()[i];
    if (id < 0) id += vocab;
    float* row = y + i * width;
    if (id < 0 || id >= vocab) {
      std::fill(row, row + width, std::numeric_limits<float>::quiet_NaN());
      continue;
    }
    for (int64_t j = 0; j < width; ++j) row[j] = generic::widen(bits[id * width + j]);
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CodegenTakeRowsBf16, TakeRowsBf16,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(CodegenMatmulF32, MatmulF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// csrc/cpu_attention.cc, linked into this module
XLA_FFI_DECLARE_HANDLER_SYMBOL(CodegenCacheAttention);

// ------------------------------------------------------------------ Python module

PyObject* capsule(XLA_FFI_Error* (*handler)(XLA_FFI_CallFrame*)) {
  return PyCapsule_New(reinterpret_cast<void*>(handler), nullptr, nullptr);
}

PyObject* handlers(PyObject*, PyObject*) {
  return Py_BuildValue("{s:N,s:N,s:N,s:N,s:N}", "int8", capsule(CodegenMatmulInt8), "bf16",
                       capsule(CodegenMatmulBf16), "f32", capsule(CodegenMatmulF32), "attention",
                       capsule(CodegenCacheAttention), "take_rows", capsule(CodegenTakeRowsBf16));
}

PyObject* isa(PyObject*, PyObject*) { return PyUnicode_FromString(active.load()->isa); }

PyObject* set_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  const bool best = std::strcmp(name, "best") == 0;
  const Kernels* chosen = kernels_for(best ? nullptr : name);
  if (chosen == nullptr) {
    PyErr_Format(PyExc_ValueError,
                 "instruction set %R is not available on this CPU; use 'best', 'amx', "
                 "'avx512', 'avx2' or 'generic' (x86-64) or 'generic' (others)",
                 arg);
    return nullptr;
  }
  active.store(chosen);
  return PyUnicode_FromString(chosen->isa);
}

PyObject* set_threads(PyObject*, PyObject* arg) {
  const long long count = PyLong_AsLongLong(arg);
  if (count == -1 && PyErr_Occurred()) return nullptr;
  if (count < 0) {
    PyErr_SetString(PyExc_ValueError, "threads must be 0 (the pool's size) or more");
    return nullptr;
  }
  return PyLong_FromLongLong(planned_threads.exchange(count));
}

PyObject* set_amx_rows(PyObject*, PyObject* arg) {
  const long long rows = PyLong_AsLongLong(arg);
  if (rows == -1 && PyErr_Occurred()) return nullptr;
  if (rows < 1) {
    PyErr_SetString(PyExc_ValueError, "rows must be 1 or more");
    return nullptr;
  }
#ifdef CODEGEN_AMX
  return PyLong_FromLongLong(amx_min_rows.exchange(rows));
#else
  return PyLong_FromLongLong(0);
#endif
}

PyMethodDef methods[] = {
    {"handlers", handlers, METH_NOARGS,
     "{'int8': capsule, 'bf16': capsule, 'f32': capsule, 'attention': capsule, 'take_rows': "
     "capsule} XLA FFI handlers"},
    {"isa", isa, METH_NOARGS,
     "The instruction set the kernels use: amx (avx512 with AMX prefills), avx512, avx2 or "
     "generic"},
    {"set_isa", set_isa, METH_O, "Use 'best' or a named instruction set; returns its name"},
    {"set_amx_rows", set_amx_rows, METH_O,
     "int8/bf16 products of at least this many rows take AMX tiles (when the instruction set "
     "is 'amx'); returns the previous count (0: built without AMX)"},
    {"set_threads", set_threads, METH_O,
     "Plan blocks for this many workers (0: the pool's size); returns the previous count"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_matmul",
                      "Weight-only int8/bf16 CPU matmuls for jax.ffi", -1, methods};

PyMODINIT_FUNC PyInit__cpu_matmul() { return PyModule_Create(&module); }
