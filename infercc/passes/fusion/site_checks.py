"""Checks shared by the norm and activation fusions: each returns None when the site qualifies,
else a sentence saying why not (it ends up in the diagnostics users read)."""

from __future__ import annotations

import numpy as np

from ...ir import DType, Node, Value
from ..diagnostics import PassRecord
from ..rewrite import const_value, node_attr

FLOATS = (DType.FLOAT, DType.FLOAT16, DType.BFLOAT16, DType.DOUBLE)
LOW_PRECISION = (DType.FLOAT16, DType.BFLOAT16)


def float_input(x: Value) -> str | None:
    if x.dtype not in FLOATS:
        return f"input %{x.name} is {x.dtype or 'of unknown type'}, not a floating-point tensor"
    if x.shape is None or not x.shape:
        return f"the rank of input %{x.name} is unknown" if x.shape is None else f"input %{x.name} is a scalar"
    return None


def scalar(value: Value | None, what: str, expected: float | None = None, rtol: float = 1e-5) -> str | None:
    """``value`` must be a constant scalar (any shape of one element), equal to ``expected`` if given."""
    if value is None:
        return None
    array = const_value(value)
    if array is None:
        return f"{what} %{value.name} is not a constant"
    if array.size != 1:
        return f"{what} %{value.name} has {array.size} elements, not one"
    if array.dtype.kind not in "fiu":
        return f"{what} %{value.name} is not a number"
    got = float(np.asarray(array, np.float64).reshape(-1)[0])
    if expected is not None and not np.isclose(got, expected, rtol=rtol, atol=0.0):
        return f"{what} is {got:.9g}, not {expected:.9g}"
    return None


def scalar_value(value: Value) -> float:
    return float(np.asarray(const_value(value), np.float64).reshape(-1)[0])


def same_dim(a: object, b: object) -> bool:
    """Dims provably equal: the same int, or the same symbol."""
    return a is not None and a == b


def same_shape(a: Value, b: Value) -> bool:
    return (
        a.shape is not None and b.shape is not None and len(a.shape) == len(b.shape)
        and all(same_dim(x, y) for x, y in zip(a.shape, b.shape))
    )


def hidden_vector(v: Value | None, x: Value, what: str) -> str | None:
    """``v`` must be a 1-D tensor of the hidden size (x's last dim) and x's element type."""
    if v is None:
        return None
    if v.shape is None or len(v.shape) != 1 or not same_dim(v.shape[0], x.shape[-1]):
        shape = "unknown" if v.shape is None else list(v.shape)
        return f"{what} %{v.name} has shape {shape}, not [{x.shape[-1]}] (the hidden size)"
    if v.dtype != x.dtype:
        return f"{what} %{v.name} is {v.dtype}, the input is {x.dtype}"
    return None


def last_axis_mean(reduce: Node, rank: int) -> str | None:
    """A ReduceMean over exactly the last axis, keeping it (axes as attribute or input)."""
    if reduce is None:
        return None
    axes_input = reduce.inputs[1] if len(reduce.inputs) > 1 else None
    if axes_input is not None:
        axes = const_value(axes_input)
        if axes is None:
            return f"the axes of {reduce.op_type} {reduce.name!r} are not constant"
        axes = [int(a) for a in np.asarray(axes).reshape(-1)]
    else:
        axes = node_attr(reduce, "axes")
        axes = None if axes is None else [int(a) for a in axes]
    if not axes:
        return f"{reduce.op_type} {reduce.name!r} reduces over all axes, not the last one"
    normalized = sorted(a % rank for a in axes)
    if normalized != [rank - 1]:
        return f"the mean is over axes {axes}, not the last axis (a norm over the hidden size needs [-1])"
    if node_attr(reduce, "keepdims", 18) == 0:
        return f"{reduce.op_type} {reduce.name!r} drops the reduced axis (keepdims=0)"
    return None


def cast_pair(upcast: Node | None, downcast: Node | None, x: Value) -> str | None:
    """Optional Cast up before and back after a computation (as HF does for 16-bit models): both or
    neither, up to float32/64 and back to the input's type."""
    if upcast is None and downcast is None:
        return None
    if upcast is None or downcast is None:
        return "the input is cast to another type but the result is not cast back (or the reverse)"
    if node_attr(upcast, "to") not in (DType.FLOAT, DType.DOUBLE):
        return f"Cast {upcast.name!r} does not cast to float32 or float64"
    if node_attr(downcast, "to") != x.dtype:
        return f"Cast {downcast.name!r} does not cast back to the input type {x.dtype}"
    return None


def first_reason(*reasons: str | None) -> str | None:
    return next((r for r in reasons if r), None)


def dedupe_sites(record: PassRecord) -> None:
    """apply_rules revisits refused sites every round; keep one record of each."""
    seen: set[tuple[str, str, str]] = set()
    kept = []
    for site in record.sites:
        key = (site.where, site.status, site.reason)
        if key not in seen:
            seen.add(key)
            kept.append(site)
    record.sites[:] = kept
