// Native CPU kernels for SHiRA's sparse math (built and loaded by cpu_sddmm.py through ctypes).
//
// A pattern S (n_rows, n_cols) is given in CSR form: crow (n_rows+1) int32, col (nnz) int16
// or int32, entries in row-major order; values and results (nnz,) are in that order. No
// per-entry row array is needed anywhere (the layer stores only crow and col: 2 bytes per
// entry when n_cols < 2^15, else 4).
//
//   sddmm    out[k] = sum_t gy[t, r(k)] * x[t, col[k]]             gy: (T, n_rows), x: (T, n_cols)
//   spmm     out[t, r] (+)= scale * sum_{k in row r} v[k] * in[t, col[k]]   x @ S^T (forward)
//            out[t, c] (+)= scale * sum_{k: col[k] = c} v[k] * in[t, r(k)]    gy @ S  (grad_x), "transposed"
//            (+= with "accumulate": the forward adds the delta straight into the base layer's output)
//   scatter  w[r(k), col[k]] = w0_k + scale * v[k]  /  = w0_k       merge, rewrite, restore
//
// Tiles: tokens are taken TB at a time and the token-major inputs transposed (8x8 AVX
// register blocks for fp32) into buffers with one TB-long row per feature
//   gyt / it: (n_rows, TB)   xt / it: (n_cols, TB)      (zero-padded past the last token)
// so every entry costs one contiguous, vectorised TB-long dot product (sddmm), multiply-add into
// register-held sums (forward spmm) or axpy (transposed spmm);
// no (n_rows, n_cols) tensor and no full transposed copy is ever made. The tile buffers are
// per-thread scratch kept between calls of fewer than kFreeScratchFrom tokens (a fresh allocation
// of this size page-faults on every call, a large share of a small inference call), freed after
// larger, training-sized ones. Rows of S are walked
// in order, so the (n_rows, TB) side is streamed and only the (n_cols, TB) side is read at
// random: TB is chosen to keep that within about 1 MB of L2.
//
// Threads (the process's OpenMP pool, which torch's kernels use too: separate threads would
// compete with its workers, which spin for a while after each matmul):
//   - at least as many token tiles as threads: each thread takes a contiguous token range
//     with its own buffers (sddmm adds the per-thread partial sums at the end);
//   - fewer (small batches, e.g. inference): the threads share one tile, transpose it
//     together (by feature blocks), then each takes a range of S's rows holding about
//     nnz/threads entries. Used for sddmm and the forward spmm, whose outputs are per row;
//     the transposed spmm writes at random columns and keeps the token split.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t CB = 16;  // columns per transpose block

// Bytes per SIMD register of the build's target (GCC vector types use it).
#if defined(__AVX512F__)
constexpr int64_t kVecBytes = 64;
#elif defined(__AVX__)
constexpr int64_t kVecBytes = 32;
#else
constexpr int64_t kVecBytes = 16;
#endif
template <typename S>
struct Vec;  // Vec<S>::type: one SIMD register of S (GCC vector type), loads need only S's alignment
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(kVecBytes), aligned(4)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(kVecBytes), aligned(8)));
};

#if defined(__AVX__)
// dst[c * ld_d + j] (+)= src[j * ld_s + c] for c, j < 8: the usual 8x8 in-register transpose
// (unpack pairs of rows, shuffle pairs of pairs, swap 128-bit halves).
template <bool Add = false>
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
    __m256 lo = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20), hi = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    if constexpr (Add) {
      lo = _mm256_add_ps(lo, _mm256_loadu_ps(dst + i * ld_d));
      hi = _mm256_add_ps(hi, _mm256_loadu_ps(dst + (i + 4) * ld_d));
    }
    _mm256_storeu_ps(dst + i * ld_d, lo);
    _mm256_storeu_ps(dst + (i + 4) * ld_d, hi);
  }
}
#endif

// dst[c * ld_d + r] (+)= src[r * ld_s + c] for r < n_r, c < n_c. fp32 with AVX: 8x8 register
// blocks, the scalar loop for the edges. The scalar loop is kept scalar on purpose:
// vectorised, it becomes scatter stores, which are slower.
template <typename S, bool Add = false>
__attribute__((optimize("no-tree-vectorize"))) void flip(const S* src, int64_t ld_s, int64_t n_r, int64_t n_c, S* dst,
                                                         int64_t ld_d) {
  for (int64_t c0 = 0; c0 < n_c; c0 += CB) {
    const int64_t c1 = std::min(n_c, c0 + CB);
    int64_t r = 0;
#if defined(__AVX__)
    if constexpr (std::is_same<S, float>::value) {
      if (c1 - c0 == CB)
        for (; r + 8 <= n_r; r += 8)
          for (int64_t c = c0; c < c1; c += 8) transpose8x8<Add>(src + r * ld_s + c, ld_s, dst + c * ld_d + r, ld_d);
    }
#endif
    for (; r < n_r; ++r)
      for (int64_t c = c0; c < c1; ++c) dst[c * ld_d + r] = (Add ? dst[c * ld_d + r] : S(0)) + src[r * ld_s + c];
  }
}

// The first row r with crow[r] >= target (n_rows if none): splits rows by entry count.
inline int64_t row_at(const int32_t* crow, int64_t n_rows, int64_t target) {
  return std::lower_bound(crow, crow + n_rows + 1, target) - crow;
}

// Rows [lo, hi) of thread i of nt, about nnz/nt entries each; together they cover [0, n_rows).
inline void row_share(const int32_t* crow, int64_t n_rows, int64_t i, int64_t nt, int64_t* lo, int64_t* hi) {
  const int64_t nnz = crow[n_rows];
  *lo = i == 0 ? 0 : std::min(n_rows, row_at(crow, n_rows, nnz * i / nt));
  *hi = i + 1 == nt ? n_rows : std::min(n_rows, row_at(crow, n_rows, nnz * (i + 1) / nt));
  *hi = std::max(*lo, *hi);
}

// Calls of at least this many tokens (training-sized) free their threads' scratch when they end;
// smaller ones (inference) keep it for the next call. Kept scratch (up to kTileBudget per thread)
// sat in every rank's memory between calls, through the step's peak: freeing it lowered a
// 2-rank FSDP2 run's peak RSS by 1 MB per rank; allocating it again costs each call about
// 0.1-0.2 ms of page faults, which is what made small calls slower (see scratch()).
constexpr int64_t kFreeScratchFrom = 512;

template <typename S>
std::vector<S>* scratch_buffers() {
  static thread_local std::vector<S> buffers[2];
  return buffers;
}

// Frees the calling thread's scratch when a call of T tokens is training-sized.
template <typename S>
void release_scratch(int64_t T) {
  if (T < kFreeScratchFrom) return;
  for (int slot = 0; slot < 2; ++slot) {
    scratch_buffers<S>()[slot].clear();
    scratch_buffers<S>()[slot].shrink_to_fit();
  }
}

// The calling thread's scratch buffer number `slot`: at least n elements (contents undefined),
// starting on a 64-byte cache line, kept for the thread's next call (unless release_scratch
// frees it). The alignment matters: with malloc's 16-byte alignment a 64-byte slice of a tile
// can straddle two cache lines, doubling the lines each vector load touches.
template <typename S>
S* scratch(int slot, int64_t n) {
  constexpr int64_t pad = 64 / sizeof(S);
  std::vector<S>& b = scratch_buffers<S>()[slot];
  if (b.size() < size_t(n + pad)) {
    b.clear();
    b.shrink_to_fit();  // no copy of the old contents
    b.resize(n + pad);
  }
  const uintptr_t p = reinterpret_cast<uintptr_t>(b.data());
  return reinterpret_cast<S*>((p + 63) & ~uintptr_t(63));
}

// Writes a (n, TB) tile back as tokens [0, tb) of token-major rows (row stride ld), adding to
// what is there when accumulating.
template <typename S, int64_t TB>
void tile_out(const S* src, int64_t n, int64_t tb, S* dst, int64_t ld, bool accumulate) {
  if (accumulate)
    flip<S, true>(src, TB, n, tb, dst, ld);
  else
    flip<S, false>(src, TB, n, tb, dst, ld);
}

// TB tokens per tile (a multiple of 16); I: the column index type (int16 or int32).
template <typename S, typename I, int64_t TB>
struct Tile {
  // dst[c * TB + j] = src[j * ld + c] for j < tb, 0 for tb <= j < TB; c < n.
  static void transpose(const S* src, int64_t ld, int64_t n, int64_t tb, S* dst) {
    flip(src, ld, tb, n, dst, TB);
    for (int64_t c = 0; c < n; ++c) std::fill(dst + c * TB + tb, dst + (c + 1) * TB, S(0));
  }

  // Columns [0, n) of a tile of tb tokens (row stride ld) into dst (n, TB), the feature
  // blocks shared among the threads of the enclosing parallel region (ends with a barrier).
  static void transpose_shared(const S* src, int64_t ld, int64_t n, int64_t tb, S* dst) {
    const int64_t n_blocks = (n + CB - 1) / CB;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t c0 = b * CB, c1 = std::min(n, c0 + CB);
      transpose(src + c0, ld, c1 - c0, tb, dst + c0 * TB);
    }
  }

  // acc[k] += gyt[r] . xt[col[k]] for the entries k of rows [r0, r1)
  static void dots(const S* gyt, const S* xt, const int32_t* crow, const I* col, int64_t r0, int64_t r1,
                   S* acc) {
    for (int64_t r = r0; r < r1; ++r) {
      const S* a = gyt + r * TB;
      int64_t k = crow[r];
      const int64_t end = crow[r + 1];
      for (; k + 4 <= end; k += 4) {  // four independent dot products keep the FMA units busy
        const S *b0 = xt + int64_t(col[k]) * TB, *b1 = xt + int64_t(col[k + 1]) * TB;
        const S *b2 = xt + int64_t(col[k + 2]) * TB, *b3 = xt + int64_t(col[k + 3]) * TB;
        S s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t j = 0; j < TB; ++j) {
          s0 += a[j] * b0[j];
          s1 += a[j] * b1[j];
          s2 += a[j] * b2[j];
          s3 += a[j] * b3[j];
        }
        acc[k] += s0;
        acc[k + 1] += s1;
        acc[k + 2] += s2;
        acc[k + 3] += s3;
      }
      for (; k < end; ++k) {
        const S* b = xt + int64_t(col[k]) * TB;
        S s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < TB; ++j) s += a[j] * b[j];
        acc[k] += s;
      }
    }
  }

  // ot[r] = scale * sum_{k in row r} v[k] * it[col[k]] for rows [r0, r1).
  static void gather_rows(const S* it, const int32_t* crow, const I* col, const S* v, S scale, int64_t r0,
                          int64_t r1, S* ot) {
#if defined(__AVX512F__)
    if constexpr (std::is_same<S, float>::value) {
      // Each row's sums stay in NA registers of 16 floats (up to 128 tokens) while its entries
      // stream past: one load and one FMA per 16 products and one store per row, where an axpy
      // per entry would load and store the row's outputs for every entry.
      constexpr int NA = int(std::min<int64_t>(TB, 128) / 16);
      const __m512 sc = _mm512_set1_ps(scale);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t k0 = crow[r], k1 = crow[r + 1];
        for (int64_t j0 = 0; j0 < TB; j0 += NA * 16) {
          __m512 acc[NA];
#pragma GCC unroll 8
          for (int u = 0; u < NA; ++u) acc[u] = _mm512_setzero_ps();
          for (int64_t k = k0; k < k1; ++k) {
            const float* a = it + int64_t(col[k]) * TB + j0;
            const __m512 vk = _mm512_set1_ps(v[k]);
#pragma GCC unroll 8
            for (int u = 0; u < NA; ++u) acc[u] = _mm512_fmadd_ps(vk, _mm512_loadu_ps(a + 16 * u), acc[u]);
          }
#pragma GCC unroll 8
          for (int u = 0; u < NA; ++u) _mm512_storeu_ps(ot + r * TB + j0 + 16 * u, _mm512_mul_ps(sc, acc[u]));
        }
      }
      return;
    }
#endif
    // Elsewhere (AVX2, or fp64): the same scheme in GCC vector types of the widest SIMD the
    // build targets, NA = 8 accumulators (8 independent FMA chains) covering CH tokens per pass.
    using V = typename Vec<S>::type;
    constexpr int64_t W = kVecBytes / sizeof(S);
    constexpr int NA = int(std::min<int64_t>(8, TB / W));
    constexpr int64_t CH = NA * W;
    static_assert(TB % CH == 0, "token tiles are whole passes of the accumulators");
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t k0 = crow[r], k1 = crow[r + 1];
      for (int64_t j0 = 0; j0 < TB; j0 += CH) {
        V acc[NA] = {};
        for (int64_t k = k0; k < k1; ++k) {
          const V* a = reinterpret_cast<const V*>(it + int64_t(col[k]) * TB + j0);
          const S vk = v[k];
#pragma GCC unroll 8
          for (int u = 0; u < NA; ++u) acc[u] += vk * a[u];
        }
        V* o = reinterpret_cast<V*>(ot + r * TB + j0);
#pragma GCC unroll 8
        for (int u = 0; u < NA; ++u) o[u] = scale * acc[u];
      }
    }
  }

  // ot[col[k]] += scale * v[k] * it[r] for the entries k of rows [r0, r1) (S^T's product from S's rows)
  static void scatter_rows(const S* it, const int32_t* crow, const I* col, const S* v, S scale, int64_t r0,
                           int64_t r1, S* ot) {
    for (int64_t r = r0; r < r1; ++r) {
      const S* a = it + r * TB;
      for (int64_t k = crow[r]; k < crow[r + 1]; ++k) {
        S* o = ot + int64_t(col[k]) * TB;
        const S vk = scale * v[k];
#pragma omp simd
        for (int64_t j = 0; j < TB; ++j) o[j] += vk * a[j];
      }
    }
  }

  // Tokens [t0, t1) of the product (of T), one thread: in (T, n_in) -> out (T, n_out).
  static void spmm_range(const S* in, const int32_t* crow, const I* col, const S* v, S scale, int64_t n_rows,
                         bool transposed, int64_t n_in, int64_t n_out, int64_t t0, int64_t t1, int64_t T,
                         bool accumulate, S* out) {
    S* it = scratch<S>(0, n_in * TB);
    S* ot = scratch<S>(1, n_out * TB);
    for (int64_t ts = t0; ts < t1; ts += TB) {
      const int64_t tb = std::min(TB, t1 - ts);
      transpose(in + ts * n_in, n_in, n_in, tb, it);
      if (transposed) {
        std::fill(ot, ot + n_out * TB, S(0));
        scatter_rows(it, crow, col, v, scale, 0, n_rows, ot);
      } else {
        gather_rows(it, crow, col, v, scale, 0, n_rows, ot);
      }
      tile_out<S, TB>(ot, n_out, tb, out + ts * n_out, n_out, accumulate);  // back to token-major rows
    }
    release_scratch<S>(T);
  }

  // Runs per_tile(ts, tb, lo, hi) for every tile of T tokens on p threads that share the tile:
  // each thread owns S's rows [lo, hi) (about nnz/p entries); a barrier ends each tile.
  template <typename Fn>
  static void shared_tiles(const int32_t* crow, int64_t n_rows, int64_t T, int64_t p, Fn&& per_tile) {
#pragma omp parallel num_threads(p)
    {
      int64_t lo, hi;
      row_share(crow, n_rows, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
      for (int64_t ts = 0; ts < T; ts += TB) {
        per_tile(ts, std::min(TB, T - ts), lo, hi);
#pragma omp barrier
      }
    }
  }

  // The forward product with the threads sharing each tile, split by rows of S.
  static void gather_shared(const S* in, const int32_t* crow, const I* col, const S* v, S scale, int64_t n_rows,
                            int64_t n_cols, int64_t T, int64_t p, bool accumulate, S* out) {
    S* it = scratch<S>(0, n_cols * TB);  // the calling thread's buffers, shared by the team
    S* ot = scratch<S>(1, n_rows * TB);
    shared_tiles(crow, n_rows, T, p, [&](int64_t ts, int64_t tb, int64_t lo, int64_t hi) {
      transpose_shared(in + ts * n_cols, n_cols, n_cols, tb, it);
      gather_rows(it, crow, col, v, scale, lo, hi, ot);
      tile_out<S, TB>(ot + lo * TB, hi - lo, tb, out + ts * n_rows + lo, n_rows, accumulate);
    });
    release_scratch<S>(T);
  }

  static void spmm(const S* in, const int32_t* crow, const I* col, const S* v, S scale, int64_t n_rows,
                   int64_t n_cols, bool transposed, int64_t T, int64_t n_threads, bool accumulate, S* out) {
    const int64_t n_tiles = (T + TB - 1) / TB;
    if (!transposed && n_tiles >= 1 && n_tiles < n_threads) {
      gather_shared(in, crow, col, v, scale, n_rows, n_cols, T, n_threads, accumulate, out);
      return;
    }
    const int64_t n_in = transposed ? n_rows : n_cols, n_out = transposed ? n_cols : n_rows;
    const int64_t p = std::max<int64_t>(1, std::min(n_threads, n_tiles));
    const int64_t span = (n_tiles + p - 1) / p * TB;  // tokens per thread: each writes its own rows
#pragma omp parallel for num_threads(p) schedule(static, 1)
    for (int64_t i = 0; i < p; ++i)
      spmm_range(in, crow, col, v, scale, n_rows, transposed, n_in, n_out, std::min(T, i * span),
                 std::min(T, (i + 1) * span), T, accumulate, out);
  }

  // acc (nnz,) = the sum over tokens [t0, t1) (of T), one thread
  static void sddmm_range(const S* gy, const S* x, const int32_t* crow, const I* col, int64_t n_rows,
                          int64_t n_cols, int64_t t0, int64_t t1, int64_t T, S* acc) {
    S* gyt = scratch<S>(0, n_rows * TB);
    S* xt = scratch<S>(1, n_cols * TB);
    std::fill(acc, acc + crow[n_rows], S(0));
    for (int64_t ts = t0; ts < t1; ts += TB) {
      const int64_t tb = std::min(TB, t1 - ts);
      transpose(gy + ts * n_rows, n_rows, n_rows, tb, gyt);
      transpose(x + ts * n_cols, n_cols, n_cols, tb, xt);
      dots(gyt, xt, crow, col, 0, n_rows, acc);
    }
    release_scratch<S>(T);
  }

  // The SDDMM with the threads sharing each tile, each summing the entries of its rows of S.
  static void sddmm_shared(const S* gy, const S* x, const int32_t* crow, const I* col, int64_t n_rows,
                           int64_t n_cols, int64_t T, int64_t p, S* out) {
    S* gyt = scratch<S>(0, n_rows * TB);  // the calling thread's buffers, shared by the team
    S* xt = scratch<S>(1, n_cols * TB);
    std::fill(out, out + crow[n_rows], S(0));
    shared_tiles(crow, n_rows, T, p, [&](int64_t ts, int64_t tb, int64_t lo, int64_t hi) {
      transpose_shared(gy + ts * n_rows, n_rows, n_rows, tb, gyt);
      transpose_shared(x + ts * n_cols, n_cols, n_cols, tb, xt);
      dots(gyt, xt, crow, col, lo, hi, out);
    });
    release_scratch<S>(T);
  }

  static void sddmm(const S* gy, const S* x, const int32_t* crow, const I* col, int64_t n_rows,
                    int64_t n_cols, int64_t T, int64_t n_threads, S* out) {
    const int64_t n_tiles = (T + TB - 1) / TB;
    if (n_tiles >= 1 && n_tiles < n_threads) {
      sddmm_shared(gy, x, crow, col, n_rows, n_cols, T, n_threads, out);
      return;
    }
    // Each thread gets a whole number of tiles; no more threads than tiles.
    const int64_t nnz = crow[n_rows];
    const int64_t p = std::max<int64_t>(1, std::min(n_threads, n_tiles));
    const int64_t span = (n_tiles + p - 1) / p * TB;  // tokens per thread
    std::vector<S> partial((p - 1) * nnz);
#pragma omp parallel for num_threads(p) schedule(static, 1)
    for (int64_t i = 0; i < p; ++i)
      sddmm_range(gy, x, crow, col, n_rows, n_cols, std::min(T, i * span), std::min(T, (i + 1) * span), T,
                  i == 0 ? out : partial.data() + (i - 1) * nnz);
    for (int64_t i = 1; i < p; ++i)
      for (int64_t k = 0; k < nnz; ++k) out[k] += partial[(i - 1) * nnz + k];
  }
};

// Calls fn(Tile<S, I, TB>{}) with tile rows of 1 KB, 512 B, 256 B or 128 B: the longest that keeps
//   - the (n_cols, TB) tile (read or written at random) within about 1.25 MB of L2,
//   - both tiles of a call, (n_rows + n_cols) x TB, within `budget` bytes (each thread keeps its
//     scratch between calls, so this also bounds what the kernels hold): kTileBudget, half of it
//     for the forward product, whose streamed output tile would otherwise push the input tile out
//     of a 512 KB L2 (short rows let a wide layer's (n_cols, TB) tile fit),
//   - TB no longer than the batch needs (the loops always run TB tokens).
constexpr int64_t kTileBudget = int64_t(1) << 19;

template <typename S, typename I, typename Fn>
void with_tile(int64_t n_rows, int64_t n_cols, int64_t T, int64_t budget, Fn&& fn) {
  constexpr int64_t row_bytes[4] = {1024, 512, 256, 128};
  int level = n_cols <= 1280 ? 0 : n_cols <= 2816 ? 1 : 2;
  while (level < 3 && (T * int64_t(sizeof(S)) <= row_bytes[level + 1] ||
                       (n_rows + n_cols) * row_bytes[level] > budget))
    ++level;
  if (level == 0)
    fn(Tile<S, I, 1024 / sizeof(S)>{});
  else if (level == 1)
    fn(Tile<S, I, 512 / sizeof(S)>{});
  else if (level == 2)
    fn(Tile<S, I, 256 / sizeof(S)>{});
  else
    fn(Tile<S, I, 128 / sizeof(S)>{});
}

// At SHiRA's entries of a row-major (n_rows, n_cols) weight w, k < nnz in row-major order:
//   mode 0 merge    saved[k] = w[r, col[k]];  w[r, col[k]] = saved[k] + scale * v[k]
//   mode 1 rewrite  w[r, col[k]] = saved[k] + scale * v[k]       (saved: W0's entries from a merge)
//   mode 2 restore  w[r, col[k]] = saved[k]                      (bit-exact)
// Entries are distinct, so threads split rows freely. No fused multiply-add: the product is
// rounded, then the sum, as torch's merge does, so both paths write the same bits.
template <typename S, typename I>
__attribute__((optimize("fp-contract=off"))) void scatter(S* w, const int32_t* crow, const I* col,
                                                          int64_t n_rows, int64_t n_cols, const S* v, S scale,
                                                          S* saved, int64_t mode, int64_t n_threads) {
#pragma omp parallel for num_threads(std::max<int64_t>(1, n_threads)) schedule(static)
  for (int64_t r = 0; r < n_rows; ++r) {
    S* wr = w + r * n_cols;
    for (int64_t k = crow[r]; k < crow[r + 1]; ++k) {
      if (mode == 0) saved[k] = wr[col[k]];
      wr[col[k]] = mode == 2 ? saved[k] : saved[k] + scale * v[k];
    }
  }
}

}  // namespace

// Exported as shira_<kernel>_<f32|f64>_<i16|i32>: value type, column index type.
extern "C" {
#define SHIRA_EXPORT(S, I, SUFFIX)                                                                                 \
  void shira_sddmm_##SUFFIX(const S* gy, const S* x, const int32_t* crow, const I* col, int64_t n_rows,            \
                            int64_t n_cols, int64_t T, int64_t n_threads, S* out) {                              \
    with_tile<S, I>(n_rows, n_cols, T, kTileBudget, [&](auto tile) {                                               \
      decltype(tile)::sddmm(gy, x, crow, col, n_rows, n_cols, T, n_threads, out);                                 \
    });                                                                                                            \
  }                                                                                                                \
  void shira_spmm_##SUFFIX(const S* in, const int32_t* crow, const I* col, const S* v, double scale,             \
                           int64_t n_rows, int64_t n_cols, int64_t transposed, int64_t T, int64_t n_threads,      \
                           int64_t accumulate, S* out) {                                                          \
    with_tile<S, I>(n_rows, n_cols, T, transposed ? kTileBudget : kTileBudget / 2, [&](auto tile) {               \
      decltype(tile)::spmm(in, crow, col, v, S(scale), n_rows, n_cols, transposed != 0, T, n_threads,             \
                           accumulate != 0, out);                                                                 \
    });                                                                                                            \
  }                                                                                                                \
  void shira_scatter_##SUFFIX(S* w, const int32_t* crow, const I* col, int64_t n_rows, int64_t n_cols,            \
                              const S* v, double scale, S* saved, int64_t mode, int64_t n_threads) {             \
    scatter<S, I>(w, crow, col, n_rows, n_cols, v, S(scale), saved, mode, n_threads);                             \
  }
SHIRA_EXPORT(float, int32_t, f32_i32)
SHIRA_EXPORT(double, int32_t, f64_i32)
SHIRA_EXPORT(float, int16_t, f32_i16)
SHIRA_EXPORT(double, int16_t, f64_i16)
#undef SHIRA_EXPORT
}
