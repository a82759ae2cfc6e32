// CPU SDDMM for SHiRA's values gradient (built and loaded by cpu_sddmm.py through ctypes).
//
//   out[k] = sum_t gy[t, rows[k]] * x[t, cols[k]]      gy: (T, n_out), x: (T, n_in) row-major
//
// Tokens are split into one contiguous range per OpenMP thread (the process's OpenMP pool,
// which torch's kernels use too: separate threads would compete with its spinning workers,
// measured up to 2x slower right after a matmul). Each thread walks its range in tiles of TB
// tokens, transposes the gy and x tiles (8x8 AVX register blocks for fp32) into buffers
//   gyt: (n_out, TB)   xt: (n_in, TB)      (rows zero-padded past the last token)
// and adds, for every entry k, the TB-long dot product gyt[rows[k]] . xt[cols[k]]
// (contiguous, vectorised, four entries at a time) to its own partial sum; the partials are
// added at the end. No (n_out, n_in) tensor and no full transposed copy is ever made.
// Entries may come in any order; in row-major order gyt is read row after row (streamed) and
// only xt is read at random, so TB is chosen to keep xt within about 1 MB of L2.
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t CB = 16;  // columns per transpose block

#if defined(__AVX__)
// dst[c * ld_d + j] = src[j * ld_s + c] for c, j < 8: the usual 8x8 in-register transpose
// (unpack pairs of rows, shuffle pairs of pairs, swap 128-bit halves).
inline void transpose8x8(const float* src, int64_t ld_s, float* dst, int64_t ld_d) {
  __m256 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_s);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ld_d, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ld_d, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
  }
}
#endif

// TB tokens per tile (a multiple of 16).
template <typename S, int64_t TB>
struct Tile {

  // dst[c * TB + j] = src[j * ld + c] for j < tb, 0 for tb <= j < TB. fp32 with AVX: 8x8
  // register blocks, the scalar loop for the edges. The scalar loop is kept scalar on
  // purpose: vectorised, it becomes scatter stores, which are slower.
  __attribute__((optimize("no-tree-vectorize"))) static void transpose(const S* src, int64_t ld, int64_t n,
                                                                        int64_t tb, S* dst) {
    for (int64_t c0 = 0; c0 < n; c0 += CB) {
      const int64_t c1 = std::min(n, c0 + CB);
      int64_t j = 0;
#if defined(__AVX__)
      if constexpr (std::is_same<S, float>::value) {
        if (c1 - c0 == CB)
          for (; j + 8 <= tb; j += 8)
            for (int64_t c = c0; c < c1; c += 8) transpose8x8(src + j * ld + c, ld, dst + c * TB + j, TB);
      }
#endif
      for (; j < tb; ++j)
        for (int64_t c = c0; c < c1; ++c) dst[c * TB + j] = src[j * ld + c];
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t jj = tb; jj < TB; ++jj) dst[c * TB + jj] = S(0);
    }
  }

  // acc[k] += gyt[rows[k]] . xt[cols[k]] for k in [0, nnz)
  static void dots(const S* gyt, const S* xt, const int32_t* rows, const int32_t* cols, int64_t nnz, S* acc) {
    int64_t k = 0;
    for (; k + 4 <= nnz; k += 4) {  // four independent dot products keep the FMA units busy
      const S *a0 = gyt + rows[k] * TB, *a1 = gyt + rows[k + 1] * TB;
      const S *a2 = gyt + rows[k + 2] * TB, *a3 = gyt + rows[k + 3] * TB;
      const S *b0 = xt + cols[k] * TB, *b1 = xt + cols[k + 1] * TB;
      const S *b2 = xt + cols[k + 2] * TB, *b3 = xt + cols[k + 3] * TB;
      S s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t j = 0; j < TB; ++j) {
        s0 += a0[j] * b0[j];
        s1 += a1[j] * b1[j];
        s2 += a2[j] * b2[j];
        s3 += a3[j] * b3[j];
      }
      acc[k] += s0;
      acc[k + 1] += s1;
      acc[k + 2] += s2;
      acc[k + 3] += s3;
    }
    for (; k < nnz; ++k) {
      const S *a = gyt + rows[k] * TB, *b = xt + cols[k] * TB;
      S s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < TB; ++j) s += a[j] * b[j];
      acc[k] += s;
    }
  }

  // acc (nnz,) = the sum over tokens [t0, t1)
  static void range(const S* gy, const S* x, const int32_t* rows, const int32_t* cols, int64_t nnz,
                    int64_t n_out, int64_t n_in, int64_t t0, int64_t t1, S* acc) {
    std::vector<S> gyt(n_out * TB), xt(n_in * TB);
    std::fill(acc, acc + nnz, S(0));
    for (int64_t ts = t0; ts < t1; ts += TB) {
      const int64_t tb = std::min(TB, t1 - ts);
      transpose(gy + ts * n_out, n_out, n_out, tb, gyt.data());
      transpose(x + ts * n_in, n_in, n_in, tb, xt.data());
      dots(gyt.data(), xt.data(), rows, cols, nnz, acc);
    }
  }

  static void run(const S* gy, const S* x, const int32_t* rows, const int32_t* cols, int64_t nnz, int64_t T,
                    int64_t n_out, int64_t n_in, int64_t n_threads, S* out) {
    // Each thread gets a whole number of tiles; no more threads than tiles.
    const int64_t n_tiles = (T + TB - 1) / TB;
    const int64_t p = std::max<int64_t>(1, std::min(n_threads, n_tiles));
    const int64_t span = (n_tiles + p - 1) / p * TB;  // tokens per thread
    std::vector<S> partial((p - 1) * nnz);
#pragma omp parallel for num_threads(p) schedule(static, 1)
    for (int64_t i = 0; i < p; ++i)
      range(gy, x, rows, cols, nnz, n_out, n_in, std::min(T, i * span), std::min(T, (i + 1) * span),
            i == 0 ? out : partial.data() + (i - 1) * nnz);
    for (int64_t i = 1; i < p; ++i)
      for (int64_t k = 0; k < nnz; ++k) out[k] += partial[(i - 1) * nnz + k];
  }
};

// Tile rows of 1 KB when xt (n_in rows) then stays <= ~1.25 MB, else 512 B, else 256 B.
template <typename S>
void sddmm(const S* gy, const S* x, const int32_t* rows, const int32_t* cols, int64_t nnz, int64_t T,
           int64_t n_out, int64_t n_in, int64_t n_threads, S* out) {
  const int64_t row_bytes = n_in <= 1280 ? 1024 : n_in <= 2816 ? 512 : 256;
  if (row_bytes == 1024)
    Tile<S, 1024 / sizeof(S)>::run(gy, x, rows, cols, nnz, T, n_out, n_in, n_threads, out);
  else if (row_bytes == 512)
    Tile<S, 512 / sizeof(S)>::run(gy, x, rows, cols, nnz, T, n_out, n_in, n_threads, out);
  else
    Tile<S, 256 / sizeof(S)>::run(gy, x, rows, cols, nnz, T, n_out, n_in, n_threads, out);
}

}  // namespace

extern "C" {
void shira_sddmm_f32(const float* gy, const float* x, const int32_t* rows, const int32_t* cols, int64_t nnz,
                     int64_t T, int64_t n_out, int64_t n_in, int64_t n_threads, float* out) {
  sddmm<float>(gy, x, rows, cols, nnz, T, n_out, n_in, n_threads, out);
}
void shira_sddmm_f64(const double* gy, const double* x, const int32_t* rows, const int32_t* cols, int64_t nnz,
                     int64_t T, int64_t n_out, int64_t n_in, int64_t n_threads, double* out) {
  sddmm<double>(gy, x, rows, cols, nnz, T, n_out, n_in, n_threads, out);
}
}
