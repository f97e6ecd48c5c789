/* fp32 matmul against a constant weight packed by codegen/packing.py pack_f32: panels of
 * ICC_PANEL (16) output columns, each [K, 16] contiguous, the last padded with zero columns.
 *
 * M >= ICC_F32_PACK_MIN_M (prefill) takes the cache-blocked path further down (rows packed per
 * call, K-blocks, weight prefetch). Below it, one tile = up to ICC_F32_MR rows of x times
 * ICC_F32_NP adjacent panels, accumulated over all of K in registers, reading x in place (packing
 * a few rows would not pay). M = 1 (decode) is the same code with one row: every panel is streamed
 * once, front to back, the threads splitting the panels between them. The row and panel counts
 * are compile-time constants in each instantiation, so gcc unrolls them into registers:
 *   AVX-512: 12 rows x 2 panels = 24 zmm accumulators, per k 2 weight loads + 12 broadcasts;
 *   AVX2:    6 rows x 1 panel  = 12 ymm accumulators, per k 2 weight loads + 6 broadcasts;
 *   plain C: 4 rows x 1 panel, left to the auto-vectorizer. */
#ifndef ICC_GEMM_H
#define ICC_GEMM_H
#include "common.h"

#ifndef ICC_F32_PREFETCH
#define ICC_F32_PREFETCH 2048 /* bytes ahead in a panel's stream (GEMV) */
#endif
#if defined(__AVX512F__)
#define ICC_F32_MR 12
#define ICC_F32_NP 2
#elif defined(__AVX2__) && defined(__FMA__)
#define ICC_F32_MR 6
#define ICC_F32_NP 1
#else
#define ICC_F32_MR 4
#define ICC_F32_NP 1
#endif

/* Loops over a tile's rows and halves run fully unrolled (R and NP are constants of each
 * instantiation), so each accumulator is one register. */
#if defined(__clang__)
#define ICC_UNROLL_ALL _Pragma("unroll")
#elif defined(__GNUC__)
#define ICC_UNROLL_ALL _Pragma("GCC unroll 16")
#else
#define ICC_UNROLL_ALL
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
/* acc -> out through constant indices only. Why: when the epilogue indexed acc by a run-time row
 * (a loop gcc did not unroll), gcc kept the whole array on the stack and stored all 12
 * accumulators on every k step of the FMA loop: store-bound, 34 GF/s on one AVX2 core against
 * 93 GF/s with the accumulators in registers (M = 128, K = 768, N = 2048). */
ICC_INLINE void icc_f32_spill(const int R, const int NP, __m256 acc[ICC_F32_MR][2 * ICC_F32_NP],
                              float out[ICC_F32_MR][ICC_F32_NP * ICC_PANEL]) {
    ICC_UNROLL_ALL
    for (int r = 0; r < R; r++)
        ICC_UNROLL_ALL
        for (int h = 0; h < 2 * NP; h++) _mm256_storeu_ps(out[r] + 8 * h, acc[r][h]);
}
#endif

/* y[0:R, 0:ncols] = x[0:R, :] @ panels[0:NP] (+ bias); ps = floats per panel (K * 16). */
ICC_INLINE void icc_gemm_f32_tile(const int R, const int NP, int64_t K, const float *x, int64_t ldx,
                                  const float *w, int64_t ps, const float *bias, float *y,
                                  int64_t ldy, int64_t ncols) {
#if defined(__AVX512F__)
    __m512 acc[ICC_F32_MR][ICC_F32_NP];
    for (int r = 0; r < R; r++)
        for (int p = 0; p < NP; p++) acc[r][p] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m512 b[ICC_F32_NP];
        for (int p = 0; p < NP; p++) b[p] = _mm512_loadu_ps(w + p * ps + k * ICC_PANEL);
        for (int r = 0; r < R; r++) {
            __m512 a = _mm512_set1_ps(x[r * ldx + k]);
            for (int p = 0; p < NP; p++) acc[r][p] = _mm512_fmadd_ps(a, b[p], acc[r][p]);
        }
    }
    for (int p = 0; p < NP; p++) {
        int64_t left = ncols - p * ICC_PANEL;
        if (left <= 0) break;
        __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        __m512 bv = bias ? _mm512_maskz_loadu_ps(m, bias + p * ICC_PANEL) : _mm512_setzero_ps();
        for (int r = 0; r < R; r++)
            _mm512_mask_storeu_ps(y + r * ldy + p * ICC_PANEL, m, _mm512_add_ps(acc[r][p], bv));
    }
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc[ICC_F32_MR][2 * ICC_F32_NP];
    ICC_UNROLL_ALL
    for (int r = 0; r < R; r++)
        ICC_UNROLL_ALL
        for (int h = 0; h < 2 * NP; h++) acc[r][h] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m256 b[2 * ICC_F32_NP];
        for (int p = 0; p < NP; p++) {
            b[2 * p] = _mm256_loadu_ps(w + p * ps + k * ICC_PANEL);
            b[2 * p + 1] = _mm256_loadu_ps(w + p * ps + k * ICC_PANEL + 8);
        }
        ICC_UNROLL_ALL
        for (int r = 0; r < R; r++) {
            __m256 a = _mm256_broadcast_ss(x + r * ldx + k);
            ICC_UNROLL_ALL
            for (int h = 0; h < 2 * NP; h++) acc[r][h] = _mm256_fmadd_ps(a, b[h], acc[r][h]);
        }
    }
    float out[ICC_F32_MR][ICC_F32_NP * ICC_PANEL];
    icc_f32_spill(R, NP, acc, out);
    for (int r = 0; r < R; r++)
        for (int64_t c = 0; c < ncols; c++) y[r * ldy + c] = out[r][c] + (bias ? bias[c] : 0.0f);
#else
    float acc[ICC_F32_MR][ICC_F32_NP * ICC_PANEL];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NP * ICC_PANEL; c++) acc[r][c] = 0.0f;
    for (int64_t k = 0; k < K; k++)
        for (int p = 0; p < NP; p++) {
            const float *b = w + p * ps + k * ICC_PANEL;
            for (int r = 0; r < R; r++) {
                float a = x[r * ldx + k];
                for (int c = 0; c < ICC_PANEL; c++) acc[r][p * ICC_PANEL + c] += a * b[c];
            }
        }
    for (int r = 0; r < R; r++)
        for (int64_t c = 0; c < ncols; c++) y[r * ldy + c] = acc[r][c] + (bias ? bias[c] : 0.0f);
#endif
}

/* M = 1: y[0:ncols] = x @ panels[0:NP]. Memory-bound: each panel is read once, front to back, and
 * the FMA latency must not throttle the stream, so 4 k-phases accumulate separately (4 x NP
 * independent chains) and meet at the end. */
ICC_INLINE void icc_gemv_f32_tile(const int NP, int64_t K, const float *x, const float *w, int64_t ps,
                                  const float *bias, float *y, int64_t ncols) {
#if defined(__AVX512F__)
    __m512 acc[4][ICC_F32_NP];
    for (int j = 0; j < 4; j++)
        for (int p = 0; p < NP; p++) acc[j][p] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 4 <= K; k += 4)
        for (int j = 0; j < 4; j++)
            for (int p = 0; p < NP; p++) {
                _mm_prefetch((const char *)(w + p * ps + (k + j) * ICC_PANEL) + ICC_F32_PREFETCH, _MM_HINT_T0);
                acc[j][p] = _mm512_fmadd_ps(_mm512_set1_ps(x[k + j]), _mm512_loadu_ps(w + p * ps + (k + j) * ICC_PANEL), acc[j][p]);
            }
    for (; k < K; k++)
        for (int p = 0; p < NP; p++)
            acc[0][p] = _mm512_fmadd_ps(_mm512_set1_ps(x[k]), _mm512_loadu_ps(w + p * ps + k * ICC_PANEL), acc[0][p]);
    for (int p = 0; p < NP; p++) {
        int64_t left = ncols - p * ICC_PANEL;
        if (left <= 0) break;
        __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0][p], acc[1][p]), _mm512_add_ps(acc[2][p], acc[3][p]));
        if (bias) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(m, bias + p * ICC_PANEL));
        _mm512_mask_storeu_ps(y + p * ICC_PANEL, m, sum);
    }
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc[4][2 * ICC_F32_NP];
    for (int j = 0; j < 4; j++)
        for (int h = 0; h < 2 * NP; h++) acc[j][h] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 4 <= K; k += 4)
        for (int j = 0; j < 4; j++) {
            __m256 a = _mm256_broadcast_ss(x + k + j);
            for (int h = 0; h < 2 * NP; h++)
                acc[j][h] = _mm256_fmadd_ps(a, _mm256_loadu_ps(w + (h >> 1) * ps + (k + j) * ICC_PANEL + 8 * (h & 1)), acc[j][h]);
        }
    for (; k < K; k++) {
        __m256 a = _mm256_broadcast_ss(x + k);
        for (int h = 0; h < 2 * NP; h++)
            acc[0][h] = _mm256_fmadd_ps(a, _mm256_loadu_ps(w + (h >> 1) * ps + k * ICC_PANEL + 8 * (h & 1)), acc[0][h]);
    }
    float out[ICC_F32_NP * ICC_PANEL];
    for (int h = 0; h < 2 * NP; h++)
        _mm256_storeu_ps(out + 8 * h, _mm256_add_ps(_mm256_add_ps(acc[0][h], acc[1][h]), _mm256_add_ps(acc[2][h], acc[3][h])));
    for (int64_t c = 0; c < ncols; c++) y[c] = out[c] + (bias ? bias[c] : 0.0f);
#else
    icc_gemm_f32_tile(1, NP, K, x, K, w, ps, bias, y, 0, ncols);
#endif
}

/* One tile of `rows` (1 .. ICC_F32_MR) rows and `np` (1 .. ICC_F32_NP) panels: constant
 * arguments for every case, so each is its own unrolled instantiation. */
static void icc_gemm_f32_rows(int rows, int np, int64_t K, const float *x, const float *w, int64_t ps,
                              const float *bias, float *y, int64_t ldy, int64_t ncols) {
#define ICC_F32_CASE(R)                                                                          \
    case R:                                                                                      \
        if (np == ICC_F32_NP) icc_gemm_f32_tile(R, ICC_F32_NP, K, x, K, w, ps, bias, y, ldy, ncols); \
        else icc_gemm_f32_tile(R, 1, K, x, K, w, ps, bias, y, ldy, ncols);                       \
        break;
    if (rows == 1) {
        if (np == ICC_F32_NP) icc_gemv_f32_tile(ICC_F32_NP, K, x, w, ps, bias, y, ncols);
        else icc_gemv_f32_tile(1, K, x, w, ps, bias, y, ncols);
        return;
    }
    switch (rows) {
#if ICC_F32_MR >= 12
        ICC_F32_CASE(12)
        ICC_F32_CASE(11)
        ICC_F32_CASE(10)
        ICC_F32_CASE(9)
#endif
#if ICC_F32_MR >= 8
        ICC_F32_CASE(8)
        ICC_F32_CASE(7)
#endif
#if ICC_F32_MR >= 6
        ICC_F32_CASE(6)
        ICC_F32_CASE(5)
#endif
        ICC_F32_CASE(4)
        ICC_F32_CASE(3)
        ICC_F32_CASE(2)
        default: break;
    }
#undef ICC_F32_CASE
}

/* ---- M >= ICC_F32_PACK_MIN_M: cache-blocked GEMM on packed rows ------------------------------
 * The weight panels are already packed at compile time; the rows of x are packed per call into
 * micro-panels of ICC_F32_MR rows, k-major ([K][MR], zero rows past M), so the micro-kernel reads
 * both operands as sequential streams (one broadcast per row and k from consecutive floats, folded
 * into the FMA as an embedded broadcast). K is cut into blocks of at most ICC_F32_KC: the slice of
 * NP panels for one K-block (KC x 16 NP floats) stays in L1 while every row tile of the work item
 * runs against it, and the packed rows (M x KC) stream from L2. Partial sums live in y between
 * K-blocks (the first block stores bias + sum, later ones add). Work items are (panel group,
 * row-tile range) pairs, enough of them for the threads to balance. */
#ifndef ICC_F32_PACK_MIN_M
#define ICC_F32_PACK_MIN_M 8
#endif
#ifndef ICC_F32_PF_SPREAD
#define ICC_F32_PF_SPREAD 4 /* the next block's prefetch is spread over this many row tiles */
#endif
#ifndef ICC_F32_KC
#define ICC_F32_KC 256 /* floats of K per block: 2 panels x 256 x 64 B = 32 KB of weights in L1 */
#endif

/* y tile [R, NP * 16 (ncols valid)] (=|+=) a [K][MR] @ panels (bias added when first). */
ICC_INLINE void icc_gemm_f32_ptile(const int R, const int NP, int64_t kc, const float *a, const float *w,
                                   int64_t ps, const float *pf, const float *bias, int first, float *y,
                                   int64_t ldy, int64_t ncols) {
#if defined(__AVX512F__)
    __m512 acc[ICC_F32_MR][ICC_F32_NP];
    for (int r = 0; r < R; r++)
        for (int p = 0; p < NP; p++) acc[r][p] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kc; k++) {
        __m512 b[ICC_F32_NP];
        if ((k & (ICC_F32_PF_SPREAD - 1)) == 0)
            for (int p = 0; p < NP; p++) _mm_prefetch((const char *)(pf + p * ps + (k / ICC_F32_PF_SPREAD) * ICC_PANEL), _MM_HINT_T1);
        for (int p = 0; p < NP; p++) b[p] = _mm512_load_ps(w + p * ps + k * ICC_PANEL);
        for (int r = 0; r < R; r++) {
            __m512 av = _mm512_set1_ps(a[k * ICC_F32_MR + r]);
            for (int p = 0; p < NP; p++) acc[r][p] = _mm512_fmadd_ps(av, b[p], acc[r][p]);
        }
    }
    for (int p = 0; p < NP; p++) {
        int64_t left = ncols - p * ICC_PANEL;
        if (left <= 0) break;
        __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        __m512 bv = first && bias ? _mm512_maskz_loadu_ps(m, bias + p * ICC_PANEL) : _mm512_setzero_ps();
        for (int r = 0; r < R; r++) {
            float *yp = y + r * ldy + p * ICC_PANEL;
            __m512 base = first ? bv : _mm512_maskz_loadu_ps(m, yp);
            _mm512_mask_storeu_ps(yp, m, _mm512_add_ps(acc[r][p], base));
        }
    }
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc[ICC_F32_MR][2 * ICC_F32_NP];
    ICC_UNROLL_ALL
    for (int r = 0; r < R; r++)
        ICC_UNROLL_ALL
        for (int h = 0; h < 2 * NP; h++) acc[r][h] = _mm256_setzero_ps();
    for (int64_t k = 0; k < kc; k++) {
        __m256 b[2 * ICC_F32_NP];
        if ((k & (ICC_F32_PF_SPREAD - 1)) == 0)
            for (int p = 0; p < NP; p++) _mm_prefetch((const char *)(pf + p * ps + (k / ICC_F32_PF_SPREAD) * ICC_PANEL), _MM_HINT_T1);
        for (int p = 0; p < NP; p++) {
            b[2 * p] = _mm256_load_ps(w + p * ps + k * ICC_PANEL);
            b[2 * p + 1] = _mm256_load_ps(w + p * ps + k * ICC_PANEL + 8);
        }
        ICC_UNROLL_ALL
        for (int r = 0; r < R; r++) {
            __m256 av = _mm256_broadcast_ss(a + k * ICC_F32_MR + r);
            ICC_UNROLL_ALL
            for (int h = 0; h < 2 * NP; h++) acc[r][h] = _mm256_fmadd_ps(av, b[h], acc[r][h]);
        }
    }
    float out[ICC_F32_MR][ICC_F32_NP * ICC_PANEL];
    icc_f32_spill(R, NP, acc, out);
    for (int r = 0; r < R; r++) {
        float *yr = y + r * ldy;
        if (ncols == NP * ICC_PANEL) {
            for (int h = 0; h < 2 * NP; h++) {
                __m256 base = first ? (bias ? _mm256_loadu_ps(bias + 8 * h) : _mm256_setzero_ps()) : _mm256_loadu_ps(yr + 8 * h);
                _mm256_storeu_ps(yr + 8 * h, _mm256_add_ps(_mm256_loadu_ps(out[r] + 8 * h), base));
            }
        } else {
            for (int64_t c = 0; c < ncols; c++) yr[c] = out[r][c] + (first ? (bias ? bias[c] : 0.0f) : yr[c]);
        }
    }
#else
    (void)pf; /* no prefetch instruction in plain C */
    float acc[ICC_F32_MR][ICC_F32_NP * ICC_PANEL];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NP * ICC_PANEL; c++) acc[r][c] = 0.0f;
    for (int64_t k = 0; k < kc; k++)
        for (int p = 0; p < NP; p++) {
            const float *b = w + p * ps + k * ICC_PANEL;
            for (int r = 0; r < R; r++) {
                float av = a[k * ICC_F32_MR + r];
                for (int c = 0; c < ICC_PANEL; c++) acc[r][p * ICC_PANEL + c] += av * b[c];
            }
        }
    for (int r = 0; r < R; r++)
        for (int64_t c = 0; c < ncols; c++)
            y[r * ldy + c] = acc[r][c] + (first ? (bias ? bias[c] : 0.0f) : y[r * ldy + c]);
#endif
}

/* One packed tile: `rows` (1 .. MR) and `np` (1 .. NP) as constants of their own instantiation. */
static void icc_gemm_f32_prows(int rows, int np, int64_t kc, const float *a, const float *w, int64_t ps,
                               const float *pf, const float *bias, int first, float *y, int64_t ldy, int64_t ncols) {
#define ICC_F32_PCASE(R)                                                                                  \
    case R:                                                                                               \
        if (np == ICC_F32_NP) icc_gemm_f32_ptile(R, ICC_F32_NP, kc, a, w, ps, pf, bias, first, y, ldy, ncols); \
        else icc_gemm_f32_ptile(R, 1, kc, a, w, ps, pf, bias, first, y, ldy, ncols);                          \
        break;
    switch (rows) {
#if ICC_F32_MR >= 12
        ICC_F32_PCASE(12)
        ICC_F32_PCASE(11)
        ICC_F32_PCASE(10)
        ICC_F32_PCASE(9)
#endif
#if ICC_F32_MR >= 8
        ICC_F32_PCASE(8)
        ICC_F32_PCASE(7)
#endif
#if ICC_F32_MR >= 6
        ICC_F32_PCASE(6)
        ICC_F32_PCASE(5)
#endif
        ICC_F32_PCASE(4)
        ICC_F32_PCASE(3)
        ICC_F32_PCASE(2)
        ICC_F32_PCASE(1)
        default: break;
    }
#undef ICC_F32_PCASE
}

/* x rows [m0, m0 + MR) -> ap [K][MR], rows past M zero. */
static void icc_gemm_f32_pack_rows(int64_t M, int64_t K, const float *x, int64_t m0, float *ap) {
    const int rows = (int)(M - m0 < ICC_F32_MR ? M - m0 : ICC_F32_MR);
    if (rows < ICC_F32_MR) memset(ap, 0, sizeof(float) * (size_t)(K * ICC_F32_MR));
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (m0 + r) * K;
        for (int64_t k = 0; k < K; k++) ap[k * ICC_F32_MR + r] = xr[k];
    }
}

static void icc_gemm_f32_packed(int64_t M, int64_t N, int64_t K, const float *x, const float *W,
                                const float *bias, float *y, float *ap) {
    const int64_t ps = K * ICC_PANEL;
    const int64_t panels = (N + ICC_PANEL - 1) / ICC_PANEL;
    const int64_t groups = (panels + ICC_F32_NP - 1) / ICC_F32_NP;
    const int64_t tiles = (M + ICC_F32_MR - 1) / ICC_F32_MR;
    const int64_t kblocks = (K + ICC_F32_KC - 1) / ICC_F32_KC;
    const int64_t kc0 = (K + kblocks - 1) / kblocks; /* even blocks: no short last one */
#ifdef _OPENMP
    const int threads = M * N * K >= ICC_PARALLEL_MIN_MACS ? omp_get_max_threads() : 1;
#else
    const int threads = 1;
#endif
    /* row-tile ranges per group: at least 4 work items per thread when the groups alone are fewer */
    int64_t splits = groups >= 4 * threads ? 1 : (4 * threads + groups - 1) / groups;
    if (splits > tiles) splits = tiles;
    const int64_t per = (tiles + splits - 1) / splits;
    const int64_t items = groups * splits;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) icc_gemm_f32_pack_rows(M, K, x, t * ICC_F32_MR, ap + t * K * ICC_F32_MR);
    /* handed out dynamically in chunks of ~1/8 of a thread's share: a thread descheduled by another
     * process (2 shared cores) delays the call by one chunk, not by its whole static share, and
     * within a chunk the next item's weights are the ones the last block prefetches */
    const int64_t chunk = (items + 8 * threads - 1) / (8 * threads);
#pragma omp for schedule(dynamic, chunk)
        for (int64_t it = 0; it < items; it++) {
            const int64_t g = it / splits, t0 = (it % splits) * per;
            const int64_t t1 = t0 + per < tiles ? t0 + per : tiles;
            const int64_t p0 = g * ICC_F32_NP;
            const int np = (int)(panels - p0 < ICC_F32_NP ? panels - p0 : ICC_F32_NP);
            const int64_t n0 = p0 * ICC_PANEL, ncols = N - n0 < np * ICC_PANEL ? N - n0 : np * ICC_PANEL;
            for (int64_t k0 = 0; k0 < K; k0 += kc0) {
                const int64_t kc = K - k0 < kc0 ? K - k0 : kc0;
                /* the weights the next block reads (the next group's first block after the last
                 * one), prefetched to L2 while this block runs: they come from memory once per
                 * call, and this hides that stream behind the arithmetic */
                const float *next = k0 + kc < K ? W + p0 * ps + (k0 + kc) * ICC_PANEL : W + (p0 + ICC_F32_NP) * ps;
                const int64_t share = (kc0 + ICC_F32_PF_SPREAD - 1) / ICC_F32_PF_SPREAD * ICC_PANEL;
                for (int64_t t = t0; t < t1; t++) {
                    const int64_t m0 = t * ICC_F32_MR;
                    const int rows = (int)(M - m0 < ICC_F32_MR ? M - m0 : ICC_F32_MR);
                    icc_gemm_f32_prows(rows, np, kc, ap + t * K * ICC_F32_MR + k0 * ICC_F32_MR,
                                       W + p0 * ps + k0 * ICC_PANEL, ps, next + ((t - t0) % ICC_F32_PF_SPREAD) * share, bias ? bias + n0 : NULL, k0 == 0,
                                       y + m0 * N + n0, N, ncols);
                }
            }
        }
    }
}

static void icc_gemm_f32(int64_t M, int64_t N, int64_t K, const float *x, const void *w,
                         const float *bias, float *y) {
    if (M <= 0 || N <= 0) return;
    const float *W = (const float *)w;
    const int64_t ps = K * ICC_PANEL;
    const int64_t panels = (N + ICC_PANEL - 1) / ICC_PANEL;
    const int64_t groups = (panels + ICC_F32_NP - 1) / ICC_F32_NP;
    const int64_t tiles = (M + ICC_F32_MR - 1) / ICC_F32_MR;
    if (K <= 0) {
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) y[m * N + n] = bias ? bias[n] : 0.0f;
        return;
    }
    if (M >= ICC_F32_PACK_MIN_M) {
        float *ap = (float *)icc_scratch(ICC_SCR_PACK, sizeof(float) * (size_t)(tiles * ICC_F32_MR * K));
        if (ap) {
            icc_gemm_f32_packed(M, N, K, x, W, bias, y, ap);
            return;
        }
    }
    /* groups outer, row tiles inner: a static schedule hands each thread whole panel groups, which
     * stay in its cache across all their row tiles. */
#pragma omp parallel for collapse(2) schedule(static) if (M * N * K >= ICC_PARALLEL_MIN_MACS)
    for (int64_t g = 0; g < groups; g++) {
        for (int64_t t = 0; t < tiles; t++) {
            int64_t p0 = g * ICC_F32_NP, m0 = t * ICC_F32_MR;
            int np = (int)(panels - p0 < ICC_F32_NP ? panels - p0 : ICC_F32_NP);
            int rows = (int)(M - m0 < ICC_F32_MR ? M - m0 : ICC_F32_MR);
            int64_t n0 = p0 * ICC_PANEL, ncols = N - n0 < np * ICC_PANEL ? N - n0 : np * ICC_PANEL;
            icc_gemm_f32_rows(rows, np, K, x + m0 * K, W + p0 * ps, ps, bias ? bias + n0 : NULL,
                              y + m0 * N + n0, N, ncols);
        }
    }
}

#endif
