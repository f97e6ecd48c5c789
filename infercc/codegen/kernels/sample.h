/* The token sampler of the generated decode loop (templates/generate.c.j2).
 *
 * Same order and semantics as runtime/sampling.py (temperature, then top-k, top-p, min-p, then a
 * draw), computed in double like the NumPy sampler. Greedy (temperature 0) is argmax with ties to
 * the lowest id and the first NaN winning, as numpy.argmax: greedy tokens equal the Python loop's.
 * Seeded draws use xoshiro256** seeded through splitmix64, so a seed reproduces the same tokens
 * here, but NOT the tokens NumPy's generator draws in the Python loop (documented in c_generate.py).
 * Penalties (repetition, frequency, presence) come first, on a float64 copy of the row, with
 * sampling.py's apply_penalties arithmetic operation for operation (no contraction into fused
 * multiply-adds): greedy tokens with penalties equal the Python loop's too. */
#ifndef ICC_SAMPLE_H
#define ICC_SAMPLE_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "argmax.h"

typedef struct {
    double temperature;   /* 0 = greedy */
    int64_t top_k;        /* 0 = off */
    double top_p;         /* 1 = off */
    double min_p;         /* 0 = off */
    double repetition;    /* HF's, over prompt and output ids: 1 = off */
    double frequency;     /* OpenAI's, per earlier occurrence in the output: 0 = off */
    double presence;      /* OpenAI's, once for a token the output holds: 0 = off */
} icc_sampler;

/* the element type code of a penalized row (doubles): ONNX's code for double */
#define ICC_PEN_F64 11

typedef struct { uint64_t s[4]; } icc_rng;

static uint64_t icc_splitmix(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void icc_rng_seed(icc_rng *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) r->s[i] = icc_splitmix(&seed);
}

static inline uint64_t icc_rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

/* uniform double in [0, 1) (53 random bits) */
static double icc_rng_uniform(icc_rng *r) {
    uint64_t *s = r->s, result = icc_rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]; s[2] ^= t; s[3] = icc_rotl(s[3], 45);
    return (double)(result >> 11) * (1.0 / 9007199254740992.0);
}

/* logit k of a float32, float16 or (penalized) double row */
static inline double icc_logit(const void *row, int dt, int64_t k) {
    if (dt == ICC_PEN_F64) return ((const double *)row)[k];
    return dt == ICC_F16 ? (double)icc_h2f(((const uint16_t *)row)[k]) : (double)((const float *)row)[k];
}

/* numpy.argmax of a row: the first NaN, else the first maximum */
static int64_t icc_argmax_any(const void *row, int dt, int64_t n) {
    if (dt != ICC_PEN_F64) return icc_argmax(row, dt, n);
    const double *x = row;
    int64_t best = 0;
    for (int64_t k = 0; k < n; k++) {
        if (x[k] != x[k]) return k;
        if (x[k] > x[best]) best = k;
    }
    return best;
}

/* ---- penalties --------------------------------------------------------------------------------- */
/* What the penalties need of the ids so far, kept as tokens come (no pass over the history per
 * step): per id its output count and whether the prompt or output holds it, and the distinct ids
 * seen, in order; the penalized row is written into `row`. */
typedef struct {
    int32_t *count;
    uint8_t *seen;
    int64_t *ids, n_ids, vocab;
    double *row;
} icc_penalty;

static int icc_penalized(const icc_sampler *s) {
    return s->repetition != 1.0 || s->frequency != 0.0 || s->presence != 0.0;
}

static void icc_penalty_free(icc_penalty *p) {
    free(p->count); free(p->seen); free(p->ids); free(p->row);
    *p = (icc_penalty){0};
}

/* token seen in the prompt (output = 0) or generated (1); ids outside the vocabulary are ignored */
static void icc_penalty_see(icc_penalty *p, int64_t token, int output) {
    if (!p->row || token < 0 || token >= p->vocab) return;
    if (!p->seen[token]) { p->seen[token] = 1; p->ids[p->n_ids++] = token; }
    if (output) p->count[token]++;
}

/* the buffers for a vocabulary of n, the first n_prompt ids marked seen: 0, or -1 (no memory) */
static int icc_penalty_init(icc_penalty *p, int64_t n, const int64_t *ids, int64_t n_prompt) {
    p->count = calloc((size_t)n, sizeof(int32_t));
    p->seen = calloc((size_t)n, 1);
    p->ids = malloc(sizeof(int64_t) * (size_t)n);
    p->row = malloc(sizeof(double) * (size_t)n);
    p->vocab = n;
    p->n_ids = 0;
    if (!p->count || !p->seen || !p->ids || !p->row) { icc_penalty_free(p); return -1; }
    for (int64_t i = 0; i < n_prompt; i++) icc_penalty_see(p, ids[i], 0);
    return 0;
}

/* The penalized float64 copy of a row of p->vocab logits (sampling.apply_penalties): each seen
 * id's logit divided by the repetition penalty when positive, multiplied when not, then an output
 * id's lowered by frequency * count + presence. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
static const double *icc_penalize(icc_penalty *p, const void *row, int dt, const icc_sampler *s) {
    double *x = p->row;
    for (int64_t k = 0; k < p->vocab; k++) x[k] = icc_logit(row, dt, k);
    const int counted = s->frequency != 0.0 || s->presence != 0.0;
    for (int64_t i = 0; i < p->n_ids; i++) {
        const int64_t t = p->ids[i];
        double v = x[t];
        if (s->repetition != 1.0) v = v > 0 ? v / s->repetition : v * s->repetition;
        if (counted && p->count[t]) v -= s->frequency * (double)p->count[t] + s->presence;
        x[t] = v;
    }
    return x;
}

typedef struct { double x; int64_t id; } icc_cand;

/* descending by value, ties to the lower id (a stable sort of -probs, as sampling.py) */
static int icc_cand_cmp(const void *a, const void *b) {
    const icc_cand *p = a, *q = b;
    if (p->x != q->x) return p->x > q->x ? -1 : 1;
    return p->id < q->id ? -1 : (p->id > q->id);
}

/* min-heap on (x, -id) of the k best candidates: the root is the worst kept one */
static inline int icc_worse(const icc_cand *a, const icc_cand *b) { return icc_cand_cmp(a, b) > 0; }

static void icc_sift(icc_cand *h, int64_t n, int64_t i) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && icc_worse(&h[l], &h[w])) w = l;
        if (r < n && icc_worse(&h[r], &h[w])) w = r;
        if (w == i) return;
        icc_cand t = h[i]; h[i] = h[w]; h[w] = t;
        i = w;
    }
}

/* The next token from a row of n logits; `work` holds n candidates. */
static int64_t icc_sample(const void *row, int dt, int64_t n, const icc_sampler *s, icc_rng *rng, icc_cand *work) {
    if (s->temperature == 0) return icc_argmax_any(row, dt, n);
    int64_t m = 0;
    for (int64_t k = 0; k < n; k++) {
        double x = icc_logit(row, dt, k) / s->temperature;
        if (x == -INFINITY) continue;   /* no mass: never drawn */
        work[m].x = x; work[m].id = k; m++;
    }
    if (m == 0) return icc_argmax_any(row, dt, n);
    int sorted = 0;
    if (s->top_k > 0 && s->top_k < m) {   /* keep the k best: heap select, then sort them */
        int64_t k = s->top_k;
        for (int64_t i = k / 2 - 1; i >= 0; i--) icc_sift(work, k, i);
        for (int64_t i = k; i < m; i++)
            if (icc_worse(&work[0], &work[i])) { work[0] = work[i]; icc_sift(work, k, 0); }
        m = k;
        qsort(work, (size_t)m, sizeof(icc_cand), icc_cand_cmp);
        sorted = 1;
    }
    if (s->top_p < 1.0) {
        if (!sorted) qsort(work, (size_t)m, sizeof(icc_cand), icc_cand_cmp);
        sorted = 1;
        double top = work[0].x, total = 0, before = 0;
        for (int64_t i = 0; i < m; i++) total += exp(work[i].x - top);
        int64_t keep = m;
        for (int64_t i = 0; i < m; i++) {  /* drop tokens whose more likely mass reaches top_p */
            if (before / total >= s->top_p) { keep = i; break; }
            before += exp(work[i].x - top);
        }
        m = keep > 0 ? keep : 1;
    }
    double top = work[0].x;
    if (!sorted) for (int64_t i = 1; i < m; i++) if (work[i].x > top) top = work[i].x;
    if (s->min_p > 0) {  /* p < min_p * p_max  <=>  exp(x - top) < min_p */
        int64_t j = 0;
        for (int64_t i = 0; i < m; i++) if (exp(work[i].x - top) >= s->min_p) work[j++] = work[i];
        m = j;
    }
    double total = 0;
    for (int64_t i = 0; i < m; i++) total += exp(work[i].x - top);
    double u = icc_rng_uniform(rng) * total, acc = 0;
    for (int64_t i = 0; i < m; i++) {
        acc += exp(work[i].x - top);
        if (u < acc) return work[i].id;
    }
    return work[m - 1].id;  /* rounding put the draw past the end */
}
#endif
