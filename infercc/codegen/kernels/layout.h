/* Shape and data-movement ops (standard ONNX semantics): shapes are computed here at run time
 * from the inputs' dims and, where ONNX takes them as tensors, from their values. */
#ifndef ICC_LAYOUT_H
#define ICC_LAYOUT_H
#include "tensor.h"
#include "elementwise.h"

static void icc_set_shape(icc_t *o, int r, const int64_t *d) {
    o->r = r;
    for (int i = 0; i < r; i++) o->d[i] = d[i];
}

static void icc_shape_of(icc_t *o, const icc_t *x, int64_t start, int64_t end) {
    start = icc_axis(start, x->r); end = end > x->r ? x->r : icc_axis(end, x->r);
    if (start < 0) start = 0;
    if (end < start) end = start;
    o->r = 1; o->d[0] = end - start;
    icc_alloc(o);
    for (int64_t i = start; i < end; i++) ((int64_t *)o->p)[i - start] = x->d[i];
}

static void icc_reshape(icc_t *o, const icc_t *x, const icc_t *shape, int allowzero) {
    int64_t r = icc_numel(shape), known = 1, infer = -1;
    if (r > ICC_MAX_RANK) { icc_fail("Reshape to a rank above 8"); return; }
    o->r = (int)r;
    for (int64_t i = 0; i < r; i++) {
        int64_t v = icc_i(shape, i);
        if (v == 0 && !allowzero) v = x->d[i];
        if (v == -1) { infer = i; v = 1; }
        o->d[i] = v;
        known *= v;
    }
    if (infer >= 0) o->d[infer] = known ? icc_numel(x) / known : 0;
    if (icc_numel(o) != icc_numel(x)) { icc_fail("Reshape changes the element count"); return; }
    icc_alias(o, x);
}

/* axes from a tensor (or NULL) for Squeeze / Unsqueeze */
static void icc_squeeze(icc_t *o, const icc_t *x, const icc_t *axes) {
    int drop[ICC_MAX_RANK] = {0};
    if (axes) for (int64_t i = 0; i < icc_numel(axes); i++) drop[icc_axis(icc_i(axes, i), x->r)] = 1;
    else for (int i = 0; i < x->r; i++) drop[i] = x->d[i] == 1;
    o->r = 0;
    for (int i = 0; i < x->r; i++) if (!drop[i]) o->d[o->r++] = x->d[i];
    icc_alias(o, x);
}

static void icc_unsqueeze(icc_t *o, const icc_t *x, const icc_t *axes) {
    int r = x->r + (int)icc_numel(axes), add[ICC_MAX_RANK] = {0};
    for (int64_t i = 0; i < icc_numel(axes); i++) add[icc_axis(icc_i(axes, i), r)] = 1;
    o->r = r;
    for (int i = 0, j = 0; i < r; i++) o->d[i] = add[i] ? 1 : x->d[j++];
    icc_alias(o, x);
}

static void icc_flatten(icc_t *o, const icc_t *x, int64_t axis) {
    axis = icc_axis(axis, x->r);
    int64_t a = 1, b = 1;
    for (int i = 0; i < x->r; i++) { if (i < axis) a *= x->d[i]; else b *= x->d[i]; }
    o->r = 2; o->d[0] = a; o->d[1] = b;
    icc_alias(o, x);
}

static void icc_expand(icc_t *o, const icc_t *x, const icc_t *shape) {
    icc_t s = {0};
    s.r = (int)icc_numel(shape);
    for (int i = 0; i < s.r; i++) s.d[i] = icc_i(shape, i);
    if (!icc_broadcast_shape(o, x, &s)) return;
    icc_alloc(o);
    int64_t st[ICC_MAX_RANK];
    icc_bstrides(x, o, st);
    icc_copy_strided(o->p, x->p, o->r, o->d, st, icc_esize(x->dt));
}

static void icc_transpose(icc_t *o, const icc_t *x, const int64_t *perm) {
    int64_t xs[ICC_MAX_RANK], st[ICC_MAX_RANK], acc = 1;
    for (int i = x->r - 1; i >= 0; i--) { xs[i] = acc; acc *= x->d[i]; }
    o->r = x->r;
    for (int i = 0; i < x->r; i++) { o->d[i] = x->d[perm[i]]; st[i] = xs[perm[i]]; }
    icc_alloc(o);
    icc_copy_strided(o->p, x->p, o->r, o->d, st, icc_esize(x->dt));
}

static void icc_tile(icc_t *o, const icc_t *x, const icc_t *reps) {
    o->r = x->r;
    for (int i = 0; i < x->r; i++) o->d[i] = x->d[i] * icc_i(reps, i);
    icc_alloc(o);
    int64_t n = icc_numel(o), es = icc_esize(x->dt);
    for (int64_t k = 0; k < n; k++) {
        int64_t rem = k, off = 0, stride = 1;
        for (int i = o->r - 1; i >= 0; i--) {
            off += ((rem % o->d[i]) % x->d[i]) * stride;
            rem /= o->d[i];
            stride *= x->d[i];
        }
        memcpy((char *)o->p + k * es, (const char *)x->p + off * es, (size_t)es);
    }
}

static void icc_concat(icc_t *o, const icc_t *const *xs, int n, int64_t axis) {
    axis = icc_axis(axis, xs[0]->r);
    *o = (icc_t){.dt = o->dt};
    o->r = xs[0]->r;
    memcpy(o->d, xs[0]->d, sizeof(o->d));
    o->d[axis] = 0;
    for (int i = 0; i < n; i++) o->d[axis] += xs[i]->d[axis];
    icc_alloc(o);
    int64_t outer = 1, es = icc_esize(o->dt);
    for (int i = 0; i < axis; i++) outer *= o->d[i];
    int64_t inner_o = icc_numel(o) / (outer ? outer : 1) * es, at = 0;
    for (int i = 0; i < n; i++) {
        int64_t inner = outer ? icc_numel(xs[i]) / outer * es : 0;
        for (int64_t r = 0; r < outer; r++)
            memcpy((char *)o->p + r * inner_o + at, (const char *)xs[i]->p + r * inner, (size_t)inner);
        at += inner;
    }
}

/* piece `which` of a Split along axis into the given sizes */
static void icc_split(icc_t *o, const icc_t *x, int64_t axis, const int64_t *sizes, int which) {
    axis = icc_axis(axis, x->r);
    int64_t start = 0;
    for (int i = 0; i < which; i++) start += sizes[i];
    int64_t st[ICC_MAX_RANK], acc = 1;
    for (int i = x->r - 1; i >= 0; i--) { st[i] = acc; acc *= x->d[i]; }
    o->r = x->r;
    memcpy(o->d, x->d, sizeof(o->d));
    o->d[axis] = sizes[which];
    int64_t outer = 1;
    for (int i = 0; i < axis; i++) outer *= x->d[i];
    const char *from = (const char *)x->p + start * st[axis] * icc_esize(x->dt);
    if (outer == 1) { /* each piece is one contiguous run of x (a decode step's fused QKV or gate/up): a view */
        o->p = (void *)from;
        o->owned = 0;
        return;
    }
    icc_alloc(o);
    icc_copy_strided(o->p, from, o->r, o->d, st, icc_esize(x->dt));
}

/* equal split sizes (Split without a sizes input) */
static void icc_split_sizes(const icc_t *x, int64_t axis, int n, const icc_t *given, int64_t *sizes) {
    axis = icc_axis(axis, x->r);
    for (int i = 0; i < n; i++)
        sizes[i] = given ? icc_i(given, i) : (x->d[axis] + n - 1) / n - (i == n - 1 ? ((x->d[axis] + n - 1) / n * n - x->d[axis]) : 0);
}

static void icc_slice(icc_t *o, const icc_t *x, const icc_t *starts, const icc_t *ends, const icc_t *axes, const icc_t *steps) {
    int64_t begin[ICC_MAX_RANK] = {0}, step[ICC_MAX_RANK], st[ICC_MAX_RANK], acc = 1;
    o->r = x->r;
    for (int i = 0; i < x->r; i++) { o->d[i] = x->d[i]; step[i] = 1; }
    for (int i = x->r - 1; i >= 0; i--) { st[i] = acc; acc *= x->d[i]; }
    for (int64_t k = 0; k < icc_numel(starts); k++) {
        int a = (int)(axes ? icc_axis(icc_i(axes, k), x->r) : k);
        int64_t dim = x->d[a], s = icc_i(starts, k), e = icc_i(ends, k), p = steps ? icc_i(steps, k) : 1;
        if (s < 0) s += dim;
        if (e < 0) e += dim;
        if (p > 0) {
            s = s < 0 ? 0 : s > dim ? dim : s;
            e = e < 0 ? 0 : e > dim ? dim : e;
            o->d[a] = e > s ? (e - s + p - 1) / p : 0;
        } else {
            s = s < 0 ? -1 : s > dim - 1 ? dim - 1 : s;
            e = e < -1 ? -1 : e > dim - 1 ? dim - 1 : e;
            o->d[a] = s > e ? (s - e + (-p) - 1) / (-p) : 0;
        }
        begin[a] = s;
        step[a] = p;
    }
    int64_t off = 0, ss[ICC_MAX_RANK];
    for (int i = 0; i < x->r; i++) { off += begin[i] * st[i]; ss[i] = st[i] * step[i]; }
    icc_alloc(o);
    icc_copy_strided(o->p, (const char *)x->p + off * icc_esize(x->dt), o->r, o->d, ss, icc_esize(x->dt));
}

static void icc_gather(icc_t *o, const icc_t *x, const icc_t *idx, int64_t axis) {
    axis = icc_axis(axis, x->r);
    o->r = 0;
    for (int i = 0; i < axis; i++) o->d[o->r++] = x->d[i];
    for (int i = 0; i < idx->r; i++) o->d[o->r++] = idx->d[i];
    for (int i = (int)axis + 1; i < x->r; i++) o->d[o->r++] = x->d[i];
    icc_alloc(o);
    int64_t outer = 1, inner = icc_esize(x->dt), n = icc_numel(idx), dim = x->d[axis];
    for (int i = 0; i < axis; i++) outer *= x->d[i];
    for (int i = (int)axis + 1; i < x->r; i++) inner *= x->d[i];
    for (int64_t r = 0; r < outer; r++)
        for (int64_t k = 0; k < n; k++) {
            int64_t j = icc_i(idx, k);
            if (j < 0) j += dim;
            if (j < 0 || j >= dim) { icc_fail("Gather index out of range"); return; }
            memcpy((char *)o->p + (r * n + k) * inner, (const char *)x->p + (r * dim + j) * inner, (size_t)inner);
        }
}

/* Rows of a float table [N, K] read from the panels of its transpose (pack_f32 of table^T: the
   tied LM head's weight), so a model whose embedding and head share one table stores it once: row
   n is column n % ICC_PANEL of panel n / ICC_PANEL, K floats ICC_PANEL apart. Gather's axis-0
   semantics: output shape idx + [K], a negative index counts from the end, one out of range fails. */
static void icc_gather_panels(icc_t *o, const icc_t *idx, int64_t N, int64_t K, const float *w) {
    o->dt = ICC_F32;
    icc_set_shape(o, idx->r, idx->d);
    o->d[o->r++] = K;
    icc_alloc(o);
    const int64_t n_ids = icc_numel(idx);
    for (int64_t i = 0; i < n_ids; i++) {
        int64_t j = icc_i(idx, i);
        if (j < 0) j += N;
        if (j < 0 || j >= N) { icc_fail("Gather index out of range"); return; }
        const float *col = w + (j / ICC_PANEL) * K * ICC_PANEL + j % ICC_PANEL;
        float *row = (float *)o->p + i * K;
        for (int64_t k = 0; k < K; k++) row[k] = col[k * ICC_PANEL];
    }
}

static void icc_gather_elements(icc_t *o, const icc_t *x, const icc_t *idx, int64_t axis) {
    axis = icc_axis(axis, x->r);
    icc_set_shape(o, idx->r, idx->d);
    icc_alloc(o);
    int64_t n = icc_numel(o), es = icc_esize(x->dt);
    for (int64_t k = 0; k < n; k++) {
        int64_t rem = k, off = 0, stride = 1;
        for (int i = idx->r - 1; i >= 0; i--) {
            int64_t c = rem % idx->d[i];
            rem /= idx->d[i];
            if (i == axis) { c = icc_i(idx, k); if (c < 0) c += x->d[i]; }
            off += c * stride;
            stride *= x->d[i];
        }
        memcpy((char *)o->p + k * es, (const char *)x->p + off * es, (size_t)es);
    }
}

static void icc_gather_nd(icc_t *o, const icc_t *x, const icc_t *idx, int64_t batch_dims) {
    int64_t m = idx->d[idx->r - 1], batch = 1, lookups = 1, inner = icc_esize(x->dt);
    o->r = 0;
    for (int i = 0; i < idx->r - 1; i++) o->d[o->r++] = idx->d[i];
    for (int i = (int)(batch_dims + m); i < x->r; i++) { o->d[o->r++] = x->d[i]; inner *= x->d[i]; }
    for (int i = 0; i < batch_dims; i++) batch *= x->d[i];
    for (int i = (int)batch_dims; i < idx->r - 1; i++) lookups *= idx->d[i];
    icc_alloc(o);
    int64_t xbatch = icc_numel(x) / (batch ? batch : 1) * icc_esize(x->dt);
    for (int64_t b = 0; b < batch; b++)
        for (int64_t l = 0; l < lookups; l++) {
            int64_t off = 0;
            for (int64_t j = 0; j < m; j++) {
                int64_t c = icc_i(idx, (b * lookups + l) * m + j), dim = x->d[batch_dims + j];
                off = off * dim + (c < 0 ? c + dim : c);
            }
            memcpy((char *)o->p + (b * lookups + l) * inner, (const char *)x->p + b * xbatch + off * inner, (size_t)inner);
        }
}

/* ConstantOfShape: o (element type set by the caller) of the shape held in the 1-D integer tensor
 * `shape`, every element v (integer types: iv, exact above 2^53). A negative or too long shape is
 * an error, not an allocation. */
static void icc_constant_of_shape(icc_t *o, const icc_t *shape, double v, int64_t iv) {
    const int64_t r = icc_numel(shape);
    if (r > ICC_MAX_RANK) { icc_fail("ConstantOfShape to a rank above 8"); return; }
    o->r = (int)r;
    for (int i = 0; i < o->r; i++) {
        o->d[i] = icc_i(shape, i);
        if (o->d[i] < 0) { icc_fail("ConstantOfShape with a negative dimension"); return; }
    }
    icc_alloc(o);
    if (icc_err) return;
    const int64_t n = icc_numel(o);
    if (o->dt == ICC_F32) {
        for (int64_t k = 0; k < n; k++) ((float *)o->p)[k] = (float)v;
    } else if (icc_is_int(o->dt)) {
        for (int64_t k = 0; k < n; k++) icc_iput(o, k, iv);
    } else {
        for (int64_t k = 0; k < n; k++) icc_put(o, k, v);
    }
}

/* Trilu: x's last two axes keep their upper (j - i >= k) or lower (j - i <= k) triangle, the
 * rest zero; k from the optional scalar input (0 without it). */
static void icc_trilu(icc_t *o, const icc_t *x, const icc_t *k_t, int upper) {
    if (x->r < 2) { icc_fail("Trilu needs a tensor of rank >= 2"); return; }
    const int64_t k = k_t ? icc_i(k_t, 0) : 0, rows = x->d[x->r - 2], cols = x->d[x->r - 1];
    const int64_t es = icc_esize(x->dt), mats = rows * cols != 0 ? icc_numel(x) / (rows * cols) : 0;
    o->r = x->r;
    memcpy(o->d, x->d, sizeof(o->d));
    icc_alloc(o);
    if (icc_err) return;
    memcpy(o->p, x->p, (size_t)(icc_numel(x) * es));
    for (int64_t m = 0; m < mats; m++)
        for (int64_t i = 0; i < rows; i++) {  /* row i zeroes columns [lo, hi): j < i + k, or j > i + k */
            int64_t lo = upper ? 0 : i + k + 1, hi = upper ? i + k : cols;
            lo = lo < 0 ? 0 : lo;
            hi = hi > cols ? cols : hi;
            if (lo < hi) memset((char *)o->p + ((m * rows + i) * cols + lo) * es, 0, (size_t)((hi - lo) * es));
        }
}

static void icc_range(icc_t *o, const icc_t *start, const icc_t *limit, const icc_t *delta) {
    double s = icc_get(start, 0), l = icc_get(limit, 0), d = icc_get(delta, 0);
    int64_t n = (int64_t)ceil((l - s) / d);
    o->r = 1; o->d[0] = n > 0 ? n : 0;
    icc_alloc(o);
    for (int64_t k = 0; k < o->d[0]; k++) {
        if (o->dt == ICC_F32) ((float *)o->p)[k] = (float)(s + k * d);
        else icc_put(o, k, (double)((int64_t)s + k * (int64_t)d));
    }
}

static void icc_cumsum(icc_t *o, const icc_t *x, const icc_t *axis_t, int exclusive, int reverse) {
    int64_t axis = icc_axis(icc_i(axis_t, 0), x->r), outer = 1, inner = 1, dim = x->d[axis];
    icc_set_shape(o, x->r, x->d);
    icc_alloc(o);
    for (int i = 0; i < axis; i++) outer *= x->d[i];
    for (int i = (int)axis + 1; i < x->r; i++) inner *= x->d[i];
    for (int64_t a = 0; a < outer; a++)
        for (int64_t c = 0; c < inner; c++) {
            double acc = 0;
            for (int64_t t = 0; t < dim; t++) {
                int64_t j = reverse ? dim - 1 - t : t, k = (a * dim + j) * inner + c;
                double v = icc_get(x, k);
                if (!exclusive) acc += v;
                icc_put(o, k, acc);
                if (exclusive) acc += v;
            }
        }
}

enum { ICC_RSUM, ICC_RMEAN, ICC_RMAX, ICC_RMIN };

/* output offset of input element k (reduced axes dropped, `full` the keepdims shape) */
static inline int64_t icc_reduce_offset(int64_t k, const icc_t *x, const int *red, const icc_t *full) {
    int64_t off = 0, stride = 1;
    for (int i = x->r - 1; i >= 0; i--) {
        int64_t c = k % x->d[i];
        k /= x->d[i];
        if (!red[i]) off += c * stride;
        stride *= full->d[i];
    }
    return off;
}

/* the smallest / largest value of an integer element type (the identities of Max / Min over an
 * empty set, as ONNX defines them) */
static void icc_int_range(int dt, int64_t *lo, int64_t *hi) {
    switch (dt) {
    case ICC_I32: *lo = INT32_MIN; *hi = INT32_MAX; break;
    case ICC_I8: *lo = INT8_MIN; *hi = INT8_MAX; break;
    case ICC_U8: *lo = 0; *hi = UINT8_MAX; break;
    case ICC_BOOL: *lo = 0; *hi = 1; break;
    default: *lo = INT64_MIN; *hi = INT64_MAX; break;
    }
}

/* reductions of float16 (accumulated in double) and integer / bool inputs (in int64, exact; a mean
 * divides truncating, as the integer result of ONNX's reference does) */
static void icc_reduce_other(icc_t *o, const icc_t *x, const int *red, const icc_t *full, int op, int64_t n, int64_t count) {
    int ints = icc_is_int(x->dt);
    int64_t lo, hi, total = icc_numel(x);
    icc_int_range(x->dt, &lo, &hi);
    void *acc = icc_scratch(ICC_SCR_REDUCE, (size_t)(n ? n : 1) * 8);
    if (!acc) { icc_fail("out of memory"); return; }
    int64_t *ia = (int64_t *)acc;
    double *da = (double *)acc;
    for (int64_t k = 0; k < n; k++) {
        if (ints) ia[k] = op == ICC_RMAX ? lo : op == ICC_RMIN ? hi : 0;
        else da[k] = op == ICC_RMAX ? -INFINITY : op == ICC_RMIN ? INFINITY : 0.0;
    }
    for (int64_t k = 0; k < total; k++) {
        int64_t off = icc_reduce_offset(k, x, red, full);
        if (ints) {
            int64_t v = icc_i(x, k);
            ia[off] = op == ICC_RMAX ? (v > ia[off] ? v : ia[off]) : op == ICC_RMIN ? (v < ia[off] ? v : ia[off]) : ia[off] + v;
        } else {
            double v = icc_get(x, k);
            da[off] = op == ICC_RMAX ? (v > da[off] ? v : da[off]) : op == ICC_RMIN ? (v < da[off] ? v : da[off]) : da[off] + v;
        }
    }
    for (int64_t k = 0; k < n; k++) {
        if (ints) icc_iput(o, k, op == ICC_RMEAN ? (count ? ia[k] / count : 0) : ia[k]);
        else icc_put(o, k, op == ICC_RMEAN ? da[k] / (double)count : da[k]);
    }
}

static void icc_reduce(icc_t *o, const icc_t *x, const icc_t *axes, int keepdims, int op, int noop_empty) {
    int red[ICC_MAX_RANK] = {0}, any = axes && icc_numel(axes) > 0;
    if (!any && noop_empty) { icc_set_shape(o, x->r, x->d); icc_alias(o, x); return; }
    for (int i = 0; i < x->r; i++) red[i] = !any;
    if (any) for (int64_t k = 0; k < icc_numel(axes); k++) red[icc_axis(icc_i(axes, k), x->r)] = 1;
    icc_t full = {0};
    full.r = x->r;
    o->r = 0;
    for (int i = 0; i < x->r; i++) {
        full.d[i] = red[i] ? 1 : x->d[i];
        if (!red[i] || keepdims) o->d[o->r++] = full.d[i];
    }
    icc_alloc(o);
    int64_t n = icc_numel(o), count = icc_numel(x) / (n ? n : 1);
    if (x->dt != ICC_F32) { icc_reduce_other(o, x, red, &full, op, n, count); return; }
    float *y = (float *)o->p;
    for (int64_t k = 0; k < n; k++) y[k] = op == ICC_RMAX ? -INFINITY : op == ICC_RMIN ? INFINITY : 0.f;
    const float *src = (const float *)x->p;
    for (int64_t k = 0; k < icc_numel(x); k++) {
        int64_t off = icc_reduce_offset(k, x, red, &full);
        float v = src[k];
        y[off] = op == ICC_RMAX ? (v > y[off] ? v : y[off]) : op == ICC_RMIN ? (v < y[off] ? v : y[off]) : y[off] + v;
    }
    if (op == ICC_RMEAN) for (int64_t k = 0; k < n; k++) y[k] /= (float)count;
}

static void icc_softmax(icc_t *o, const icc_t *x, int64_t axis) {
    axis = icc_axis(axis, x->r);
    icc_set_shape(o, x->r, x->d);
    icc_alloc(o);
    int64_t dim = x->d[axis], inner = 1, outer = 1;
    for (int i = 0; i < axis; i++) outer *= x->d[i];
    for (int i = (int)axis + 1; i < x->r; i++) inner *= x->d[i];
    const float *src = (const float *)x->p;
    float *y = (float *)o->p;
    #pragma omp parallel for if (outer * inner > 256)
    for (int64_t q = 0; q < outer * inner; q++) {
        int64_t a = q / inner, c = q % inner, base = a * dim * inner + c;
        float m = -INFINITY, s = 0.f;
        for (int64_t j = 0; j < dim; j++) m = src[base + j * inner] > m ? src[base + j * inner] : m;
        for (int64_t j = 0; j < dim; j++) { float e = expf(src[base + j * inner] - m); y[base + j * inner] = e; s += e; }
        for (int64_t j = 0; j < dim; j++) y[base + j * inner] /= s;
    }
}

/* batched MatMul of two activations with numpy broadcasting of the batch dims (float) */
static void icc_matmul(icc_t *o, const icc_t *a, const icc_t *b) {
    icc_t a2 = *a, b2 = *b;
    if (a2.r == 1) { a2.r = 2; a2.d[1] = a2.d[0]; a2.d[0] = 1; }
    if (b2.r == 1) { b2.r = 2; b2.d[1] = 1; }
    int64_t M = a2.d[a2.r - 2], K = a2.d[a2.r - 1], N = b2.d[b2.r - 1];
    if (b2.d[b2.r - 2] != K) { icc_fail("MatMul inner dimensions differ"); return; }
    icc_t ba = a2, bb = b2;
    ba.r -= 2; bb.r -= 2;
    icc_t batch;
    if (!icc_broadcast_shape(&batch, &ba, &bb)) return;
    int64_t sa[ICC_MAX_RANK], sb[ICC_MAX_RANK], nb = icc_numel(&batch);
    icc_bstrides(&ba, &batch, sa);
    icc_bstrides(&bb, &batch, sb);
    o->r = batch.r;
    memcpy(o->d, batch.d, sizeof(o->d));
    if (a->r > 1) o->d[o->r++] = M;
    if (b->r > 1) o->d[o->r++] = N;
    icc_alloc(o);
    #pragma omp parallel for if (nb * M * N * K > 1000000)
    for (int64_t t = 0; t < nb * M; t++) {
        int64_t bi = t / M, m = t % M, ia, ib;
        icc_offsets(bi, &batch, sa, sb, &ia, &ib);
        const float *x = (const float *)a->p + ia * M * K + m * K, *w = (const float *)b->p + ib * K * N;
        float *y = (float *)o->p + (bi * M + m) * N;
        for (int64_t n = 0; n < N; n++) y[n] = 0.f;
        for (int64_t k = 0; k < K; k++) {
            float xv = x[k];
            const float *wr = w + k * N;
            for (int64_t n = 0; n < N; n++) y[n] += xv * wr[n];
        }
    }
}

/* Gemm's definition, for the cases the packed constant-weight path does not take (B an activation,
 * transA, alpha, a C broadcast over rows): y = alpha * op(A) @ op(B) + beta * C, C unidirectionally
 * broadcast to [M, N]. Accumulates in double: this is the reference path, not the fast one. */
static void icc_gemm_ref(icc_t *o, const icc_t *a, const icc_t *b, const icc_t *c, int trans_a, int trans_b,
                         float alpha, float beta) {
    if (a->r != 2 || b->r != 2) { icc_fail("Gemm: A and B must be matrices"); return; }
    int64_t M = trans_a ? a->d[1] : a->d[0], K = trans_a ? a->d[0] : a->d[1];
    int64_t N = trans_b ? b->d[0] : b->d[1], Kb = trans_b ? b->d[1] : b->d[0];
    if (K != Kb) { icc_fail("Gemm: the inner dimensions of A and B differ"); return; }
    o->r = 2; o->d[0] = M; o->d[1] = N;
    int64_t sc[ICC_MAX_RANK] = {0};
    if (c) {
        icc_t full;
        if (!icc_broadcast_shape(&full, c, o) || full.r != 2 || full.d[0] != M || full.d[1] != N) {
            icc_fail("Gemm: C does not broadcast to [M, N]"); return;
        }
        icc_bstrides(c, o, sc);
    }
    icc_alloc(o);
    const float *x = (const float *)a->p, *w = (const float *)b->p;
    float *y = (float *)o->p;
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            double acc = 0.0;
            for (int64_t k = 0; k < K; k++)
                acc += (double)x[trans_a ? k * M + m : m * K + k] * (double)w[trans_b ? n * K + k : k * N + n];
            double v = alpha * acc;
            if (c) v += beta * icc_get(c, m * sc[0] + n * sc[1]);
            y[m * N + n] = (float)v;
        }
}
#endif
