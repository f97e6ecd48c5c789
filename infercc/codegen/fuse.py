"""Fusions across nodes that only the generated code can make (the IR is left as it is).

A fusion is a small pattern over the graph plus the C that replaces it: the group's first node
emits the whole group, its other nodes emit nothing, and the intermediate values are never
materialized. Why here and not as a graph pass: ONNX Runtime gains nothing from these shapes (it
has no kernel for them), while in C each one saves full passes over an activation.

* SwiGLU: ``Split(x) -> [gate, up]``, ``SiLU(gate)``, ``Mul(SiLU(gate), up)`` -- the gated MLP of
  LLaMA-family models after the gate and up projections were packed into one matmul -- becomes
  one loop ``y = silu(x[:, :N]) * x[:, N:]`` (no split copies, no SiLU buffer, one pass).
* LoRA delta: ``MatMul(x, A) -> Mul(., Unsqueeze(mask)) -> MatMul(., B) -> Add(y, .)``, the portable
  segmented form the LoRA variant adds after a projection (passes/lora), becomes one kernel that
  reads only each row's own adapter columns (kernels/lora.h): two dense matmuls over every loaded
  adapter's columns, most of them multiplied by a zero mask, become the row's own rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from ..ir import DType, Graph, Node, Value
from ..passes.canonical import DOMAIN


@dataclasses.dataclass
class Fused:
    """A group emitted at ``anchor``: ``emit(slot)`` gives its C lines (``slot(value)`` is the C
    expression of a value's tensor); ``members`` are the other nodes, which emit nothing."""

    name: str
    anchor: Node
    members: list[Node]
    emit: Callable[[Callable[[Value], str]], list[str]]


def plan(graph: Graph) -> dict[int, Fused]:
    """Every fusion of the graph, keyed by id() of each node it covers (anchor and members)."""
    found: dict[int, Fused] = {}
    position = {id(node): i for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        group = _swiglu(node) or _lora_delta(node, position)
        if group is not None and not any(id(n) in found for n in [group.anchor, *group.members]):
            for n in [group.anchor, *group.members]:
                found[id(n)] = group
    return found


def _only_use(value: Value | None) -> Node | None:
    """The one node reading ``value`` (once), if it is not a graph output; else None."""
    if value is None or value.is_graph_output or len(value.uses) != 1:
        return None
    return value.uses[0][0]


def _halves(split: Node) -> bool:
    """Split of a float32 tensor into two equal halves along its last axis."""
    x = split.inputs[0]
    if x is None or x.dtype != DType.FLOAT or not x.shape or len(split.outputs) != 2:
        return False
    axis = int(split.attr("axis", 0))
    if axis not in (-1, len(x.shape) - 1):
        return False
    sizes = split.attr("split", None)
    if sizes is None and len(split.inputs) > 1 and split.inputs[1] is not None:
        if split.inputs[1].const is None:
            return False
        sizes = np.asarray(split.inputs[1].const.numpy()).reshape(-1).tolist()
    if sizes is None:  # equal pieces by definition; an odd width is refused by the kernel
        return True
    return len(sizes) == 2 and int(sizes[0]) == int(sizes[1])


def _swiglu(split: Node) -> Fused | None:
    if split.op_type != "Split" or split.domain or not _halves(split):
        return None
    first, second = split.outputs
    for gate, up, gate_second in ((first, second, 0), (second, first, 1)):
        silu = _only_use(gate)
        if silu is None or silu.op_type != "SiLU" or silu.domain != DOMAIN or len(silu.inputs) != 1:
            continue
        mul = _only_use(silu.outputs[0])
        if (mul is None or mul.op_type != "Mul" or mul.domain or _only_use(up) is not mul
                or {id(v) for v in mul.inputs} != {id(silu.outputs[0]), id(up)}
                or mul.outputs[0].dtype != DType.FLOAT):
            continue
        x, y = split.inputs[0], mul.outputs[0]

        def emit(slot: Callable[[Value], str], x: Value = x, y: Value = y, flag: int = gate_second) -> list[str]:
            return [f"{slot(y)}->dt = ICC_F32; icc_swiglu({slot(y)}, {slot(x)}, {flag});"]

        return Fused("SwiGLU", split, [silu, mul], emit)
    return None


def _lora_delta(low: Node, position: dict[int, int]) -> Fused | None:
    """The LoRA variant's delta after a projection, anchored at its first matmul, which must come
    after the projection's output (the group's values are read where the anchor runs)."""
    if low.op_type != "MatMul" or low.domain or len(low.inputs) != 2 or not low.inputs[1].is_graph_input:
        return None
    mul = _only_use(low.outputs[0])
    if mul is None or mul.op_type != "Mul" or mul.domain or len(mul.inputs) != 2:
        return None
    rows = mul.inputs[1] if mul.inputs[0] is low.outputs[0] else mul.inputs[0]
    unsqueeze = rows.producer
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or unsqueeze.domain or not unsqueeze.inputs[0].is_graph_input:
        return None
    up = _only_use(mul.outputs[0])
    if up is None or up.op_type != "MatMul" or up.domain or up.inputs[0] is not mul.outputs[0] \
            or not up.inputs[1].is_graph_input:
        return None
    add = _only_use(up.outputs[0])
    if add is None or add.op_type != "Add" or add.domain or len(add.inputs) != 2:
        return None
    y = add.inputs[0] if add.inputs[1] is up.outputs[0] else add.inputs[1]
    x, a, b, mask, total = low.inputs[0], low.inputs[1], up.inputs[1], unsqueeze.inputs[0], add.outputs[0]
    values = (x, y, a, b, mask, total)
    if any(v is None or v.dtype != DType.FLOAT for v in values) or a.rank != 2 or b.rank != 2 or mask.rank != 2:
        return None
    made = y.producer
    if made is not None and position.get(id(made), len(position)) > position[id(low)]:
        return None  # y is computed after the anchor: the fused kernel could not read it there

    def emit(slot: Callable[[Value], str], values: tuple[Value, ...] = values) -> list[str]:
        x, y, a, b, mask, total = (slot(v) for v in values)
        return [f"icc_lora_delta({total}, {y}, {x}, {a}, {b}, {mask});"]

    return Fused("LoraDelta", low, [mul, up, add], emit)
