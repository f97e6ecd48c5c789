/* Tensors of the generated-C runtime: a pointer, an element type (ONNX codes), dims.
 * Shapes are computed at run time node by node (batch and sequence lengths, and every shape a
 * graph computes from them, are known only then); the kernel that produces a value allocates it
 * (icc_alloc) into the buffer slot the static memory plan gave it at code generation (values whose
 * lifetimes do not overlap share a slot), a slot's buffer kept across runs. */
#ifndef ICC_TENSOR_H
#define ICC_TENSOR_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "common.h"

#define ICC_MAX_RANK 8
enum { ICC_F32 = 1, ICC_U8 = 2, ICC_I8 = 3, ICC_I32 = 6, ICC_I64 = 7, ICC_BOOL = 9, ICC_F16 = 10 };

typedef struct {
    void *p;
    int64_t d[ICC_MAX_RANK];
    int r;
    int dt;
    int owned; /* 1: a heap buffer of its own (freed by icc_release), 2: its slot's buffer (the plan's),
                * 0: a view of an input, weight or value */
    /* A KV-cache tensor [B, heads, rows, width] bound with room to grow (the decode loop's caches):
     * rows of room per head along axis 2, heads `cap` rows apart; 0 = dense (heads d[2] rows apart).
     * Only the cached Attention reads it (the emitter checks no other node does). */
    int64_t cap;
} icc_t;

static int icc_err = 0;          /* first error code of a call (0 = none) */
static char icc_msg[256];

static void icc_fail(const char *what) {
    if (!icc_err) {
        icc_err = 1;
        strncpy(icc_msg, what, sizeof(icc_msg) - 1);
    }
}

static int64_t icc_esize(int dt) {
    switch (dt) {
    case ICC_F32: case ICC_I32: return 4;
    case ICC_I64: return 8;
    case ICC_F16: return 2;
    default: return 1;
    }
}

static int64_t icc_numel(const icc_t *t) {
    int64_t n = 1;
    for (int i = 0; i < t->r; i++) n *= t->d[i];
    return n;
}

/* The static memory plan (codegen/plan.py): the model's values V[0..nv), the slot of each (-1: a
 * heap buffer of its own) and each slot's buffer and its capacity in bytes. A slot's buffer grows to
 * the largest value it held and stays for the next run (after the first run of a shape nothing is
 * allocated); icc_free_slots gives the buffers back. The model's source defines icc_plan; a unit
 * without a model (a custom kernel's check) leaves it zero: every buffer from the heap. */
typedef struct {
    icc_t *v;
    const int *slot;
    int nv, ns;
    void **buf;
    size_t *cap;
    const unsigned char *fit; /* per slot, 1: fitted (plan.py): trimmed when over twice a run's need */
} icc_plan_t;
static icc_plan_t icc_plan;

/* the plan's slot of t: -1 unless t is one of the model's values V[i] planned into a slot (a
 * kernel's own temporaries, and copies of a value, are not: they take heap buffers) */
static int icc_slot_of(const icc_t *t) {
    uintptr_t at = (uintptr_t)t, v0 = (uintptr_t)icc_plan.v;
    if (!icc_plan.v || at < v0 || at >= v0 + sizeof(icc_t) * (size_t)icc_plan.nv || (at - v0) % sizeof(icc_t)) return -1;
    return icc_plan.slot[(at - v0) / sizeof(icc_t)];
}

/* t's buffer for its dims and type (64-byte aligned, 64 bytes of slack past the end) */
static void icc_alloc(icc_t *t) {
    size_t bytes = (size_t)((icc_numel(t) * icc_esize(t->dt) + 63) / 64 * 64 + 64);
    int s = icc_slot_of(t);
    t->cap = 0;
    if (s < 0) {
        t->p = icc_heap_alloc(bytes);
        t->owned = t->p ? 1 : 0;
    } else {
        const size_t cap = icc_plan.cap[s];
        const int trim = icc_plan.fit && icc_plan.fit[s] && cap > 2 * bytes + 4096;
        /* grown by a quarter and at least 4 KiB: a slot grown step by step (a decode step's mask,
         * one position longer each token) reallocates rarely */
        if (cap < bytes || trim) {
            size_t grown = trim || !cap ? bytes : cap + (cap / 4 > 4096 ? cap / 4 / 64 * 64 : 4096);
            if (grown < bytes) grown = bytes;
            icc_heap_free(icc_plan.buf[s]);
            icc_plan.buf[s] = icc_heap_alloc(grown);
            icc_plan.cap[s] = icc_plan.buf[s] ? grown : 0;
        }
        t->p = icc_plan.buf[s];
        t->owned = t->p ? 2 : 0;
    }
    if (!t->p) icc_fail("out of memory");
}

static void icc_release(icc_t *t) { /* views (inputs, weights, aliases) keep their pointer */
    if (t->owned == 1) icc_heap_free(t->p);
    if (t->owned) {
        t->p = NULL;
        t->owned = 0;
    }
}

/* a view of `src` with the shape already set in t (Reshape, Squeeze, Identity...) */
static void icc_alias(icc_t *t, const icc_t *src) {
    t->p = src->p;
    t->owned = 0;
}

static int64_t icc_i(const icc_t *t, int64_t k) { /* element k of an integer tensor as int64 */
    switch (t->dt) {
    case ICC_I64: return ((const int64_t *)t->p)[k];
    case ICC_I32: return ((const int32_t *)t->p)[k];
    case ICC_BOOL: case ICC_U8: return ((const uint8_t *)t->p)[k];
    case ICC_I8: return ((const int8_t *)t->p)[k];
    default: return (int64_t)((const float *)t->p)[k];
    }
}

static void icc_put(icc_t *t, int64_t k, double v); /* (defined after the half converters) */

static int64_t icc_axis(int64_t a, int r) { return a < 0 ? a + r : a; }

/* ---- half precision (IEEE binary16), round to nearest even -------------------------------- */
static float icc_h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else { /* subnormal */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7f800000 | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint16_t icc_f2h(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffff;
    if (ax >= 0x7f800000) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000 ? 0x200 : 0));
    if (ax >= 0x477ff000) return (uint16_t)(sign | 0x7c00); /* overflow -> inf */
    if (ax < 0x38800000) { /* subnormal or zero */
        if (ax < 0x33000000) return (uint16_t)sign;
        uint32_t e = ax >> 23, m = (ax & 0x7fffff) | 0x800000, shift = 126 - e;
        uint32_t v = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (v & 1))) v++;
        return (uint16_t)(sign | v);
    }
    uint32_t v = ((ax >> 13) - ((127 - 15) << 10)), rem = ax & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (v & 1))) v++;
    return (uint16_t)(sign | v);
}

static void icc_put(icc_t *t, int64_t k, double v) { /* element k of t set to v in t's type */
    switch (t->dt) {
    case ICC_F32: ((float *)t->p)[k] = (float)v; break;
    case ICC_F16: ((uint16_t *)t->p)[k] = icc_f2h((float)v); break;
    case ICC_I64: ((int64_t *)t->p)[k] = (int64_t)v; break;
    case ICC_I32: ((int32_t *)t->p)[k] = (int32_t)v; break;
    case ICC_BOOL: ((uint8_t *)t->p)[k] = v != 0; break;
    case ICC_U8: ((uint8_t *)t->p)[k] = (uint8_t)v; break;
    case ICC_I8: ((int8_t *)t->p)[k] = (int8_t)v; break;
    default: icc_fail("unsupported element type"); break;
    }
}

/* ---- broadcasting ------------------------------------------------------------------------ */
/* out dims = numpy broadcast of a and b; returns 0 on a mismatch */
static int icc_broadcast_shape(icc_t *o, const icc_t *a, const icc_t *b) {
    int r = a->r > b->r ? a->r : b->r;
    o->r = r;
    for (int i = 0; i < r; i++) {
        int64_t da = i - (r - a->r) >= 0 ? a->d[i - (r - a->r)] : 1;
        int64_t db = i - (r - b->r) >= 0 ? b->d[i - (r - b->r)] : 1;
        if (da != db && da != 1 && db != 1) { icc_fail("shapes do not broadcast"); return 0; }
        o->d[i] = da == 1 ? db : da;
    }
    return 1;
}

/* element strides of t viewed as broadcast to o's rank/dims (0 on broadcast axes) */
static void icc_bstrides(const icc_t *t, const icc_t *o, int64_t *s) {
    int64_t acc = 1;
    for (int i = o->r - 1; i >= 0; i--) {
        int j = i - (o->r - t->r);
        if (j < 0) { s[i] = 0; continue; }
        s[i] = t->d[j] == 1 && o->d[i] != 1 ? 0 : acc;
        acc *= t->d[j];
    }
}

/* offset in a and b of flat output index k (row-major over o's dims) */
static inline void icc_offsets(int64_t k, const icc_t *o, const int64_t *sa, const int64_t *sb, int64_t *oa, int64_t *ob) {
    int64_t a = 0, b = 0;
    for (int i = o->r - 1; i >= 0; i--) {
        int64_t idx = k % o->d[i];
        k /= o->d[i];
        a += idx * sa[i];
        b += idx * sb[i];
    }
    *oa = a;
    *ob = b;
}

/* strided gather copy: dst (contiguous, dims) <- src with element strides s, elements of es bytes */
static void icc_copy_strided(void *dst, const void *src, int r, const int64_t *dims, const int64_t *s, int64_t es) {
    int64_t n = 1;
    for (int i = 0; i < r; i++) n *= dims[i];
    if (n == 0) return;
    int64_t inner = r ? dims[r - 1] : 1, inner_s = r ? s[r - 1] : 1;
    int64_t rows = n / inner;
    #pragma omp parallel for if (n > 65536)
    for (int64_t row = 0; row < rows; row++) {
        int64_t k = row, off = 0;
        for (int i = r - 2; i >= 0; i--) {
            off += (k % dims[i]) * s[i];
            k /= dims[i];
        }
        char *d = (char *)dst + row * inner * es;
        const char *p = (const char *)src + off * es;
        if (inner_s == 1) memcpy(d, p, (size_t)(inner * es));
        else for (int64_t j = 0; j < inner; j++) memcpy(d + j * es, p + j * inner_s * es, (size_t)es);
    }
}
#endif
