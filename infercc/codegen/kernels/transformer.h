/* The canonical transformer ops (the canonical ops of passes/fusion and passes/quantize/ops.py):
 * norms, rotary, attention with its KV cache, float and weight-only quantized matmuls against
 * weights laid out by codegen/packing.py. Straightforward loops gcc vectorizes; OpenMP over
 * rows, output channels or heads. */
#ifndef ICC_TRANSFORMER_H
#define ICC_TRANSFORMER_H
#include "tensor.h"
#include "api.h"

#define ICC_PANEL 64

/* ---- matmuls against constant weights ------------------------------------------------------ */
/* w: panels of ICC_PANEL output channels, each [K][ICC_PANEL] contiguous (last one zero-padded) */
static void icc_gemm_f32(int64_t M, int64_t N, int64_t K, const float *x, const void *w, const float *bias, float *y) {
    int64_t panels = (N + ICC_PANEL - 1) / ICC_PANEL;
    #pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        const float *wp = (const float *)w + p * K * ICC_PANEL;
        int64_t n0 = p * ICC_PANEL, nn = N - n0 < ICC_PANEL ? N - n0 : ICC_PANEL;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) { /* four rows share every weight load */
            float acc[4][ICC_PANEL] = {{0}};
            const float *x0 = x + m * K;
            for (int64_t k = 0; k < K; k++) {
                const float *wr = wp + k * ICC_PANEL;
                float a0 = x0[k], a1 = x0[K + k], a2 = x0[2 * K + k], a3 = x0[3 * K + k];
                for (int j = 0; j < ICC_PANEL; j++) {
                    acc[0][j] += a0 * wr[j]; acc[1][j] += a1 * wr[j];
                    acc[2][j] += a2 * wr[j]; acc[3][j] += a3 * wr[j];
                }
            }
            for (int r = 0; r < 4; r++)
                for (int64_t j = 0; j < nn; j++) y[(m + r) * N + n0 + j] = acc[r][j] + (bias ? bias[n0 + j] : 0.f);
        }
        for (; m < M; m++) {
            float acc[ICC_PANEL] = {0};
            const float *xr = x + m * K;
            for (int64_t k = 0; k < K; k++) {
                const float *wr = wp + k * ICC_PANEL;
                float a = xr[k];
                for (int j = 0; j < ICC_PANEL; j++) acc[j] += a * wr[j];
            }
            for (int64_t j = 0; j < nn; j++) y[m * N + n0 + j] = acc[j] + (bias ? bias[n0 + j] : 0.f);
        }
    }
}

/* Quantized weights (packing.pack_quant): scales [N][blocks] f32, offsets [N][blocks] f32
 * (w = scale * code + offset: the zero point and a Q4_1 rest folded in), then codes
 * [N][blocks][block * bits / 8] (4-bit: element 2i in the low nibble). Exact in float: the
 * product is sum over blocks of scale * (x . codes) + offset * sum(x). */
static void icc_matmul_q(int64_t M, int64_t N, int64_t K, int bits, int64_t block, const float *x, const void *w, float *y) {
    int64_t blocks = (K + block - 1) / block, bpb = block * bits / 8;
    const float *scales = (const float *)w, *offs = scales + N * blocks;
    const uint8_t *codes = (const uint8_t *)(offs + N * blocks);
    float *xsum = (float *)malloc((size_t)(M * blocks) * sizeof(float));
    float *xpad = (float *)calloc((size_t)(M * blocks * block), sizeof(float));
    for (int64_t m = 0; m < M; m++) {
        memcpy(xpad + m * blocks * block, x + m * K, (size_t)K * sizeof(float));
        for (int64_t b = 0; b < blocks; b++) {
            float s = 0.f;
            for (int64_t j = 0; j < block; j++) s += xpad[(m * blocks + b) * block + j];
            xsum[m * blocks + b] = s;
        }
    }
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m = 0; m < M; m++) {
            const float *xm = xpad + m * blocks * block;
            float total = 0.f;
            for (int64_t b = 0; b < blocks; b++) {
                const uint8_t *c = codes + (n * blocks + b) * bpb;
                const float *xb = xm + b * block;
                float dot = 0.f;
                if (bits == 4) {
                    for (int64_t j = 0; j < block / 2; j++)
                        dot += xb[2 * j] * (float)(c[j] & 15) + xb[2 * j + 1] * (float)(c[j] >> 4);
                } else {
                    for (int64_t j = 0; j < block; j++) dot += xb[j] * (float)c[j];
                }
                total += scales[n * blocks + b] * dot + offs[n * blocks + b] * xsum[m * blocks + b];
            }
            y[m * N + n] = total;
        }
    }
    free(xsum);
    free(xpad);
}

static void icc_gather_q(int64_t n_ids, const int64_t *ids, int64_t N, int64_t K, int bits, int64_t block, const void *w, float *out) {
    int64_t blocks = (K + block - 1) / block, bpb = block * bits / 8;
    const float *scales = (const float *)w, *offs = scales + N * blocks;
    const uint8_t *codes = (const uint8_t *)(offs + N * blocks);
    for (int64_t i = 0; i < n_ids; i++) {
        int64_t n = ids[i] < 0 ? ids[i] + N : ids[i];
        n = n < 0 ? 0 : n >= N ? N - 1 : n;
        for (int64_t k = 0; k < K; k++) {
            int64_t b = k / block, j = k % block;
            const uint8_t *c = codes + (n * blocks + b) * bpb;
            int q = bits == 4 ? (j & 1 ? c[j / 2] >> 4 : c[j / 2] & 15) : c[j];
            out[i * K + k] = scales[n * blocks + b] * (float)q + offs[n * blocks + b];
        }
    }
}

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

/* ---- rotary ---------------------------------------------------------------------------------- */
/* x [B, S, H*D] (heads > 0) or [B, H, S, D] (heads = 0, H from dims); cos/sin [cb, S, R] */
static void icc_rotary(icc_t *o, const icc_t *x, const icc_t *cos_t, const icc_t *sin_t, int64_t heads, int64_t R, int interleaved) {
    o->r = x->r;
    memcpy(o->d, x->d, sizeof(o->d));
    icc_alloc(o);
    int64_t B = x->d[0], S, H, D;
    if (heads) { S = x->d[1]; H = heads; D = x->d[2] / heads; }
    else { H = x->d[1]; S = x->d[2]; D = x->d[3]; }
    int64_t cb = cos_t->d[0], half = R / 2;
    const float *X = (const float *)x->p, *C = (const float *)cos_t->p, *Sn = (const float *)sin_t->p;
    float *Y = (float *)o->p;
    #pragma omp parallel for if (B * S * H > 64)
    for (int64_t t = 0; t < B * S * H; t++) {
        int64_t b = t / (S * H), s = (t / H) % S, h = t % H;
        int64_t off = heads ? ((b * S + s) * H + h) * D : ((b * H + h) * S + s) * D;
        const float *xr = X + off, *c = C + ((cb == 1 ? 0 : b) * S + s) * R, *sn = Sn + ((cb == 1 ? 0 : b) * S + s) * R;
        float *yr = Y + off;
        if (interleaved) {
            for (int64_t i = 0; i < half; i++) {
                float a = xr[2 * i], e = xr[2 * i + 1];
                yr[2 * i] = a * c[2 * i] - e * sn[2 * i];
                yr[2 * i + 1] = e * c[2 * i + 1] + a * sn[2 * i + 1];
            }
        } else {
            for (int64_t i = 0; i < half; i++) {
                float a = xr[i], e = xr[i + half];
                yr[i] = a * c[i] - e * sn[i];
                yr[i + half] = e * c[i + half] + a * sn[i + half];
            }
        }
        for (int64_t i = R; i < D; i++) yr[i] = xr[i];
    }
}

/* ---- attention ------------------------------------------------------------------------------ */
static inline float icc_cache_get(const void *p, int dt, int64_t k) {
    return dt ? icc_h2f(((const uint16_t *)p)[k]) : ((const float *)p)[k];
}

static void icc_attention(const icc_attention_args *a) {
    int64_t B = a->B, S = a->S, P = a->P, H = a->H, Hkv = a->Hkv, D = a->D, Dv = a->Dv, T = P + S, rep = H / Hkv;
    int es = a->cache_dtype ? 2 : 4;
    if (a->present_k) { /* present = past ++ new rows (converted to the cache type) */
        for (int kv = 0; kv < 2; kv++) {
            int64_t W = kv ? Dv : D;
            char *dst = (char *)(kv ? a->present_v : a->present_k);
            const char *past = (const char *)(kv ? a->past_v : a->past_k);
            const float *src = kv ? a->v : a->k;
            for (int64_t b = 0; b < B; b++)
                for (int64_t h = 0; h < Hkv; h++) {
                    char *row = dst + ((b * Hkv + h) * a->present_cap) * W * es;
                    if (P && past != dst) memcpy(row, past + ((b * Hkv + h) * a->past_cap) * W * es, (size_t)(P * W * es));
                    for (int64_t s = 0; s < S; s++)
                        for (int64_t c = 0; c < W; c++) {
                            float v = src[(b * S + s) * Hkv * W + h * W + c];
                            int64_t at = (P + s) * W + c;
                            if (a->cache_dtype) ((uint16_t *)row)[at] = icc_f2h(v);
                            else ((float *)row)[at] = v;
                        }
                }
        }
    }
    #pragma omp parallel for schedule(dynamic)
    for (int64_t t = 0; t < B * H * S; t++) {
        int64_t b = t / (H * S), h = (t / S) % H, i = t % S, g = h / rep;
        const float *q = a->q + (b * S + i) * H * D + h * D;
        float *out = a->out + (b * S + i) * H * Dv + h * Dv;
        float *sc = (float *)malloc((size_t)(T > 0 ? T : 1) * sizeof(float));
        float m = -INFINITY;
        for (int64_t j = 0; j < T; j++) {
            int allowed = 1;
            if (a->causal && j > i + P) allowed = 0;
            if (a->left_window >= 0 && j < i + P - a->left_window) allowed = 0;
            int64_t moff = b * a->mask_stride[0] + h * a->mask_stride[1] + i * a->mask_stride[2] + j * a->mask_stride[3];
            if (a->mask_bool && !a->mask_bool[moff]) allowed = 0;
            if (!allowed && isinf(a->mask_value) && a->mask_value < 0) { sc[j] = -INFINITY; continue; }
            float dot = 0.f;
            if (a->present_k) {
                int64_t base = ((b * Hkv + g) * a->present_cap + j) * D;
                if (a->cache_dtype) for (int64_t c = 0; c < D; c++) dot += q[c] * icc_h2f(((const uint16_t *)a->present_k)[base + c]);
                else { const float *k = (const float *)a->present_k + base; for (int64_t c = 0; c < D; c++) dot += q[c] * k[c]; }
            } else {
                const float *k = a->k + (b * S + j) * Hkv * D + g * D;
                for (int64_t c = 0; c < D; c++) dot += q[c] * k[c];
            }
            float s = dot * a->scale;
            if (a->softcap != 0.f) s = a->softcap * tanhf(s / a->softcap);
            if (!allowed) s += a->mask_value;
            if (a->mask_float) s += a->mask_float[moff];
            sc[j] = s;
            m = s > m ? s : m;
        }
        for (int64_t c = 0; c < Dv; c++) out[c] = 0.f;
        if (m != -INFINITY && !isnan(m)) {
            float sum = 0.f;
            for (int64_t j = 0; j < T; j++) { sc[j] = expf(sc[j] - m); sum += sc[j]; }
            for (int64_t j = 0; j < T; j++) {
                float p = sc[j] / sum;
                if (p == 0.f) continue;
                if (a->present_v) {
                    int64_t base = ((b * Hkv + g) * a->present_cap + j) * Dv;
                    for (int64_t c = 0; c < Dv; c++) out[c] += p * icc_cache_get(a->present_v, a->cache_dtype, base + c);
                } else {
                    const float *v = a->v + (b * S + j) * Hkv * Dv + g * Dv;
                    for (int64_t c = 0; c < Dv; c++) out[c] += p * v[c];
                }
            }
        }
        free(sc);
    }
}
#endif
