/* LoRA delta, segmented by adapter (Punica / S-LoRA): o = y + ((x @ A) * mask) @ B, where A [K, C]
 * and B [C, N] hold every loaded adapter's factors side by side and mask [batch, C] keeps each row's
 * own adapter columns. The graph spells it as two dense matmuls over all C columns (the portable
 * form); here each row reads only the columns its mask keeps, so the cost is the row's own rank,
 * not the sum of every loaded adapter's, and a row's result depends on nothing else in the batch.
 */
#ifndef ICC_LORA_H
#define ICC_LORA_H
#include "tensor.h"

/* rows of x (and y, o): batch * seq, row m belongs to batch row m / seq */
static void icc_lora_delta(icc_t *o, const icc_t *y, const icc_t *x, const icc_t *a, const icc_t *b, const icc_t *mask) {
    if (x->dt != ICC_F32 || y->dt != ICC_F32 || a->dt != ICC_F32 || b->dt != ICC_F32 || mask->dt != ICC_F32 ||
        a->r != 2 || b->r != 2 || mask->r != 2) {
        icc_fail("LoRA delta: float32 x, y, A [K, C], B [C, N] and mask [batch, C] expected"); return;
    }
    const int64_t K = a->d[0], C = a->d[1], N = b->d[1], batch = mask->d[0];
    const int64_t rows = K ? icc_numel(x) / K : 0;
    if (b->d[0] != C || mask->d[1] != C || x->d[x->r - 1] != K || y->d[y->r - 1] != N || icc_numel(y) != rows * N ||
        batch <= 0 || rows % batch) {
        icc_fail("LoRA delta: the shapes of x, y, A, B and the mask do not agree"); return;
    }
    const int64_t seq = rows / batch;
    icc_set_shape(o, y->r, y->d);
    o->dt = ICC_F32;
    icc_alloc(o);
    if (icc_err) return;
    const float *xs = (const float *)x->p, *A = (const float *)a->p, *B = (const float *)b->p;
    const float *ms = (const float *)mask->p;
    float *out = (float *)o->p;
    if (out != (const float *)y->p) memcpy(out, y->p, sizeof(float) * (size_t)(rows * N));
    /* rows split between threads past the usual work threshold (a row's work: its rank, ~8-64
     * columns, times K + N) */
    #pragma omp parallel for schedule(static) if (rows * (K + N) * 8 >= ICC_PARALLEL_MIN_MACS)
    for (int64_t m = 0; m < rows; m++) {
        const float *xr = xs + m * K, *mr = ms + (m / seq) * C;
        float *yr = out + m * N;
        for (int64_t c0 = 0; c0 < C;) {  /* each run of kept columns: one adapter's rank */
            if (mr[c0] == 0.0f) { c0++; continue; }
            int64_t c1 = c0;
            while (c1 < C && mr[c1] != 0.0f && c1 - c0 < 64) c1++;
            const int64_t w = c1 - c0;
            float t[64];
            for (int64_t c = 0; c < w; c++) t[c] = 0.0f;
            for (int64_t k = 0; k < K; k++) {  /* x . A[:, c0:c1]: the inner loop runs along A's row */
                const float xv = xr[k], *ar = A + k * C + c0;
                for (int64_t c = 0; c < w; c++) t[c] += xv * ar[c];
            }
            for (int64_t c = 0; c < w; c++) {
                const float s = t[c] * mr[c0 + c], *br = B + (c0 + c) * N;
                for (int64_t n = 0; n < N; n++) yr[n] += s * br[n];
            }
            c0 = c1;
        }
    }
}

#endif
