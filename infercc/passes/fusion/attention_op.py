"""The canonical attention op, ``ai.infercc::Attention``: one node per scaled-dot-product attention,
whatever reshapes, transposes, scalings and mask arithmetic the exporter wrote around it.

Layout. ``query`` [B, S, H*D], ``key`` [B, Skv, Hkv*D], ``value`` [B, Skv, Hkv*Dv], output
[B, S, H*Dv]: heads packed in the last axis, as the Q/K/V projections produce them. Exporters
split heads with a Reshape + Transpose right after the projections and merge them back right
after attention, so in this layout a fusion removes all of those, and it is the layout ONNX
Runtime's MultiHeadAttention/GroupQueryAttention and ONNX's Attention take. Grouped-query
attention keeps K/V at their Hkv heads (the exporter's repeat_kv is dropped).

Inputs: ``query``, ``key``, ``value``, optional ``mask``: bool (True = may attend) or float (added to
the scores), broadcastable to [B, H, S, Skv], rank 4. Attributes: ``num_heads``, ``kv_num_heads``,
``head_size``, ``v_head_size``, ``scale``, ``causal`` (0/1), ``left_window`` (-1: unbounded; else
how many earlier keys a query sees, with ``causal``), ``mask_value`` (added to disallowed scores),
``softmax_precision`` (0: the inputs' type; else the type the scores are cast to for the softmax,
as 16-bit models do), ``softcap`` (0: none; else c in ``c * tanh(scores / c)``, Gemma 2's cap on the
scaled scores, applied before the masks).

Semantics, exactly what :func:`decompose` builds (i query row, j key column, off = Skv - S)::

    allowed = mask (bool) & (j <= i + off if causal) & (j >= i + off - left_window if left_window >= 0)
    scores  = cap(scale * q @ k^T) + where(allowed, 0, mask_value) (+ mask if float)
              (cap(x) = softcap * tanh(x / softcap), or x when softcap is 0)
    p       = softmax(scores), with NaN replaced by 0
    out     = p @ v

A query row with no allowed key thus gives 0 when ``mask_value`` is -inf (what torch SDPA and the
TorchScript exports compute) and the mean of V when it is finite (float32 min, as the dynamo
exports fill): each file keeps its own semantics on fully padded rows.

KV cache (added by ``passes/kv_cache``): optional inputs 4 and 5, ``past_key`` [B, Hkv, P, D] and
``past_value`` [B, Hkv, P, Dv], and then two more outputs, ``present_key`` / ``present_value``
[B, Hkv, P+S, D]: the past with this call's keys and values appended. The keys attended are then
the present ones (Skv = P + S), so ``off`` = P and the causal triangle stays bottom-right aligned:
one graph serves the prompt (P = 0) and every decode step. ``mask`` (if any) then spans the P + S
keys. The cache may be stored in another float type than Q (float16 for a float32 model): new
keys and values are rounded to it when appended, and attention reads the present converted back.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ...ir import DType, Node, Shape, Value
from ..canonical import DOMAIN, CanonicalOp, register
from ..rewrite import Builder
from .build_util import i64, scalar_like, shared

OP_NAME = "Attention"


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """The attributes of a canonical Attention node, read once."""

    num_heads: int
    kv_num_heads: int
    head_size: int
    v_head_size: int
    scale: float
    causal: bool
    left_window: int
    mask_value: float
    softmax_precision: int = 0
    softcap: float = 0.0

    @classmethod
    def of(cls, node: Node) -> AttentionSpec:
        return cls(
            num_heads=int(node.attr("num_heads")), kv_num_heads=int(node.attr("kv_num_heads")),
            head_size=int(node.attr("head_size")), v_head_size=int(node.attr("v_head_size")),
            scale=float(node.attr("scale")), causal=bool(node.attr("causal", 0)),
            left_window=int(node.attr("left_window", -1)), mask_value=float(node.attr("mask_value", -math.inf)),
            softmax_precision=int(node.attr("softmax_precision", 0)), softcap=float(node.attr("softcap", 0.0)),
        )

    def attrs(self) -> dict[str, object]:
        return {
            "num_heads": self.num_heads, "kv_num_heads": self.kv_num_heads, "head_size": self.head_size,
            "v_head_size": self.v_head_size, "scale": self.scale, "causal": int(self.causal),
            "left_window": self.left_window, "mask_value": self.mask_value,
            **({"softmax_precision": self.softmax_precision} if self.softmax_precision else {}),
            **({"softcap": self.softcap} if self.softcap else {}),
        }


def inputs(node: Node) -> tuple[Value, Value, Value, Value | None]:
    q, k, v = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    return q, k, v, mask


def past(node: Node) -> tuple[Value, Value] | None:
    """(past_key, past_value) of a cached attention, None for one without a cache."""
    if len(node.inputs) > 5 and node.inputs[4] is not None and node.inputs[5] is not None:
        return node.inputs[4], node.inputs[5]
    return None


def same_length(q: Value, k: Value) -> bool:
    """Query and key lengths provably equal (self-attention without a cache)."""
    from .dims import DimOracle

    return DimOracle().same(q, 1, k, 1)


def may_be_nan(spec: AttentionSpec, mask: Value | None) -> bool:
    """Whether a row can end up with every score at -inf (softmax gives NaN there)."""
    # causal too: with more queries than keys, the first rows see no key
    has_bool = (mask is not None and mask.dtype == DType.BOOL) or spec.left_window >= 0 or spec.causal
    return (has_bool and math.isinf(spec.mask_value)) or (mask is not None and mask.dtype != DType.BOOL)


def _infer(node: Node) -> list[tuple[DType | None, Shape]]:
    q = node.inputs[0]
    spec = AttentionSpec.of(node)
    hidden = spec.num_heads * spec.v_head_size
    shape = None if q.shape is None or len(q.shape) != 3 else (q.shape[0], q.shape[1], hidden)
    found = [(q.dtype, shape)]
    cache = past(node)
    if cache is not None:
        batch = shape[0] if shape is not None else None
        for x, size in zip(cache, (spec.head_size, spec.v_head_size)):
            found.append((x.dtype, (batch, spec.kv_num_heads, None, size)))
    return found


# -- masks --------------------------------------------------------------------------------------
def _scalar_dim(op: Builder, x: Value, axis: int) -> Value:
    return op.Squeeze(op.Shape(x, start=axis, end=axis + 1), i64(op, [0]))


def key_length(op: Builder, node: Node) -> Value:
    """Skv as a scalar: the key length, plus the past length for a cached attention."""
    k = node.inputs[1]
    cache = past(node)
    if cache is None:
        return _scalar_dim(op, k, 1)
    return op.Add(_scalar_dim(op, cache[0], 2), _scalar_dim(op, k, 1))


def position_mask(op: Builder, q: Value, k: Value, spec: AttentionSpec, skv: Value | None = None) -> Value:
    """The [S, Skv] bool mask of the causal triangle and sliding window (bottom-right aligned);
    ``skv`` overrides k's length (a cached attention's keys include the past)."""
    s = _scalar_dim(op, q, 1)
    skv = _scalar_dim(op, k, 1) if skv is None else skv
    zero, one = op.const(np.asarray(0, np.int64), hint="zero"), op.const(np.asarray(1, np.int64), hint="one")
    rows = op.Unsqueeze(op.Add(op.Range(zero, s, one), op.Sub(skv, s)), i64(op, [1]))
    cols = op.Range(zero, skv, one)
    parts = []
    if spec.causal:
        parts.append(op.LessOrEqual(cols, rows))
    if spec.left_window >= 0:
        parts.append(op.GreaterOrEqual(cols, op.Sub(rows, op.const(np.asarray(spec.left_window, np.int64)))))
    return parts[0] if len(parts) == 1 else op.And(*parts)


def bias(op: Builder, node: Node, *, fill: float | None = None, full_rows: bool = False,
         dtype: DType | None = None, positions: bool = True) -> Value | None:
    """The float [B|1, H|1, S|1, Skv] bias adding the mask, the causal triangle and the window to
    the scores (None when nothing is masked). ``full_rows`` makes dim 2 equal S (kernels that do not
    broadcast the query axis); ``fill`` overrides ``mask_value``; ``positions=False`` leaves the
    triangle and window out (for a kernel that applies them itself). Built once per graph for
    layers that share the mask and the (symbolic) lengths."""
    q, k, _, mask = inputs(node)
    spec = AttentionSpec.of(node)
    fill = spec.mask_value if fill is None else fill
    dtype = dtype or q.dtype
    positional = (spec.causal or spec.left_window >= 0) and positions
    if mask is None and not positional:
        return None
    cache = past(node)

    def make() -> Value:
        allowed = None
        if mask is not None and mask.dtype == DType.BOOL:
            allowed = mask
        if positional:
            tri = position_mask(op, q, k, spec, key_length(op, node) if cache is not None else None)
            allowed = tri if allowed is None else op.And(allowed, tri)
        out = None
        if allowed is not None:
            out = op.Where(allowed, scalar_like(op, 0.0, dtype, "zero"), scalar_like(op, fill, dtype, "fill"))
        if mask is not None and mask.dtype != DType.BOOL:
            extra = mask if mask.dtype == dtype else op.Cast(mask, to=int(dtype))
            out = extra if out is None else op.Add(out, extra)
        if out is not None and full_rows and not positional:
            rows = op.Concat(i64(op, [1, 1]), op.Shape(q, start=1, end=2), i64(op, [1]), axis=0)
            out = op.Expand(out, rows)
        if mask is None:  # the [S, Skv] triangle alone: rank 4 like every other mask
            out = op.Unsqueeze(out, i64(op, [0, 1]))
        return out

    lengths = (q.shape[1] if q.shape else None, k.shape[1] if k.shape else None)
    if cache is not None:
        lengths += (cache[0].shape[2] if cache[0].shape else None,)
    if None in lengths:
        return make()
    key = ("attention_bias", id(mask), spec.causal and positions, spec.left_window if positions else -1, float(fill),
           dtype, lengths, full_rows)
    return shared(op, key, make)


# -- decomposition ------------------------------------------------------------------------------
def _split_heads(op: Builder, x: Value, heads: int, size: int, perm: list[int]) -> Value:
    return op.Transpose(op.Reshape(x, i64(op, [0, 0, heads, size])), perm=perm)


def decompose(op: Builder, node: Node) -> list[Value]:
    """Standard ONNX for any canonical Attention: the computation its docstring defines."""
    q, k, v, mask = inputs(node)
    spec = AttentionSpec.of(node)
    h, hkv, d, dv = spec.num_heads, spec.kv_num_heads, spec.head_size, spec.v_head_size
    q4 = _split_heads(op, op.Mul(q, scalar_like(op, spec.scale, q.dtype, "scale")), h, d, [0, 2, 1, 3])
    cache = past(node)
    if cache is None:
        kt = _split_heads(op, k, hkv, d, [0, 2, 3, 1])
        v4 = _split_heads(op, v, hkv, dv, [0, 2, 1, 3])
    else:  # present = past + this call's heads, [B, Hkv, P+S, D], in the cache's type
        stored = cache[0].dtype if cache[0].dtype != q.dtype else None
        present_k = op.Concat(cache[0], _cast(op, _split_heads(op, k, hkv, d, [0, 2, 1, 3]), stored), axis=2)
        present_v = op.Concat(cache[1], _cast(op, _split_heads(op, v, hkv, dv, [0, 2, 1, 3]), stored), axis=2)
        back = q.dtype if stored is not None else None
        kt = op.Transpose(_cast(op, present_k, back), perm=[0, 1, 3, 2])
        v4 = _cast(op, present_v, back)
    grouped = hkv not in (h, 1)
    rep = h // hkv
    if grouped:  # [B, Hkv, rep, S, D] against [B, Hkv, 1, D, Skv]: no copy of K/V per query head
        q4 = op.Reshape(q4, i64(op, [0, hkv, rep, -1, d]))
        kt, v4 = op.Unsqueeze(kt, i64(op, [2])), op.Unsqueeze(v4, i64(op, [2]))
    scores = op.MatMul(q4, kt)
    work = DType(spec.softmax_precision) if spec.softmax_precision else q.dtype
    if work != q.dtype:
        scores = op.Cast(scores, to=int(work))
    if spec.softcap:
        cap = scalar_like(op, spec.softcap, work, "softcap")
        scores = op.Mul(op.Tanh(op.Div(scores, cap)), cap)
    added = bias(op, node, dtype=work)
    if added is not None:
        if grouped:
            added = _grouped_bias(op, added, mask, h, hkv, rep)
        scores = op.Add(scores, added)
    probs = op.Softmax(scores, axis=-1)
    if may_be_nan(spec, mask):
        probs = op.Where(op.IsNaN(probs), scalar_like(op, 0.0, work, "zero"), probs)
    if work != q.dtype:
        probs = op.Cast(probs, to=int(q.dtype))
    out = op.MatMul(probs, v4)
    if grouped:
        out = op.Reshape(out, i64(op, [0, h, -1, dv]))
    merged = op.Reshape(op.Transpose(out, perm=[0, 2, 1, 3]), i64(op, [0, 0, h * dv]))
    return [merged] if cache is None else [merged, present_k, present_v]


def _cast(op: Builder, x: Value, dtype: DType | None) -> Value:
    return x if dtype is None else op.Cast(x, to=int(dtype))


def _grouped_bias(op: Builder, added: Value, mask: Value | None, h: int, hkv: int, rep: int) -> Value:
    """A [B|1, H|1, S, Skv] bias as [B|1, Hkv|1, rep|1, S, Skv] for the grouped product."""
    if mask is None or (mask.shape is not None and mask.shape[1] == 1):
        return op.Unsqueeze(added, i64(op, [2]))
    full = op.Expand(added, i64(op, [1, h, 1, 1]))
    dims = op.Concat(op.Shape(full, start=0, end=1), i64(op, [hkv, rep]), op.Shape(full, start=2, end=4), axis=0)
    return op.Reshape(full, dims)


def make_node(op: Builder, q: Value, k: Value, v: Value, mask: Value | None, spec: AttentionSpec) -> Value:
    """Build a canonical Attention node (the fusion's replacement)."""
    ins = [q, k, v] + ([mask] if mask is not None else [])
    return getattr(op, OP_NAME)(*ins, _domain=DOMAIN, **spec.attrs())


def make_cached_node(op: Builder, q: Value, k: Value, v: Value, mask: Value | None, past_key: Value,
                     past_value: Value, spec: AttentionSpec) -> tuple[Value, Value, Value]:
    """Build a canonical Attention with a KV cache: (output, present_key, present_value)."""
    return getattr(op, OP_NAME)(q, k, v, mask, past_key, past_value, _domain=DOMAIN, _outputs=3, **spec.attrs())


def _lowerings() -> dict:
    from .attention_lower import lower_onnx, lower_ort

    return {"ort": lower_ort, "onnx": lower_onnx}


ATTENTION = register(CanonicalOp(OP_NAME, _infer, decompose, _lowerings()))
