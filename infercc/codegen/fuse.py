"""Fusions across nodes that only the generated code can make (the IR is left as it is).

A fusion is a small pattern over the graph plus the C that replaces it: the group's first node
emits the whole group, its other nodes emit nothing, and the intermediate values are never
materialized. Why here and not as a graph pass: ONNX Runtime gains nothing from these shapes (it
has no kernel for them), while in C each one saves full passes over an activation.

* SwiGLU: ``Split(x) -> [gate, up]``, ``SiLU(gate)``, ``Mul(SiLU(gate), up)`` -- the gated MLP of
  LLaMA-family models after the gate and up projections were packed into one matmul -- becomes
  one loop ``y = silu(x[:, :N]) * x[:, N:]`` (no split copies, no SiLU buffer, one pass).
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
    for node in graph.nodes:
        group = _swiglu(node)
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
