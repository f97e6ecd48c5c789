"""The canonical paged attention op, ``ai.infercc::PagedAttention``: a cached Attention whose keys
and values live in a block pool shared by every sequence (vLLM's PagedAttention), not in one
contiguous [batch, kv_heads, past, head_size] tensor per call.

Inputs (indices fixed): 0 ``query`` [B, S, H*D], 1 ``key`` [B, S, Hkv*D], 2 ``value`` [B, S,
Hkv*Dv] (the S new tokens of each row, heads packed as for Attention), 3 optional ``mask``
(bool or float, rank 4, broadcastable to [B, H, S, T]), 4 ``key_pool`` [num_blocks, Hkv,
block_size, D] and 5 ``value_pool`` [num_blocks, Hkv, block_size, Dv] (float32 or float16, both
the same), 6 ``block_tables`` [B, max_blocks] int32 (row b's blocks in order: token position t
sits in block ``block_tables[b, t // block_size]`` at slot ``t % block_size``), 7 ``past_lens``
[B] int32 (tokens already in the pool per row). Attributes: all of Attention's (see
``fusion/attention_op.py``) plus ``block_size``. Output: the attention output [B, S, H*Dv] only.

Why no padding of the new tokens: every row of one call has the same number S of new tokens (a
decode step, or prompt chunks of one length); the runner groups rows by S. Rows differ only in
their past, which the block table and ``past_lens`` give per row.

Semantics (what :func:`reference` computes), for each row b with p = past_lens[b]:

1. the row's new keys and values are written into the pools at positions p .. p+S-1 (rounded to
   the pool's type). THE POOLS ARE WRITTEN IN PLACE: a side effect on two of the op's inputs that
   the paged runtime relies on (the next call reads them); no ONNX graph can express it, so the op
   has no decomposition and runs only on the generated-C runtime (``kernels/paged_attention.h``);
2. the row attends over its p + S keys read from the blocks, exactly as a cached Attention with a
   past of p tokens does (``off`` = p: causal triangle and window bottom-right aligned per row,
   softcap, grouped heads, ``mask_value``, NaN rows -> 0);
3. the mask, when present, is read at column (T - (p + S)) + j for key j, T being the mask's last
   dimension: the runner left-pads the attention_mask of rows with a shorter past, so a row's keys
   are always the last p + S columns, whatever mask the graph computed from it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ...errors import PassError
from ...ir import DType, Node, Shape, Value
from ..canonical import DOMAIN, CanonicalOp, register
from ..fusion.attention_op import AttentionSpec
from ..rewrite import Builder

OP_NAME = "PagedAttention"
#: Input slots of the op.
MASK, KEY_POOL, VALUE_POOL, BLOCK_TABLES, PAST_LENS = 3, 4, 5, 6, 7
#: Element types a pool may have (the C kernel reads both natively).
POOL_DTYPES = (DType.FLOAT, DType.FLOAT16)


@dataclasses.dataclass(frozen=True)
class PagedSpec:
    """A PagedAttention node's attributes: Attention's plus the block size."""

    attention: AttentionSpec
    block_size: int

    @classmethod
    def of(cls, node: Node) -> PagedSpec:
        return cls(AttentionSpec.of(node), int(node.attr("block_size")))

    def attrs(self) -> dict[str, object]:
        return {**self.attention.attrs(), "block_size": self.block_size}


def _infer(node: Node) -> list[tuple[DType | None, Shape]]:
    q = node.inputs[0]
    spec = AttentionSpec.of(node)
    shape = None if q.shape is None or len(q.shape) != 3 else (q.shape[0], q.shape[1], spec.num_heads * spec.v_head_size)
    return [(q.dtype, shape)]


def _no_decomposition(op: Builder, node: Node) -> list[Value]:
    raise PassError(f"{OP_NAME} {node.name!r} writes its key/value pools in place, which standard ONNX cannot "
                    "express: it runs only on the generated-C runtime (the paged runner's 'ort-gather' form "
                    "serves ONNX Runtime with the contiguous cached graph instead)")


def make_node(op: Builder, q: Value, k: Value, v: Value, mask: Value | None, key_pool: Value, value_pool: Value,
              block_tables: Value, past_lens: Value, spec: PagedSpec) -> Value:
    """Build a PagedAttention node; returns its output."""
    return getattr(op, OP_NAME)(q, k, v, mask, key_pool, value_pool, block_tables, past_lens, _domain=DOMAIN,
                                **spec.attrs())


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None, key_pool: np.ndarray,
              value_pool: np.ndarray, block_tables: np.ndarray, past_lens: np.ndarray, spec: PagedSpec) -> np.ndarray:
    """The op's definition in NumPy (float64 inside): writes the new keys/values into the pools
    (in place, as the kernel does) and returns the output [B, S, H*Dv] float32. For tests."""
    a, bs = spec.attention, spec.block_size
    B, S = q.shape[:2]
    H, Hkv, D, Dv = a.num_heads, a.kv_num_heads, a.head_size, a.v_head_size
    rep = H // Hkv
    out = np.zeros((B, S, H * Dv), np.float32)
    full = None if mask is None else np.broadcast_to(mask, (B, H, S, mask.shape[-1]))
    for b in range(B):
        p = int(past_lens[b])
        total = p + S
        new = np.arange(p, total)
        blocks, slots = block_tables[b, new // bs], new % bs
        key_pool[blocks, :, slots] = k[b].reshape(S, Hkv, D).astype(key_pool.dtype)
        value_pool[blocks, :, slots] = v[b].reshape(S, Hkv, Dv).astype(value_pool.dtype)
        every = np.arange(total)
        blocks, slots = block_tables[b, every // bs], every % bs
        keys = key_pool[blocks, :, slots].astype(np.float64).transpose(1, 0, 2)  # [Hkv, total, D]
        values = value_pool[blocks, :, slots].astype(np.float64).transpose(1, 0, 2)
        keys, values = np.repeat(keys, rep, axis=0), np.repeat(values, rep, axis=0)
        q4 = (q[b] * np.float32(a.scale)).reshape(S, H, D).transpose(1, 0, 2).astype(np.float64)
        scores = q4 @ keys.transpose(0, 2, 1)  # [H, S, total]
        if a.softcap:
            scores = a.softcap * np.tanh(scores / a.softcap)
        i, j = np.arange(S)[:, None] + p, every[None, :]
        allowed = np.ones((S, total), bool)
        if a.causal:
            allowed &= j <= i
        if a.left_window >= 0:
            allowed &= j >= i - a.left_window
        extra = 0.0
        if full is not None:
            columns = full[b][..., full.shape[-1] - total + every]  # [H, S, total]
            if columns.dtype == bool:
                allowed = allowed & columns
            else:
                extra = columns.astype(np.float64)
        scores = scores + np.where(allowed, 0.0, a.mask_value) + extra
        with np.errstate(invalid="ignore", over="ignore"):  # a row with no allowed key: NaN -> 0
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs = np.nan_to_num(probs / probs.sum(-1, keepdims=True), nan=0.0)
        out[b] = (probs @ values).transpose(1, 0, 2).reshape(S, H * Dv)
    return out


PAGED_ATTENTION = register(CanonicalOp(OP_NAME, _infer, _no_decomposition))
