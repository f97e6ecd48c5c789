"""The canonical rotary embedding, ``ai.infercc::RotaryEmbedding``.

Inputs: ``x``, either [B, S, H*D] (``num_heads`` = H) or [B, H, S, D] (``num_heads`` = 0, the layout
exporters rotate in, right after splitting heads); ``cos`` and ``sin`` [B|1, S, R]: the per-position
factors exactly as the model multiplies them, R = ``rotary_dim`` (partial rotary when R < D, the
last D - R channels pass through). ``interleaved`` picks the rotation: 0 pairs channel c with c + R/2
(GPT-NeoX/Llama "rotate half"), 1 pairs 2c with 2c + 1 (GPT-J). Semantics (= decompose)::

    out[..., :R] = x[..., :R] * cos + rotate(x[..., :R]) * sin,   out[..., R:] = x[..., R:]

Invariant kept by the fusion that creates the node: the factors repeat per pair (cos[..., c] ==
cos[..., c + R/2], or cos[..., 2c] == cos[..., 2c + 1] when interleaved), so a lowering may pass
the half-width caches ONNX Runtime and ONNX's RotaryEmbedding expect.

The attention fusion moves a rotary on [B, H, S, D] before the head split (a rotation acts per
head and position, so it commutes with the split): the attention node then reads the projection
outputs directly and the lowered graph keeps no head transposes.
"""

from __future__ import annotations

from ...ir import DType, Node, Shape, Value
from ..canonical import DOMAIN, CanonicalOp, register
from ..rewrite import Builder
from .build_util import i64, last_slice, shared
from .dims import dim_of, last_axis_slice

OP_NAME = "RotaryEmbedding"
MS = "com.microsoft"
STANDARD_ROTARY_OPSET = 23


def attrs_of(node: Node) -> tuple[int, int, int]:
    """(num_heads, rotary_dim, interleaved)."""
    return int(node.attr("num_heads", 0)), int(node.attr("rotary_dim")), int(node.attr("interleaved", 0))


def _infer(node: Node) -> list[tuple[DType | None, Shape]]:
    x = node.inputs[0]
    return [(x.dtype, x.shape)]


def _heads_view(op: Builder, node: Node) -> tuple[Value, Value, Value, int | None]:
    """x as 4-D with heads split, cos/sin broadcastable to it, and the head size when 3-D."""
    x, cos, sin = node.inputs[:3]
    heads, _, _ = attrs_of(node)
    if heads:  # [B, S, H*D] -> [B, S, H, D], factors [B|1, S, 1, R]
        axis = 2
        x4 = op.Reshape(x, i64(op, [0, 0, heads, -1]))
    else:  # [B, H, S, D], factors [B|1, 1, S, R]
        axis = 1
        x4 = x
    return x4, op.Unsqueeze(cos, i64(op, [axis])), op.Unsqueeze(sin, i64(op, [axis])), heads


def partial_split_reason(x: Value, head: Node, tail: Node, rope: Node, axis) -> str | None:
    """Why ``Concat(rope(x[..., :R]), x[..., R:])`` (slices ``head``, ``tail``, concatenated on
    ``axis``) is not a partial rotary of x with rope's rotary_dim R; None when it is."""
    if axis not in (-1, 3):
        return "the rotated and passed channels are concatenated along another axis than the last"
    first, rest = last_axis_slice(head, x), last_axis_slice(tail, x)
    width, rdim = dim_of(x, -1), int(rope.attr("rotary_dim"))
    if first != (0, rdim) or rest is None or rest[0] != rdim or rest[1] != width:
        return f"partial rotary over {first} and {rest} does not split {width} channels at {rdim}"
    return None


def rotate(op: Builder, x: Value, rotary_dim: int, interleaved: int) -> Value:
    """rotate_half (or its interleaved form) of the last axis of ``x`` (size ``rotary_dim``)."""
    half = rotary_dim // 2
    if not interleaved:
        return op.Concat(op.Neg(last_slice(op, x, half, rotary_dim)), last_slice(op, x, 0, half), axis=-1)
    even, odd = last_slice(op, x, 0, rotary_dim, 2), last_slice(op, x, 1, rotary_dim, 2)
    pairs = op.Concat(op.Unsqueeze(op.Neg(odd), i64(op, [-1])), op.Unsqueeze(even, i64(op, [-1])), axis=-1)
    shape = op.Concat(op.Shape(x, start=0, end=-1), i64(op, [rotary_dim]), axis=0)
    return op.Reshape(pairs, shape)


def decompose(op: Builder, node: Node) -> list[Value]:
    x4, cos, sin, heads = _heads_view(op, node)
    _, rdim, interleaved = attrs_of(node)
    width = node.inputs[0].shape[-1] if node.inputs[0].shape else None
    head_size = width // heads if heads and isinstance(width, int) else (width if not heads else None)
    partial = head_size is None or rdim < head_size
    rot_in = last_slice(op, x4, 0, rdim) if partial else x4
    out = op.Add(op.Mul(rot_in, cos), op.Mul(rotate(op, rot_in, rdim, interleaved), sin))
    if partial:
        out = op.Concat(out, last_slice(op, x4, rdim, 2**62), axis=-1)
    if heads:
        out = op.Reshape(out, i64(op, [0, 0, -1]))
    return [out]


def half_cache(op: Builder, factors: Value, rotary_dim: int, interleaved: int) -> Value:
    """[B|1, S, R/2] from [B|1, S, R] (valid by the op's invariant)."""
    key = ("rotary_half_cache", id(factors), rotary_dim, interleaved)
    if interleaved:
        return shared(op, key, lambda: last_slice(op, factors, 0, rotary_dim, 2))
    return shared(op, key, lambda: last_slice(op, factors, 0, rotary_dim // 2))


def batch_and_seq(op: Builder, x: Value, seq_axis: int) -> tuple[Value, Value]:
    """x's batch and sequence lengths as [1] tensors. Every layer's q and k have the same ones: keyed
    on x's symbolic dims they are read once (from the first x lowered), so what is built from them
    (positions, expanded caches) is the same computation in every layer and post-lowering CSE
    keeps one copy instead of one per rotary node and decoding step."""
    dims = (None, None) if x.shape is None else (x.shape[0], x.shape[seq_axis])

    def read(axis: int, dim) -> Value:
        make = lambda: op.Shape(x, start=axis, end=axis + 1)  # noqa: E731
        return make() if dim is None else shared(op, ("rotary_dim_of", axis == 0, dim), make)

    return read(0, dims[0]), read(seq_axis, dims[1])


def lower_ort(op: Builder, node: Node) -> list[Value] | str:
    """com.microsoft RotaryEmbedding: caches [positions, R/2] indexed by position_ids; we pass the
    model's own per-position factors as the cache, row b*S + s for batch b, position s."""
    x, cos, sin = node.inputs[:3]
    heads, rdim, interleaved = attrs_of(node)
    if x.dtype not in (DType.FLOAT, DType.FLOAT16):
        return f"ONNX Runtime's RotaryEmbedding has no kernel for {x.dtype or 'an unknown type'}"
    seq_axis = 1 if heads else 2
    caches = []
    for factors in (cos, sin):
        half = half_cache(op, factors, rdim, interleaved)
        if factors.shape is not None and factors.shape[0] == 1:
            caches.append(op.Reshape(half, i64(op, [-1, rdim // 2])))
        else:
            b, s = batch_and_seq(op, x, seq_axis)
            rows = op.Concat(b, s, i64(op, [rdim // 2]), axis=0)
            caches.append(op.Reshape(op.Expand(half, rows), i64(op, [-1, rdim // 2])))
    if cos.shape is not None and cos.shape[0] == 1:
        positions = i64(op, [0])  # shape (1): positions 0..S-1 from offset 0
    else:
        b, s = batch_and_seq(op, x, seq_axis)
        count = op.Squeeze(op.Mul(b, s), i64(op, [0]))
        positions = op.Reshape(op.Range(i64(op, 0), count, i64(op, 1)), op.Concat(b, s, axis=0))
    attrs = {"interleaved": interleaved, "rotary_embedding_dim": rdim}
    if heads:
        attrs["num_heads"] = heads
    elif x.shape is not None and isinstance(x.shape[1], int):
        attrs["num_heads"] = x.shape[1]
    return [op.RotaryEmbedding(x, positions, caches[0], caches[1], _domain=MS, **attrs)]


def lower_onnx(op: Builder, node: Node) -> list[Value] | str:
    """ONNX RotaryEmbedding (opset 23) with [B, S, R/2] caches and no position ids."""
    x, cos, sin = node.inputs[:3]
    heads, rdim, interleaved = attrs_of(node)
    ctx = getattr(op, "lowering", None)
    opset = getattr(ctx, "opset", None)
    if opset is None or opset < STANDARD_ROTARY_OPSET:
        found = "an unknown opset" if opset is None else f"opset {opset}"
        return f"standard RotaryEmbedding needs opset {STANDARD_ROTARY_OPSET}; the model imports {found}"
    seq_axis = 1 if heads else 2
    rows = op.Concat(*batch_and_seq(op, x, seq_axis), i64(op, [rdim // 2]), axis=0)
    caches = [op.Expand(half_cache(op, f, rdim, interleaved), rows) for f in (cos, sin)]
    attrs = {"interleaved": interleaved, "rotary_embedding_dim": rdim}
    if heads:
        attrs["num_heads"] = heads
    return [op.RotaryEmbedding(x, caches[0], caches[1], **attrs)]


def make_node(op: Builder, x: Value, cos: Value, sin: Value, *, num_heads: int, rotary_dim: int,
              interleaved: int) -> Value:
    return getattr(op, OP_NAME)(x, cos, sin, _domain=DOMAIN, num_heads=num_heads, rotary_dim=rotary_dim,
                                interleaved=interleaved)


def is_rotary(node: Node | None) -> bool:
    return node is not None and node.domain == DOMAIN and node.op_type == OP_NAME


ROTARY = register(CanonicalOp(OP_NAME, _infer, decompose, {"ort": lower_ort, "onnx": lower_onnx}))
