/* The canonical transformer ops (the canonical ops of passes/fusion and passes/quantize/ops.py):
 * norms and the tensor-level door to rotary; the matmuls (gemm.h, qgemm.h), attention
 * (attention.h) and the rotary kernel (rotary.h) have headers of their own. */
#ifndef ICC_TRANSFORMER_H
#define ICC_TRANSFORMER_H
#include "tensor.h"
#include "api.h"

/* ---- norms --------------------------------------------------------------------------------- */
/* rows of width W: y = norm(x + skip + skip_bias) * scale + bias; sum (when non-NULL) gets x + skip */
static void icc_norm(int64_t rows, int64_t W, const float *x, const float *skip, const float *skip_bias, const float *scale,
                     const float *bias, float eps, int rms, float *y, float *sum) {
    #pragma omp parallel for if (rows > 8)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * W;
        float *yr = y + r * W, *sr = sum ? sum + r * W : yr;
        for (int64_t j = 0; j < W; j++) sr[j] = xr[j] + (skip ? skip[r * W + j] : 0.f) + (skip_bias ? skip_bias[j] : 0.f);
        double mean = 0.0, var = 0.0;
        if (!rms) {
            for (int64_t j = 0; j < W; j++) mean += sr[j];
            mean /= (double)W;
        }
        for (int64_t j = 0; j < W; j++) var += ((double)sr[j] - mean) * ((double)sr[j] - mean);
        float inv = (float)(1.0 / sqrt(var / (double)W + (double)eps)), mu = (float)mean;
        for (int64_t j = 0; j < W; j++) yr[j] = (sr[j] - mu) * inv * scale[j] + (bias ? bias[j] : 0.f);
    }
}

/* ---- SwiGLU (codegen/fuse.py): y = silu(gate) * up, x = [gate | up] (gate_second: [up | gate]) ---- */
static inline float icc_silu1(float a) {
    const float e = expf(-fabsf(a)); /* in (0, 1]: sigmoid without overflow either way */
    return a * (a >= 0.f ? 1.f / (1.f + e) : e / (1.f + e));
}

static void icc_swiglu(icc_t *o, const icc_t *x, int gate_second) {
    const int64_t W = x->d[x->r - 1], N = W / 2, rows = W ? icc_numel(x) / W : 0;
    if (x->dt != ICC_F32 || W % 2) { icc_fail("SwiGLU: x must be float32 with an even last axis"); return; }
    o->r = x->r;
    memcpy(o->d, x->d, sizeof(o->d));
    o->d[o->r - 1] = N;
    icc_alloc(o);
    if (icc_err) return;
    const float *in = (const float *)x->p;
    float *y = (float *)o->p;
    #pragma omp parallel for if (rows * N > 65536)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = in + r * W + (gate_second ? N : 0), *u = in + r * W + (gate_second ? 0 : N);
        float *yr = y + r * N;
        int64_t j = 0;
#ifdef ICC_AT_VW
        const icc_at_v one = icc_at_set1(1.0f);
        for (; j + ICC_AT_VW <= N; j += ICC_AT_VW) {
            icc_at_v a = icc_at_load(g + j);
#if defined(__AVX512F__)
            __m512 e = icc_at_vexp(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(a)));
            __m512 num = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_GE_OQ), e, one);
            __m512 sig = _mm512_div_ps(num, _mm512_add_ps(one, e));
#else
            __m256 absa = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a);
            __m256 e = icc_at_vexp(_mm256_sub_ps(_mm256_setzero_ps(), absa));
            __m256 num = _mm256_blendv_ps(e, one, _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_GE_OQ));
            __m256 sig = _mm256_div_ps(num, _mm256_add_ps(one, e));
#endif
            icc_at_store(yr + j, icc_at_mul(icc_at_mul(a, sig), icc_at_load(u + j)));
        }
#endif
        for (; j < N; j++) yr[j] = icc_silu1(g[j]) * u[j];
    }
}

/* ---- rotary: shapes from the tensors, then rotary.h ---------------------------------------------- */
/* x [B, S, H*D] (heads > 0) or [B, H, S, D] (heads = 0, H from dims); cos/sin [cb, S, R] */
static void icc_rotary_op(icc_t *o, const icc_t *x, const icc_t *cos_t, const icc_t *sin_t, int64_t heads, int64_t R, int interleaved) {
    o->r = x->r;
    memcpy(o->d, x->d, sizeof(o->d));
    icc_alloc(o);
    if (icc_err) return;
    int64_t B = x->d[0], S, H, D;
    if (heads) { S = x->d[1]; H = heads; D = x->d[2] / heads; }
    else { H = x->d[1]; S = x->d[2]; D = x->d[3]; }
    if (cos_t->d[1] != S || cos_t->d[2] != R || (cos_t->d[0] != 1 && cos_t->d[0] != B)) {
        icc_fail("RotaryEmbedding: cos/sin do not match [batch, sequence, rotary_dim]");
        return;
    }
    icc_rotary(B, S, H, D, R, interleaved, heads ? 0 : 1, (const float *)x->p, (const float *)cos_t->p,
               (const float *)sin_t->p, cos_t->d[0] == 1 ? 0 : S * R, (float *)o->p);
}

#endif
