"""When rows of different past lengths may share one forward call of the paged runner
(runtime/paged_runner.py): an analysis of how the graph derives positions and masks."""

from __future__ import annotations

from ..ir import Model, Value


def padding_problem(model: Model, *, masked_keys: bool) -> str | None:
    """Why left-padding rows to the longest past in one call could change a row's results, else
    None. Each step pads afresh, so a row's padding changes between steps: positions must come from
    ``position_ids`` or from the mask's values (a CumSum); positions counted over the mask's length
    (a Range, as torch exports count them) would shift -- rotary ones too, since keys already in the
    pool were rotated with the padding of their own step. ``masked_keys``: the padded past is
    attended over (ort-gather), so every attention must also mask keys by the mask's values."""
    from ..passes.kv_cache import contract as c
    from ..passes.kv_cache.sequence import MASK_NAME, POSITIONS_NAME, Refusal, SequenceWorld

    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    if MASK_NAME not in inputs:
        return f"the graph has no {MASK_NAME!r} input"
    try:
        world = SequenceWorld(graph)
        sinks = world.sinks()
    except (Refusal, KeyError) as exc:
        return f"how the graph derives positions could not be analysed ({exc})"
    positions = inputs.get(POSITIONS_NAME)
    for sink in sinks:
        x = sink.node.inputs[sink.index]
        if sink.kind == "shape" or (sink.kind == "mask" and not masked_keys):
            continue
        if sink.kind == "mask":
            if not _reaches(x, lambda v: v is inputs[MASK_NAME]):
                return f"the attention mask %{x.name} does not read {MASK_NAME!r}'s values, so padding would be attended"
            continue
        if not positions_from_mask_or_ids(x, positions):
            return (f"the {sink.kind} operand %{x.name} of {sink.node.op_type} {sink.node.name!r} counts positions over "
                    f"the sequence's length, not from {MASK_NAME!r}'s values or {POSITIONS_NAME!r}: padding would shift them")
    if masked_keys:
        for node in c.attention_nodes(graph):
            if len(node.inputs) < 4 or node.inputs[3] is None:
                return f"attention {node.name!r} takes no mask, so padded keys would be attended"
    return None


def positions_from_mask_or_ids(x: Value, positions: Value | None) -> bool:
    """Whether ``x`` (an operand that carries positions) is computed from ``position_ids`` or a
    running count (CumSum) of the mask, not counted over the sequence's length (a Range)."""
    return _reaches(x, lambda v: v is positions or (v.producer is not None and v.producer.op_type == "CumSum"))


def _reaches(value: Value, found, limit: int = 10000) -> bool:
    """Whether ``found`` holds for ``value`` or anything it is computed from through data edges
    (a Shape or Size reads only its input's shape: not followed)."""
    seen: set[int] = set()
    stack = [value]
    while stack and len(seen) < limit:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if found(v):
            return True
        node = v.producer
        if node is not None and not (node.op_type in ("Shape", "Size") and not node.domain):
            stack.extend(x for x in node.inputs if x is not None)
    return False
