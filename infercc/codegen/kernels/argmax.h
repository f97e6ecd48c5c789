/* The argmax of a row of logits, numpy's: the first maximum, or the first NaN. Greedy decoding
 * picks tokens with it, in the decode loop's sampler (sample.h) and for the serving engine's
 * greedy steps (icc_output_argmax), so both give the tokens numpy.argmax gives. */
#ifndef ICC_ARGMAX_H
#define ICC_ARGMAX_H
#include "common.h"
#include "tensor.h"

static int64_t icc_argmax_scalar_f32(const float *x, int64_t n) {
    int64_t best = 0;
    for (int64_t v = 0; v < n; v++) {
        if (x[v] != x[v]) return v;
        if (x[v] > x[best]) best = v;
    }
    return best;
}

static int64_t icc_argmax_f32(const float *x, int64_t n) {
#if defined(__AVX2__)
    /* the maximum (and whether any NaN) 8 lanes at a time, then the first index holding it: the
     * first maximum, as numpy's; a row with a NaN takes the scalar path */
    int64_t i = 0;
    __m256 m = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        m = _mm256_max_ps(m, v);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, m);
    float top = lanes[0];
    for (int k = 1; k < 8; k++) top = lanes[k] > top ? lanes[k] : top;
    int has_nan = _mm256_movemask_ps(nan);
    for (; i < n; i++) {
        if (x[i] != x[i]) has_nan = 1;
        else if (x[i] > top) top = x[i];
    }
    if (has_nan) return icc_argmax_scalar_f32(x, n);
    const __m256 t = _mm256_set1_ps(top);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), t, _CMP_EQ_OQ));
        if (hit) return j + __builtin_ctz((unsigned)hit);
    }
    for (; j < n; j++)
        if (x[j] == top) return j;
    return 0;
#else
    return icc_argmax_scalar_f32(x, n);
#endif
}

/* a float32 (ICC_F32) or float16 row of n logits */
static int64_t icc_argmax(const void *row, int dt, int64_t n) {
    if (dt != ICC_F16) return icc_argmax_f32((const float *)row, n);
    int64_t best = 0;
    float top = 0.0f;
    for (int64_t v = 0; v < n; v++) {
        const float x = icc_h2f(((const uint16_t *)row)[v]);
        if (x != x) return v;
        if (v == 0 || x > top) { top = x; best = v; }
    }
    return best;
}

#endif
