"""Whether a graph gets the decode loop in C (templates/generate.c.j2), and its inputs' roles.

The loop builds each step's feeds itself, as the model runner does for one sequence (batch 1, no
padding): ``input_ids`` [1, s] the new tokens, ``attention_mask`` [1, past+s] all ones,
``position_ids`` [1, s] = past..past+s-1, ``logits_to_keep`` = 1, and every
``past_key_values.X`` the previous step's ``present.X`` (ownership moved, not copied). A graph with
any other input, without a cache, or without a ``logits`` output gets no loop: the Python loop
(runtime/generate.py) serves it. The mapping is decided here, at code generation, from the names.
"""

from __future__ import annotations

import dataclasses

from ..ir import DType, Model, Value
from .ops import DT
from .ops_transformer import grows_in_place

#: The per-step inputs the loop knows how to build (besides the cache pairs).
STEP_INPUTS = ("input_ids", "attention_mask", "position_ids", "logits_to_keep")
_INTEGER = (DType.INT64, DType.INT32)


@dataclasses.dataclass
class DecodePlan:
    """Slots and element types the generate template binds each step."""

    ids: dict
    mask: dict | None
    positions: dict | None
    keep: dict | None
    logits: int
    logits_dt: int
    caches: list[dict]   # past slot, present slot, dtype code, heads, width
    #: Every cached Attention may append in place (ops_transformer.grows_in_place): the loop then
    #: keeps each cache in a buffer with room to grow (doubling) instead of a new present per step.
    in_place: bool = False


def plan(model: Model, index: dict[int, int]) -> tuple[DecodePlan | None, str]:
    """(the plan, "") when the graph fits the loop, else (None, why not) for diagnostics."""
    from ..runtime.kv_cache import PAST_PREFIX, PRESENT_PREFIX, CacheSpec

    graph = model.graph
    inputs: dict[str, Value] = {v.name: v for v in graph.inputs}
    outputs: dict[str, Value] = {v.name: v for v in graph.outputs}
    try:
        spec = CacheSpec.from_model(model)
    except Exception as exc:  # noqa: BLE001 - any malformed cache means "no C loop", never a failed emit
        return None, f"the cache inputs are not the cached-graph contract's ({exc})"
    if spec is None:
        return None, "the graph has no KV cache (each step would recompute the sequence)"
    cache_inputs = {e.input for e in spec.entries}
    other = [n for n in inputs if n not in STEP_INPUTS and n not in cache_inputs]
    if other:
        return None, f"the graph takes input(s) {other} the C loop does not build"
    for name in ("input_ids", "attention_mask"):
        if name not in inputs:
            return None, f"the graph has no {name!r} input"
    roles = {}
    for name in STEP_INPUTS:
        v = inputs.get(name)
        if v is None:
            roles[name] = None
            continue
        if name != "logits_to_keep" and v.const is not None:
            return None, f"input {name!r} has a default value (the C loop builds it itself)"
        if v.dtype not in _INTEGER:
            return None, f"input {name!r} is {v.dtype} (the C loop builds int64 or int32 inputs)"
        rank = 0 if name == "logits_to_keep" else 2
        if v.shape is not None and len(v.shape) != rank:
            return None, f"input {name!r} has rank {len(v.shape)} (expected {rank})"
        roles[name] = {"index": index[id(v)], "dt": DT[v.dtype]}
    logits = outputs.get("logits")
    if logits is None or logits.dtype not in (DType.FLOAT, DType.FLOAT16):
        return None, "the graph has no float 'logits' output"
    caches = []
    for entry in spec.entries:
        past, present = inputs[entry.input], outputs[entry.output]
        if past.dtype not in DT or present.dtype != past.dtype:
            return None, f"cache {entry.input!r} is {past.dtype} but {entry.output!r} is {present.dtype}"
        assert entry.input.startswith(PAST_PREFIX) and entry.output.startswith(PRESENT_PREFIX)
        caches.append({"past": index[id(past)], "present": index[id(present)], "dt": DT[past.dtype],
                       "heads": entry.heads, "width": entry.width})
    in_place = all(grows_in_place(inputs[entry.input]) for entry in spec.entries)
    return DecodePlan(roles["input_ids"], roles["attention_mask"], roles["position_ids"], roles["logits_to_keep"],
                      index[id(logits)], DT[logits.dtype], caches, in_place), ""
