"""Helpers for the hand-written parts of fusions: a mismatch carries the sentence the fusion report
shows, and peeling helpers look through the scalings and casts exporters sprinkle around."""

from __future__ import annotations

import numpy as np

from ...ir import DType, Value
from ..rewrite import const_value


class Mismatch(Exception):
    """This site does not qualify; ``str(exc)`` says why, for users."""


def scalar_const(value: Value | None) -> float | None:
    """The number a one-element constant holds, else None."""
    array = const_value(value)
    if array is None or array.size != 1 or array.dtype.kind not in "fiub":
        return None
    return float(np.asarray(array, np.float64).reshape(-1)[0])


def is_scalar_shaped(value: Value) -> bool:
    """Known to hold one element (rank 0, or all dims 1)."""
    return value.shape is not None and all(d == 1 for d in value.shape)


def peel_scale(value: Value, what: str) -> tuple[Value, float, list[Value]]:
    """Look through Mul/Div by constant scalars (either operand of Mul). Returns the inner value,
    the product of the scalings, and the values passed (outermost first). A scaling by a value that
    is not constant is a mismatch."""
    factor = 1.0
    chain: list[Value] = []
    while True:
        node = value.producer
        if node is None or node.domain or node.op_type not in ("Mul", "Div"):
            return value, factor, chain
        a, b = node.inputs
        cb, ca = scalar_const(b), scalar_const(a) if node.op_type == "Mul" else None
        if cb is not None:
            factor = factor * cb if node.op_type == "Mul" else factor / cb
            inner = a
        elif ca is not None:
            factor, inner = factor * ca, b
        elif is_scalar_shaped(b) or (node.op_type == "Mul" and is_scalar_shaped(a)):
            raise Mismatch(f"the scale of {what} ({node.op_type} {node.name!r}) is not constant")
        else:
            return value, factor, chain
        chain.append(value)
        value = inner


def is_float(value: Value) -> bool:
    return value.dtype is not None and value.dtype.is_float


def bool_dtype(value: Value) -> bool:
    return value.dtype == DType.BOOL
