"""Proving that two tensor dimensions are equal at run time.

Fusions replace reshapes and transposes by one canonical layout, which is only sound when the
reshape targets really hold the dims the fusion assumes. Exporters compute those targets at run
time (``Concat(Gather(Shape(x), 0), ..., 16)``) and shape inference often loses the symbols, so a
fusion needs two things besides the inferred shapes:

* :func:`shape_elements`: the entries of a small integer tensor by *provenance*: an int, "dim k of
  value X", or a symbol from shape inference;
* :class:`DimOracle`: whether "dim i of A" equals "dim j of B", because the inferred symbols say
  so or because both follow, through ops that keep a dim (transposes, elementwise ops, matmuls,
  splits along another axis...), from one common dim.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ...ir import Value
from ...ir.symbolic import dim_values, shape_axes
from ..rewrite import const_value, node_attr

#: An element of a shape tensor: an int, ``(value, axis)`` ("that dim of that value"), a symbol, or
#: None (unknown).
Elem = "int | tuple[Value, int] | str | None"

_UNARY = {
    "Neg", "Cast", "Sqrt", "Exp", "Relu", "Softmax", "IsNaN", "Identity", "Dropout", "Sigmoid", "Tanh",
    "Erf", "Gelu", "Abs", "Reciprocal", "Not", "Cos", "Sin", "LogSoftmax",
}
_NORMS = {"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "GroupNormalization"}
_BINARY = {"Add", "Sub", "Mul", "Div", "Where", "And", "Or", "Pow", "Max", "Min"}
_MAX_VISITS = 256


def ints(value: Value | None) -> list[int] | None:
    """A constant integer tensor's elements, flattened (None if not constant or not integer)."""
    array = small_const(value)
    if array is None or array.dtype.kind not in "iu" or array.size > 64:
        return None
    return [int(x) for x in np.asarray(array).reshape(-1)]


def small_const(value: Value | None, depth: int = 0) -> np.ndarray | None:
    """A small tensor computable from constants alone (what constant folding may have left, such
    as TorchScript's ``Mul(ConstantOfShape([5], 1), -1)``), else None."""
    array = const_value(value)
    if array is not None or value is None or depth > 8:
        return array
    node = value.producer
    if node is None or node.domain or value.index != 0:
        return None
    op = node.op_type
    if op == "ConstantOfShape":
        shape = small_const(node.inputs[0], depth + 1)
        fill = node.attr("value")
        if shape is None or shape.size > 4 or int(np.prod(shape)) > 64:
            return None
        base = fill.numpy().reshape(-1)[0] if fill is not None else np.float32(0)
        return np.full([int(d) for d in shape], base, dtype=np.asarray(base).dtype)
    args = [small_const(x, depth + 1) for x in node.inputs]
    if any(a is None for a in args):
        return None
    try:
        if op in _NUMPY_BINARY:
            return np.asarray(_NUMPY_BINARY[op](args[0], args[1])).astype(args[0].dtype)
        if op == "Neg":
            return -args[0]
        if op == "Cast":
            from ...ir import DType

            return args[0].astype(DType(node.attr("to")).numpy)
    except (ValueError, TypeError):
        return None
    return None


_NUMPY_BINARY = {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract, "Equal": np.equal}


def shape_elements(value: Value | None, memo: dict | None = None) -> list | None:
    """The entries of a 0-D/1-D integer tensor (a Reshape or Expand target) by provenance."""
    if value is None:
        return None
    memo = {} if memo is None else memo
    key = id(value)
    if key not in memo:
        memo[key] = None
        memo[key] = _elements(value, memo)
    return memo[key]


def _elements(value: Value, memo: dict) -> list | None:
    consts = ints(value)
    if consts is not None:
        return consts
    node = value.producer
    found = None
    if node is not None and not node.domain and value.index == 0:
        found = _node_elements(node, memo)
    if found is not None:
        return found
    symbols = dim_values(value)
    return None if symbols is None else [d if d is not None else None for d in symbols]


def _node_elements(node, memo: dict) -> list | None:
    op = node.op_type
    args = node.inputs
    if op == "Shape":
        x = args[0]
        if x.shape is None:
            return None
        return [(x, k) for k in shape_axes(node, len(x.shape))]
    if op in ("Identity", "Unsqueeze", "Squeeze") or (op == "Cast" and node_attr(node, "to") in (6, 7)):
        return shape_elements(args[0], memo)
    if op == "Gather" and node_attr(node, "axis", 99) in (0, None):
        data, idx = shape_elements(args[0], memo), ints(args[1])
        if data is None or idx is None:
            return None
        try:
            return [data[i] for i in idx]
        except IndexError:
            return None
    if op == "Concat":
        parts = [shape_elements(a, memo) for a in args]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    if op == "Slice":
        data = shape_elements(args[0], memo)
        starts, ends = ints(args[1]), ints(args[2])
        steps = ints(args[4]) if len(args) > 4 and args[4] is not None else [1]
        if data is None or starts is None or ends is None or steps is None or len(starts) != 1:
            return None
        return data[slice(starts[0], ends[0], steps[0])]
    if op == "Where":
        # TorchScript's Expand targets: Where(Equal(t, -1), ones, t) replaces -1 entries by 1.
        cond, then, other = args
        if cond.producer is not None and cond.producer.op_type == "Equal":
            t, c = cond.producer.inputs
            c_vals = ints(c)
            t_elems = shape_elements(t, memo)
            if t is other and c_vals is not None and t_elems is not None and all(v < 0 for v in c_vals):
                if all(not isinstance(e, int) or e >= 0 for e in t_elems):
                    return t_elems
        return None
    return None


def dim_of(value: Value, axis: int) -> object:
    """The inferred dim (int or symbol) of ``value`` at ``axis``, or None."""
    if value.shape is None or not -len(value.shape) <= axis < len(value.shape):
        return None
    return value.shape[axis]


class DimOracle:
    """Decides whether two (value, axis) dims are provably equal."""

    def __init__(self) -> None:
        self._memo: dict = {}
        self._roots: dict[tuple[int, int], tuple[set[tuple[int, int]], set[object]]] = {}

    def elements(self, value: Value | None) -> list | None:
        return shape_elements(value, self._memo)

    def same(self, a: Value, i: int, b: Value, j: int) -> bool:
        i, j = _norm(a, i), _norm(b, j)
        if i is None or j is None:
            return False
        if a is b and i == j:
            return True
        da, db = dim_of(a, i), dim_of(b, j)
        if da is not None and da == db:
            return True
        (ka, sa), (kb, sb) = self._reach(a, i), self._reach(b, j)
        return bool(ka & kb) or bool(sa & sb)

    def is_dim(self, elem: object, ref: Value, axis: int) -> bool:
        """Whether a shape element (see :func:`shape_elements`) equals dim ``axis`` of ``ref``."""
        if elem is None:
            return False
        if isinstance(elem, tuple):
            return self.same(elem[0], elem[1], ref, axis)
        return dim_of(ref, axis) == elem

    def _reach(self, value: Value, axis: int) -> tuple[set[tuple[int, int]], set[object]]:
        """The (value, axis) pairs provably equal to this dim, and the inferred sizes among them
        (equal symbols name equal sizes)."""
        key = (id(value), axis)
        if key not in self._roots:
            seen = {key}
            sizes = {dim_of(value, axis)} - {None}
            stack = [(value, axis)]
            while stack and len(seen) < _MAX_VISITS:
                v, k = stack.pop()
                for nv, nk in self._up(v, k):
                    nkey = (id(nv), nk)
                    if nkey not in seen:
                        seen.add(nkey)
                        stack.append((nv, nk))
                        size = dim_of(nv, nk)
                        if size is not None:
                            sizes.add(size)
            self._roots[key] = (seen, sizes)
        return self._roots[key]

    def _up(self, value: Value, axis: int) -> Iterator[tuple[Value, int]]:
        """(value, axis) pairs that provably have the same size as dim ``axis`` of ``value``."""
        node = value.producer
        if node is None or value.shape is None:
            return
        rank = len(value.shape)
        if node.domain:
            yield from _canonical_up(node, value, axis)
            return
        op = node.op_type
        ins = node.inputs
        if op == "Transpose":
            perm = node_attr(node, "perm") or list(range(rank))[::-1]
            yield ins[0], perm[axis]
        elif op in _UNARY:
            yield ins[0], axis
        elif op in _BINARY or op == "Concat":
            if op == "Concat" and _norm(value, node_attr(node, "axis")) == axis:
                return
            for x in ins:
                if x is None or x.shape is None or len(x.shape) != rank or dim_of(x, axis) == 1:
                    continue
                yield x, axis
        elif op in ("Split", "Slice"):
            if op == "Split":
                cut = {_norm(value, node_attr(node, "axis", 99) or 0)}
            else:
                axes = ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(ints(ins[1]) or [])))
                cut = {_norm(value, a) for a in axes or []} if axes is not None else set(range(rank))
            if axis not in cut:
                yield ins[0], axis
        elif op in ("MatMul", "Gemm"):
            a, b = ins[0], ins[1]
            if a.shape is None or b.shape is None or len(a.shape) < 2 or len(b.shape) < 2:
                return
            if op == "Gemm" and (node_attr(node, "transA", 99) or node_attr(node, "transB", 99)):
                return
            if axis == rank - 1:
                yield b, len(b.shape) - 1
            elif axis == rank - 2:
                yield a, len(a.shape) - 2
            else:
                yield from ((x, axis) for x in (a, b) if len(x.shape) == rank and dim_of(x, axis) != 1)
        elif op in _NORMS:
            yield ins[0], axis
        elif op == "Gather" and node_attr(node, "axis", 99) in (0, None) and ins[1].shape is not None:
            if axis < len(ins[1].shape):
                yield ins[1], axis
        elif op in ("Reshape", "Expand"):
            elems = self.elements(ins[1])
            if elems is None or len(elems) != rank:
                return
            elem = elems[axis]
            if isinstance(elem, tuple):
                yield elem
            elif op == "Reshape" and elem == 0 and not node_attr(node, "allowzero", 99):
                yield ins[0], axis
            elif op == "Expand" and elem == 1 and ins[0].shape is not None and len(ins[0].shape) == rank:
                yield ins[0], axis
        elif op in ("Unsqueeze", "Squeeze"):
            mapped = _squeeze_map(node, rank)
            if mapped is not None and axis in mapped:
                yield ins[0], mapped[axis]


def _canonical_up(node, value: Value, axis: int) -> Iterator[tuple[Value, int]]:
    """infercc's canonical ops: norms, activations and rotary keep their first input's shape;
    attention keeps the query's batch and length."""
    from ..canonical import DOMAIN

    if node.domain != DOMAIN or value.index != 0 or not node.inputs or node.inputs[0] is None:
        return
    if node.op_type == "Attention":
        if axis in (0, 1):
            yield node.inputs[0], axis
    elif node.op_type in _SAME_SHAPE_CANONICAL:
        yield node.inputs[0], axis


_SAME_SHAPE_CANONICAL = {
    "LayerNorm", "RMSNorm", "SkipLayerNorm", "SkipRMSNorm", "Gelu", "SiLU", "RotaryEmbedding",
}


def _squeeze_map(node, out_rank: int) -> dict[int, int] | None:
    """Output axis -> input axis for Unsqueeze/Squeeze with constant axes."""
    x = node.inputs[0]
    if x.shape is None:
        return None
    axes = ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else node_attr(node, "axes")
    if axes is None:
        return None
    in_rank = len(x.shape)
    if node.op_type == "Unsqueeze":
        inserted = {a % out_rank for a in axes}
        kept = [k for k in range(out_rank) if k not in inserted]
        return {out_k: in_k for in_k, out_k in enumerate(kept)}
    removed = {a % in_rank for a in axes}
    kept = [k for k in range(in_rank) if k not in removed]
    return dict(enumerate(kept))


def _norm(value: Value, axis: int | None) -> int | None:
    if axis is None or value.shape is None:
        return None
    rank = len(value.shape)
    if not -rank <= axis < rank:
        return None
    return axis % rank


def last_axis_slice(node, x: Value) -> tuple[int, int] | None:
    """(start, end) of a step-1 Slice along x's last axis (end clipped to its size when known)."""
    ins = node.inputs
    starts, ends = ints(ins[1]), ints(ins[2])
    axes = ints(ins[3]) if len(ins) > 3 and ins[3] is not None else [0]
    steps = ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1]
    rank = len(x.shape) if x.shape is not None else None
    if None in (starts, ends, axes, steps) or len(starts) != 1 or steps != [1]:
        return None
    if not (axes == [-1] or (rank is not None and axes == [rank - 1])):
        return None
    end = ends[0]
    width = dim_of(x, -1)
    if isinstance(width, int) and end >= width:
        end = width
    return starts[0], end
