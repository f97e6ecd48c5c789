"""Symbolic contents of small integer tensors (the shape arithmetic exporters emit).

Exporters compute Reshape targets as Shape -> Gather -> Concat chains. Knowing that such a tensor
holds ``[batch, seq, 8, 64]`` lets shape inference go on where onnx stops, and lets the
shape-simplification pass replace the chain by a constant when the symbols are not needed.
"""

from __future__ import annotations

import numpy as np

from .dtypes import DType
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
    if t is None or len(t.shape) > 1:
        return None
    return _tensor_ints(t)


def _tensor_ints(t) -> list[int] | None:
    """The elements of a small integer (or bool, as 0/1) tensor."""
    if t.size > MAX_ELEMENTS or not (t.dtype.is_integer or t.dtype == DType.BOOL):
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
    if op == "Reshape" and args[0] is not None and args[1] is not None and len(args[1]) <= 1:
        return args[0]  # flattened to 1-D (or a 1-element tensor made 0-D): the same elements
    if op == "ConstantOfShape" and args[0] is not None and len(args[0]) == 1 and isinstance(args[0][0], int):
        fill = node.attr("value")
        fill = [0] if fill is None else _tensor_ints(fill)
        if fill is not None and len(fill) == 1 and args[0][0] <= MAX_ELEMENTS:
            return fill * args[0][0]
        return None
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
        pairs = _elementwise(args[0], args[1])
        return None if pairs is None else [arith(op, x, y) for x, y in pairs]
    if op == "Equal" and args[0] is not None and args[1] is not None:
        pairs = _elementwise(args[0], args[1])
        return None if pairs is None else [_equal(x, y) for x, y in pairs]
    if op == "Where" and all(a is not None for a in args[:3]) and len(args) == 3:
        # where(shape == -1, 1, shape): torch's expand() turns its "keep this dim" -1 into this
        cond, x, y = args
        n = max(len(cond), len(x), len(y))
        if any(len(a) not in (1, n) for a in (cond, x, y)) or not all(isinstance(c, int) for c in cond):
            return None
        pick = [(cond * n if len(cond) == 1 else cond)[i] for i in range(n)]
        xs, ys = (x * n if len(x) == 1 else x), (y * n if len(y) == 1 else y)
        return [xs[i] if c else ys[i] for i, c in enumerate(pick)]
    return None


def _elementwise(a: list[Dim], b: list[Dim]) -> list[tuple[Dim, Dim]] | None:
    """Pair up two 1-D operands with broadcasting (one of them may have a single element)."""
    if len(a) != len(b):
        if len(a) == 1:
            a = a * len(b)
        elif len(b) == 1:
            b = b * len(a)
        else:
            return None
    return list(zip(a, b))


def _equal(a: Dim, b: Dim) -> Dim:
    """Equal on dims as 1/0, or None when it cannot be decided. A symbol is a dimension or a sum,
    product or quotient of dimensions (no "-" in it), so never negative: it differs from any
    negative number (the -1 "infer"/"keep" markers reshape and expand targets are compared with)."""
    if a is None or b is None:
        return None
    if isinstance(a, int) and isinstance(b, int) or a == b:
        return int(a == b)
    if isinstance(a, int):
        a, b = b, a
    if isinstance(b, int) and b < 0 and isinstance(a, str) and "-" not in a:
        return 0
    return None


def shape_axes(node: Node, rank: int) -> range:
    """The input axes a Shape node reports: its start/end attributes (opset 15+), negative values
    counted from the end and both clamped to [0, rank], as the operator defines them."""
    start, end = node.attr("start", 0) or 0, node.attr("end")
    end = rank if end is None else end
    start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
    return range(max(start, 0), min(end, rank))


def _int_cast(node: Node) -> bool:
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


def range_length(start: list[Dim] | None, limit: list[Dim] | None, delta: list[Dim] | None) -> Dim:
    """Number of elements of Range(start, limit, delta) (each given as a 1-element dim list):
    max(ceil((limit - start) / delta), 0) for numbers; limit - start for a symbolic bound and step 1
    (torch.arange(seq) is Range(0, seq, 1), of length seq); None otherwise."""
    if not all(v is not None and len(v) == 1 for v in (start, limit, delta)):
        return None
    (a,), (b,), (step,) = start, limit, delta
    if isinstance(a, int) and isinstance(b, int) and isinstance(step, int) and step:
        return max(-((a - b) // step), 0)
    if step == 1:
        return arith("Sub", b, a)
    return None


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
