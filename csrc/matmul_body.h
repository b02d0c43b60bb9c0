// The SIMD body of the weight-only matmul, included once per instruction set by cpu_matmul.cc
// inside a namespace that defines:
//   V, LANES, vzero(), vset1(float), vfma(a, b, acc), vadd(a, b), vmul(a, b),
//   vload(const float*), vstore(float*, V), wload(const int8_t*), wload(const uint16_t*)
//   (16-bit = bf16 bits), wload(const float*)
// No include guard: it is meant to be included several times.
#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 8
#endif
//
// Layout (row-major, as XLA hands buffers to a custom call):
//   x [M, K] fp32, w [K, N] int8, bf16 or fp32, scale [N] fp32 or null, y [M, N] fp32
//   y[m, n] = scale[n] * sum_k x[m, k] * float(w[k, n])
//
// One call computes a block of the product: weight rows [k0, k1) times columns [n0, n1), for
// every row of x (cpu_matmul.cc splits K and N over the thread pool and adds the blocks of a
// column range up). Decoding is memory-bound (every weight is read once per token), so the
// loop streams KB = 4 weight rows at a time, contiguously over the block's columns (hardware
// prefetchers follow 4 sequential streams), widens each weight vector to fp32 once and uses
// it for up to 4 rows of x held in registers; the partial sums live in y (the block of y stays
// in L1/L2).

// Rows r0..r0+MR of x against weight rows k..k+KB, columns [0, width) of the block (w and y
// already point at column n0; width is a multiple of LANES).
// `ahead`: weight rows to prefetch, this many rows down (0: none; the first row group only).
template <int MR, int KB, typename W>
inline void tile(const float* x, int64_t ldx, const W* w, int64_t ldw, float* y, int64_t ldy,
                 int64_t k, int64_t width, int64_t ahead) {
  V xs[MR][KB];
  for (int r = 0; r < MR; ++r)
    for (int kk = 0; kk < KB; ++kk) xs[r][kk] = vset1(x[r * ldx + k + kk]);
  const W* rows[KB];
  for (int kk = 0; kk < KB; ++kk) rows[kk] = w + (k + kk) * ldw;
  constexpr int64_t kLine = 64 / sizeof(W);  // weights per cache line
  for (int64_t j = 0; j < width; j += LANES) {
    if (ahead > 0 && j % kLine == 0)
      for (int kk = 0; kk < KB; ++kk) __builtin_prefetch(rows[kk] + ahead * ldw + j, 0, 3);
    V wv[KB];
    for (int kk = 0; kk < KB; ++kk) wv[kk] = wload(rows[kk] + j);
    for (int r = 0; r < MR; ++r) {
      float* out = y + r * ldy + j;
      V acc = vload(out);
      for (int kk = 0; kk < KB; ++kk) acc = vfma(xs[r][kk], wv[kk], acc);
      vstore(out, acc);
    }
  }
}

template <int KB, typename W>
inline void rows_block(const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N,
                       int64_t k, int64_t width) {
  // Prefetch 8 rows down while the rows stay inside the matrix (far enough for the memory's
  // latency, near enough to stay in L2).
  const int64_t ahead = (PREFETCH_ROWS > 0 && k + KB + PREFETCH_ROWS <= K) ? PREFETCH_ROWS : 0;
  int64_t m = 0;
  for (; m + 4 <= M; m += 4)
    tile<4, KB>(x + m * K, K, w, N, y + m * N, N, k, width, m == 0 ? ahead : 0);
  const int64_t first = m == 0 ? ahead : 0;
  switch (M - m) {
    case 3: tile<3, KB>(x + m * K, K, w, N, y + m * N, N, k, width, first); break;
    case 2: tile<2, KB>(x + m * K, K, w, N, y + m * N, N, k, width, first); break;
    case 1: tile<1, KB>(x + m * K, K, w, N, y + m * N, N, k, width, first); break;
    default: break;
  }
}

// y[m, n0:n1] = (scale[n] *) sum_{k0 <= k < k1} x[m, k] w[k, n]; y rows are N apart.
template <typename W>
void block(const float* x, const W* w, const float* scale, float* y, int64_t M, int64_t K,
           int64_t N, int64_t k0, int64_t k1, int64_t n0, int64_t n1) {
  const int64_t width = ((n1 - n0) / LANES) * LANES;
  if (width > 0) {
    for (int64_t m = 0; m < M; ++m) std::memset(y + m * N + n0, 0, width * sizeof(float));
    int64_t k = k0;
    for (; k + 4 <= k1; k += 4) rows_block<4>(x, w + n0, y + n0, M, K, N, k, width);
    for (; k < k1; ++k) rows_block<1>(x, w + n0, y + n0, M, K, N, k, width);
    if (scale != nullptr) {
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = n0; j < n0 + width; j += LANES)
          vstore(y + m * N + j, vmul(vload(y + m * N + j), vload(scale + j)));
    }
  }
  if (n0 + width < n1) generic::block(x, w, scale, y, M, K, N, k0, k1, n0 + width, n1);
}

// y[m, n0:n1] = (scale[n] *) (y + partial[0] + ... + partial[parts - 1])[m, n0:n1], the
// partials in order (the same sums whichever thread finished first); each partial is [M, N].
inline void add_up(float* y, const float* partial, int64_t parts, const float* scale,
                   int64_t M, int64_t N, int64_t n0, int64_t n1) {
  const int64_t width = ((n1 - n0) / LANES) * LANES;
  for (int64_t m = 0; m < M; ++m) {
    float* out = y + m * N;
    int64_t j = n0;
    for (; j < n0 + width; j += LANES) {
      V acc = vload(out + j);
      for (int64_t p = 0; p < parts; ++p) acc = vadd(acc, vload(partial + p * M * N + m * N + j));
      vstore(out + j, scale != nullptr ? vmul(acc, vload(scale + j)) : acc);
    }
    for (; j < n1; ++j) {
      float acc = out[j];
      for (int64_t p = 0; p < parts; ++p) acc += partial[p * M * N + m * N + j];
      out[j] = scale != nullptr ? acc * scale[j] : acc;
    }
  }
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
