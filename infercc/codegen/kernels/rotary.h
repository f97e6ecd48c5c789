/* infercc generated-C runtime: the canonical RotaryEmbedding (semantics: passes/fusion/rotary_op.py;
 * contract: api.h, icc_rotary).
 *
 * The model's full-width factors are used as given (x * cos + rotate(x) * sin over R channels, the
 * decomposition's arithmetic), so no invariant about repeated halves is relied upon. Each (b, s, h)
 * row is independent: rows are split over threads only when there are enough of them (prefill);
 * a decode step (S = 1) runs on the calling thread. Plain C loops that gcc vectorizes (contiguous
 * halves; the interleaved pairs through a swap the vectorizer handles as a permute); each pair is
 * read before it is written, so out may be x.
 */
#ifndef ICC_ROTARY_H
#define ICC_ROTARY_H
#include "api.h"
#include <string.h>

#define ICC_RO_SERIAL_ROWS 256 /* fewer (b, s, h) rows than this: no fork/join */

static inline void icc_ro_row(int64_t D, int64_t R, int interleaved, const float *x, const float *c,
                              const float *s, float *o) {
    if (!interleaved) {
        const int64_t h = R / 2;
        for (int64_t i = 0; i < h; i++) {
            const float a = x[i], b = x[i + h];
            o[i] = a * c[i] + (-b) * s[i];
            o[i + h] = b * c[i + h] + a * s[i + h];
        }
    } else {
        for (int64_t i = 0; i < R; i += 2) {
            const float a = x[i], b = x[i + 1];
            o[i] = a * c[i] + (-b) * s[i];
            o[i + 1] = b * c[i + 1] + a * s[i + 1];
        }
    }
    if (o != x && D > R) memcpy(o + R, x + R, (size_t)(D - R) * sizeof(float));
}

static void icc_rotary(int64_t B, int64_t S, int64_t H, int64_t D, int64_t R, int interleaved, int heads_first,
                       const float *x, const float *cos, const float *sin, int64_t cs_batch_stride, float *out) {
    const int64_t rows = B * S * H;
    if (rows <= 0) return;
#pragma omp parallel for schedule(static) if (rows >= ICC_RO_SERIAL_ROWS)
    for (int64_t r = 0; r < rows; r++) {
        int64_t b, s;
        if (heads_first) { /* r = (b * H + h) * S + s */
            b = r / (H * S);
            s = r % S;
        } else { /* r = (b * S + s) * H + h */
            b = r / (S * H);
            s = (r / H) % S;
        }
        const int64_t f = b * cs_batch_stride + s * R;
        icc_ro_row(D, R, interleaved, x + r * D, cos + f, sin + f, out + r * D);
    }
}

#endif
