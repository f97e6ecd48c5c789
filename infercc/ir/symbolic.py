"""Symbolic contents of small integer tensors (the shape arithmetic exporters emit).

Exporters compute Reshape targets as Shape -> Gather -> Concat chains. Knowing that such a tensor
holds ``[batch, seq, 8, 64]`` lets shape inference go on where onnx stops, and lets the
shape-simplification pass replace the chain by a constant when the symbols are not needed.
"""

from __future__ import annotations

import numpy as np

from .node import Node
from .value import Dim, Value

#: Tensors with more elements than this are not shape arithmetic; don't track them.
MAX_ELEMENTS = 16


def dim_values(value: Value | None, memo: dict[int, list[Dim] | None] | None = None) -> list[Dim] | None:
    """The elements of a 0-D/1-D integer tensor as ints or symbolic names, or None if unknown.

    Symbols are dim names from input shapes ("batch") or expressions over them ("(seq+1)").
    """
    if value is None:
        return None
    memo = {} if memo is None else memo
    key = id(value)
    if key not in memo:
        memo[key] = None  # guards against cycles in malformed graphs
        memo[key] = _compute(value, memo)
    return memo[key]


def _const_ints(value: Value) -> list[int] | None:
    t = value.const if value.const is not None and not value.is_graph_input else None
    if t is None and value.producer is not None and value.producer.op_type == "Constant" and not value.producer.domain:
        t = value.producer.attr("value")
        if t is None and value.producer.attr("value_ints") is not None:
            return list(value.producer.attr("value_ints"))
        if t is None and value.producer.attr("value_int") is not None:
            return [value.producer.attr("value_int")]
    if t is None or t.size > MAX_ELEMENTS or not t.dtype.is_integer or len(t.shape) > 1:
        return None
    return [int(x) for x in np.asarray(t.numpy()).reshape(-1)]


def _compute(value: Value, memo: dict) -> list[Dim] | None:
    ints = _const_ints(value)
    if ints is not None:
        return list(ints)
    node = value.producer
    if node is None or node.domain or value.index != 0:
        return None
    op = node.op_type
    args = [dim_values(v, memo) if v is not None else None for v in node.inputs]
    if op == "Shape":
        shape = node.inputs[0].shape
        if shape is None:
            return None
        return [shape[axis] for axis in shape_axes(node, len(shape))]
    if op in ("Identity", "Cast", "Unsqueeze", "Squeeze") and args[0] is not None:
        if op == "Cast" and not _int_cast(node):
            return None
        return args[0]
    if op == "Gather" and args[0] is not None and args[1] is not None and node.attr("axis", 0) == 0:
        data, idx = args[0], args[1]
        try:
            return [data[int(i)] for i in idx if isinstance(i, int)] if all(isinstance(i, int) for i in idx) else None
        except IndexError:
            return None
    if op == "Concat" and all(a is not None for a in args):
        return [d for a in args for d in a]
    if op == "Slice" and args[0] is not None and all(a is not None for a in args[1:3]):
        axes, steps = (args[3] if len(args) > 3 else [0]), (args[4] if len(args) > 4 else [1])
        if axes not in ([0], [-1], None) or not all(isinstance(x, int) for x in args[1] + args[2] + (steps or [1])):
            return None
        return args[0][slice(args[1][0], args[2][0], (steps or [1])[0])]
    if op in ("Add", "Sub", "Mul", "Div") and args[0] is not None and args[1] is not None:
        a, b = args
        if len(a) != len(b):
            if len(a) == 1:
                a = a * len(b)
            elif len(b) == 1:
                b = b * len(a)
            else:
                return None
        return [arith(op, x, y) for x, y in zip(a, b)]
    return None


def shape_axes(node: Node, rank: int) -> range:
    """The input axes a Shape node reports: its start/end attributes (opset 15+), negative values
    counted from the end and both clamped to [0, rank], as the operator defines them."""
    start, end = node.attr("start", 0) or 0, node.attr("end")
    end = rank if end is None else end
    start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
    return range(max(start, 0), min(end, rank))


def _int_cast(node: Node) -> bool:
    from .dtypes import DType

    return DType(node.attr("to", 0)).is_integer


def arith(op: str, a: Dim, b: Dim) -> Dim:
    """Elementwise arithmetic on dims; symbolic results become expression names."""
    if a is None or b is None:
        return None
    if isinstance(a, int) and isinstance(b, int):
        if op == "Div":
            # ONNX integer Div truncates toward zero (C semantics), unlike Python's floor division.
            return (abs(a) // abs(b)) * (1 if (a >= 0) == (b > 0) else -1) if b else None
        return {"Add": a + b, "Sub": a - b, "Mul": a * b}[op]
    if op in ("Add", "Sub") and b == 0:
        return a
    if op == "Mul" and b == 1 or op == "Div" and b == 1:
        return a
    if op == "Mul" and a == 1:
        return b
    if op == "Add" and a == 0:
        return b
    sym = {"Add": "+", "Sub": "-", "Mul": "*", "Div": "/"}[op]
    return f"({a}{sym}{b})"


def reshape_dims(input_shape: tuple[Dim, ...] | None, target: list[Dim], allowzero: int = 0) -> tuple[Dim, ...]:
    """Output shape of Reshape given a (possibly symbolic) target: resolves 0 (copy) and -1 (infer)
    when the input's factors cancel against the known target factors."""
    dims: list[Dim] = []
    for i, d in enumerate(target):
        if d == 0 and not allowzero:
            # 0 copies the input's dim: unknown when the input's shape is
            known = input_shape is not None and i < len(input_shape)
            dims.append(input_shape[i] if known else None)
        else:
            dims.append(d)
    if -1 in dims and input_shape is not None:
        num, den = _factors(input_shape), _factors([d for d in dims if d != -1])
        if num is not None and den is not None:
            coef = num[0] // den[0] if den[0] and num[0] % den[0] == 0 else None
            rest = list(num[1])
            ok = coef is not None
            for s in den[1]:
                if s in rest:
                    rest.remove(s)
                else:
                    ok = False
            if ok:
                if not rest:
                    dims[dims.index(-1)] = coef
                elif coef == 1 and len(rest) == 1:
                    dims[dims.index(-1)] = rest[0]
                else:
                    dims[dims.index(-1)] = None
            else:
                dims[dims.index(-1)] = None
        else:
            dims[dims.index(-1)] = None
    return tuple(None if (isinstance(d, int) and d < 0) else d for d in dims)


def _factors(dims) -> tuple[int, list[str]] | None:
    coef, syms = 1, []
    for d in dims:
        if d is None:
            return None
        if isinstance(d, int):
            coef *= d
        else:
            syms.append(d)
    return coef, syms


def broadcast(*shapes: tuple[Dim, ...]) -> tuple[Dim, ...]:
    """Numpy broadcasting over symbolic dims (unknown where it cannot be decided)."""
    rank = max(len(s) for s in shapes)
    out: list[Dim] = []
    for i in range(rank):
        dims = [s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0]
        non_one = [d for d in dims if d != 1]
        if not non_one:
            out.append(1)
        elif all(d == non_one[0] for d in non_one):
            out.append(non_one[0])
        else:
            ints = [d for d in non_one if isinstance(d, int)]
            out.append(ints[0] if ints else None)
    return tuple(out)
