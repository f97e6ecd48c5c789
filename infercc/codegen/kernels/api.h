/* infercc generated-C runtime: the kernel contract.
 *
 * Every generated model translation unit includes "kernels.h", which includes the kernel headers
 * below; each header defines (as `static` functions, so gcc can specialize them on the constant
 * arguments a generated call passes) the functions declared here. This file is the contract
 * between the code generator (codegen/emit.py) and the kernels: change a signature here first.
 *
 * Conventions: row-major, contiguous unless a stride is given; sizes are int64_t; float is fp32;
 * fp16 is IEEE binary16 stored as uint16_t. Kernels parallelize with OpenMP themselves (the
 * library sets the thread count once); a kernel called with M = 0 or B = 0 returns at once.
 * Weights arrive in the layout the matching Python packer (codegen/packing.py) wrote into the
 * 64-byte-aligned weight blob.
 */
#ifndef ICC_API_H
#define ICC_API_H
#include <stdint.h>
#include <stddef.h>

/* ---- gemm.h: float matmul against a constant weight ------------------------------------------
 * y[M, N] = x[M, K] @ W[K, N] (+ bias[N] when bias != NULL). `w` is packing.pack_f32(W). */
static void icc_gemm_f32(int64_t M, int64_t N, int64_t K, const float *x, const void *w,
                         const float *bias, float *y);

/* ---- qgemm.h: weight-only quantized matmul (canonical MatMulQuant) -----------------------------
 * y[M, N] = x[M, K] @ dequant(W)[K, N], W quantized in blocks of `block` along K with `bits` (4 or
 * 8); `w` is packing.pack_quant(B, scales, zero_points, rests, K, N, bits, block) (MatMulNBits
 * layout in, the kernel's layout out: codes, scales, zero points / mins and rests all inside).
 * Activations may be quantized to int8 per block for integer dot products (the kernel's choice,
 * within the accuracy the tests state). */
static void icc_matmul_q(int64_t M, int64_t N, int64_t K, int bits, int64_t block, const float *x,
                         const void *w, float *y);
/* Canonical GatherQuant: out[i, :] = dequant(row ids[i] of the [N, K] table) for i < n_ids; the
 * table is the same packed bytes a MatMulQuant of that table uses (a tied LM head shares them).
 * An id outside [-N, N) is clamped into range (the graph's checks happen before). */
static void icc_gather_q(int64_t n_ids, const int64_t *ids, int64_t N, int64_t K, int bits,
                         int64_t block, const void *w, float *out);

/* ---- attention.h: canonical Attention (fusion/attention_op.py defines the semantics) ----------- */
typedef struct {
    int64_t B, S, P;           /* batch, query length, past length (0 without a cache) */
    int64_t H, Hkv, D, Dv;     /* query heads, kv heads (H % Hkv == 0), key and value head sizes */
    float scale, softcap, mask_value;
    int causal;                /* bottom-right aligned: key j visible to query i iff j <= i + P */
    int64_t left_window;       /* -1 unbounded, else keys j >= i + P - left_window */
    const float *q;            /* [B, S, H*D] */
    const float *k, *v;        /* new keys/values [B, S, Hkv*D], [B, S, Hkv*Dv] */
    /* mask: bool (uint8, 1 = may attend) or float (added), broadcast over [B, H, S, P+S] with
     * element strides (0 on broadcast axes); both NULL without a mask. */
    const uint8_t *mask_bool;
    const float *mask_float;
    int64_t mask_stride[4];
    /* cache: cache_dtype 0 = fp32, 1 = fp16. past_* [B, Hkv, past_cap, D|Dv] with P rows valid
     * (NULL when P = 0 or no cache); present_* [B, Hkv, present_cap, D|Dv] receives the P + S rows
     * (the past copied, then the new rows converted to the cache type). When present_k == past_k
     * (one buffer, in place, past_cap == present_cap) only the S new rows are written. present_k
     * NULL: no cache, keys are k/v themselves (P must be 0). Attention reads keys from present
     * (so an fp16 cache rounds the new keys before they are used, as the graph form does). */
    int cache_dtype;
    const void *past_k, *past_v;
    int64_t past_cap;
    void *present_k, *present_v;
    int64_t present_cap;
    float *out;                /* [B, S, H*Dv] */
} icc_attention_args;
/* Scores follow the decomposition exactly: s = cap(scale * q.k) + (allowed ? 0 : mask_value) +
 * mask_float; a disallowed key may be skipped only when mask_value is -inf, and a row whose
 * scores are all -inf outputs 0 (the decomposition's NaN -> 0). No [S, P+S] score matrix is
 * materialized (online softmax over key tiles). */
static void icc_attention(const icc_attention_args *a);

/* ---- rotary.h: canonical RotaryEmbedding (fusion/rotary_op.py defines the semantics) ------------
 * Added by the attention kernel's branch (h-cattn), not in the first contract: the op the Q/K
 * projections feed before attention. x and out are [B, S, H, D] (heads_first = 0: the canonical
 * [B, S, H*D] layout, num_heads = H) or [B, H, S, D] (heads_first = 1: num_heads = 0, H from the
 * shape); cos and sin are the model's full-width factors [B|1, S, R], row (b, s) at
 * b * cs_batch_stride + s * R (cs_batch_stride 0 when the batch axis broadcasts). The first R
 * channels of every head are rotated, out[:R] = x[:R] * cos + rotate(x[:R]) * sin, rotate pairing
 * c with c + R/2 (interleaved = 0) or 2c with 2c + 1 (interleaved = 1); channels R.. are copied.
 * out may be x (in place). */
static void icc_rotary(int64_t B, int64_t S, int64_t H, int64_t D, int64_t R, int interleaved, int heads_first,
                       const float *x, const float *cos, const float *sin, int64_t cs_batch_stride, float *out);

#endif
