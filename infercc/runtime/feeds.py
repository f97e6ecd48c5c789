"""Checking user feeds against a model's signature, and making random feeds for numeric checks."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from ..errors import InputError
from ..ir import DType, Graph, Node, Value


def signature(values: list[Value]) -> list[dict]:
    return [
        {"name": v.name, "dtype": str(v.dtype) if v.dtype is not None else None,
         "shape": None if v.shape is None else list(v.shape)}
        for v in values
    ]


#: Inputs of the cached-graph contract (passes/kv_cache/contract.py) that carry the cache.
CACHE_PREFIX = "past_key_values."


def with_empty_cache(graph: Graph, feeds: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """A call of a cached graph that passes none of the cache inputs starts a sequence: empty pasts
    [batch, kv_heads, 0, head_size] are added (the batch read from ``input_ids``), and an all-ones
    ``attention_mask`` if none is given (no padding). Feeds of other graphs, or that pass a cache,
    are returned as they are."""
    cache = [v for v in graph.inputs if v.name.startswith(CACHE_PREFIX) and v.const is None]
    ids = feeds.get("input_ids") if isinstance(feeds, Mapping) else None
    if not cache or ids is None or any(v.name in feeds for v in cache) or np.ndim(ids) != 2:
        return feeds
    filled = dict(feeds)
    if "attention_mask" not in filled and any(v.name == "attention_mask" for v in graph.inputs):
        filled["attention_mask"] = np.ones(np.shape(ids), np.int64)
    for v in cache:
        shape = [np.shape(ids)[0]] + [d if isinstance(d, int) else 0 for d in (v.shape or (0, 0, 0, 0))[1:]]
        shape[2] = 0
        filled[v.name] = np.zeros(shape, (v.dtype or DType.FLOAT).numpy)
    return filled


def check_feeds(graph: Graph, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds as arrays of the right dtype; an InputError names the input and what it expects.
    A cached graph called without its cache inputs starts from an empty cache (``with_empty_cache``)."""
    expected = {v.name: v for v in graph.inputs if not v.is_const}
    if not isinstance(feeds, Mapping):
        raise InputError(
            f"feeds must be a dict of input name -> array, got {type(feeds).__name__}; the model's inputs are {list(expected)}"
        )
    feeds = with_empty_cache(graph, feeds)
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
                _check_fits(name, array, want)
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
        if value.dtype is not None and value.dtype.is_integer:
            _check_indices(name, value, array)
        out[name] = array
    _check_cache_lengths(graph, out)
    return out


#: Inputs that carry a batch of token sequences: an empty one is always a mistake.
TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


def _check_fits(name: str, array: np.ndarray, want: np.dtype) -> None:
    """int64 ids given to an int32 input would wrap around silently when cast: refuse those."""
    if array.dtype.kind in "iu" and want.kind in "iu" and array.size:
        info = np.iinfo(want)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise InputError(
                f"input {name!r} holds {bad}, which does not fit the model's {want.name} "
                f"(range {info.min} to {info.max}); pass values in that range"
            )


def _check_indices(name: str, value: Value, array: np.ndarray) -> None:
    """Token ids and other indices: no empty batch or sequence, every id a row of the table it
    indexes (onnxruntime would fail inside the Gather with its own text, or, for some providers,
    read out of bounds). Token ids must be >= 0; other indices may count from the end, as Gather
    allows."""
    tables = list(_index_tables(value))
    if (tables or name in TOKEN_INPUTS) and 0 in array.shape:
        axis = array.shape.index(0)
        dim = value.shape[axis] if value.shape is not None else None
        label = f" ({dim!r})" if isinstance(dim, str) else ""
        raise InputError(
            f"input {name!r} is empty: axis {axis}{label} has size 0 (shape {list(array.shape)}); "
            "pass at least one sequence of at least one token"
        )
    if not tables or not array.size:
        return
    node, rows = min(tables, key=lambda t: t[1])
    low = 0 if name == "input_ids" else -rows
    smallest, largest = int(array.min()), int(array.max())
    if smallest < low or largest >= rows:
        bad = smallest if smallest < low else largest
        where = tuple(int(i) for i in np.argwhere(array == bad)[0])
        table = node.inputs[0].name
        raise InputError(
            f"input {name!r} holds {bad} at index {list(where)}, outside the valid range {low} to {rows - 1}: "
            f"it indexes the {rows} rows of {table!r} (node {node.name or node.op_type!r}); "
            + (f"token ids must be in 0 to {rows - 1} (vocabulary size {rows})" if name == "input_ids"
               else "pass indices in that range")
        )


def _check_cache_lengths(graph: Graph, feeds: dict[str, np.ndarray]) -> None:
    """A cached graph's attention_mask covers the past and the new tokens."""
    past = next((feeds[v.name] for v in graph.inputs if v.name.startswith(CACHE_PREFIX) and v.name in feeds), None)
    ids, mask = feeds.get("input_ids"), feeds.get("attention_mask")
    if past is None or ids is None or mask is None or past.ndim != 4 or ids.ndim != 2 or mask.ndim != 2:
        return
    if mask.shape[1] != past.shape[2] + ids.shape[1]:
        seq = next((v.shape[1] for v in graph.inputs if v.name == "input_ids" and v.shape), "sequence")
        raise InputError(
            f"inputs 'input_ids' and 'attention_mask' disagree: the mask must cover the {past.shape[2]} past "
            f"tokens plus the {ids.shape[1]} new ones (dim {seq!r} of input_ids), got length {mask.shape[1]}"
        )


def _fmt(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def random_feeds(graph: Graph, rng: np.random.Generator, dims: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Plausible random feeds: symbolic dims from ``dims`` (else 2, or 8 for sequence-like names),
    integer inputs in the range the graph indexes with them (a Gather table's size), masks all ones."""
    dims = dict(dims or {})
    _cache_dims(graph, dims)
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


def _cache_dims(graph: Graph, dims: dict[str, int]) -> None:
    """A cached graph's lengths must agree (mask = past + new tokens): an empty past by default."""
    inputs = {v.name: v for v in graph.inputs}
    past = next((v for v in graph.inputs if v.name.startswith(CACHE_PREFIX) and v.shape and len(v.shape) == 4), None)
    ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
    if past is None or ids is None or mask is None or not ids.shape or not mask.shape:
        return
    seq, prior, total = ids.shape[-1], past.shape[2], mask.shape[-1]
    if not all(isinstance(d, str) for d in (seq, prior, total)):
        return
    dims.setdefault(seq, 8)
    dims.setdefault(prior, 0)
    dims.setdefault(total, dims[seq] + dims[prior])


def _index_bound(value: Value) -> int:
    """Largest safe exclusive bound for an integer input: the smallest table it indexes."""
    return max(min([100, *(rows for _, rows in _index_tables(value))]), 1)


#: Ops whose input 1 indexes rows of input 0, with the attribute that names the axis.
_GATHERS = {"Gather": "axis", "GatherElements": "axis", "GatherBlockQuantized": "gather_axis"}
#: Ops that pass indices through unchanged in value.
_INDEX_PASSTHROUGH = ("Cast", "Unsqueeze", "Reshape", "Flatten")


def _index_tables(value: Value) -> Iterator[tuple[Node, int]]:
    """(node, rows) for every table ``value`` indexes, directly or through shape-only ops: the
    rows are the size of the gathered axis, where the graph knows it."""
    for node, i in value.uses:
        if node.op_type in _GATHERS and i == 1 and node.inputs[0] is not None:
            table = node.inputs[0].shape
            axis = node.attr(_GATHERS[node.op_type], 0)
            if table and -len(table) <= axis < len(table) and isinstance(table[axis], int):
                yield node, table[axis]
        elif node.op_type in _INDEX_PASSTHROUGH and i == 0:
            yield from _index_tables(node.outputs[0])
