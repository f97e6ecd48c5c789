/* infercc generated-C runtime: the canonical Attention (semantics: passes/fusion/attention_op.py;
 * contract: api.h, icc_attention).
 *
 * Flash-style: each work unit is (batch, kv head, a chunk of up to ICC_AT_MR query rows of that kv
 * head's group, a key split). Rows are ordered query-position-major (t = i * rep + r), so the rep
 * query heads sharing a kv head read each K/V tile once, and rows of one chunk have neighbouring
 * causal bounds. Keys stream in tiles of ICC_AT_TK with an online softmax (running max, running
 * sum, rescaled accumulator): no [S, P+S] matrix. Past ICC_AT_SPLIT keys, the keys are split at
 * fixed positions and the partial (max, sum, acc) merged afterwards (flash-decoding: threads share
 * one kv head's long context). A row's result is the same bits whatever else runs in the call
 * (batch invariance, icc_at_splits), so batched, chunked and speculative decoding give the tokens
 * of one sequence decoded alone. An fp16 cache tile is converted once per tile to fp32 and
 * shared by every row of the chunk.
 *
 * Scores follow the decomposition's order of operations: q is scaled first, s = cap(q' . k), then
 * s + (where(allowed, 0, mask_value) + mask_float). Disallowed keys are skipped (whole tiles)
 * only when mask_value is -inf; a row whose scores are all -inf outputs 0.
 *
 * Vector paths: AVX-512F, AVX2+FMA, plain C; fp16 <-> fp32 with F16C when __F16C__ is defined,
 * else a portable bit-exact (round-to-nearest-even) converter.
 */
#ifndef ICC_ATTENTION_H
#define ICC_ATTENTION_H
#include "api.h"
#include "common.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define ICC_AT_MR 32 /* query rows (heads x positions) per unit */
#define ICC_AT_TK 64 /* keys per tile */
#define ICC_AT_SPLIT 128 /* keys per split: fixed, so a row's arithmetic never depends on the call */
/* Below this many multiply-adds (rows x keys x (D + Dv)) a call runs on the calling thread: the
 * fork/join (~1-2 us with the workers still spinning from the matmul before) costs more than it
 * saves. A decode step's attention is above it from ~16 keys on: its K/V come from DRAM (the
 * weights streamed since evicted them), and two threads read them at ~1.7x one thread's
 * bandwidth (SmolLM2-135M decode at 128-192 keys, 2 threads: attention 27 us a layer serial,
 * the whole step ~4% faster split; the old bound, 2^18, kept every such step serial). */
#define ICC_AT_SERIAL_WORK (1 << 15)

/* Software prefetch of a decode step's keys and values. They come from DRAM (the weights the step
 * streamed since evicted them), and the hardware prefetcher helps little: it stops at each 4 KB
 * page (16 rows of 64 floats), and the value product reads a tile in column strips (one cache line
 * of each row per pass). Without it the loads wait one latency at a time between the arithmetic
 * (SmolLM2-135M Q4_1 at ~1,060 cached tokens, 2 threads, per decode step: attention 5.6-6.1 ms,
 * ~9 GB/s of K/V; with it 4.3-5.2 ms, in the same runs). The QK and PV loops ask for the rows
 * ICC_AT_AHEAD ahead of the one in use, within the `avail` rows their caller says may be read (a
 * paged block's neighbour in memory belongs to another sequence), and a tile of the contiguous
 * kernel its values when it starts. */
#ifndef ICC_AT_AHEAD
#define ICC_AT_AHEAD 16
#endif
/* n rows of `width` floats, `stride` floats apart (a prefetch never faults) */
static inline void icc_at_prefetch_rows(const float *base, int64_t stride, int64_t width, int64_t n) {
    for (int64_t j = 0; j < n; j++)
        for (int64_t d = 0; d < width; d += 16) __builtin_prefetch(base + j * stride + d, 0, 3);
}

/* bytes [p, p + n) toward L1, a line at a time */
static inline void icc_at_prefetch_bytes(const void *p, int64_t n) {
    for (int64_t o = 0; o < n; o += 64) __builtin_prefetch((const char *)p + o, 0, 3);
}

/* ---- fp16 <-> fp32 ------------------------------------------------------------------------- */
/* Portable converters (F. Giesen's, round-to-nearest-even, bit-exact with F16C on every finite
 * value and infinity; NaN becomes a quiet NaN). */
static inline uint16_t icc_at_f32_to_f16(float value) {
    union { float f; uint32_t u; } x, magic;
    x.f = value;
    uint32_t sign = x.u & 0x80000000u;
    uint16_t out;
    x.u ^= sign;
    if (x.u >= (uint32_t)(127 + 16) << 23) {
        out = x.u > 0x7f800000u ? 0x7e00 : 0x7c00;
    } else if (x.u < (uint32_t)113 << 23) { /* subnormal or zero: the FPU rounds for us */
        magic.u = (uint32_t)((127 - 15) + (23 - 10) + 1) << 23;
        x.f += magic.f;
        out = (uint16_t)(x.u - magic.u);
    } else {
        uint32_t odd = (x.u >> 13) & 1u;
        x.u += ((uint32_t)(15 - 127) << 23) + 0xfffu + odd;
        out = (uint16_t)(x.u >> 13);
    }
    return (uint16_t)(out | (sign >> 16));
}

static inline float icc_at_f16_to_f32(uint16_t h) {
    union { float f; uint32_t u; } o, magic;
    const uint32_t shifted_exp = 0x7c00u << 13;
    magic.u = (uint32_t)113 << 23;
    o.u = (uint32_t)(h & 0x7fffu) << 13;
    uint32_t e = shifted_exp & o.u;
    o.u += (uint32_t)(127 - 15) << 23;
    if (e == shifted_exp) {
        o.u += (uint32_t)(128 - 16) << 23;
    } else if (e == 0) {
        o.u += 1u << 23;
        o.f -= magic.f;
    }
    o.u |= (uint32_t)(h & 0x8000u) << 16;
    return o.f;
}

static inline void icc_at_to_f16(uint16_t *dst, const float *src, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) dst[i] = icc_at_f32_to_f16(src[i]);
}

static inline void icc_at_from_f16(float *dst, const uint16_t *src, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 32 <= n; i += 32) {
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
        _mm512_storeu_ps(dst + i + 16, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i + 16))));
    }
#endif
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
    for (; i < n; i++) dst[i] = icc_at_f16_to_f32(src[i]);
}

/* ---- vector helpers -------------------------------------------------------------------------- */
#if defined(__AVX512F__)
#define ICC_AT_VW 16
typedef __m512 icc_at_v;
#define icc_at_load _mm512_loadu_ps
#define icc_at_store _mm512_storeu_ps
#define icc_at_set1 _mm512_set1_ps
#define icc_at_zero _mm512_setzero_ps
#define icc_at_fma _mm512_fmadd_ps
#define icc_at_mul _mm512_mul_ps
#define icc_at_add _mm512_add_ps
#define icc_at_vmax _mm512_max_ps
static inline __m256 icc_at_half(__m512 x) {
    return _mm256_add_ps(_mm512_castps512_ps256(x),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
}
static inline float icc_at_hmax(__m512 x) { return _mm512_reduce_max_ps(x); }
static inline float icc_at_hsum(__m512 x) { return _mm512_reduce_add_ps(x); }
/* exp(x) for x <= 0 (Cephes polynomial, ~1 ulp); exactly 0 below -87.3 (and for -inf). */
static inline __m512 icc_at_vexp(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.3f);
    __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_max_ps(x, lo);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
    __m512 y = _mm512_set1_ps(1.9875691500E-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
    y = _mm512_mul_ps(y, _mm512_castsi512_ps(e));
    return _mm512_maskz_mov_ps((__mmask16)~tiny, y);
}
#elif defined(__AVX2__) && defined(__FMA__)
#define ICC_AT_VW 8
typedef __m256 icc_at_v;
#define icc_at_load _mm256_loadu_ps
#define icc_at_store _mm256_storeu_ps
#define icc_at_set1 _mm256_set1_ps
#define icc_at_zero _mm256_setzero_ps
#define icc_at_fma _mm256_fmadd_ps
#define icc_at_mul _mm256_mul_ps
#define icc_at_add _mm256_add_ps
#define icc_at_vmax _mm256_max_ps
static inline __m256 icc_at_half(__m256 x) { return x; }
static inline float icc_at_hsum(__m256 x) { return icc_hsum256(x); }
static inline float icc_at_hmax(__m256 x) { return icc_hmax256(x); }
static inline __m256 icc_at_vexp(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f);
    __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    return _mm256_and_ps(y, keep);
}
#endif

#ifdef ICC_AT_VW
/* Four horizontal sums at once: (sum a, sum b, sum c, sum d). */
static inline __m128 icc_at_hsum4(icc_at_v a, icc_at_v b, icc_at_v c, icc_at_v d) {
    __m256 ab = _mm256_hadd_ps(icc_at_half(a), icc_at_half(b));
    __m256 cd = _mm256_hadd_ps(icc_at_half(c), icc_at_half(d));
    __m256 abcd = _mm256_hadd_ps(ab, cd);
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}
#endif

#ifdef ICC_AT_VW
/* out[0:4] = q . k0 .. q . k3: one FMA chain per key over the vector part of D (dv), a horizontal
 * sum, then the rest of D. Every key's dot goes through here, so its bits never depend on which
 * keys share the call (batch invariance; see icc_at_splits). */
static inline void icc_at_dot4(const float *q, const float *k0, const float *k1, const float *k2, const float *k3,
                               int64_t dv, int64_t D, float *out) {
    icc_at_v a0 = icc_at_zero(), a1 = icc_at_zero(), a2 = icc_at_zero(), a3 = icc_at_zero();
    for (int64_t d = 0; d < dv; d += ICC_AT_VW) {
        icc_at_v x = icc_at_load(q + d);
        a0 = icc_at_fma(x, icc_at_load(k0 + d), a0);
        a1 = icc_at_fma(x, icc_at_load(k1 + d), a1);
        a2 = icc_at_fma(x, icc_at_load(k2 + d), a2);
        a3 = icc_at_fma(x, icc_at_load(k3 + d), a3);
    }
    _mm_storeu_ps(out, icc_at_hsum4(a0, a1, a2, a3));
    for (int64_t d = dv; d < D; d++) {
        out[0] += q[d] * k0[d];
        out[1] += q[d] * k1[d];
        out[2] += q[d] * k2[d];
        out[3] += q[d] * k3[d];
    }
}
#endif

/* out[j] = q . K[j] for j < n (K rows `ks` floats apart). */
static inline void icc_at_dots(const float *q, const float *kb, int64_t ks, int64_t n, int64_t D,
                               float *out) {
    int64_t j = 0;
#ifdef ICC_AT_VW
    const int64_t dv = D - D % ICC_AT_VW;
    for (; j + 4 <= n; j += 4) {
        const float *k0 = kb + j * ks;
        icc_at_dot4(q, k0, k0 + ks, k0 + 2 * ks, k0 + 3 * ks, dv, D, out + j);
    }
    if (j < n) { /* the last 1..3 keys as a group of 4, repeating the first of them */
        const float *k0 = kb + j * ks;
        float t[4];
        icc_at_dot4(q, k0, j + 1 < n ? k0 + ks : k0, j + 2 < n ? k0 + 2 * ks : k0, k0, dv, D, t);
        for (int64_t i = 0; j + i < n; i++) out[j + i] = t[i];
        return;
    }
#endif
    for (; j < n; j++) {
        const float *kr = kb + j * ks;
        float s = 0.0f;
        for (int64_t d = 0; d < D; d++) s += q[d] * kr[d];
        out[j] = s;
    }
}

static inline float icc_at_rowmax(const float *s, int64_t n) {
    float m = -INFINITY;
    int64_t j = 0;
#ifdef ICC_AT_VW
    if (n >= ICC_AT_VW) {
        icc_at_v vm = icc_at_load(s);
        for (j = ICC_AT_VW; j + ICC_AT_VW <= n; j += ICC_AT_VW) vm = icc_at_vmax(vm, icc_at_load(s + j));
        m = icc_at_hmax(vm);
    }
#endif
    for (; j < n; j++) m = s[j] > m ? s[j] : m;
    return m;
}

/* s[j] = exp(s[j] - m) in place; returns the sum. */
static inline float icc_at_expsum(float *s, int64_t n, float m) {
    float sum = 0.0f;
    int64_t j = 0;
#ifdef ICC_AT_VW
    icc_at_v vs = icc_at_zero(), vm = icc_at_set1(-m);
    for (; j + ICC_AT_VW <= n; j += ICC_AT_VW) {
        icc_at_v e = icc_at_vexp(icc_at_add(icc_at_load(s + j), vm));
        icc_at_store(s + j, e);
        vs = icc_at_add(vs, e);
    }
    if (j < n) { /* the tail as one more vector, padded with -inf (exp = 0): key j always adds into
                  * lane j % VW, however many keys the tile has (batch invariance; see icc_at_splits) */
        float t[ICC_AT_VW];
        for (int64_t i = 0; i < ICC_AT_VW; i++) t[i] = j + i < n ? s[j + i] : -INFINITY;
        icc_at_v e = icc_at_vexp(icc_at_add(icc_at_load(t), vm));
        icc_at_store(t, e);
        vs = icc_at_add(vs, e);
        for (int64_t i = 0; j + i < n; i++) s[j + i] = t[i];
        j = n;
    }
    sum = icc_at_hsum(vs);
#endif
    for (; j < n; j++) {
        s[j] = expf(s[j] - m);
        sum += s[j];
    }
    return sum;
}

/* acc[0:Dv] = acc * alpha + sum_j p[j] * V[j] (V rows `vs` floats apart). */
static inline void icc_at_pv(float *acc, float alpha, const float *p, const float *vb, int64_t vs,
                             int64_t n, int64_t Dv) {
    int64_t d = 0;
#ifdef ICC_AT_VW
    const icc_at_v va = icc_at_set1(alpha);
    for (; d + 4 * ICC_AT_VW <= Dv; d += 4 * ICC_AT_VW) {
        icc_at_v a0 = icc_at_mul(va, icc_at_load(acc + d));
        icc_at_v a1 = icc_at_mul(va, icc_at_load(acc + d + ICC_AT_VW));
        icc_at_v a2 = icc_at_mul(va, icc_at_load(acc + d + 2 * ICC_AT_VW));
        icc_at_v a3 = icc_at_mul(va, icc_at_load(acc + d + 3 * ICC_AT_VW));
        const float *vr = vb + d;
        for (int64_t j = 0; j < n; j++, vr += vs) {
            icc_at_v pj = icc_at_set1(p[j]);
            a0 = icc_at_fma(pj, icc_at_load(vr), a0);
            a1 = icc_at_fma(pj, icc_at_load(vr + ICC_AT_VW), a1);
            a2 = icc_at_fma(pj, icc_at_load(vr + 2 * ICC_AT_VW), a2);
            a3 = icc_at_fma(pj, icc_at_load(vr + 3 * ICC_AT_VW), a3);
        }
        icc_at_store(acc + d, a0);
        icc_at_store(acc + d + ICC_AT_VW, a1);
        icc_at_store(acc + d + 2 * ICC_AT_VW, a2);
        icc_at_store(acc + d + 3 * ICC_AT_VW, a3);
    }
    for (; d + ICC_AT_VW <= Dv; d += ICC_AT_VW) {
        icc_at_v a0 = icc_at_mul(va, icc_at_load(acc + d));
        const float *vr = vb + d;
        for (int64_t j = 0; j < n; j++, vr += vs) a0 = icc_at_fma(icc_at_set1(p[j]), icc_at_load(vr), a0);
        icc_at_store(acc + d, a0);
    }
#endif
    for (; d < Dv; d++) {
        float a = acc[d] * alpha;
        for (int64_t j = 0; j < n; j++) a += p[j] * vb[j * vs + d];
        acc[d] = a;
    }
}

#ifdef ICC_AT_VW
#if ICC_AT_VW == 16
#define ICC_AT_QK_RB 4 /* query rows per QK step (x 4 keys: 16 accumulators of 32 registers) */
#define ICC_AT_PV_DB 4 /* vectors of Dv per PV step (x 4 rows: 16 accumulators) */
#else
#define ICC_AT_QK_RB 2 /* AVX2 has 16 registers */
#define ICC_AT_PV_DB 2
#endif
/* A float16 cache is read where it lies, each vector converted as it is loaded (F16C / AVX-512:
 * exact), instead of converting a tile into a float buffer first: half the bytes from memory, no
 * second pass. The products and their order are the buffer path's, so the results are too. */
#if defined(__AVX512F__)
#define ICC_AT_HALF_INLINE 1
#define icc_at_loadh(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(p)))
#elif defined(__F16C__)
#define ICC_AT_HALF_INLINE 1
#define icc_at_loadh(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(p)))
#endif
/* element e of a float (H = 0) or float16 (H = 1) array, as one vector */
static inline __attribute__((always_inline)) icc_at_v icc_at_loadx(const void *p, int64_t e, const int H) {
#ifdef ICC_AT_HALF_INLINE
    if (H) return icc_at_loadh((const uint16_t *)p + e);
#else
    (void)H;
#endif
    return icc_at_load((const float *)p + e);
}
/* rb rows (q rows D apart) against 4 keys at a time: each K load serves rb rows. kb: float keys
 * (H = 0) or float16 keys (H = 1: no prefetch here, the caller fetched the tile; the last n % 4
 * keys are converted into tmp, D floats a row, for icc_at_dots). */
static inline __attribute__((always_inline)) void icc_at_qk_rows(const float *q, int64_t D, int rb, const void *kb,
                                                               const int H, int64_t ks, int64_t n, int64_t avail,
                                                               float *s, float *tmp) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const int64_t e0 = j * ks, e1 = e0 + ks, e2 = e1 + ks, e3 = e2 + ks;
        if (!H && j + ICC_AT_AHEAD + 4 <= avail)
            icc_at_prefetch_rows((const float *)kb + e0 + ICC_AT_AHEAD * ks, ks, D, 4);
        icc_at_v acc[ICC_AT_QK_RB][4];
#pragma GCC unroll 4
        for (int r = 0; r < rb; r++) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = icc_at_zero();
        for (int64_t d = 0; d < D; d += ICC_AT_VW) {
            const icc_at_v x0 = icc_at_loadx(kb, e0 + d, H), x1 = icc_at_loadx(kb, e1 + d, H),
                           x2 = icc_at_loadx(kb, e2 + d, H), x3 = icc_at_loadx(kb, e3 + d, H);
#pragma GCC unroll 4
            for (int r = 0; r < rb; r++) {
                const icc_at_v qv = icc_at_load(q + r * D + d);
                acc[r][0] = icc_at_fma(qv, x0, acc[r][0]);
                acc[r][1] = icc_at_fma(qv, x1, acc[r][1]);
                acc[r][2] = icc_at_fma(qv, x2, acc[r][2]);
                acc[r][3] = icc_at_fma(qv, x3, acc[r][3]);
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < rb; r++)
            _mm_storeu_ps(s + r * ICC_AT_TK + j, icc_at_hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
    }
    if (j == n) return;
    const float *kt = (const float *)kb + j * ks;
    int64_t kts = ks;
    if (H) {
        for (int64_t i = j; i < n; i++) icc_at_from_f16(tmp + (i - j) * D, (const uint16_t *)kb + i * ks, D);
        kt = tmp;
        kts = D;
    }
    for (int r = 0; r < rb; r++) icc_at_dots(q + r * D, kt, kts, n - j, D, s + r * ICC_AT_TK + j);
}

/* acc[r] = acc[r] * alpha[r] + p[r] @ V for rb rows: each V load serves rb rows. vb: float values
 * (H = 0) or float16 values (H = 1: Dv a multiple of ICC_AT_PV_DB vectors). */
static inline __attribute__((always_inline)) void icc_at_pv_rows(float *acc, int64_t Dv, int rb, const float *alpha,
                                                               const float *p, const void *vb, const int H,
                                                               int64_t vs, int64_t n, int64_t avail) {
    int64_t d = 0;
    for (; d + ICC_AT_PV_DB * ICC_AT_VW <= Dv; d += ICC_AT_PV_DB * ICC_AT_VW) {
        icc_at_v a[4][ICC_AT_PV_DB];
#pragma GCC unroll 4
        for (int r = 0; r < rb; r++) {
            const icc_at_v va = icc_at_set1(alpha[r]);
#pragma GCC unroll 4
            for (int c = 0; c < ICC_AT_PV_DB; c++) a[r][c] = icc_at_mul(va, icc_at_load(acc + r * Dv + d + c * ICC_AT_VW));
        }
        for (int64_t j = 0, e = d; j < n; j++, e += vs) {
            if (!H && d == 0 && j + ICC_AT_AHEAD < avail)
                icc_at_prefetch_rows((const float *)vb + e + ICC_AT_AHEAD * vs, vs, Dv, 1);
            icc_at_v x[ICC_AT_PV_DB];
#pragma GCC unroll 4
            for (int c = 0; c < ICC_AT_PV_DB; c++) x[c] = icc_at_loadx(vb, e + c * ICC_AT_VW, H);
#pragma GCC unroll 4
            for (int r = 0; r < rb; r++) {
                const icc_at_v pj = icc_at_set1(p[r * ICC_AT_TK + j]);
#pragma GCC unroll 4
                for (int c = 0; c < ICC_AT_PV_DB; c++) a[r][c] = icc_at_fma(pj, x[c], a[r][c]);
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < rb; r++)
#pragma GCC unroll 4
            for (int c = 0; c < ICC_AT_PV_DB; c++) icc_at_store(acc + r * Dv + d + c * ICC_AT_VW, a[r][c]);
    }
    for (int r = 0; r < rb && d < Dv; r++) /* the rest of Dv, row by row (float values only) */
        icc_at_pv(acc + r * Dv + d, alpha[r], p + r * ICC_AT_TK, (const float *)vb + d, vs, n, Dv - d);
}
#endif

#ifdef ICC_AT_VW
/* The M rows in groups of icc_at_qk_rows / icc_at_pv_rows, float (H = 0) or float16 (H = 1) K/V. */
static inline __attribute__((always_inline)) void icc_at_qk_groups(const float *q, int64_t D, int64_t M,
                                                                 const void *kb, const int H, int64_t ks, int64_t n,
                                                                 int64_t avail, float *s, float *tmp) {
    int64_t m = 0;
    for (; m + ICC_AT_QK_RB <= M; m += ICC_AT_QK_RB)
        icc_at_qk_rows(q + m * D, D, ICC_AT_QK_RB, kb, H, ks, n, avail, s + m * ICC_AT_TK, tmp);
#if ICC_AT_QK_RB == 4
    if (M - m == 3) icc_at_qk_rows(q + m * D, D, 3, kb, H, ks, n, avail, s + m * ICC_AT_TK, tmp);
    if (M - m == 2) icc_at_qk_rows(q + m * D, D, 2, kb, H, ks, n, avail, s + m * ICC_AT_TK, tmp);
#endif
    if (M - m == 1) icc_at_qk_rows(q + m * D, D, 1, kb, H, ks, n, avail, s + m * ICC_AT_TK, tmp);
}

static inline __attribute__((always_inline)) void icc_at_pv_groups(float *acc, int64_t Dv, int64_t M,
                                                                 const float *alpha, const float *p, const void *vb,
                                                                 const int H, int64_t vs, int64_t n, int64_t avail) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) icc_at_pv_rows(acc + m * Dv, Dv, 4, alpha + m, p + m * ICC_AT_TK, vb, H, vs, n, avail);
    if (M - m == 3) icc_at_pv_rows(acc + m * Dv, Dv, 3, alpha + m, p + m * ICC_AT_TK, vb, H, vs, n, avail);
    if (M - m == 2) icc_at_pv_rows(acc + m * Dv, Dv, 2, alpha + m, p + m * ICC_AT_TK, vb, H, vs, n, avail);
    if (M - m == 1) icc_at_pv_rows(acc + m * Dv, Dv, 1, alpha + m, p + m * ICC_AT_TK, vb, H, vs, n, avail);
}
#endif

/* S[m][j] = q_m . K[j] for the M rows (D apart) of a tile of n keys (S rows ICC_AT_TK apart);
 * `avail` >= n keys from kb may be read (prefetched ahead). */
static inline void icc_at_qk(const float *q, int64_t D, int64_t M, const float *kb, int64_t ks, int64_t n,
                             int64_t avail, float *s) {
    (void)avail; /* (the plain C loops prefetch nothing) */
#ifdef ICC_AT_VW
    if (D % ICC_AT_VW == 0) {
        icc_at_qk_groups(q, D, M, kb, 0, ks, n, avail, s, NULL);
        return;
    }
#endif
    for (int64_t m = 0; m < M; m++) icc_at_dots(q + m * D, kb, ks, n, D, s + m * ICC_AT_TK);
}

/* acc[m] = acc[m] * alpha[m] + p[m] @ V for the M rows (acc rows Dv apart, p rows ICC_AT_TK apart);
 * `avail` >= n value rows from vb may be read (prefetched ahead). */
static inline void icc_at_pv_all(float *acc, int64_t Dv, int64_t M, const float *alpha, const float *p,
                                 const float *vb, int64_t vs, int64_t n, int64_t avail) {
    (void)avail;
#ifdef ICC_AT_VW
    icc_at_pv_groups(acc, Dv, M, alpha, p, vb, 0, vs, n, avail);
    return;
#endif
    for (int64_t m = 0; m < M; m++) icc_at_pv(acc + m * Dv, alpha[m], p + m * ICC_AT_TK, vb, vs, n, Dv);
}

#ifdef ICC_AT_HALF_INLINE
/* Whether the float16 cache is read in place (icc_at_qk_h, icc_at_pv_h) for these head sizes. */
#define ICC_AT_HALF_FITS(D, Dv) ((D) % ICC_AT_VW == 0 && (Dv) % (ICC_AT_PV_DB * ICC_AT_VW) == 0)
/* icc_at_qk over float16 keys read in place (tmp: 3 rows of D floats) */
static inline void icc_at_qk_h(const float *q, int64_t D, int64_t M, const uint16_t *kb, int64_t ks, int64_t n,
                               float *s, float *tmp) {
    icc_at_qk_groups(q, D, M, kb, 1, ks, n, n, s, tmp);
}

/* icc_at_pv_all over float16 values read in place */
static inline void icc_at_pv_h(float *acc, int64_t Dv, int64_t M, const float *alpha, const float *p,
                               const uint16_t *vb, int64_t vs, int64_t n) {
    icc_at_pv_groups(acc, Dv, M, alpha, p, vb, 1, vs, n, n);
}
#else
#define ICC_AT_HALF_FITS(D, Dv) 0
#endif

/* ---- the kernel -------------------------------------------------------------------------------- */
/* Head bh's rows of one cache tensor: the past copied into present (unless in place), then the S
 * new rows appended in the cache's type. Called by icc_at_run, in or out of a parallel region. */
static inline void icc_at_append(const icc_attention_args *a, int64_t bh, const void *past, void *present,
                                 const float *src, int64_t size) {
    const int64_t S = a->S, P = a->P, Hkv = a->Hkv, b = bh / Hkv, g = bh % Hkv;
    const size_t esz = a->cache_dtype ? 2 : 4;
    char *dst = (char *)present + (size_t)(bh * a->present_cap * size) * esz;
    if (past != present && P > 0)
        memcpy(dst, (const char *)past + (size_t)(bh * a->past_cap * size) * esz, (size_t)(P * size) * esz);
    for (int64_t i = 0; i < S; i++) {
        const float *row = src + ((b * S + i) * Hkv + g) * size;
        char *at = dst + (size_t)((P + i) * size) * esz;
        if (a->cache_dtype)
            icc_at_to_f16((uint16_t *)at, row, size);
        else
            memcpy(at, row, (size_t)size * sizeof(float));
    }
}

typedef struct {
    float *q, *s, *acc, *m, *l, *alpha, *kt, *vt;
    int64_t *lo, *hi, *moff;
} icc_at_ws;

/* s[j] += where(key jt+j allowed, 0, mv) + mask_float for the n keys of a tile: allowed = within
 * [lo, hi] and mask_bool (both masks read at o + key * mstride). A contiguous mask row (mstride 1,
 * the padding masks of decode) takes branch-free loops gcc vectorizes; the arithmetic, and so every
 * bit, is the per-key loop's. */
static inline void icc_at_bias(float *s, int64_t n, int64_t jt, int64_t lo, int64_t hi, const uint8_t *mask_bool,
                               const float *mask_float, int64_t o, int64_t mstride, float mv) {
    if (mstride != 1) {
        for (int64_t j = 0; j < n; j++) {
            const int64_t kj = jt + j;
            int ok = kj >= lo && kj <= hi;
            if (mask_bool) ok = ok && mask_bool[o + kj * mstride];
            float bias = ok ? 0.0f : mv;
            if (mask_float) bias += mask_float[o + kj * mstride];
            s[j] += bias;
        }
        return;
    }
    int64_t a = lo - jt, b = hi - jt + 1; /* keys [a, b) of the tile are within the bounds */
    a = a < 0 ? 0 : (a > n ? n : a);
    b = b < a ? a : (b > n ? n : b);
    const uint8_t *mb = mask_bool ? mask_bool + o + jt : NULL;
    const float *mf = mask_float ? mask_float + o + jt : NULL;
    for (int64_t j = a > 0 ? 0 : b; j < n; j = (j + 1 == a) ? b : j + 1) { /* outside the bounds: [0, a) and [b, n) */
        float bias = mv;
        if (mf) bias += mf[j];
        s[j] += bias;
    }
    if (mb && mf) {
        for (int64_t j = a; j < b; j++) {
            float bias = mb[j] ? 0.0f : mv;
            bias += mf[j];
            s[j] += bias;
        }
    } else if (mb) {
        for (int64_t j = a; j < b; j++) s[j] += mb[j] ? 0.0f : mv;
    } else if (mf) {
        for (int64_t j = a; j < b; j++) s[j] += 0.0f + mf[j];
    } /* no mask: keys within the bounds take no bias */
}

/* ---- shared by the attention kernels (this one and paged_attention.h) ------------------------------ */
/* Row m's scores s[0..n) for keys jt .. jt+n-1 (already q.k): softcap, causal/window bounds
 * [lo, hi] and masks (bias mv where disallowed), then the online-softmax update of (m, l) with
 * alpha the old accumulator's factor. Returns 0 when the row sees none of these keys (s zeroed). */
static inline int icc_at_row(icc_at_ws *w, int64_t m, int64_t jt, int64_t n, int skip, float cap, int has_mask,
                             const uint8_t *mask_bool, const float *mask_float, int64_t mstride, float mv) {
    float *s = w->s + m * ICC_AT_TK;
    w->alpha[m] = 1.0f;
    if (skip && (jt + n <= w->lo[m] || jt > w->hi[m])) { /* nothing this row may see */
        memset(s, 0, (size_t)n * sizeof(float));
        return 0;
    }
    if (cap != 0.0f)
        for (int64_t j = 0; j < n; j++) s[j] = tanhf(s[j] / cap) * cap;
    if (has_mask || jt < w->lo[m] || jt + n - 1 > w->hi[m])
        icc_at_bias(s, n, jt, w->lo[m], w->hi[m], mask_bool, mask_float, w->moff[m], mstride, mv);
    const float mt = icc_at_rowmax(s, n);
    if (isinf(mt) && mt < 0) { /* every score -inf: p = 0 */
        memset(s, 0, (size_t)n * sizeof(float));
        return 0;
    }
    const float mnew = mt > w->m[m] ? mt : w->m[m];
    const float alpha = isinf(w->m[m]) ? 0.0f : expf(w->m[m] - mnew);
    w->l[m] = w->l[m] * alpha + icc_at_expsum(s, n, mnew);
    w->m[m] = mnew;
    w->alpha[m] = alpha;
    return 1;
}

/* The start of a unit: rows t0 .. t0+M-1 of kv group (b, g) get their scaled query, the key bounds
 * [lo, hi] of the causal triangle / window (off = keys before the first query; Skv keys in all),
 * their mask offset (mcol: the mask column of key 0) and a fresh online-softmax state; with skip,
 * [kb, ke) is narrowed to the keys some row may see. */
static inline void icc_at_begin(icc_at_ws *w, const float *q, float scale, int64_t b, int64_t g, int64_t t0,
                                int64_t M, int64_t rep, int64_t S, int64_t H, int64_t D, int64_t Dv, int64_t off,
                                int64_t Skv, int causal, int64_t left_window, int has_mask, const int64_t *ms,
                                int64_t mcol, int skip, int64_t *kb, int64_t *ke) {
    int64_t klo = Skv, khi = -1;
    for (int64_t m = 0; m < M; m++) {
        const int64_t t = t0 + m, i = t / rep, h = g * rep + t % rep;
        const float *qr = q + (b * S + i) * H * D + h * D;
        float *qs = w->q + m * D;
        for (int64_t d = 0; d < D; d++) qs[d] = qr[d] * scale;
        int64_t lo = left_window >= 0 ? i + off - left_window : 0;
        int64_t hi = causal ? i + off : Skv - 1;
        w->lo[m] = lo < 0 ? 0 : lo;
        w->hi[m] = hi > Skv - 1 ? Skv - 1 : hi;
        w->moff[m] = has_mask ? b * ms[0] + h * ms[1] + i * ms[2] + mcol : 0; /* strides unset without a mask */
        w->m[m] = -INFINITY;
        w->l[m] = 0.0f;
        memset(w->acc + m * Dv, 0, (size_t)Dv * sizeof(float));
        if (w->lo[m] < klo) klo = w->lo[m];
        if (w->hi[m] > khi) khi = w->hi[m];
    }
    if (skip) { /* keys no row may see are never read */
        if (*kb < klo) *kb = klo;
        if (*ke > khi + 1) *ke = khi + 1;
    }
}

/* Rows t0 .. t0+M-1 of kv group bg after a unit over split sp: their outputs (acc / l) into out
 * [B, S, H*Dv], or, with nsplit > 1, this split's (max, sum, acc[Dv]) into part. ok = 0 (the
 * workspace could not be allocated): NaN rows, never silently wrong numbers. */
static inline void icc_at_unit_out(const icc_at_ws *w, int ok, float *out, float *part, int64_t bg, int64_t t0,
                                   int64_t M, int64_t sp, int64_t nsplit, int64_t R, int64_t S, int64_t Hkv,
                                   int64_t rep, int64_t Dv) {
    const int64_t b = bg / Hkv, g = bg % Hkv, HDv = Hkv * rep * Dv;
    for (int64_t m = 0; m < M; m++) {
        const int64_t t = t0 + m;
        float *o = nsplit > 1 ? part + ((bg * R + t) * nsplit + sp) * (Dv + 2)
                              : out + (b * S + t / rep) * HDv + (g * rep + t % rep) * Dv;
        if (!ok) {
            for (int64_t d = 0; d < (nsplit > 1 ? Dv + 2 : Dv); d++) o[d] = NAN;
            continue;
        }
        const float *acc = w->acc + m * Dv;
        if (nsplit > 1) {
            o[0] = w->m[m];
            o[1] = w->l[m];
            memcpy(o + 2, acc, (size_t)Dv * sizeof(float));
        } else {
            const float inv = w->l[m] > 0.0f ? 1.0f / w->l[m] : 0.0f;
            for (int64_t d = 0; d < Dv; d++) o[d] = acc[d] * inv;
        }
    }
}

/* How many parts the keys are split into: [0, ICC_AT_SPLIT), [ICC_AT_SPLIT, 2 ICC_AT_SPLIT), ...
 * Batch invariance: a query row's result must not depend on how many rows share the call (a
 * decode step alone, 16 decodes batched, k + 1 rows verifying speculated tokens, a prompt chunk)
 * nor on the thread count, or greedy tokens drift apart at near ties -- so the split points are
 * fixed key positions, never derived from the work or the threads. Splits also give two threads
 * work at one kv head and a long context (a split that a row cannot see is skipped and merges as
 * nothing). */
static inline int64_t icc_at_splits(int64_t keys) {
    return keys > ICC_AT_SPLIT ? (keys + ICC_AT_SPLIT - 1) / ICC_AT_SPLIT : 1;
}

/* One row's split partials (max, sum, acc) merged into its output. */
static inline void icc_at_merge_row(const float *part, float *out, int64_t S, int64_t Hkv, int64_t R, int64_t rep,
                                    int64_t Dv, int64_t nsplit, int64_t row) {
    const int64_t HDv = Hkv * rep * Dv;
    const int64_t bg = row / R, t = row % R, b = bg / Hkv, g = bg % Hkv;
    const float *pr = part + row * nsplit * (Dv + 2);
    float mx = -INFINITY, l = 0.0f;
    for (int64_t sp = 0; sp < nsplit; sp++) { /* a NaN (failed split) stays NaN */
        const float ms = pr[sp * (Dv + 2)];
        mx = (ms > mx || ms != ms) ? ms : mx;
    }
    float *o = out + (b * S + t / rep) * HDv + (g * rep + t % rep) * Dv;
    for (int64_t d = 0; d < Dv; d++) o[d] = 0.0f;
    if (isinf(mx) && mx < 0) return;
    for (int64_t sp = 0; sp < nsplit; sp++) {
        const float *ps = pr + sp * (Dv + 2);
        if (isinf(ps[0]) && ps[0] < 0) continue;
        const float f = expf(ps[0] - mx);
        l += ps[1] * f;
        for (int64_t d = 0; d < Dv; d++) o[d] += ps[2 + d] * f;
    }
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int64_t d = 0; d < Dv; d++) o[d] *= inv;
}

/* Every row's splits merged: an orphaned `omp for` with par = 1 (inside the kernel's parallel
 * region), a plain loop with par = 0. */
static inline void icc_at_merge(const float *part, float *out, int64_t B, int64_t S, int64_t Hkv, int64_t R,
                                int64_t rep, int64_t Dv, int64_t nsplit, int par) {
    if (par) {
#pragma omp for schedule(static)
        for (int64_t row = 0; row < B * Hkv * R; row++) icc_at_merge_row(part, out, S, Hkv, R, rep, Dv, nsplit, row);
    } else {
        for (int64_t row = 0; row < B * Hkv * R; row++) icc_at_merge_row(part, out, S, Hkv, R, rep, Dv, nsplit, row);
    }
}

/* Rows t0 .. t0+M-1 of kv head group bg against keys [kb, ke): online softmax into w. */
static inline void icc_at_unit(const icc_attention_args *a, icc_at_ws *w, int64_t bg, int64_t t0,
                               int64_t M, int64_t kb, int64_t ke) {
    const int64_t S = a->S, H = a->H, Hkv = a->Hkv, D = a->D, Dv = a->Dv, rep = H / Hkv;
    const int cached = a->present_k != NULL, half = cached && a->cache_dtype == 1;
    const int64_t Skv = (cached ? a->P : 0) + S, off = Skv - S;
    const int64_t b = bg / Hkv, g = bg % Hkv;
    const float mv = a->mask_value, cap = a->softcap;
    const int skip = isinf(mv) && mv < 0;
    const int has_mask = a->mask_bool != NULL || a->mask_float != NULL;
    const int64_t *ms = a->mask_stride;
    icc_at_begin(w, a->q, a->scale, b, g, t0, M, rep, S, H, D, Dv, off, Skv, a->causal, a->left_window, has_mask, ms,
                 0, skip, &kb, &ke);
    const float *kbase = NULL, *vbase = NULL; /* fp32 keys and values read in place */
    int64_t ks = D, vs = Dv;
    if (cached && !half) {
        kbase = (const float *)a->present_k + bg * a->present_cap * D;
        vbase = (const float *)a->present_v + bg * a->present_cap * Dv;
    } else if (!cached) {
        kbase = a->k + b * S * Hkv * D + g * D;
        vbase = a->v + b * S * Hkv * Dv + g * Dv;
        ks = Hkv * D;
        vs = Hkv * Dv;
    }
    const uint16_t *kh = half ? (const uint16_t *)a->present_k + bg * a->present_cap * D : NULL;
    const uint16_t *vh = half ? (const uint16_t *)a->present_v + bg * a->present_cap * Dv : NULL;
    const int in_place_half = half && ICC_AT_HALF_FITS(D, Dv);
    (void)in_place_half; /* (without F16C: the buffer path only) */
    for (int64_t j0 = kb; j0 < ke; j0 += ICC_AT_TK) {
        const int64_t n = (ke - j0 < ICC_AT_TK) ? ke - j0 : ICC_AT_TK;
        if (kbase) {
            icc_at_prefetch_rows(vbase + j0 * vs, vs, Dv, n); /* (fp32, read in place) */
        } else if (half) { /* this tile's values and the next tile's keys (rows contiguous per kv head) */
            const int64_t j1 = j0 + ICC_AT_TK, n1 = (ke - j1 < ICC_AT_TK) ? ke - j1 : ICC_AT_TK;
            if (j0 == kb) icc_at_prefetch_bytes(kh + j0 * D, n * D * 2);
            if (n1 > 0) icc_at_prefetch_bytes(kh + j1 * D, n1 * D * 2);
            icc_at_prefetch_bytes(vh + j0 * Dv, n * Dv * 2);
        }
        int any = 0;
        for (int64_t m = 0; m < M && !any; m++) any = !skip || (j0 + n > w->lo[m] && j0 <= w->hi[m]);
        if (!any) continue;
#ifdef ICC_AT_HALF_INLINE
        if (in_place_half) {
            icc_at_qk_h(w->q, D, M, kh + j0 * D, D, n, w->s, w->kt);
        } else
#endif
        if (half) {
            icc_at_from_f16(w->kt, kh + j0 * D, n * D);
            icc_at_qk(w->q, D, M, w->kt, D, n, n, w->s);
        } else {
            icc_at_qk(w->q, D, M, kbase + j0 * ks, ks, n, ke - j0, w->s);
        }
        any = 0;
        for (int64_t m = 0; m < M; m++)
            any |= icc_at_row(w, m, j0, n, skip, cap, has_mask, a->mask_bool, a->mask_float, ms[3], mv);
        if (!any) continue;
#ifdef ICC_AT_HALF_INLINE
        if (in_place_half) {
            icc_at_pv_h(w->acc, Dv, M, w->alpha, w->s, vh + j0 * Dv, Dv, n);
        } else
#endif
        if (half) {
            icc_at_from_f16(w->vt, vh + j0 * Dv, n * Dv);
            icc_at_pv_all(w->acc, Dv, M, w->alpha, w->s, w->vt, Dv, n, n);
        } else {
            icc_at_pv_all(w->acc, Dv, M, w->alpha, w->s, vbase + j0 * vs, vs, n, ke - j0);
        }
    }
}

/* Cache tensor x % 2 (0 = keys, 1 = values) of kv head x / 2: the past and the new rows (icc_at_append). */
static inline void icc_at_append_one(const icc_attention_args *a, int64_t x) {
    if (x % 2 == 0)
        icc_at_append(a, x / 2, a->past_k, a->present_k, a->k, a->D);
    else
        icc_at_append(a, x / 2, a->past_v, a->present_v, a->v, a->Dv);
}

/* Work unit u: (kv head group, row chunk, key split), its result into out or its split's partials. */
static inline void icc_at_unit_run(const icc_attention_args *a, icc_at_ws *w, int ok, float *part, int64_t u,
                                   int64_t nsplit, int64_t chunks, int64_t R, int64_t Skv) {
    const int64_t sp = u % nsplit, c = (u / nsplit) % chunks, bg = u / (nsplit * chunks);
    const int64_t t0 = c * ICC_AT_MR, M = (R - t0 < ICC_AT_MR) ? R - t0 : ICC_AT_MR;
    const int64_t kb = sp * ICC_AT_SPLIT, ke = (kb + ICC_AT_SPLIT < Skv) ? kb + ICC_AT_SPLIT : Skv;
    if (ok) icc_at_unit(a, w, bg, t0, M, kb, ke);
    icc_at_unit_out(w, ok, a->out, part, bg, t0, M, sp, nsplit, R, a->S, a->Hkv, a->H / a->Hkv, a->Dv);
}

/* A thread's workspace carved out of its ``mem``: q, s, acc, m, l, alpha, then ``gap`` floats the
 * caller uses (the paged kernel: a row of ones), then the converted K and V tiles when ``tiles``,
 * and from float nf on the int64 row bounds. Returns the gap's first float. */
static inline float *icc_at_carve(icc_at_ws *w, float *mem, int64_t D, int64_t Dv, int64_t gap, int tiles, size_t nf) {
    w->q = mem;
    w->s = w->q + ICC_AT_MR * D;
    w->acc = w->s + ICC_AT_MR * ICC_AT_TK;
    w->m = w->acc + ICC_AT_MR * Dv;
    w->l = w->m + ICC_AT_MR;
    w->alpha = w->l + ICC_AT_MR;
    float *g = w->alpha + ICC_AT_MR;
    w->kt = g + gap;
    w->vt = w->kt + (tiles ? ICC_AT_TK * D : 0);
    w->lo = (int64_t *)(void *)(mem + nf);
    w->hi = w->lo + ICC_AT_MR;
    w->moff = w->hi + ICC_AT_MR;
    return g;
}

/* The kernel's work after its plan: the new rows into the cache, the units, the merge. par = 1:
 * called by every thread of a parallel region, the loops shared as orphaned `omp for`s; par = 0:
 * the calling thread alone, with no OpenMP region at all (a serial region still costs a team
 * start and a barrier, measured ~1.1 us a call: a third of a 128-key decode of 9 heads). */
static inline void icc_at_run(const icc_attention_args *a, float *part, int64_t nsplit, char *ws, size_t stride,
                              size_t nf, int par) {
    const int64_t B = a->B, S = a->S, H = a->H, Hkv = a->Hkv, D = a->D, Dv = a->Dv;
    const int cached = a->present_k != NULL, half = cached && a->cache_dtype == 1;
    const int64_t Skv = (cached ? a->P : 0) + S;
    const int64_t rep = H / Hkv, R = rep * S, chunks = (R + ICC_AT_MR - 1) / ICC_AT_MR;
    const int64_t units = B * Hkv * chunks * nsplit, appends = cached ? 2 * B * Hkv : 0;
    if (par) { /* the cache first (the implicit barrier orders it before any read) */
#pragma omp for schedule(static)
        for (int64_t x = 0; x < appends; x++) icc_at_append_one(a, x);
    } else {
        for (int64_t x = 0; x < appends; x++) icc_at_append_one(a, x);
    }
    icc_at_ws w;
    memset(&w, 0, sizeof w);
    float *mem = ws ? (float *)(void *)(ws + stride * (size_t)(par ? icc_thread() : 0)) : NULL;
    if (mem) icc_at_carve(&w, mem, D, Dv, 0, half, nf);
    if (par) {
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < units; u++) icc_at_unit_run(a, &w, mem != NULL, part, u, nsplit, chunks, R, Skv);
    } else {
        for (int64_t u = 0; u < units; u++) icc_at_unit_run(a, &w, mem != NULL, part, u, nsplit, chunks, R, Skv);
    }
    if (nsplit > 1) icc_at_merge(part, a->out, B, S, Hkv, R, rep, Dv, nsplit, par);
}

static void icc_attention(const icc_attention_args *a) {
    const int64_t B = a->B, S = a->S, H = a->H, Hkv = a->Hkv, D = a->D, Dv = a->Dv;
    if (B <= 0 || S <= 0 || H <= 0) return;
    const int cached = a->present_k != NULL;
    const int half = cached && a->cache_dtype == 1;
    const int64_t Skv = (cached ? a->P : 0) + S;
    const int64_t R = (H / Hkv) * S;
    const int parallel = B * H * S * Skv * (D + Dv) >= ICC_AT_SERIAL_WORK && icc_max_threads() > 1;
    int64_t nsplit = icc_at_splits(Skv);
    /* per row and split: (max, sum, acc[Dv]) */
    float *part = NULL;
    if (nsplit > 1) {
        part = (float *)icc_scratch(ICC_SCR_PART, (size_t)(B * Hkv * R * nsplit * (Dv + 2)) * sizeof(float));
        if (!part) nsplit = 1; /* no room for the partials: unsplit */
    }
    /* each thread's workspace: the floats, then (aligned) the int64 row bounds */
    size_t nf = (size_t)(ICC_AT_MR * (D + ICC_AT_TK + Dv + 3) + (half ? ICC_AT_TK * (D + Dv) : 0)), stride;
    nf = (nf + 15) & ~(size_t)15; /* the int64 arrays after the floats stay aligned */
    char *ws = icc_scratch_threads(ICC_SCR_WS, nf * sizeof(float) + 3 * ICC_AT_MR * sizeof(int64_t), &stride);
    if (parallel) {
#pragma omp parallel
        icc_at_run(a, part, nsplit, ws, stride, nf, 1);
    } else {
        icc_at_run(a, part, nsplit, ws, stride, nf, 0);
    }
}

#endif
