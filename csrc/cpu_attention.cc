// Decode-step attention over a KV cache for XLA's CPU backend, called from JAX through jax.ffi.
//
// For each row b, head h and new token q (S new tokens at positions start[b] .. start[b]+S-1):
//
//   out[b, q, h] = softmax_j(query[b, q, h] . k_j / sqrt(D)) v_j  over
//     j in { cache positions p < start[b] }  (k_j = cache_keys[b, h, p], from the cache)
//        u { new tokens t <= q }             (k_j = key[b, t, h], not yet in the cache)
//
// with fp32 scores, softmax and sums whatever the cache's dtype (fp32 or bf16), as
// model/modeling.py's cached_attention computes it. What this adds over XLA: it reads only the
// positions in use, where it lies, so a cache as long as the model's context costs a decode
// step what the tokens so far cost (XLA reads the whole cache, or copies the slices it reads),
// and one compiled program serves every length. Each (row, head) is one task on XLA's own
// intra-op thread pool; a task's sums run in one fixed order, so results do not depend on the
// thread count.
//
// Part of the extension `codegen_repl.model._cpu_matmul` (setup.py); model/cpu_attention.py
// registers and calls it.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;  // bf16 is the top half of an fp32
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

constexpr int64_t kLanes = 16;  // independent partial sums: the compiler keeps them in vectors

// q . k over D dims (D a multiple of kLanes): lane l sums dims l, l + 16, ..., then the lanes
// are added in order. No -ffast-math: the compiler vectorizes the lanes without reordering.
template <typename T>
inline float dot(const float* q, const T* k, int64_t D) {
  float lanes[kLanes] = {};
  for (int64_t d = 0; d < D; d += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += q[d + l] * widen(k[d + l]);
  float sum = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

template <typename T>
inline void axpy(float* out, float weight, const T* v, int64_t D) {
  for (int64_t d = 0; d < D; ++d) out[d] += weight * widen(v[d]);
}

struct Shape {
  int64_t B, S, H, D, L;
};

// One (row b, head h): every new token's attention. `scores` holds start + S floats.
template <typename T>
void attend(const float* query, const float* key, const float* value, const T* cache_keys,
            const T* cache_values, int64_t start, float* out, const Shape& s, int64_t b,
            int64_t h, float* scores) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.D));
  const int64_t row = s.S * s.H * s.D;  // one row of query/key/value/out
  const T* keys = cache_keys + (b * s.H + h) * s.L * s.D;
  const T* values = cache_values + (b * s.H + h) * s.L * s.D;
  for (int64_t q = 0; q < s.S; ++q) {
    const float* qv = query + b * row + (q * s.H + h) * s.D;
    const int64_t seen = start + q + 1;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t p = 0; p < start; ++p) {
      scores[p] = dot(qv, keys + p * s.D, s.D) * scale;
      top = std::max(top, scores[p]);
    }
    for (int64_t t = 0; t <= q; ++t) {
      float& score = scores[start + t];
      score = dot(qv, key + b * row + (t * s.H + h) * s.D, s.D) * scale;
      top = std::max(top, score);
    }
    float total = 0.0f;
    for (int64_t j = 0; j < seen; ++j) {
      scores[j] = std::exp(scores[j] - top);
      total += scores[j];
    }
    float* o = out + b * row + (q * s.H + h) * s.D;
    std::fill(o, o + s.D, 0.0f);
    const float norm = 1.0f / total;
    for (int64_t p = 0; p < start; ++p) axpy(o, scores[p] * norm, values + p * s.D, s.D);
    for (int64_t t = 0; t <= q; ++t)
      axpy(o, scores[start + t] * norm, value + b * row + (t * s.H + h) * s.D, s.D);
  }
}

// Runs task(i) for i in [0, tasks) on the pool and the calling thread; returns when all ran.
template <typename Task>
void parallel_for(ffi::ThreadPool& pool, int64_t tasks, int64_t threads, const Task& task) {
  struct Work {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> unfinished;
  };
  auto work = std::make_shared<Work>();
  work->unfinished.store(tasks);
  auto loop = [work, tasks, &task] {
    for (int64_t i; (i = work->next.fetch_add(1)) < tasks;) {
      task(i);
      if (work->unfinished.fetch_sub(1) == 1) work->unfinished.notify_all();
    }
  };
  for (int64_t t = 1; t < std::min(threads, tasks); ++t) {
    auto copy = loop;
    pool.Schedule(std::move(copy));
  }
  loop();
  // Helpers that start after the work is gone find no task; `task` outlives every call to it,
  // because the caller waits here until the last task has finished.
  for (int64_t left; (left = work->unfinished.load()) != 0;) work->unfinished.wait(left);
}

template <typename T>
ffi::Error run(ffi::ThreadPool& pool, const float* query, const float* key, const float* value,
               const T* cache_keys, const T* cache_values, const int32_t* starts, float* out,
               const Shape& s) {
  for (int64_t b = 0; b < s.B; ++b)
    if (starts[b] < 0 || starts[b] > s.L)
      return ffi::Error::InvalidArgument("codegen attention: a row's start is outside the cache");
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  parallel_for(pool, s.B * s.H, threads, [&](int64_t i) {
    thread_local std::vector<float> scores;
    const int64_t b = i / s.H, h = i % s.H;
    scores.resize(static_cast<size_t>(starts[b] + s.S));
    attend(query, key, value, cache_keys, cache_values, starts[b], out, s, b, h,
           scores.data());
  });
  return ffi::Error::Success();
}

}  // namespace

ffi::Error CacheAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> query,
                          ffi::Buffer<ffi::F32> key, ffi::Buffer<ffi::F32> value,
                          ffi::AnyBuffer cache_keys, ffi::AnyBuffer cache_values,
                          ffi::Buffer<ffi::S32> starts, ffi::ResultBuffer<ffi::F32> out) {
  auto q = query.dimensions(), c = cache_keys.dimensions();
  if (q.size() != 4 || c.size() != 4 || key.dimensions() != q || value.dimensions() != q ||
      cache_values.dimensions() != c || out->dimensions() != q ||
      starts.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("codegen attention: query/key/value/out [B, S, H, D], "
                                       "cache keys/values [B, H, L, D], starts [B]");
  const Shape s{q[0], q[1], q[2], q[3], c[2]};
  if (c[0] != s.B || c[1] != s.H || c[3] != s.D || starts.dimensions()[0] != s.B ||
      s.D % kLanes != 0)
    return ffi::Error::InvalidArgument("codegen attention: shapes do not match (or head_dim "
                                       "is not a multiple of 16)");
  if (cache_keys.element_type() != cache_values.element_type())
    return ffi::Error::InvalidArgument("codegen attention: cache keys and values differ in dtype");
  const float* qp = query.typed_data();
  const float* kp = key.typed_data();
  const float* vp = value.typed_data();
  switch (cache_keys.element_type()) {
    case ffi::DataType::F32:
      return run(pool, qp, kp, vp, static_cast<const float*>(cache_keys.untyped_data()),
                 static_cast<const float*>(cache_values.untyped_data()), starts.typed_data(),
                 out->typed_data(), s);
    case ffi::DataType::BF16:
      return run(pool, qp, kp, vp, static_cast<const uint16_t*>(cache_keys.untyped_data()),
                 static_cast<const uint16_t*>(cache_values.untyped_data()), starts.typed_data(),
                 out->typed_data(), s);
    default:
      return ffi::Error::InvalidArgument("codegen attention: the cache must be fp32 or bf16");
  }
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CodegenCacheAttention, CacheAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
