"""Checking user feeds against a model's signature, and making random feeds for numeric checks."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import InputError
from ..ir import DType, Graph, Value


def signature(values: list[Value]) -> list[dict]:
    return [
        {"name": v.name, "dtype": str(v.dtype) if v.dtype is not None else None,
         "shape": None if v.shape is None else list(v.shape)}
        for v in values
    ]


def check_feeds(graph: Graph, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds as arrays of the right dtype; an InputError names the input and what it expects."""
    expected = {v.name: v for v in graph.inputs if not v.is_const}
    if not isinstance(feeds, Mapping):
        raise InputError(
            f"feeds must be a dict of input name -> array, got {type(feeds).__name__}; the model's inputs are {list(expected)}"
        )
    required = [v.name for v in graph.inputs if v.const is None]
    unknown = sorted(set(feeds) - {v.name for v in graph.inputs})
    if unknown:
        raise InputError(f"unknown input(s) {unknown}; the model's inputs are {list(expected)}")
    missing = [n for n in required if n not in feeds]
    if missing:
        raise InputError(f"missing input(s) {missing}; the model's inputs are {list(expected)}")
    out: dict[str, np.ndarray] = {}
    symbols: dict[str, tuple[int, str]] = {}
    for name, array in feeds.items():
        value = expected.get(name) or next(v for v in graph.inputs if v.name == name)
        try:
            array = np.asarray(array)
        except (ValueError, TypeError) as exc:
            raise InputError(f"input {name!r} is not an array: {exc}") from None
        if value.dtype is not None and value.dtype != DType.STRING:
            want = value.dtype.numpy
            if array.dtype != want:
                if not np.can_cast(array.dtype, want, casting="same_kind"):
                    raise InputError(f"input {name!r} must be {value.dtype}, got {array.dtype}; convert it with .astype({want.name})")
                array = array.astype(want)
        if value.shape is not None:
            if array.ndim != len(value.shape):
                raise InputError(
                    f"input {name!r} must have rank {len(value.shape)} (shape {_fmt(value.shape)}), got shape {list(array.shape)}"
                )
            for axis, (dim, size) in enumerate(zip(value.shape, array.shape)):
                if isinstance(dim, int) and dim != size:
                    raise InputError(f"input {name!r} axis {axis} must be {dim} (shape {_fmt(value.shape)}), got {size}")
                if isinstance(dim, str):
                    seen = symbols.setdefault(dim, (size, name))
                    if seen[0] != size:
                        raise InputError(
                            f"inputs {seen[1]!r} and {name!r} disagree on dimension {dim!r}: {seen[0]} vs {size}"
                        )
        out[name] = array
    return out


def _fmt(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def random_feeds(graph: Graph, rng: np.random.Generator, dims: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Plausible random feeds: symbolic dims from ``dims`` (else 2, or 8 for sequence-like names),
    integer inputs in the range the graph indexes with them (a Gather table's size), masks all ones."""
    dims = dict(dims or {})
    feeds: dict[str, np.ndarray] = {}
    for value in graph.inputs:
        if value.const is not None:
            continue
        shape = []
        for d in value.shape or ():
            if isinstance(d, int):
                shape.append(d)
            else:
                shape.append(dims.setdefault(str(d), 8 if d and "seq" in str(d).lower() else 2))
        dtype = (value.dtype or DType.FLOAT).numpy
        lname = value.name.lower()
        if value.dtype == DType.BOOL or "mask" in lname:
            feeds[value.name] = np.ones(shape, dtype)
        elif value.dtype is not None and value.dtype.is_integer:
            if "position" in lname and shape:
                feeds[value.name] = np.broadcast_to(np.arange(shape[-1]), shape).astype(dtype)
            else:
                feeds[value.name] = rng.integers(0, _index_bound(value), size=shape).astype(dtype)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _index_bound(value: Value) -> int:
    """Largest safe exclusive bound for an integer input: the smallest table it indexes."""
    bound = 100
    for node, i in value.uses:
        if node.op_type in ("Gather", "GatherElements") and i == 1:
            table = node.inputs[0].shape
            if table and isinstance(table[node.attr("axis", 0)], int):
                bound = min(bound, table[node.attr("axis", 0)])
        elif node.op_type in ("Cast", "Unsqueeze", "Reshape", "Flatten") and i == 0:
            bound = min(bound, _index_bound(node.outputs[0]))
    return max(bound, 1)
