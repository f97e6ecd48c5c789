/* infercc generated-C runtime: the canonical PagedAttention (semantics: passes/kv_cache/paged_op.py).
 *
 * The keys and values of every sequence live in two block pools shared by all of them, [num_blocks,
 * Hkv, block_size, D|Dv]; a row finds its blocks through its block table. One call:
 *
 * 1. writes each row's S new keys/values into the pools at positions past_len .. past_len+S-1
 *    (block_tables[b][t / block_size], slot t % block_size; fp16 pools round to nearest even).
 *    THE POOLS ARE INPUTS WRITTEN IN PLACE: the paged runtime relies on this side effect;
 * 2. attends, for each row, over its past_len + S keys read from the blocks in place (no gather
 *    copy), with attention.h's flash loop: a key tile is up to ICC_AT_TK keys made of whole blocks
 *    (a block larger than a tile is cut), online softmax across tiles, the same work units
 *    (row, kv head, chunk of query rows, key split) and the same vector helpers. An fp16 tile is
 *    converted once into the unit's workspace and is then contiguous; an fp32 tile is read block
 *    by block where it lies.
 *
 * Per row, off = past_len: the causal triangle and the window are bottom-right aligned on that row's
 * own keys, and the mask (when given) is read at column (mask_len - (past_len + S)) + j for key j,
 * the last past_len + S columns (the runner left-pads the attention_mask of shorter rows).
 *
 * Every block id a call may touch is checked (0 <= id < num_blocks) and every row's table must
 * cover its past_len + S tokens before anything is written: a bad table fails the call
 * (icc_fail) and leaves the pools as they were. Two rows of one call must not write the same slot
 * (the block manager copies a shared block before a row appends to it).
 *
 * Trees of candidates (tree = 1: a bool mask per query saying which of the row's new tokens each
 * one may see, runtime/tree_attention.py): each query row attends over its own allowed keys taken
 * in order and numbered 0, 1, ... as if they were contiguous, so that key j' of that list lands in
 * the tile, split and vector lane where key j' of a chain of the row's path lands: a tree node's
 * output is bit for bit its chain's (a gap of masked keys would move the later keys to other lanes
 * and change the rounding of the sums, which greedy decoding of a quantized model can notice).
 *
 * The contract lives here, not in api.h, because this op exists only for the paged runtime.
 */
#ifndef ICC_PAGED_ATTENTION_H
#define ICC_PAGED_ATTENTION_H
#include "tensor.h"
#include "attention.h"

typedef struct {
    int64_t B, S;              /* rows, new tokens per row (the same for every row of a call) */
    int64_t H, Hkv, D, Dv;     /* query heads, kv heads (H % Hkv == 0), key and value head sizes */
    float scale, softcap, mask_value;
    int causal;                /* key j visible to query i of row b iff j <= i + past_lens[b] */
    int64_t left_window;       /* -1 unbounded, else keys j >= i + past_lens[b] - left_window */
    const float *q;            /* [B, S, H*D] */
    const float *k, *v;        /* new keys/values [B, S, Hkv*D], [B, S, Hkv*Dv] */
    /* mask: bool (uint8, 1 = may attend) or float (added), broadcast over [B, H, S, mask_len]
     * with element strides (0 on broadcast axes); both NULL without a mask. */
    const uint8_t *mask_bool;
    const float *mask_float;
    int64_t mask_stride[4];
    int64_t mask_len;
    int cache_dtype;           /* pools: 0 = fp32, 1 = fp16 */
    void *key_pool, *value_pool; /* [num_blocks, Hkv, block_size, D|Dv], written in place */
    int64_t num_blocks, block_size;
    const int32_t *block_tables; /* [B, max_blocks] */
    int64_t max_blocks;
    const int32_t *past_lens;  /* [B] */
    float *out;                /* [B, S, H*Dv] */
    int tree;                  /* 1: the bool mask is a tree's (each row over its own keys, see above) */
} icc_paged_attention_args;

/* Every row's lengths and blocks valid (else icc_fail and 0), before the pools are touched. */
static int icc_pa_check(const icc_paged_attention_args *a) {
    const int64_t bs = a->block_size;
    if (bs <= 0 || a->Hkv <= 0 || a->H % a->Hkv) {
        icc_fail("PagedAttention: block_size must be positive and num_heads a multiple of kv_num_heads");
        return 0;
    }
    const int has_mask = a->mask_bool != NULL || a->mask_float != NULL;
    for (int64_t b = 0; b < a->B; b++) {
        const int64_t p = a->past_lens[b], total = p + a->S, need = (total + bs - 1) / bs;
        if (p < 0) {
            icc_fail("PagedAttention: kv_past_lens holds a negative length");
            return 0;
        }
        if (need > a->max_blocks) {
            icc_fail("PagedAttention: a row's block table is shorter than its past + new tokens");
            return 0;
        }
        if (has_mask && a->mask_len < total) {
            icc_fail("PagedAttention: the mask is shorter than a row's past + new tokens");
            return 0;
        }
        for (int64_t t = 0; t < need; t++) {
            const int64_t id = a->block_tables[b * a->max_blocks + t];
            if (id < 0 || id >= a->num_blocks) {
                icc_fail("PagedAttention: kv_block_tables holds a block id outside the pool");
                return 0;
            }
        }
    }
    return 1;
}

/* Row b = bg / Hkv, kv head g = bg % Hkv: its S new keys (is_v = 0) or values into the pool. */
static inline void icc_pa_write(const icc_paged_attention_args *a, int64_t bg, int is_v) {
    const int64_t S = a->S, Hkv = a->Hkv, bs = a->block_size, b = bg / Hkv, g = bg % Hkv;
    const int64_t size = is_v ? a->Dv : a->D, p = a->past_lens[b];
    const float *src = is_v ? a->v : a->k;
    char *pool = (char *)(is_v ? a->value_pool : a->key_pool);
    const size_t esz = a->cache_dtype ? 2 : 4;
    const int32_t *table = a->block_tables + b * a->max_blocks;
    for (int64_t i = 0; i < S; i++) {
        const int64_t pos = p + i, blk = table[pos / bs];
        const float *row = src + ((b * S + i) * Hkv + g) * size;
        char *at = pool + (size_t)(((blk * Hkv + g) * bs + pos % bs) * size) * esz;
        if (a->cache_dtype)
            icc_at_to_f16((uint16_t *)at, row, size);
        else
            memcpy(at, row, (size_t)size * sizeof(float));
    }
}

/* One piece of a key tile: n keys of one block, at offset `off` of the tile. */
typedef struct {
    const char *k, *v;
    int64_t off, n;
} icc_pa_seg;

/* One block segment's scores into w->s at its offset, its keys read where they lie: float, or
 * float16 where the build and head sizes allow (ICC_AT_HALF_FITS). */
static inline void icc_pa_qk_seg(icc_at_ws *w, int64_t D, int64_t M, const icc_pa_seg *sg, int half) {
#ifdef ICC_AT_HALF_INLINE
    if (half) {
        icc_at_qk_h(w->q, D, M, (const uint16_t *)(const void *)sg->k, D, sg->n, w->s + sg->off, w->kt);
        return;
    }
#endif
    (void)half;
    icc_at_qk(w->q, D, M, (const float *)(const void *)sg->k, D, sg->n, sg->n, w->s + sg->off);
}

/* One block segment's values into the accumulators (alpha: the rescale, ones after the first). */
static inline void icc_pa_pv_seg(icc_at_ws *w, int64_t Dv, int64_t M, const float *alpha, const icc_pa_seg *sg,
                                 int half) {
#ifdef ICC_AT_HALF_INLINE
    if (half) {
        icc_at_pv_h(w->acc, Dv, M, alpha, w->s + sg->off, (const uint16_t *)(const void *)sg->v, Dv, sg->n);
        return;
    }
#endif
    (void)half;
    icc_at_pv_all(w->acc, Dv, M, alpha, w->s + sg->off, (const float *)(const void *)sg->v, Dv, sg->n, sg->n);
}

/* Rows t0 .. t0+M-1 of kv head group bg against keys [kb, ke) of its row: online softmax into w
 * (icc_at_unit's loop with tiles gathered from blocks). `ones` holds M ones (later pieces of a
 * tile add to the accumulator without rescaling it again). */
static inline void icc_pa_unit(const icc_paged_attention_args *a, icc_at_ws *w, const float *ones, int64_t bg,
                               int64_t t0, int64_t M, int64_t kb, int64_t ke) {
    const int64_t S = a->S, H = a->H, Hkv = a->Hkv, D = a->D, Dv = a->Dv, rep = H / Hkv, bs = a->block_size;
    const int64_t b = bg / Hkv, g = bg % Hkv;
    const int64_t off = a->past_lens[b], Skv = off + S;
    const int half = a->cache_dtype == 1;
    const int in_place = !half || ICC_AT_HALF_FITS(D, Dv); /* K/V read where they lie (else converted) */
    const size_t esz = half ? 2 : 4;
    const float mv = a->mask_value, cap = a->softcap;
    const int skip = isinf(mv) && mv < 0;
    const int has_mask = a->mask_bool != NULL || a->mask_float != NULL;
    const int64_t *ms = a->mask_stride;
    const int64_t mcol = has_mask ? (a->mask_len - Skv) * ms[3] : 0; /* this row's first key column */
    const int32_t *table = a->block_tables + b * a->max_blocks;
    if (ke > Skv) ke = Skv;
    icc_at_begin(w, a->q, a->scale, b, g, t0, M, rep, S, H, D, Dv, off, Skv, a->causal, a->left_window, has_mask, ms,
                 mcol, skip, &kb, &ke);
    icc_pa_seg seg[ICC_AT_TK];
    for (int64_t j0 = kb; j0 < ke;) {
        int64_t n = 0;
        int nseg = 0;
        while (j0 + n < ke && n < ICC_AT_TK) { /* the tile: whole blocks, cut at ke and at ICC_AT_TK */
            const int64_t j = j0 + n, within = j % bs, blk = table[j / bs];
            int64_t len = bs - within;
            if (len > ke - j) len = ke - j;
            if (len > ICC_AT_TK - n) len = ICC_AT_TK - n;
            const size_t at = (size_t)((blk * Hkv + g) * bs + within);
            seg[nseg].k = (const char *)a->key_pool + at * (size_t)D * esz;
            seg[nseg].v = (const char *)a->value_pool + at * (size_t)Dv * esz;
            seg[nseg].off = n;
            seg[nseg].n = len;
            nseg++;
            n += len;
        }
        const int64_t jt = j0;
        j0 += n;
        int any = 0;
        for (int64_t m = 0; m < M && !any; m++) any = !skip || (jt + n > w->lo[m] && jt <= w->hi[m]);
        if (!any) continue;
        if (in_place) { /* (attention.h's prefetch, by block: the tile's values, the next block's keys) */
            for (int s = 0; s < nseg; s++) icc_at_prefetch_bytes(seg[s].v, seg[s].n * Dv * (int64_t)esz);
            for (int s = 0; s < nseg; s++) {
                if (s + 1 < nseg) icc_at_prefetch_bytes(seg[s + 1].k, seg[s + 1].n * D * (int64_t)esz);
                icc_pa_qk_seg(w, D, M, &seg[s], half);
            }
        } else { /* float16 keys converted into a float tile */
            for (int s = 0; s < nseg; s++)
                icc_at_from_f16(w->kt + seg[s].off * D, (const uint16_t *)(const void *)seg[s].k, seg[s].n * D);
            icc_at_qk(w->q, D, M, w->kt, D, n, n, w->s);
        }
        any = 0;
        for (int64_t m = 0; m < M; m++)
            any |= icc_at_row(w, m, jt, n, skip, cap, has_mask, a->mask_bool, a->mask_float, ms[3], mv);
        if (!any) continue;
        if (in_place) {
            for (int s = 0; s < nseg; s++) icc_pa_pv_seg(w, Dv, M, s == 0 ? w->alpha : ones, &seg[s], half);
        } else {
            for (int s = 0; s < nseg; s++)
                icc_at_from_f16(w->vt + seg[s].off * Dv, (const uint16_t *)(const void *)seg[s].v, seg[s].n * Dv);
            icc_at_pv_all(w->acc, Dv, M, w->alpha, w->s, w->vt, Dv, n, n);
        }
    }
}

/* Key or value `j` of row b, kv head g, as float32 into dst (size floats). */
static inline void icc_pa_read(const icc_paged_attention_args *a, const int32_t *table, int64_t g, int64_t j,
                               int is_v, float *dst) {
    const int64_t size = is_v ? a->Dv : a->D, bs = a->block_size;
    const size_t at = (size_t)(((table[j / bs] * a->Hkv + g) * bs + j % bs) * size);
    const void *pool = is_v ? a->value_pool : a->key_pool;
    if (a->cache_dtype)
        icc_at_from_f16(dst, (const uint16_t *)pool + at, size);
    else
        memcpy(dst, (const float *)pool + at, (size_t)size * sizeof(float));
}

/* icc_pa_unit for a tree's rows (tree = 1): each row over its allowed keys renumbered 0, 1, ...
 * (idx: room for a row's keys), tiles, pieces and calls as icc_pa_unit makes them for a chain
 * whose keys are those, so every sum rounds as there. */
static inline void icc_pa_unit_tree(const icc_paged_attention_args *a, icc_at_ws *w, const float *ones, int64_t bg,
                                    int64_t t0, int64_t M, int64_t kb, int64_t ke, int64_t *idx) {
    const int64_t S = a->S, H = a->H, Hkv = a->Hkv, D = a->D, Dv = a->Dv, rep = H / Hkv, bs = a->block_size;
    const int64_t b = bg / Hkv, g = bg % Hkv;
    const int64_t off = a->past_lens[b], Skv = off + S;
    const int64_t *ms = a->mask_stride;
    const int64_t mcol = (a->mask_len - Skv) * ms[3];
    const int32_t *table = a->block_tables + b * a->max_blocks;
    int64_t all_b = 0, all_e = Skv;
    icc_at_begin(w, a->q, a->scale, b, g, t0, M, rep, S, H, D, Dv, off, Skv, a->causal, a->left_window, 1, ms, mcol,
                 0, &all_b, &all_e);
    for (int64_t m = 0; m < M; m++) {
        int64_t count = 0;
        for (int64_t j = w->lo[m]; j <= w->hi[m]; j++)
            if (a->mask_bool[w->moff[m] + j * ms[3]]) idx[count++] = j;
        const int64_t end = ke < count ? ke : count;
        const int64_t lo = w->lo[m], hi = w->hi[m];
        for (int64_t jt = kb; jt < end; jt += ICC_AT_TK) {
            const int64_t n = end - jt < ICC_AT_TK ? end - jt : ICC_AT_TK;
            for (int64_t x = 0; x < n; x++) {
                icc_pa_read(a, table, g, idx[jt + x], 0, w->kt + x * D);
                icc_pa_read(a, table, g, idx[jt + x], 1, w->vt + x * Dv);
            }
            /* pieces where a chain's blocks would end (fp32 pools are read block by block) */
            int64_t cut[ICC_AT_TK + 1], pieces = 0;
            cut[0] = 0;
            if (a->cache_dtype)
                cut[++pieces] = n;
            else
                for (int64_t x = 0; x < n;) {
                    int64_t len = bs - (jt + x) % bs;
                    if (len > n - x) len = n - x;
                    x += len;
                    cut[++pieces] = x;
                }
            float *s = w->s + m * ICC_AT_TK;
            for (int64_t c = 0; c < pieces; c++)
                icc_at_qk(w->q + m * D, D, 1, w->kt + cut[c] * D, D, cut[c + 1] - cut[c], cut[c + 1] - cut[c],
                          s + cut[c]);
            w->lo[m] = jt, w->hi[m] = jt + n - 1; /* every key here is allowed */
            const int any = icc_at_row(w, m, jt, n, 0, a->softcap, 0, NULL, NULL, 0, a->mask_value);
            w->lo[m] = lo, w->hi[m] = hi;
            if (!any) continue;
            for (int64_t c = 0; c < pieces; c++)
                icc_at_pv_all(w->acc + m * Dv, Dv, 1, c == 0 ? w->alpha + m : ones, s + cut[c], w->vt + cut[c] * Dv,
                              Dv, cut[c + 1] - cut[c], cut[c + 1] - cut[c]);
        }
    }
}

/* Work unit u of the paged kernel: (kv head group, row chunk, key split). */
static inline void icc_pa_unit_run(const icc_paged_attention_args *a, icc_at_ws *w, const float *ones, int ok,
                                   int tree, float *part, int64_t u, int64_t nsplit, int64_t chunks, int64_t R) {
    const int64_t sp = u % nsplit, c = (u / nsplit) % chunks, bg = u / (nsplit * chunks);
    const int64_t t0 = c * ICC_AT_MR, M = (R - t0 < ICC_AT_MR) ? R - t0 : ICC_AT_MR;
    const int64_t kb = sp * ICC_AT_SPLIT, ke = kb + ICC_AT_SPLIT;
    if (ok && tree)
        icc_pa_unit_tree(a, w, ones, bg, t0, M, kb, ke, w->moff + ICC_AT_MR);
    else if (ok)
        icc_pa_unit(a, w, ones, bg, t0, M, kb, ke);
    icc_at_unit_out(w, ok, a->out, part, bg, t0, M, sp, nsplit, R, a->S, a->Hkv, a->H / a->Hkv, a->Dv);
}

/* The kernel's work after its plan (icc_at_run's pattern): par = 1 inside a parallel region, the
 * loops shared as orphaned `omp for`s; par = 0 on the calling thread with no OpenMP region. */
static inline void icc_pa_run(const icc_paged_attention_args *a, float *part, int64_t nsplit, char *ws, size_t stride,
                              size_t nf, int par) {
    const int64_t B = a->B, S = a->S, H = a->H, Hkv = a->Hkv, D = a->D, Dv = a->Dv;
    const int half = a->cache_dtype == 1, tree = a->tree && a->mask_bool != NULL;
    const int64_t rep = H / Hkv, R = rep * S, chunks = (R + ICC_AT_MR - 1) / ICC_AT_MR;
    const int64_t units = B * Hkv * chunks * nsplit;
    /* the new keys and values first (the implicit barrier orders them before any read) */
    if (par) {
#pragma omp for schedule(static)
        for (int64_t x = 0; x < 2 * B * Hkv; x++) icc_pa_write(a, x / 2, (int)(x % 2));
    } else {
        for (int64_t x = 0; x < 2 * B * Hkv; x++) icc_pa_write(a, x / 2, (int)(x % 2));
    }
    icc_at_ws w;
    memset(&w, 0, sizeof w);
    float *mem = ws ? (float *)(void *)(ws + stride * (size_t)(par ? icc_thread() : 0)) : NULL;
    float *ones = NULL;
    if (mem) {
        ones = icc_at_carve(&w, mem, D, Dv, ICC_AT_MR, half || tree, nf);
        for (int i = 0; i < ICC_AT_MR; i++) ones[i] = 1.0f;
    }
    if (par) {
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < units; u++) icc_pa_unit_run(a, &w, ones, mem != NULL, tree, part, u, nsplit, chunks, R);
    } else {
        for (int64_t u = 0; u < units; u++) icc_pa_unit_run(a, &w, ones, mem != NULL, tree, part, u, nsplit, chunks, R);
    }
    if (nsplit > 1) icc_at_merge(part, a->out, B, S, Hkv, R, rep, Dv, nsplit, par);
}

static void icc_paged_attention(const icc_paged_attention_args *a) {
    const int64_t B = a->B, S = a->S, H = a->H, Hkv = a->Hkv, D = a->D, Dv = a->Dv;
    if (B <= 0 || S <= 0 || H <= 0) return;
    if (!icc_pa_check(a)) return;
    const int half = a->cache_dtype == 1, tree = a->tree && a->mask_bool != NULL;
    int64_t max_skv = 0, keys = 0;
    for (int64_t b = 0; b < B; b++) {
        const int64_t skv = a->past_lens[b] + S;
        max_skv = skv > max_skv ? skv : max_skv;
        keys += skv;
    }
    const int64_t R = (H / Hkv) * S;
    const int parallel = H * S * keys * (D + Dv) >= ICC_AT_SERIAL_WORK && icc_max_threads() > 1;
    int64_t nsplit = icc_at_splits(max_skv);
    float *part = NULL; /* per row and split: (max, sum, acc[Dv]) */
    if (nsplit > 1) {
        part = (float *)icc_scratch(ICC_SCR_PART, (size_t)(B * Hkv * R * nsplit * (Dv + 2)) * sizeof(float));
        if (!part) nsplit = 1;
    }
    /* each thread's workspace: the floats, then (aligned) the int64 row bounds and tree offsets */
    size_t nf = (size_t)(ICC_AT_MR * (D + ICC_AT_TK + Dv + 4) + (half || tree ? ICC_AT_TK * (D + Dv) : 0)), stride;
    nf = (nf + 15) & ~(size_t)15; /* the int64 arrays after the floats stay aligned */
    char *ws = icc_scratch_threads(ICC_SCR_WS, nf * sizeof(float) + (size_t)(3 * ICC_AT_MR + (tree ? max_skv : 0)) * sizeof(int64_t),
                                   &stride);

    if (parallel) {
#pragma omp parallel
        icc_pa_run(a, part, nsplit, ws, stride, nf, 1);
    } else {
        icc_pa_run(a, part, nsplit, ws, stride, nf, 0);
    }
}

#endif
