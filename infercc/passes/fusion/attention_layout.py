"""From the per-head tensors attention reads back to the packed [B, S, heads*size] layout.

Exporters split heads as ``Transpose(Reshape(x, [B, S, N, D]), [0, 2, 1, 3])`` and transpose K for
Q·Kᵀ in several ways (a 4-D Transpose, or dynamo's Reshape to 3-D / Transpose / Reshape back),
repeat K/V heads for grouped-query attention (Unsqueeze -> Expand -> Reshape), and merge heads
after attention with the inverse. This module recognises each form, proving with the DimOracle
that the reshape targets hold the dims assumed, and returns *plans*: how to obtain the packed
tensor (the projection output itself when the split is recognised, else a Transpose + Reshape
built on demand). Plans are built only once the whole site matched, so a refused site leaves the
graph untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ...ir import Node, Value
from ..canonical import DOMAIN
from ..rewrite import Builder, node_attr
from .build_util import i64, shared
from .dims import DimOracle, dim_of, ints
from .match_util import Mismatch
from .rotary_op import attrs_of, is_rotary, make_node

Plan = Callable[[Builder], Value]


@dataclasses.dataclass
class Packed:
    """A [B, S, heads*size] value equal to the [B, heads, S, size] one attention reads."""

    plan: Plan
    heads: int
    size: int
    how: str
    #: A value whose axis 1 is this tensor's sequence axis (to prove lengths equal).
    seq: tuple[Value, int]
    #: The [B, S, *] tensor the heads were split from (a projection output), when known.
    source: Value | None = None
    #: The rotary applied on the way ("" if none), for the report.
    rotary: str = ""


class Layout:
    def __init__(self, oracle: DimOracle) -> None:
        self.oracle = oracle

    # -- heads split ---------------------------------------------------------------------------
    def split_reshape(self, t: Value) -> tuple[Value, int, int] | None:
        """``t = Reshape(x, [B, S, N, D])`` splitting x's last axis: (x, N, D), proven."""
        node = t.producer
        if node is None or node.domain or node.op_type != "Reshape":
            return None
        x = node.inputs[0]
        if x.shape is None or len(x.shape) != 3:
            return None
        elems = self.oracle.elements(node.inputs[1])
        if elems is None or len(elems) != 4 or elems.count(-1) > 1:
            return None
        zero_copies = not node_attr(node, "allowzero", 99)
        for i in (0, 1):
            e = elems[i]
            if not ((e == 0 and zero_copies) or e == -1 or self.oracle.is_dim(e, x, i)):
                return None
        n, d = elems[2], elems[3]
        hidden = dim_of(x, 2)
        if n == -1 and isinstance(d, int) and isinstance(hidden, int) and d > 0 and hidden % d == 0:
            n = hidden // d
        if d == -1 and isinstance(n, int) and isinstance(hidden, int) and n > 0 and hidden % n == 0:
            d = hidden // n
        if not (isinstance(n, int) and isinstance(d, int) and n > 0 and d > 0):
            return None
        if -1 in elems[:2] and not (isinstance(hidden, int) and hidden == n * d):
            return None
        if isinstance(hidden, int) and hidden != n * d:
            return None
        return x, n, d

    def packed(self, x4: Value, what: str) -> Packed:
        """The packed form of a [B, N, S, D] value (Q, K or V as attention reads it)."""
        node = x4.producer
        if node is not None and not node.domain:
            if node.op_type == "Transpose" and node_attr(node, "perm") == [0, 2, 1, 3]:
                return self.packed_bshd(node.inputs[0], what)
            if node.op_type in ("Split", "Slice"):
                found = self._split_before_transpose(x4, node, what)
                if found is not None:
                    return found
        if is_rotary(node) and attrs_of(node)[0] == 0:
            return self._rotary_before_split(node, what)
        heads, size = dim_of(x4, 1), dim_of(x4, 3)
        if not (isinstance(heads, int) and isinstance(size, int)):
            raise Mismatch(f"the number of heads or the head size of {what} is not known")
        return Packed(
            lambda op: op.Reshape(op.Transpose(x4, perm=[0, 2, 1, 3]), i64(op, [0, 0, heads * size])),
            heads, size, "heads merged by a transpose", (x4, 2),
        )

    def packed_bshd(self, t: Value, what: str) -> Packed:
        """The packed form of a [B, S, N, D] value."""
        split = self.split_reshape(t)
        if split is not None:
            x, n, d = split
            rotary = ""
            if is_rotary(x.producer) and attrs_of(x.producer)[0] == n:  # rotated as [B, S, H*D] (GPT-J)
                rotary = _rotary_label(x.producer, d)
            return Packed(lambda op: x, n, d, "projection output", (x, 1), x, rotary)
        heads, size = dim_of(t, 2), dim_of(t, 3)
        if not (isinstance(heads, int) and isinstance(size, int)):
            raise Mismatch(f"the number of heads or the head size of {what} is not known")
        return Packed(lambda op: op.Reshape(t, i64(op, [0, 0, heads * size])), heads, size, "heads merged", (t, 1))

    def _split_before_transpose(self, x4: Value, node: Node, what: str) -> Packed | None:
        """Packed QKV split per head after the transpose (GPT-NeoX): split before it instead."""
        src = node.inputs[0]
        tr = src.producer
        if tr is None or tr.op_type != "Transpose" or node_attr(tr, "perm") != [0, 2, 1, 3]:
            return None
        if node.op_type == "Split":
            axis = node_attr(node, "axis", 99)
            if axis not in (3, -1):
                return None
        else:
            axes = ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
            if axes not in ([3], [-1]):
                return None
        t = tr.inputs[0]
        heads, size = self._heads_of_bshd(t), dim_of(x4, 3)
        if heads is None or not isinstance(size, int):
            return None
        index = x4.index

        def plan(op: Builder) -> Value:
            if node.op_type == "Split":  # one Split for Q, K and V
                def split() -> Value:
                    attrs = {k: a.value for k, a in node.attrs.items()}
                    attrs["axis"] = 3
                    parts = op.Split(t, *node.inputs[1:], _outputs=len(node.outputs), **attrs)
                    return parts[0] if isinstance(parts, tuple) else parts

                part = shared(op, ("split_before_transpose", id(node)), split).producer.outputs[index]
            else:
                part = op.Slice(t, *node.inputs[1:])
            return op.Reshape(part, i64(op, [0, 0, heads * size]))

        split = self.split_reshape(t)
        return Packed(plan, heads, size, "packed QKV split before the head transpose", (t, 1),
                      split[0] if split is not None else None)

    def _heads_of_bshd(self, t: Value) -> int | None:
        split = self.split_reshape(t)
        if split is not None:
            return split[1]
        heads = dim_of(t, 2)
        return heads if isinstance(heads, int) else None

    def _rotary_before_split(self, node: Node, what: str) -> Packed:
        inner = self.packed(node.inputs[0], what)
        _, rdim, interleaved = attrs_of(node)
        cos, sin = node.inputs[1], node.inputs[2]

        def plan(op: Builder) -> Value:
            return make_node(op, inner.plan(op), cos, sin, num_heads=inner.heads, rotary_dim=rdim,
                             interleaved=interleaved)

        return Packed(plan, inner.heads, inner.size, f"{inner.how}, rotary moved before the head split", inner.seq,
                      inner.source, _rotary_label(node, inner.size))

    # -- K transposed --------------------------------------------------------------------------
    def untranspose_key(self, kt: Value) -> tuple[str, Value]:
        """K as read by Q·Kᵀ -> ("bhsd", [B, N, S, D]) or ("bshd", [B, S, N, D])."""
        node = kt.producer
        op = node.op_type if node is not None and not node.domain else None
        if op == "Transpose":
            perm = node_attr(node, "perm")
            if perm == [0, 1, 3, 2]:
                return "bhsd", node.inputs[0]
            if perm == [0, 2, 3, 1]:
                return "bshd", node.inputs[0]
        if op == "Reshape":
            k4 = self._batched_transpose(node)
            if k4 is not None:
                return "bhsd", k4
        raise Mismatch(f"Kᵀ is computed by {op or 'a graph input'}, not a transpose of K")

    def _batched_transpose(self, outer: Node) -> Value | None:
        """dynamo's Kᵀ: Reshape(Transpose(Reshape(k4, [-1, S, D]), [0, 2, 1]), [B, N, D, S])."""
        tr = outer.inputs[0].producer
        if tr is None or tr.op_type != "Transpose" or node_attr(tr, "perm") != [0, 2, 1]:
            return None
        inner = tr.inputs[0].producer
        if inner is None or inner.op_type != "Reshape":
            return None
        k4 = inner.inputs[0]
        e1, e2 = self.oracle.elements(inner.inputs[1]), self.oracle.elements(outer.inputs[1])
        if e1 is None or e2 is None or len(e1) != 3 or len(e2) != 4 or k4.shape is None or len(k4.shape) != 4:
            return None
        same = self.oracle.is_dim
        ok = (e1[0] == -1 or same(e1[0], k4, 0) and dim_of(k4, 1) == 1) and same(e1[1], k4, 2) and same(e1[2], k4, 3)
        ok = ok and same(e2[0], k4, 0) and same(e2[1], k4, 1) and same(e2[2], k4, 3) and same(e2[3], k4, 2)
        return k4 if ok else None

    # -- grouped-query repeat ------------------------------------------------------------------
    def unrepeat(self, x4: Value, what: str) -> tuple[Value, int]:
        """Drop repeat_kv: returns (the value with the model's K/V heads, repeats)."""
        node = x4.producer
        if node is None or node.domain:
            return x4, 1
        if node.op_type == "Tile":
            raise Mismatch(f"{what} heads are repeated with Tile (k0, k1, k0, k1); grouped-query attention "
                           "shares each K/V head with consecutive query heads (k0, k0, k1, k1)")
        if node.op_type == "Expand":
            src = node.inputs[0]
            elems = self.oracle.elements(node.inputs[1])
            if dim_of(src, 1) == 1 and elems is not None and len(elems) == 4 and isinstance(elems[1], int):
                return src, elems[1]
            return x4, 1
        if node.op_type != "Reshape":
            return x4, 1
        expand = node.inputs[0].producer
        if expand is None or expand.op_type != "Expand":
            return x4, 1
        unsq = expand.inputs[0].producer
        if unsq is None or unsq.op_type != "Unsqueeze":
            return x4, 1
        axes = ints(unsq.inputs[1]) if len(unsq.inputs) > 1 and unsq.inputs[1] is not None else node_attr(unsq, "axes")
        src = unsq.inputs[0]
        if axes != [2] or src.shape is None or len(src.shape) != 4:
            raise Mismatch(f"{what} is repeated along an axis other than the heads")
        ex, tg = self.oracle.elements(expand.inputs[1]), self.oracle.elements(node.inputs[1])
        if ex is None or tg is None or len(ex) != 5 or len(tg) != 4 or not isinstance(ex[2], int):
            raise Mismatch(f"the repeat of {what}'s heads has a shape infercc cannot evaluate")
        same = self.oracle.is_dim
        rep = ex[2]
        # Expand: 1 keeps the input's dim; the reshape may copy (0) the batch or infer (-1) one dim.
        ok = all(ex[i] == 1 or same(ex[i], src, j) for i, j in ((0, 0), (1, 1), (3, 2), (4, 3)))
        heads = dim_of(src, 1)
        zero = not node_attr(node, "allowzero", 99)
        ok = ok and tg.count(-1) <= 1 and (same(tg[0], src, 0) or tg[0] == 0 and zero or tg[0] == -1)
        ok = ok and (tg[1] == -1 or isinstance(heads, int) and tg[1] == heads * rep)
        ok = ok and all(tg[i] == -1 or same(tg[i], src, i) for i in (2, 3))
        if not ok:
            raise Mismatch(f"the repeat of {what}'s heads does not keep batch, length and head size")
        return src, rep


def is_canonical(node: Node | None, name: str) -> bool:
    return node is not None and node.domain == DOMAIN and node.op_type == name


def _rotary_label(node: Node, head_size: int) -> str:
    """The report's description of a canonical rotary: its rotation, and the rotated part of a head."""
    _, rdim, interleaved = attrs_of(node)
    return ("interleaved" if interleaved else "half-rotated") + ("" if rdim == head_size else f", {rdim} of {head_size} dims")
