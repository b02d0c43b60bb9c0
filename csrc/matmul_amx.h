// The many-row (prefill) weight-only matmul on Intel AMX tiles, included once by cpu_matmul.cc
// (x86-64 with a compiler that has the AMX intrinsics: g++ >= 11, clang >= 12).
//
//   y[M, N] fp32 = x[M, K] fp32 @ w[K, N] (int8 or bf16)  (* scale[N] for int8)
//
// AMX multiplies bf16 by bf16 into fp32 sums (TDPBF16PS). The weights fit bf16 exactly (an int8
// has 8 significant bits, bf16 keeps 8), and each fp32 activation is cut into three bf16 parts
// whose sum is exactly the activation (`split`: a 24-bit significand is three 8-bit ones).
// Every product of a part and a weight has at most 16 significant bits, so it is exact in fp32,
// and the result is a sum of exact products in fp32, as in the vector kernel, only with 3K
// terms instead of K (the bound is in cpu_matmul.py: gamma(3K + 2) (1 + 2^-6) sum_k |x_k w_kn|).
// AMX flushes denormals (DAZ/FTZ): a part below 2^-126 (of an activation below about 2^-110)
// counts as zero, a product or sum below 2^-126 too, at most 2^-126 (|w_kn| + 1) per term (in
// the bound).
//
// A prefill reads each weight once for all its rows, so it is bound by the multiply-adds, not
// by memory: 16x16x32 per instruction on the tiles, where AVX-512 does 16 per FMA.
//
// Work: the activations are cut into parts once per call (by the calling thread); the columns
// are cut into panels of 128, one task each on XLA's thread pool. A task widens its panel of
// weights to bf16 in the tile layout AMX reads (pairs of rows interleaved, Intel SDM vol. 1
// ch. 18) into a per-thread buffer, one K block of 1024 rows at a time, then runs every 32-row
// block of x over it: four 16x16 fp32 sum tiles, two tiles of x, two of weights (the 8 tile
// registers); the sums carry over between K blocks in a per-thread buffer.
//
// Linux hands a process the AMX state only on request (arch_prctl ARCH_REQ_XCOMP_PERM,
// Documentation/arch/x86/xstate.rst); `amx::enable` asks once, and without it the path is off.

#include <sys/syscall.h>
#include <unistd.h>

#if defined(__clang__)
#pragma clang attribute push(                                                                  \
    __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#endif
namespace amx {

constexpr int64_t kParts = 3;       // bf16 parts per fp32 activation (exact)
constexpr int64_t kTileK = 32;      // bf16 values per tile row (64 bytes)
constexpr int64_t kPanel = 32;      // weight columns per task: two 16-column tiles
constexpr int64_t kRowBlock = 32;   // rows of x per pass: two 16-row tiles

// Whether this process may use AMX bf16 tiles: the CPU has them and Linux granted the state.
bool enable() {
  static const bool granted = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512bf16") || !__builtin_cpu_supports("avx512bw")) return false;
    unsigned eax, ebx, ecx, edx;
    __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
    const bool tile = (edx >> 24) & 1, bf16 = (edx >> 22) & 1;  // CPUID.(7,0):EDX AMX-TILE/BF16
    if (!tile || !bf16) return false;
#if defined(__linux__)
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;  // asm/prctl.h, xstate.rst
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
#else
    return false;
#endif
  }();
  return granted;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: sums [16 rows, 16 fp32]; 4-5: x parts [16 rows, 32 bf16]; 6-7: weights [16 pairs
// of rows, 16 columns x 2 bf16]. All 16 rows of 64 bytes.
inline void configure() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
}

inline __m512 bf16_to_f32(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The bf16 parts of rows [0, rows_pad) of x [M, K] (zero past M and K) as AMX tiles, each 16
// rows x 32 values contiguous (1 KB, so a tile load reads one run of memory): the tile of
// part p, rows [16 mt, 16 mt + 16), columns [32 ks, 32 ks + 32) is at
// parts + ((p * rows_pad / 16 + mt) * k_pad / 32 + ks) * 512.
// Each part is cut off (rounded toward zero: the top 16 bits of the fp32 value), never rounded
// up, so no part overflows (round to nearest made bf16(3.4e38) infinite, and x - hi NaN);
// x = hi + mid + lo exactly: x - hi has at most 16 significant bits, x - hi - mid at most 8.
// Infinities and NaNs go whole into hi (rounded to nearest, which keeps a NaN a NaN).
void split(const float* x, int64_t M, int64_t K, uint16_t* parts, int64_t rows_pad,
           int64_t k_pad) {
  static_assert(kParts == 3, "three bf16 parts hold an fp32 exactly");
  const int64_t steps = k_pad / kTileK, part = rows_pad * k_pad;
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i exponent = _mm512_set1_epi32(0x7F800000);
  for (int64_t m = 0; m < rows_pad; ++m) {
    uint16_t* row = parts + (m / 16) * steps * 512 + (m % 16) * kTileK;
    for (int64_t k = 0; k < k_pad; k += 16) {
      const __mmask16 valid =
          m < M ? (k + 16 <= K ? 0xFFFF : (k < K ? (1u << (K - k)) - 1 : 0)) : 0;
      const __m512 value = _mm512_maskz_loadu_ps(valid, x + m * K + k);
      const __m512i bits = _mm512_castps_si512(value);
      const __mmask16 finite =
          _mm512_cmpneq_epi32_mask(_mm512_and_si512(bits, exponent), exponent);
      const __m512i hi = _mm512_and_si512(bits, top);
      const __m512 rest = _mm512_sub_ps(value, _mm512_castsi512_ps(hi));  // exact
      const __m512i mid = _mm512_and_si512(_mm512_castps_si512(rest), top);
      const __m512 lo = _mm512_sub_ps(rest, _mm512_castsi512_ps(mid));  // exact, 8 bits
      const __m256i whole = (__m256i)_mm512_cvtneps_pbh(value);
      const __m256i parts3[3] = {
          _mm256_mask_mov_epi16(whole, finite, _mm512_cvtepi32_epi16(_mm512_srli_epi32(hi, 16))),
          _mm512_maskz_cvtepi32_epi16(finite, _mm512_srli_epi32(mid, 16)),
          _mm512_maskz_cvtepi32_epi16(finite,
                                      _mm512_srli_epi32(_mm512_castps_si512(lo), 16))};
      uint16_t* out = row + (k / kTileK) * 512 + k % kTileK;
      for (int64_t p = 0; p < kParts; ++p)
        _mm256_storeu_si256((__m256i*)(out + p * part), parts3[p]);
    }
  }
}

// 32 weights of row k, columns [n, n + 32) (fewer at the edge: zeros), as bf16 bits.
inline __m512i row_bf16(const int8_t* w, int64_t N, int64_t k, int64_t n) {
  const int64_t left = N - n;
  const __mmask32 valid = left >= 32 ? 0xFFFFFFFFu : (1u << left) - 1;
  const __m256i bytes = _mm256_maskz_loadu_epi8(valid, w + k * N + n);
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(bytes)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(bytes, 1)));
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // exact: |int8| < 2^8
}
inline __m512i row_bf16(const uint16_t* w, int64_t N, int64_t k, int64_t n) {
  const int64_t left = N - n;
  const __mmask32 valid = left >= 32 ? 0xFFFFFFFFu : (1u << left) - 1;
  return _mm512_maskz_loadu_epi16(valid, w + k * N + n);
}

// Rows [k0, k1) x columns [n0, n0 + width) of w [K, N] (width <= columns, a multiple of 32 per
// task; zeros past N and K) in AMX's weight-tile layout: for each step ks of 32 rows and each
// 32 columns j, two tiles (columns 32 j.., 32 j + 16..) at panel + (ks * columns / 32 + j) *
// 1024, each 16 rows of (w[k, c], w[k + 1, c]) pairs for its 16 columns c, k = k0 + 32 ks +
// 2 * row. Reads each pair of weight rows once, whole cache lines, prefetching 16 rows ahead
// (the rows are N apart: other pages, which the hardware prefetchers do not cross).
template <typename W>
void pack(const W* w, int64_t K, int64_t N, int64_t n0, int64_t width, int64_t columns,
          int64_t k0, int64_t k1, uint16_t* panel) {
  // Interleave two rows' 32 values: first columns 0-15 (tile 0), then 16-31 (tile 1).
  alignas(64) static constexpr uint16_t kFirst[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                                      37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                                      11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr uint16_t kSecond[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21,
                                                       53, 22, 54, 23, 55, 24, 56, 25, 57, 26, 58,
                                                       27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i first = _mm512_load_si512(kFirst), second = _mm512_load_si512(kSecond);
  const int64_t groups = (width + kPanel - 1) / kPanel, row_bytes = width * sizeof(W);
  constexpr int64_t kAhead = 16;
  for (int64_t k = k0; k < k1; k += 2) {
    for (int64_t ahead = k + kAhead; ahead < std::min(k + kAhead + 2, K); ++ahead)
      for (int64_t byte = 0; byte < row_bytes; byte += 64)
        _mm_prefetch(reinterpret_cast<const char*>(w + ahead * N + n0) + byte, _MM_HINT_T0);
    const int64_t step = (k - k0) / kTileK;
    uint16_t* tiles = panel + step * (columns / kPanel) * 1024 + (k % kTileK) / 2 * 32;
    for (int64_t j = 0; j < groups; ++j, tiles += 1024) {
      const int64_t n = n0 + j * kPanel;
      const __m512i a = k < K ? row_bf16(w, N, k, n) : _mm512_setzero_si512();
      const __m512i b = k + 1 < K ? row_bf16(w, N, k + 1, n) : _mm512_setzero_si512();
      _mm512_store_si512(tiles, _mm512_permutex2var_epi16(a, first, b));
      _mm512_store_si512(tiles + 512, _mm512_permutex2var_epi16(a, second, b));
    }
  }
}

// One K block of the 32 x 32 outputs at rows m0, columns 32 j of a task's panel: the x parts'
// tiles of steps [step0, step0 + steps) times the packed block (`panel`, as `pack` lays it
// out). The fp32 sums carry over between K blocks in `sums` ([rows_pad, columns], the task's):
// the first block starts from zero, the last multiplies by the scale and writes y[m, n:n+32]
// (valid rows and columns only).
void block_product(const uint16_t* parts, int64_t rows_pad, int64_t k_pad, int64_t step0,
                   int64_t steps, const uint16_t* panel, int64_t columns, int64_t j, bool first,
                   bool last, float* sums, const float* scale, float* y, int64_t M, int64_t N,
                   int64_t n, int64_t m0) {
  const int64_t part = rows_pad * k_pad, all_steps = k_pad / kTileK;
  const int64_t panel_step = (columns / kPanel) * 1024, stride = columns * 4;
  const uint16_t* a0 = parts + ((m0 / 16) * all_steps + step0) * 512;
  const uint16_t* a1 = a0 + all_steps * 512;
  const uint16_t* b = panel + j * 1024;
  float* c = sums + m0 * columns + j * kPanel;
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_loadd(0, c, stride);
    _tile_loadd(1, c + 16, stride);
    _tile_loadd(2, c + 16 * columns, stride);
    _tile_loadd(3, c + 16 * columns + 16, stride);
  }
  for (int64_t ks = 0; ks < steps; ++ks, a0 += 512, a1 += 512, b += panel_step) {
    _tile_loadd(6, b, 64);
    _tile_loadd(7, b + 512, 64);
    for (int64_t p = 0; p < kParts; ++p) {  // (a tile is loaded again once its uses began)
      _tile_loadd(4, a0 + p * part, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_loadd(5, a1 + p * part, 64);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, stride);
  _tile_stored(1, c + 16, stride);
  _tile_stored(2, c + 16 * columns, stride);
  _tile_stored(3, c + 16 * columns + 16, stride);
  if (!last) return;
  const int64_t rows = std::min<int64_t>(kRowBlock, M - m0);
  const int64_t width = std::min<int64_t>(kPanel, N - n);
  const __mmask16 lo = width >= 16 ? 0xFFFF : (1u << width) - 1;
  const __mmask16 hi = width >= 32 ? 0xFFFF : (width > 16 ? (1u << (width - 16)) - 1 : 0);
  const __m512 s0 = scale ? _mm512_maskz_loadu_ps(lo, scale + n) : _mm512_set1_ps(1.0f);
  const __m512 s1 = scale ? _mm512_maskz_loadu_ps(hi, scale + n + 16) : _mm512_set1_ps(1.0f);
  for (int64_t r = 0; r < rows; ++r) {
    float* out = y + (m0 + r) * N + n;
    const float* sum = c + r * columns;
    _mm512_mask_storeu_ps(out, lo, _mm512_mul_ps(_mm512_loadu_ps(sum), s0));
    _mm512_mask_storeu_ps(out + 16, hi, _mm512_mul_ps(_mm512_loadu_ps(sum + 16), s1));
  }
}

// A per-thread buffer of at least `bytes` (64-byte aligned), kept between calls; `Slot` tells
// a task's two buffers apart (its packed panel, its sums).
template <int Slot>
void* task_buffer(int64_t bytes) {
  thread_local std::unique_ptr<void, decltype(&std::free)> buffer{nullptr, &std::free};
  thread_local int64_t size = 0;
  if (bytes > size) {
    bytes = (bytes + 63) / 64 * 64;  // aligned_alloc takes a multiple of the alignment
    buffer.reset(std::aligned_alloc(64, bytes));
    if (!buffer) throw std::bad_alloc();
    size = bytes;
  }
  return buffer.get();
}

// Rows of w per K block: the block's packed panel (kKBlock x kColumns bf16, 256 KB) and a
// 32-row block of x's parts for it (kParts x 32 x kKBlock bf16, 192 KB) stay in L2 (2 MB per
// core on Sapphire Rapids) while the panel's four 32-column blocks read them; without K blocks
// a 10240-deep product (2B's fc_out) read 1.9 MB of parts per 32 columns, from L3.
constexpr int64_t kKBlock = 1024;
// Columns per task: whole cache lines of weight rows for the packing to read.
constexpr int64_t kColumns = 4 * kPanel;

template <typename W>
struct Product {
  const W* w;
  const float* scale;
  float* y;
  const uint16_t* parts;
  int64_t M, K, N, rows_pad, k_pad;

  // Task t: columns [128 t, 128 t + 128), K block by K block, the sums in the task's buffer.
  void run(int64_t t) const {
    const int64_t n0 = t * kColumns, width = std::min(kColumns, N - n0);
    auto* panel = static_cast<uint16_t*>(task_buffer<0>(kKBlock * kColumns * 2));
    auto* sums = static_cast<float*>(task_buffer<1>(rows_pad * kColumns * 4));
    for (int64_t k0 = 0; k0 < k_pad; k0 += kKBlock) {
      const int64_t k1 = std::min(k_pad, k0 + kKBlock);
      pack(w, K, N, n0, width, kColumns, k0, k1, panel);
      for (int64_t m0 = 0; m0 < rows_pad; m0 += kRowBlock)
        for (int64_t j = 0; j * kPanel < width; ++j)
          block_product(parts, rows_pad, k_pad, k0 / kTileK, (k1 - k0) / kTileK, panel, kColumns,
                        j, k0 == 0, k1 == k_pad, sums, scale, y, M, N, n0 + j * kPanel, m0);
    }
  }
};

// Take tasks until none are left (tiles configured for this thread while it works); `done()`
// after each.
template <typename W, typename Done>
void work(std::atomic<int64_t>& next, int64_t tasks, const Product<W>& product, Done done) {
  configure();
  for (int64_t t; (t = next.fetch_add(1)) < tasks;) {
    product.run(t);
    done();
  }
  _tile_release();
}

}  // namespace amx
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
