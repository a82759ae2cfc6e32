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
//
// Sparse products (SHiRA's forward delta x @ S^T and grad_x = gy @ S) use the same tiles:
//   out[t, dst[k]] += v[k] * in[t, src[k]]   per thread token range: transpose the in tile,
// one TB-long axpy per entry into an (n_dst, TB) tile, transpose that tile back into out.
// Threads own disjoint token rows, so there is no reduction and any entry order works.
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

// dst[c * ld_d + r] = src[r * ld_s + c] for r < n_r, c < n_c. fp32 with AVX: 8x8 register
// blocks, the scalar loop for the edges. The scalar loop is kept scalar on purpose:
// vectorised, it becomes scatter stores, which are slower.
template <typename S>
__attribute__((optimize("no-tree-vectorize"))) void flip(const S* src, int64_t ld_s, int64_t n_r, int64_t n_c, S* dst,
                                                         int64_t ld_d) {
  for (int64_t c0 = 0; c0 < n_c; c0 += CB) {
    const int64_t c1 = std::min(n_c, c0 + CB);
    int64_t r = 0;
#if defined(__AVX__)
    if constexpr (std::is_same<S, float>::value) {
      if (c1 - c0 == CB)
        for (; r + 8 <= n_r; r += 8)
          for (int64_t c = c0; c < c1; c += 8) transpose8x8(src + r * ld_s + c, ld_s, dst + c * ld_d + r, ld_d);
    }
#endif
    for (; r < n_r; ++r)
      for (int64_t c = c0; c < c1; ++c) dst[c * ld_d + r] = src[r * ld_s + c];
  }
}

// TB tokens per tile (a multiple of 16).
template <typename S, int64_t TB>
struct Tile {

  // dst[c * TB + j] = src[j * ld + c] for j < tb, 0 for tb <= j < TB.
  static void transpose(const S* src, int64_t ld, int64_t n, int64_t tb, S* dst) {
    flip(src, ld, tb, n, dst, TB);
    for (int64_t c = 0; c < n; ++c) std::fill(dst + c * TB + tb, dst + (c + 1) * TB, S(0));
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

  // out[t, dst_idx[k]] += vals[k] * in[t, src_idx[k]] for t in [t0, t1); out rows start at 0
  static void spmm_range(const S* in, const int32_t* src_idx, const int32_t* dst_idx, const S* vals, int64_t nnz,
                         int64_t n_src, int64_t n_dst, int64_t t0, int64_t t1, S* out) {
    std::vector<S> it(n_src * TB), ot(n_dst * TB);
    for (int64_t ts = t0; ts < t1; ts += TB) {
      const int64_t tb = std::min(TB, t1 - ts);
      transpose(in + ts * n_src, n_src, n_src, tb, it.data());
      std::fill(ot.begin(), ot.end(), S(0));
      for (int64_t k = 0; k < nnz; ++k) {  // one TB-long axpy per entry, vectorised
        const S v = vals[k];
        const S* a = it.data() + src_idx[k] * TB;
        S* o = ot.data() + dst_idx[k] * TB;
#pragma omp simd
        for (int64_t j = 0; j < TB; ++j) o[j] += v * a[j];
      }
      flip(ot.data(), TB, n_dst, tb, out + ts * n_dst, n_dst);  // the tile back to token-major rows
    }
  }

  static void spmm(const S* in, const int32_t* src_idx, const int32_t* dst_idx, const S* vals, int64_t nnz,
                   int64_t T, int64_t n_src, int64_t n_dst, int64_t n_threads, S* out) {
    const int64_t n_tiles = (T + TB - 1) / TB;
    const int64_t p = std::max<int64_t>(1, std::min(n_threads, n_tiles));
    const int64_t span = (n_tiles + p - 1) / p * TB;  // tokens per thread: each writes its own rows
#pragma omp parallel for num_threads(p) schedule(static, 1)
    for (int64_t i = 0; i < p; ++i)
      spmm_range(in, src_idx, dst_idx, vals, nnz, n_src, n_dst, std::min(T, i * span), std::min(T, (i + 1) * span),
                 out);
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

// Calls fn(Tile<S, TB>{}) with tile rows of 1 KB when an (n_in, TB) tile (the one read or
// written at random) then stays <= ~1.25 MB, else 512 B, else 256 B.
template <typename S, typename Fn>
void with_tile(int64_t n_in, Fn&& fn) {
  if (n_in <= 1280)
    fn(Tile<S, 1024 / sizeof(S)>{});
  else if (n_in <= 2816)
    fn(Tile<S, 512 / sizeof(S)>{});
  else
    fn(Tile<S, 256 / sizeof(S)>{});
}

template <typename S>
void sddmm(const S* gy, const S* x, const int32_t* rows, const int32_t* cols, int64_t nnz, int64_t T,
           int64_t n_out, int64_t n_in, int64_t n_threads, S* out) {
  with_tile<S>(n_in, [&](auto tile) { decltype(tile)::run(gy, x, rows, cols, nnz, T, n_out, n_in, n_threads, out); });
}

// out (T, n_dst) = in (T, n_src) @ A^T for the sparse A (n_dst, n_src) with A[dst_idx[k], src_idx[k]] =
// vals[k]; n_wide: the layer's in-features (the tile side read or written at random).
template <typename S>
void spmm(const S* in, const int32_t* src_idx, const int32_t* dst_idx, const S* vals, int64_t nnz, int64_t T,
          int64_t n_src, int64_t n_dst, int64_t n_wide, int64_t n_threads, S* out) {
  with_tile<S>(n_wide, [&](auto tile) {
    decltype(tile)::spmm(in, src_idx, dst_idx, vals, nnz, T, n_src, n_dst, n_threads, out);
  });
}

// At SHiRA's entries of a row-major (n_out, n_in) weight w, k < nnz, i_k = rows[k] * n_in + cols[k]:
//   mode 0 merge    saved[k] = w[i_k];  w[i_k] = saved[k] + scale * v[k]
//   mode 1 rewrite  w[i_k] = saved[k] + scale * v[k]       (saved: W0's entries from a merge)
//   mode 2 restore  w[i_k] = saved[k]                      (bit-exact)
// Entries are distinct, so threads split k freely. No fused multiply-add: the product is
// rounded, then the sum, as torch's merge does, so both paths write the same bits.
template <typename S>
__attribute__((optimize("fp-contract=off"))) void scatter(S* w, const int32_t* rows, const int32_t* cols, int64_t n_in, int64_t nnz, const S* v, S scale,
             S* saved, int64_t mode, int64_t n_threads) {
#pragma omp parallel for num_threads(std::max<int64_t>(1, n_threads)) schedule(static)
  for (int64_t k = 0; k < nnz; ++k) {
    const int64_t at = int64_t(rows[k]) * n_in + cols[k];
    if (mode == 0) saved[k] = w[at];
    w[at] = mode == 2 ? saved[k] : saved[k] + scale * v[k];
  }
}

}  // namespace

extern "C" {
void shira_scatter_f32(float* w, const int32_t* rows, const int32_t* cols, int64_t n_in, int64_t nnz,
                       const float* v, double scale, float* saved, int64_t mode, int64_t n_threads) {
  scatter<float>(w, rows, cols, n_in, nnz, v, float(scale), saved, mode, n_threads);
}
void shira_scatter_f64(double* w, const int32_t* rows, const int32_t* cols, int64_t n_in, int64_t nnz,
                       const double* v, double scale, double* saved, int64_t mode, int64_t n_threads) {
  scatter<double>(w, rows, cols, n_in, nnz, v, scale, saved, mode, n_threads);
}
void shira_spmm_f32(const float* in, const int32_t* src_idx, const int32_t* dst_idx, const float* vals, int64_t nnz,
                    int64_t T, int64_t n_src, int64_t n_dst, int64_t n_wide, int64_t n_threads, float* out) {
  spmm<float>(in, src_idx, dst_idx, vals, nnz, T, n_src, n_dst, n_wide, n_threads, out);
}
void shira_spmm_f64(const double* in, const int32_t* src_idx, const int32_t* dst_idx, const double* vals,
                    int64_t nnz, int64_t T, int64_t n_src, int64_t n_dst, int64_t n_wide, int64_t n_threads,
                    double* out) {
  spmm<double>(in, src_idx, dst_idx, vals, nnz, T, n_src, n_dst, n_wide, n_threads, out);
}
void shira_sddmm_f32(const float* gy, const float* x, const int32_t* rows, const int32_t* cols, int64_t nnz,
                     int64_t T, int64_t n_out, int64_t n_in, int64_t n_threads, float* out) {
  sddmm<float>(gy, x, rows, cols, nnz, T, n_out, n_in, n_threads, out);
}
void shira_sddmm_f64(const double* gy, const double* x, const int32_t* rows, const int32_t* cols, int64_t nnz,
                     int64_t T, int64_t n_out, int64_t n_in, int64_t n_threads, double* out) {
  sddmm<double>(gy, x, rows, cols, nnz, T, n_out, n_in, n_threads, out);
}
}
