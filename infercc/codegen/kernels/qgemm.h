/* Weight-only quantized matmul and gather, on the layout of codegen/packing.py pack_quant:
 * a 64-byte header, then panels of ICC_PANEL (16) output columns; per panel and K block the codes
 * (4 consecutive k of one column in one 32-bit lane, 16 columns per 64 bytes, 4-bit: two such
 * groups per 64 bytes, low nibbles first), then all scales [blocks][16] float (flag 4: fp16, when
 * every scale is exactly an fp16 -- GGUF's are -- 10% fewer bytes to stream), zero points
 * [blocks][16] uint8 (header flag 1, else 2^(bits-1)), rests [blocks][16] float (flag 2; fp16 with
 * flag 8); flag 16: the rests are block minimums m of w = s * c + m (GGUF Q4_1's own form), used as
 * s * (c - z) + fma(z, s, m) with z = clamp(rint(-m / s), 0, 2^bits - 1) (icc_q_min_zero): the
 * integer zero point nearest the grid's own zero, the one the ONNX Runtime lowering gives
 * MatMulNBits (passes/quantize/native.py; packing.py stores this form only where that z and
 * fma(z, s, m) give back its zero points and float32 rests bit for bit). The int8 activations'
 * rounding error is sum_k e_k s (c_k - z): with the same z on both runtimes it is the same error.
 *
 * The method is ggml's (llama.cpp vec_dot_q4_1_q8_1): each activation row is quantized to int8 in
 * the weight's blocks exactly as ONNX Runtime's MLAS does at accuracy_level 4 (d = max|x| / 127,
 * q = x * (127 / max|x|) rounded to nearest, ties to even, as cvtps / rintf do in the default
 * rounding mode; d * sum q as the zero point's block sum), every block is one integer dot product
 * per column, and the block's float terms are folded in afterwards:
 *     sum_k x_k (s (c_k - z) + r) ~= s d (sum_k q_k c_k - z sum_k q_k) + r sum_k x_k
 * (the zero point against the *quantized* sum, so the only error is sum_k e_k s (c_k - z), e_k the
 * activation's rounding, |e_k| <= d / 2; the rest against the exact float sum). Because a 32-bit
 * lane sums 4 consecutive k of *one* column, a register of lanes is 16 (AVX2: 8) columns and no
 * horizontal sum is ever needed: per 4 k one broadcast of 4 activation bytes feeds
 *   AVX-512 VNNI: _mm512_dpbusd_epi32 (u8 codes x s8 activations, no saturation);
 *   AVX2: _mm256_maddubs_epi16 + _mm256_madd_epi16 (or AVX-VNNI's dpbusd); 4-bit codes add 8
 *         maddubs results in int16 (exact) before one madd widening; 8-bit codes go through the
 *         sign trick (|c - 128| x sign(q, c - 128)) since u8 255 x s8 127 x 2 saturates int16;
 *   plain C: int32 loops.
 * M > 1: all rows are quantized once, then each panel's blocks are used against ICC_Q_MR rows at
 * a time while in L1 (the 4-bit unpacking is shared by those rows too). Threads split the panels.
 * Without VNNI a row costs its own 16 maddubs per block of 16 columns, so an AVX2 step of k rows
 * reads the weights once but still does k rows of multiplies (benchmarks.kernels --rows). */
#ifndef ICC_QGEMM_H
#define ICC_QGEMM_H
#include <math.h>
#include "common.h"

#define ICC_QHEADER 64
#define ICC_QFLAG_ZP 1
#define ICC_QFLAG_REST 2
#define ICC_QFLAG_F16_SCALES 4
#define ICC_QFLAG_F16_RESTS 8
#define ICC_QFLAG_MINS 16
/* software prefetch distance in bytes of the weight stream: at 4096 a one-row AVX2 decode step of
 * SmolLM2-135M Q4_1 (84 MB, one thread) ran at 12.4 GB/s, at 8192 15.1, 16384 14.8: the hardware
 * prefetcher alone leaves most of the DRAM latency exposed at one stream per core */
#ifndef ICC_Q_PREFETCH
#define ICC_Q_PREFETCH 8192
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define ICC_Q_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ICC_Q_AVX2 1
#endif
/* rows per tile: each unpacked weight vector serves this many rows (AVX-512: 3 x 8 accumulators
 * of 32 registers; AVX2: 8 too, measured with GCC 12 on Zen 3 per row and block of 16 columns:
 * 25 cycles at 1 row, 19 a row at 2..5 and 15 at 8, where the 6- and 7-row tiles spill, 27 a
 * row: icc_q_tile_at splits those rests) */
#ifndef ICC_Q_MR
#if defined(ICC_Q_AVX512) || defined(ICC_Q_AVX2)
#define ICC_Q_MR 8
#else
#define ICC_Q_MR 4
#endif
#endif

/* Where one panel's parts are. */
typedef struct {
    const uint8_t *codes;  /* the panel's first byte: its codes, then the rest of its stride */
    int64_t pf_step;  /* bytes of the panel's stream prefetched per block (icc_q_prefetch) */
    const float *scales, *rests; /* scales NULL when they are fp16 (scales16) */
    const uint16_t *scales16, *rests16; /* rests16: fp16 rests (then rests is NULL) */
    const uint8_t *zps;
    float z0;  /* the zero point without a zero-point array: 2^(bits-1) */
    float zmax;  /* the largest code: 2^bits - 1 */
    int mins;  /* the rests are minimums m: zero point icc_q_min_zero(m, scale), rest fma(z, scale, m) */
} icc_qpanel;

static inline icc_qpanel icc_q_panel(const void *w, int64_t p, int64_t nb, int64_t code_bytes) {
    const int32_t *h = (const int32_t *)w;
    const int flags = h[6];
    const uint8_t *base = (const uint8_t *)w + ICC_QHEADER + p * (int64_t)h[7];
    icc_qpanel q;
    q.codes = base;
    q.pf_step = ((int64_t)h[7] / nb + 63) & ~(int64_t)63;
    base += nb * code_bytes;
    q.scales = (flags & ICC_QFLAG_F16_SCALES) ? NULL : (const float *)base;
    q.scales16 = (flags & ICC_QFLAG_F16_SCALES) ? (const uint16_t *)base : NULL;
    base += nb * ICC_PANEL * ((flags & ICC_QFLAG_F16_SCALES) ? 2 : 4);
    q.zps = (flags & ICC_QFLAG_ZP) ? base : NULL;
    base += (flags & ICC_QFLAG_ZP) ? nb * ICC_PANEL : 0;
    q.rests = (flags & ICC_QFLAG_REST) && !(flags & ICC_QFLAG_F16_RESTS) ? (const float *)base : NULL;
    q.rests16 = (flags & ICC_QFLAG_REST) && (flags & ICC_QFLAG_F16_RESTS) ? (const uint16_t *)base : NULL;
    q.z0 = (float)(1 << (h[2] - 1));
    q.zmax = (float)((1 << h[2]) - 1);
    q.mins = (flags & ICC_QFLAG_MINS) != 0;
    return q;
}

/* IEEE binary16 -> float, exactly (every half is a float). */
static inline float icc_half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    uint32_t bits;
    if (exp == 0x1F) bits = sign | 0x7F800000u | (man << 13); /* inf / nan */
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (!man) bits = sign;
    else { /* subnormal half: normalize */
        int e = -1;
        uint32_t m = man;
        do { m <<= 1; e++; } while (!(m & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((m & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Block b's share of the software prefetch: the panel is one sequential stream (codes, then its
 * scales, zero points and rests, then the next panel), so each block fetches pf_step bytes of it
 * ICC_Q_PREFETCH ahead -- the whole stride, scales included, not only the codes' part of it. */
ICC_INLINE void icc_q_prefetch(icc_qpanel P, int64_t b) {
    const char *p = (const char *)P.codes + ICC_Q_PREFETCH + b * P.pf_step;
    for (int64_t off = 0; off < P.pf_step; off += 64) __builtin_prefetch(p + off, 0, 3);
}

static inline float icc_q_scale(icc_qpanel P, int64_t i) {
    return P.scales ? P.scales[i] : icc_half_to_float(P.scales16[i]);
}

/* A minimum's block zero point: clamp(rint(-m / s), 0, zmax) in float32, rint in the default
 * rounding mode (ties to even) -- numpy's np.clip(np.rint(-(m / s)), 0, zmax) in native.py. */
static inline float icc_q_min_zero(float m, float s, float zmax) {
    const float z = rintf(-m / s);
    return z < 0.0f ? 0.0f : (z > zmax ? zmax : z);
}

/* Block i's zero point and rest (the float added to each weight). */
static inline void icc_q_zero_rest(icc_qpanel P, int64_t i, float *z, float *rest) {
    const float r = P.rests ? P.rests[i] : P.rests16 ? icc_half_to_float(P.rests16[i]) : 0.0f;
    if (P.mins) {
        const float s = icc_q_scale(P, i);
        *z = icc_q_min_zero(r, s, P.zmax);
        *rest = fmaf(*z, s, r);  /* one rounding: the float32 rest the importer computed */
    } else {
        *z = P.zps ? (float)P.zps[i] : P.z0;
        *rest = r;
    }
}

#if defined(ICC_Q_AVX512)
/* icc_q_zero_rest for 16 columns of a block */
ICC_INLINE void icc_q_zero_rest512(icc_qpanel P, int64_t i, __m512 s, __m512 *z, __m512 *rest) {
    const __m512 r = P.rests ? _mm512_loadu_ps(P.rests + i)
                   : P.rests16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(P.rests16 + i)))
                               : _mm512_setzero_ps();
    if (P.mins) {
        const __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_sub_ps(_mm512_setzero_ps(), r), s),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        *z = _mm512_min_ps(_mm512_max_ps(q, _mm512_setzero_ps()), _mm512_set1_ps(P.zmax));
        *rest = _mm512_fmadd_ps(*z, s, r);
    } else {
        *z = P.zps ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(P.zps + i))))
                   : _mm512_set1_ps(P.z0);
        *rest = r;
    }
}
#endif

/* Activations quantized per block: q [M][nb * block] int8 (zero past K), and per (row, block) the
 * scale d, d * sum(q) and the float sum of x. */
typedef struct {
    int8_t *q;
    float *d, *dq, *sx;
    void *mem;
} icc_qact;

static void icc_quantize_block(const float *x, int64_t n, int64_t block, int8_t *q, float *d,
                               float *dq, float *sx) {
    float amax = 0.0f, sum = 0.0f;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 vmax = _mm512_setzero_ps(), vsum = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        vsum = _mm512_add_ps(vsum, v);
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
    }
    amax = _mm512_reduce_max_ps(vmax);
    sum = _mm512_reduce_add_ps(vsum);
#elif defined(__AVX2__)
    if (n >= 8) {
        __m256 vmax = _mm256_setzero_ps(), vsum = _mm256_setzero_ps();
        for (; i + 8 <= n; i += 8) {
            const __m256 v = _mm256_loadu_ps(x + i);
            vsum = _mm256_add_ps(vsum, v);
            /* |v| first: max_ps returns its second operand for a NaN, so NaNs are skipped as below */
            vmax = _mm256_max_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), v), vmax);
        }
        amax = icc_hmax256(vmax);
        sum = icc_hsum256(vsum);
    }
#endif
    for (; i < n; i++) {
        float a = x[i] < 0 ? -x[i] : x[i];
        sum += x[i];
        amax = a > amax ? a : amax;
    }
    const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t qsum = 0;
    i = 0;
#if defined(__AVX512F__)
    __m512i vq = _mm512_setzero_si512();
    for (; i + 16 <= n; i += 16) {
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(id)));
        vq = _mm512_add_epi32(vq, v);
        _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtsepi32_epi8(v));
    }
    qsum = _mm512_reduce_add_epi32(vq);
#elif defined(__AVX2__)
    /* the loop below, 8 at a time: round to nearest, ties to even (cvtps in the default rounding
     * mode, as rintf below and MLAS), clamp to +-127 (identical q, so identical integer sums, on
     * every path) */
    __m256i vq = _mm256_setzero_si256();
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(id));
        __m256i r = _mm256_cvtps_epi32(v);
        r = _mm256_max_epi32(_mm256_min_epi32(r, _mm256_set1_epi32(127)), _mm256_set1_epi32(-127));
        vq = _mm256_add_epi32(vq, r);
        const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(r, r), _mm256_setzero_si256());
        const int32_t lo = _mm_cvtsi128_si32(_mm256_castsi256_si128(b)), hi = _mm_cvtsi128_si32(_mm256_extracti128_si256(b, 1));
        memcpy(q + i, &lo, 4);
        memcpy(q + i + 4, &hi, 4);
    }
    {
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(vq), _mm256_extracti128_si256(vq, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
        qsum = _mm_cvtsi128_si32(t);
    }
#endif
    for (; i < n; i++) {
        /* ties to even, as MLAS's _mm256_round_ps / cvtps (and the AVX-512 loop above) */
        int32_t r = (int32_t)rintf(x[i] * id);
        r = r > 127 ? 127 : (r < -127 ? -127 : r);
        q[i] = (int8_t)r;
        qsum += r;
    }
    for (; i < block; i++) q[i] = 0;
    *d = amax / 127.0f;
    *dq = *d * (float)qsum;
    *sx = sum;
}

static int icc_quantize_act(int64_t M, int64_t K, int64_t block, const float *x, icc_qact *a) {
    const int64_t nb = (K + block - 1) / block, kp = nb * block;
    const size_t qbytes = ((size_t)(M * kp) + 63) & ~(size_t)63;
    a->mem = icc_scratch(ICC_SCR_QACT, qbytes + 3 * sizeof(float) * (size_t)(M * nb));
    if (!a->mem) return 0;
    a->q = (int8_t *)a->mem;
    a->d = (float *)((char *)a->mem + qbytes);
    a->dq = a->d + M * nb;
    a->sx = a->dq + M * nb;
#pragma omp parallel for schedule(static) if (M * K >= (1 << 14))
    for (int64_t i = 0; i < M * nb; i++) {
        int64_t m = i / nb, b = i % nb, k0 = b * block;
        icc_quantize_block(x + m * K + k0, K - k0 < block ? K - k0 : block, block, a->q + m * kp + k0,
                           a->d + i, a->dq + i, a->sx + i);
    }
    return 1;
}

static inline int32_t icc_load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

#include "qgemm_avx2.h"

/* y[0:R, 0:ncols] = x[0:R] @ one panel. BITS constant per instantiation; xq/d/dq/sx point at row 0
 * of the tile, rows kp (resp. nb) apart. */
ICC_INLINE void icc_q_tile(const int R, const int BITS, int64_t block, int64_t nb, icc_qpanel P,
                           const int8_t *xq, int64_t kp, const float *d, const float *dq,
                           const float *sx, float *y, int64_t ldy, int64_t ncols) {
    const int64_t cb = block * ICC_PANEL * BITS / 8;
#if defined(ICC_Q_AVX512)
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    __m512 yacc[ICC_Q_MR];
    for (int r = 0; r < R; r++) yacc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *c = P.codes + b * cb;
        const int8_t *xb = xq + b * block;
        icc_q_prefetch(P, b);
        __m512i a0[ICC_Q_MR], a1[ICC_Q_MR];
        for (int r = 0; r < R; r++) a0[r] = a1[r] = _mm512_setzero_si512();
        for (int64_t h = 0; h < block / 8; h++) {
            __m512i lo, hi;
            if (BITS == 4) {
                __m512i v = _mm512_loadu_si512(c + 64 * h);
                lo = _mm512_and_si512(v, m4);
                hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            } else {
                lo = _mm512_loadu_si512(c + 128 * h);
                hi = _mm512_loadu_si512(c + 128 * h + 64);
            }
            for (int r = 0; r < R; r++) {
                a0[r] = _mm512_dpbusd_epi32(a0[r], lo, _mm512_set1_epi32(icc_load_i32(xb + r * kp + 8 * h)));
                a1[r] = _mm512_dpbusd_epi32(a1[r], hi, _mm512_set1_epi32(icc_load_i32(xb + r * kp + 8 * h + 4)));
            }
        }
        const __m512 s = P.scales ? _mm512_loadu_ps(P.scales + b * ICC_PANEL)
                                  : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(P.scales16 + b * ICC_PANEL)));
        __m512 z, rest;
        icc_q_zero_rest512(P, b * ICC_PANEL, s, &z, &rest);
        for (int r = 0; r < R; r++) {
            /* s d (sum q c) - s z (d sum q): both integer sums are exact in float */
            __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(a0[r], a1[r]));
            __m512 t = _mm512_fnmadd_ps(z, _mm512_set1_ps(dq[r * nb + b]), _mm512_mul_ps(dot, _mm512_set1_ps(d[r * nb + b])));
            yacc[r] = _mm512_fmadd_ps(s, t, yacc[r]);
        }
        if (P.rests || P.rests16)
            for (int r = 0; r < R; r++) yacc[r] = _mm512_fmadd_ps(rest, _mm512_set1_ps(sx[r * nb + b]), yacc[r]);
    }
    const __mmask16 mask = ncols >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << ncols) - 1);
    for (int r = 0; r < R; r++) _mm512_mask_storeu_ps(y + r * ldy, mask, yacc[r]);
#elif defined(ICC_Q_AVX2)
    (void)cb;
    icc_q_tile_avx2(R, BITS, block, nb, P, xq, kp, d, dq, sx, y, ldy, ncols);
#else
    float yacc[ICC_Q_MR][ICC_PANEL];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < ICC_PANEL; j++) yacc[r][j] = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *c = P.codes + b * cb;
        const int8_t *xb = xq + b * block;
        int32_t dot[ICC_Q_MR][ICC_PANEL];
        for (int r = 0; r < R; r++)
            for (int j = 0; j < ICC_PANEL; j++) dot[r][j] = 0;
        for (int64_t g = 0; g < block / 4; g++) {
            const uint8_t *cg = BITS == 4 ? c + 64 * (g >> 1) : c + 64 * g;
            const int nib = BITS == 4 ? (int)(g & 1) * 4 : 0;
            for (int r = 0; r < R; r++) {
                const int8_t *xg = xb + r * kp + 4 * g;
                for (int j = 0; j < ICC_PANEL; j++) {
                    int32_t s = 0;
                    for (int e = 0; e < 4; e++) {
                        int code = BITS == 4 ? (cg[4 * j + e] >> nib) & 0x0F : cg[4 * j + e];
                        s += code * xg[e];
                    }
                    dot[r][j] += s;
                }
            }
        }
        float s[ICC_PANEL];
        for (int j = 0; j < ICC_PANEL; j++) s[j] = icc_q_scale(P, b * ICC_PANEL + j);
        for (int j = 0; j < ICC_PANEL; j++) {
            float z, rest;
            icc_q_zero_rest(P, b * ICC_PANEL + j, &z, &rest);
            for (int r = 0; r < R; r++) {
                float t = (float)dot[r][j] * d[r * nb + b] - z * dq[r * nb + b];
                yacc[r][j] += s[j] * t + rest * sx[r * nb + b];
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int64_t j = 0; j < ncols; j++) y[r * ldy + j] = yacc[r][j];
#endif
}

/* Which (bits, block) tiles are compiled: bit (BITS == 8) * 5 + i for blocks 16, 32, 64, 128 (i =
 * 0..3) and any other block (i = 4). The generated source defines it from its own matmuls
 * (emit.py: a SmolLM2 library then builds in about half the time); without it, all of them. */
#ifndef ICC_Q_USED
#define ICC_Q_USED 0x3FF
#endif
#define ICC_Q_HAS(BITS, i) ((ICC_Q_USED >> (((BITS) == 8) * 5 + (i))) & 1)

/* A tile the library was built without (ICC_Q_USED): NaN, never stale values. */
static void icc_q_absent(int R, float *y, int64_t ldy, int64_t ncols) {
    for (int r = 0; r < R; r++)
        for (int64_t j = 0; j < ncols; j++) y[r * ldy + j] = __builtin_nanf("");
}

/* Every (rows, bits, block) its own instantiation: with the block a constant the dot product over
 * one block unrolls completely and the compiler schedules the blocks' chains into each other. The
 * branches of tiles left out are constant-false, so they are never instantiated. */
#define ICC_Q_BLOCKS(R, BITS)                                                                        \
    if (ICC_Q_HAS(BITS, 0) && block == 16) icc_q_tile(R, BITS, 16, nb, P, xq, kp, d, dq, sx, y, ldy, ncols); \
    else if (ICC_Q_HAS(BITS, 1) && block == 32) icc_q_tile(R, BITS, 32, nb, P, xq, kp, d, dq, sx, y, ldy, ncols); \
    else if (ICC_Q_HAS(BITS, 2) && block == 64) icc_q_tile(R, BITS, 64, nb, P, xq, kp, d, dq, sx, y, ldy, ncols); \
    else if (ICC_Q_HAS(BITS, 3) && block == 128) icc_q_tile(R, BITS, 128, nb, P, xq, kp, d, dq, sx, y, ldy, ncols); \
    else if (ICC_Q_HAS(BITS, 4)) icc_q_tile(R, BITS, block, nb, P, xq, kp, d, dq, sx, y, ldy, ncols);  \
    else icc_q_absent(R, y, ldy, ncols);
#define ICC_Q_ROWS(R)                              \
    static void icc_q_rows##R(int bits, int64_t block, int64_t nb, icc_qpanel P, const int8_t *xq, \
                              int64_t kp, const float *d, const float *dq, const float *sx, float *y, \
                              int64_t ldy, int64_t ncols) {                                        \
        if (bits == 4) { ICC_Q_BLOCKS(R, 4) } else { ICC_Q_BLOCKS(R, 8) }                          \
    }
ICC_Q_ROWS(1)
ICC_Q_ROWS(2)
ICC_Q_ROWS(3)
ICC_Q_ROWS(4)
#if ICC_Q_MR >= 8
ICC_Q_ROWS(5)
ICC_Q_ROWS(6)
ICC_Q_ROWS(7)
ICC_Q_ROWS(8)
#endif
#undef ICC_Q_ROWS
#undef ICC_Q_BLOCKS
#undef ICC_Q_HAS

static void icc_q_rows(int rows, int bits, int64_t block, int64_t nb, icc_qpanel P, const int8_t *xq,
                       int64_t kp, const float *d, const float *dq, const float *sx, float *y,
                       int64_t ldy, int64_t ncols) {
    switch (rows) {
#if ICC_Q_MR >= 8
        case 8: icc_q_rows8(bits, block, nb, P, xq, kp, d, dq, sx, y, ldy, ncols); break;
        case 7: icc_q_rows7(bits, block, nb, P, xq, kp, d, dq, sx, y, ldy, ncols); break;
        case 6: icc_q_rows6(bits, block, nb, P, xq, kp, d, dq, sx, y, ldy, ncols); break;
        case 5: icc_q_rows5(bits, block, nb, P, xq, kp, d, dq, sx, y, ldy, ncols); break;
#endif
        case 4: icc_q_rows4(bits, block, nb, P, xq, kp, d, dq, sx, y, ldy, ncols); break;
        case 3: icc_q_rows3(bits, block, nb, P, xq, kp, d, dq, sx, y, ldy, ncols); break;
        case 2: icc_q_rows2(bits, block, nb, P, xq, kp, d, dq, sx, y, ldy, ncols); break;
        default: icc_q_rows1(bits, block, nb, P, xq, kp, d, dq, sx, y, ldy, ncols); break;
    }
}

/* The row tiles of M rows: ICC_Q_MR rows each, then the rest, on AVX2 a rest of 6 or 7 rows as
 * 4 + 2 or 5 + 2 (see ICC_Q_MR). icc_q_tile_at: rows of tile t and its first row. */
#if defined(ICC_Q_AVX2) && ICC_Q_MR == 8
#define ICC_Q_SPLIT_REST 1
#else
#define ICC_Q_SPLIT_REST 0
#endif
static inline int64_t icc_q_tiles(int64_t M) {
    const int64_t rest = M % ICC_Q_MR;
    return M / ICC_Q_MR + (rest > 0) + (ICC_Q_SPLIT_REST && rest >= 6);
}

static inline int icc_q_tile_at(int64_t M, int64_t t, int64_t *m0) {
    const int64_t full = M / ICC_Q_MR, rest = M - full * ICC_Q_MR;
    *m0 = t * ICC_Q_MR;
    if (t < full) return ICC_Q_MR;
    if (ICC_Q_SPLIT_REST && rest >= 6) {
        if (t == full) return (int)rest - 2;
        *m0 = full * ICC_Q_MR + rest - 2;
        return 2;
    }
    return (int)rest;
}

static void icc_matmul_q(int64_t M, int64_t N, int64_t K, int bits, int64_t block, const float *x,
                         const void *w, float *y) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        memset(y, 0, sizeof(float) * (size_t)(M * N));
        return;
    }
    icc_qact a;
    if (!icc_quantize_act(M, K, block, x, &a)) { /* out of memory: NaN, never stale values */
        for (int64_t i = 0; i < M * N; i++) y[i] = __builtin_nanf("");
        return;
    }
    const int64_t nb = (K + block - 1) / block, kp = nb * block, cb = block * ICC_PANEL * bits / 8;
    const int64_t panels = (N + ICC_PANEL - 1) / ICC_PANEL;
    const int64_t tiles = icc_q_tiles(M);
#pragma omp parallel for collapse(2) schedule(static) if (M * N * K >= ICC_PARALLEL_MIN_MACS)
    for (int64_t p = 0; p < panels; p++) {
        for (int64_t t = 0; t < tiles; t++) {
            int64_t m0;
            const int rows = icc_q_tile_at(M, t, &m0);
            const int64_t n0 = p * ICC_PANEL;
            const int64_t ncols = N - n0 < ICC_PANEL ? N - n0 : ICC_PANEL;
            icc_q_rows(rows, bits, block, nb, icc_q_panel(w, p, nb, cb), a.q + m0 * kp, kp,
                       a.d + m0 * nb, a.dq + m0 * nb, a.sx + m0 * nb, y + m0 * N + n0, N, ncols);
        }
    }
}

/* (code - z) * s, then + rest, as two roundings (numpy's dequantization): no fused multiply-add. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
static void icc_gather_q(int64_t n_ids, const int64_t *ids, int64_t N, int64_t K, int bits,
                         int64_t block, const void *w, float *out) {
    if (n_ids <= 0 || N <= 0) return;
    const int64_t nb = (K + block - 1) / block, cb = block * ICC_PANEL * bits / 8;
    for (int64_t i = 0; i < n_ids; i++) {
        int64_t n = ids[i] < 0 ? ids[i] + N : ids[i];
        n = n < 0 ? 0 : (n >= N ? N - 1 : n);
        const icc_qpanel P = icc_q_panel(w, n / ICC_PANEL, nb, cb);
        const int64_t j = n % ICC_PANEL;
        float *o = out + i * K;
        for (int64_t k = 0; k < K; k++) {
            const int64_t b = k / block, g = (k % block) / 4, e = k % 4;
            int code;
            if (bits == 4) code = (P.codes[b * cb + 64 * (g >> 1) + 4 * j + e] >> ((g & 1) * 4)) & 0x0F;
            else code = P.codes[b * cb + 64 * g + 4 * j + e];
            const float z = P.zps ? (float)P.zps[b * ICC_PANEL + j] : P.z0;
            float v;
            if (P.mins) /* GGUF's own d * q + m */
                v = (float)code * icc_q_scale(P, b * ICC_PANEL + j) + icc_half_to_float(P.rests16[b * ICC_PANEL + j]);
            else {
                v = ((float)code - z) * icc_q_scale(P, b * ICC_PANEL + j);
                if (P.rests) v = v + P.rests[b * ICC_PANEL + j];
            }
            o[k] = v;
        }
    }
}

#endif
