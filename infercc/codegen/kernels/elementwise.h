/* Elementwise ops with numpy broadcasting, unary math, Cast, Where. */
#ifndef ICC_ELEMENTWISE_H
#define ICC_ELEMENTWISE_H
#include "tensor.h"

enum { ICC_ADD, ICC_SUB, ICC_MUL, ICC_DIV, ICC_POW, ICC_MAX, ICC_MIN, ICC_EQ, ICC_LT, ICC_LE, ICC_GT, ICC_GE,
       ICC_AND, ICC_OR, ICC_XOR, ICC_MOD, ICC_FMOD };
/* ICC_MOD is Mod with fmod=0 (the result takes the divisor's sign, as Python's %); ICC_FMOD is
 * fmod=1 (the dividend's sign, as C's fmod and integer %). */

static inline float icc_fop(int op, float a, float b) {
    switch (op) {
    case ICC_ADD: return a + b;
    case ICC_SUB: return a - b;
    case ICC_MUL: return a * b;
    case ICC_DIV: return a / b;
    case ICC_POW: return powf(a, b);
    case ICC_MAX: return a > b || isnan(a) ? a : b;
    case ICC_MIN: return a < b || isnan(a) ? a : b;
    case ICC_MOD: { float m = fmodf(a, b); return m != 0.f && ((m < 0.f) != (b < 0.f)) ? m + b : m; }
    case ICC_FMOD: return fmodf(a, b);
    default: return 0.f;
    }
}

static inline int64_t icc_iop(int op, int64_t a, int64_t b) {
    switch (op) {
    case ICC_ADD: return a + b;
    case ICC_SUB: return a - b;
    case ICC_MUL: return a * b;
    case ICC_DIV: return b ? a / b : 0;
    case ICC_MAX: return a > b ? a : b;
    case ICC_MIN: return a < b ? a : b;
    case ICC_MOD: { int64_t m = b ? a % b : 0; return (m != 0 && ((m < 0) != (b < 0))) ? m + b : m; }
    case ICC_FMOD: return b ? a % b : 0;
    case ICC_POW: { int64_t r = 1; for (int64_t i = 0; i < b; i++) r *= a; return r; }
    default: return 0;
    }
}

static inline int icc_cmp(int op, double a, double b) {
    switch (op) {
    case ICC_EQ: return a == b;
    case ICC_LT: return a < b;
    case ICC_LE: return a <= b;
    case ICC_GT: return a > b;
    case ICC_GE: return a >= b;
    case ICC_AND: return (a != 0) && (b != 0);
    case ICC_OR: return (a != 0) || (b != 0);
    case ICC_XOR: return (a != 0) != (b != 0);
    default: return 0;
    }
}

static inline int icc_icmp(int op, int64_t a, int64_t b) {
    switch (op) {
    case ICC_EQ: return a == b;
    case ICC_LT: return a < b;
    case ICC_LE: return a <= b;
    case ICC_GT: return a > b;
    case ICC_GE: return a >= b;
    default: return icc_cmp(op, (double)(a != 0), (double)(b != 0)); /* And / Or / Xor */
    }
}

static double icc_get(const icc_t *t, int64_t k) {
    switch (t->dt) {
    case ICC_F32: return ((const float *)t->p)[k];
    case ICC_F16: return icc_h2f(((const uint16_t *)t->p)[k]);
    default: return (double)icc_i(t, k);
    }
}

static int icc_is_int(int dt) { return dt == ICC_I64 || dt == ICC_I32 || dt == ICC_I8 || dt == ICC_U8 || dt == ICC_BOOL; }

/* element k of an integer tensor set to v (wrapping to the element width, as ONNX integer ops) */
static void icc_iput(icc_t *t, int64_t k, int64_t v) {
    switch (t->dt) {
    case ICC_I64: ((int64_t *)t->p)[k] = v; break;
    case ICC_I32: ((int32_t *)t->p)[k] = (int32_t)v; break;
    case ICC_I8: ((int8_t *)t->p)[k] = (int8_t)v; break;
    case ICC_U8: ((uint8_t *)t->p)[k] = (uint8_t)v; break;
    case ICC_BOOL: ((uint8_t *)t->p)[k] = v != 0; break;
    default: icc_put(t, k, (double)v); break;
    }
}

/* o = a (op) b, broadcasting; o->dt set by the caller (bool for comparisons). Float32 operands take
 * the fast paths; float16 and mixed operands (Pow's exponent may be an integer tensor) are computed
 * in float32 element by element; integer outputs in int64, stored at their width. */
static void icc_binary(icc_t *o, const icc_t *a, const icc_t *b, int op) {
    if (!icc_broadcast_shape(o, a, b)) return;
    icc_alloc(o);
    int64_t n = icc_numel(o), sa[ICC_MAX_RANK], sb[ICC_MAX_RANK];
    icc_bstrides(a, o, sa);
    icc_bstrides(b, o, sb);
    int same = icc_numel(a) == n && icc_numel(b) == n;
    if (o->dt == ICC_BOOL) {
        uint8_t *y = (uint8_t *)o->p;
        int ints = icc_is_int(a->dt) && icc_is_int(b->dt); /* int64 compares: doubles round above 2^53 */
        for (int64_t k = 0; k < n; k++) {
            int64_t ia = k, ib = k;
            if (!same) icc_offsets(k, o, sa, sb, &ia, &ib);
            y[k] = (uint8_t)(ints ? icc_icmp(op, icc_i(a, ia), icc_i(b, ib)) : icc_cmp(op, icc_get(a, ia), icc_get(b, ib)));
        }
    } else if (o->dt == ICC_F32 && a->dt == ICC_F32 && b->dt == ICC_F32) {
        float *y = (float *)o->p;
        const float *x = (const float *)a->p, *z = (const float *)b->p;
        if (same) {
            #pragma omp parallel for if (n > 65536)
            for (int64_t k = 0; k < n; k++) y[k] = icc_fop(op, x[k], z[k]);
        } else if (icc_numel(b) == 1) {
            float c = z[0];
            #pragma omp parallel for if (n > 65536)
            for (int64_t k = 0; k < n; k++) y[k] = icc_fop(op, x[k], c);
        } else {
            #pragma omp parallel for if (n > 65536)
            for (int64_t k = 0; k < n; k++) {
                int64_t ia, ib;
                icc_offsets(k, o, sa, sb, &ia, &ib);
                y[k] = icc_fop(op, x[ia], z[ib]);
            }
        }
    } else if (o->dt == ICC_F32 || o->dt == ICC_F16) {
        for (int64_t k = 0; k < n; k++) {
            int64_t ia = k, ib = k;
            if (!same) icc_offsets(k, o, sa, sb, &ia, &ib);
            icc_put(o, k, icc_fop(op, (float)icc_get(a, ia), (float)icc_get(b, ib)));
        }
    } else if (icc_is_int(o->dt)) {
        for (int64_t k = 0; k < n; k++) {
            int64_t ia = k, ib = k;
            if (!same) icc_offsets(k, o, sa, sb, &ia, &ib);
            icc_iput(o, k, icc_iop(op, icc_i(a, ia), icc_i(b, ib)));
        }
    } else icc_fail("binary op on an unsupported element type");
}

enum { ICC_NEG, ICC_SQRT, ICC_EXP, ICC_LOG, ICC_TANH, ICC_COS, ICC_SIN, ICC_ERF, ICC_RELU, ICC_SIGMOID,
       ICC_ABS, ICC_RECIP, ICC_NOT, ICC_FLOOR, ICC_CEIL, ICC_ROUND, ICC_SILU, ICC_GELU, ICC_GELU_TANH, ICC_IDENTITY };

static inline float icc_ufop(int op, float x) {
    switch (op) {
    case ICC_NEG: return -x;
    case ICC_SQRT: return sqrtf(x);
    case ICC_EXP: return expf(x);
    case ICC_LOG: return logf(x);
    case ICC_TANH: return tanhf(x);
    case ICC_COS: return cosf(x);
    case ICC_SIN: return sinf(x);
    case ICC_ERF: return erff(x);
    case ICC_RELU: return x > 0.f ? x : 0.f;
    case ICC_SIGMOID: return 1.f / (1.f + expf(-x));
    case ICC_ABS: return fabsf(x);
    case ICC_RECIP: return 1.f / x;
    case ICC_FLOOR: return floorf(x);
    case ICC_CEIL: return ceilf(x);
    case ICC_ROUND: return rintf(x); /* half to even, as ONNX Round */
    case ICC_SILU: return x / (1.f + expf(-x));
    case ICC_GELU: return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
    case ICC_GELU_TANH: return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    default: return x;
    }
}

static void icc_unary(icc_t *o, const icc_t *a, int op) {
    o->r = a->r;
    memcpy(o->d, a->d, sizeof(o->d));
    icc_alloc(o);
    int64_t n = icc_numel(o);
    if (a->dt == ICC_F32) {
        const float *x = (const float *)a->p;
        float *y = (float *)o->p;
        #pragma omp parallel for if (n > 16384)
        for (int64_t k = 0; k < n; k++) y[k] = icc_ufop(op, x[k]);
    } else if (a->dt == ICC_BOOL && op == ICC_NOT) {
        for (int64_t k = 0; k < n; k++) ((uint8_t *)o->p)[k] = !((const uint8_t *)a->p)[k];
    } else if (a->dt == ICC_F16) { /* computed in float32, rounded once to half */
        for (int64_t k = 0; k < n; k++) icc_put(o, k, icc_ufop(op, (float)icc_get(a, k)));
    } else if (icc_is_int(a->dt) && a->dt != ICC_BOOL && (op == ICC_NEG || op == ICC_ABS || op == ICC_RELU)) {
        for (int64_t k = 0; k < n; k++) { /* the emitter lets only these three through on integers */
            int64_t v = icc_i(a, k);
            icc_iput(o, k, op == ICC_NEG ? -v : op == ICC_ABS ? (v < 0 ? -v : v) : (v > 0 ? v : 0));
        }
    } else icc_fail("unary op on an unsupported element type");
}

/* y = f(x + bias) with bias [W] over the last axis (a fused BiasGelu); bias NULL: f(x) */
static void icc_unary_bias(icc_t *o, const icc_t *a, const icc_t *bias, int op) {
    if (!bias) { icc_unary(o, a, op); return; }
    o->r = a->r;
    memcpy(o->d, a->d, sizeof(o->d));
    icc_alloc(o);
    int64_t n = icc_numel(o), w = icc_numel(bias);
    const float *x = (const float *)a->p, *b = (const float *)bias->p;
    float *y = (float *)o->p;
    #pragma omp parallel for if (n > 16384)
    for (int64_t k = 0; k < n; k++) y[k] = icc_ufop(op, x[k] + b[k % w]);
}

/* Clip; lo / hi NULL for no bound. min(max(x, lo), hi): with lo > hi every element is hi (ONNX). */
static void icc_clip(icc_t *o, const icc_t *a, const icc_t *lo, const icc_t *hi) {
    o->r = a->r;
    memcpy(o->d, a->d, sizeof(o->d));
    icc_alloc(o);
    int64_t n = icc_numel(o);
    if (icc_is_int(a->dt)) { /* int64 compares: a double would round bounds above 2^53 */
        int64_t l = lo ? icc_i(lo, 0) : INT64_MIN, h = hi ? icc_i(hi, 0) : INT64_MAX;
        for (int64_t k = 0; k < n; k++) {
            int64_t v = icc_i(a, k);
            v = v < l ? l : v;
            icc_iput(o, k, v > h ? h : v);
        }
        return;
    }
    float l = lo ? (float)icc_get(lo, 0) : -INFINITY, h = hi ? (float)icc_get(hi, 0) : INFINITY;
    if (a->dt != ICC_F32) {
        for (int64_t k = 0; k < n; k++) {
            float v = (float)icc_get(a, k);
            v = v < l ? l : v;
            icc_put(o, k, v > h ? h : v);
        }
        return;
    }
    const float *x = (const float *)a->p;
    float *y = (float *)o->p;
    for (int64_t k = 0; k < n; k++) {
        float v = x[k] < l ? l : x[k];
        y[k] = v > h ? h : v;
    }
}

static void icc_cast(icc_t *o, const icc_t *a) {
    o->r = a->r;
    memcpy(o->d, a->d, sizeof(o->d));
    icc_alloc(o);
    int64_t n = icc_numel(o);
    if (icc_is_int(a->dt) && icc_is_int(o->dt)) { /* through int64, not double: exact above 2^53 */
        for (int64_t k = 0; k < n; k++) icc_iput(o, k, icc_i(a, k));
        return;
    }
    for (int64_t k = 0; k < n; k++) icc_put(o, k, icc_get(a, k));
}

/* o = c ? a : b with three-way broadcasting */
static void icc_where(icc_t *o, const icc_t *c, const icc_t *a, const icc_t *b) {
    icc_t ab;
    if (!icc_broadcast_shape(&ab, a, b) || !icc_broadcast_shape(o, c, &ab)) return;
    icc_alloc(o);
    int64_t n = icc_numel(o), sc[ICC_MAX_RANK], sa[ICC_MAX_RANK], sb[ICC_MAX_RANK], es = icc_esize(o->dt);
    icc_bstrides(c, o, sc);
    icc_bstrides(a, o, sa);
    icc_bstrides(b, o, sb);
    for (int64_t k = 0; k < n; k++) {
        int64_t ic, ia, ib, z;
        icc_offsets(k, o, sc, sa, &ic, &ia);
        icc_offsets(k, o, sb, sb, &ib, &z);
        const char *src = ((const uint8_t *)c->p)[ic] ? (const char *)a->p + ia * es : (const char *)b->p + ib * es;
        memcpy((char *)o->p + k * es, src, (size_t)es);
    }
}
#endif
