"""Small helpers for fusions, decompositions and lowerings that build nodes with a Builder.

:func:`shared` lets every layer's rewrite reuse one computation (a causal bias, a rotary cache
slice) instead of building a copy per layer: the pipeline's CSE ran before the fusions, and
nothing after them would merge the copies.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

import numpy as np

from ...ir import DType, Graph, Value
from ..rewrite import Builder

_CACHES: weakref.WeakKeyDictionary[Graph, dict[Hashable, Value]] = weakref.WeakKeyDictionary()


def shared(op: Builder, key: Hashable, make: Callable[[], Value]) -> Value:
    """The value built by ``make`` for ``key`` in this graph, built once. An entry whose value left
    the graph (removed, or built by a lowering that gave up) is rebuilt."""
    cache = _CACHES.setdefault(op.graph, {})
    found = cache.get(key)
    if found is not None and _alive(op.graph, found):
        return found
    value = make()
    cache[key] = value
    return value


def _alive(graph: Graph, value: Value) -> bool:
    if value.producer is not None:
        return value.producer.graph is graph
    return graph.initializers.get(value.name) is value


def i64(op: Builder, values: list[int] | int, hint: str = "c") -> Value:
    return op.const(np.asarray(values, dtype=np.int64), hint=hint)


def scalar_like(op: Builder, value: float, dtype: DType | None, hint: str = "c") -> Value:
    np_dtype = (dtype or DType.FLOAT).numpy
    return op.const(np.asarray(value, dtype=np_dtype), hint=hint)


def dim(op: Builder, x: Value, axis: int) -> Value:
    """A 1-element int64 tensor holding ``x``'s size along ``axis`` (for Concat-built shapes)."""
    start = axis
    end = axis + 1 if axis != -1 else None
    if end is None:
        return op.Shape(x, start=-1)
    return op.Shape(x, start=start, end=end)


def last_slice(op: Builder, x: Value, start: int, end: int, step: int = 1) -> Value:
    """``x[..., start:end:step]``."""
    return op.Slice(x, i64(op, [start]), i64(op, [end]), i64(op, [-1]), i64(op, [step]))
