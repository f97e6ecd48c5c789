"""Keeping replaced subgraphs from surviving through their Shape readers.

Exporters compute reshape targets from ``Shape`` of intermediate tensors (TorchScript reads the
per-head Q after rotary to know the sequence length). Once a fusion replaced those tensors, the
``Shape`` readers alone would keep the old computation alive (a rotary, transposes). Every size
such a ``Shape`` reads is provably the size of some value that stays (the fused node's inputs or
outputs), so the ``Shape`` is recomputed from those, and the old subgraph dies.
"""

from __future__ import annotations

import numpy as np

from ...ir import Graph, Node, Value
from ...ir.symbolic import shape_axes
from ..rewrite import Builder
from .dims import DimOracle, dim_of


def reroute_shapes(graph: Graph, oracle: DimOracle, keepers: list[Value], *, rounds: int = 4) -> int:
    """Replace ``Shape(x)`` where x is read by nothing else, from the sizes of ``keepers``.
    Returns how many Shape nodes were replaced."""
    replaced = 0
    for _ in range(rounds):
        changed = 0
        position = {id(n): i for i, n in enumerate(graph.nodes)}
        for node in list(graph.nodes):
            if node.graph is not graph or node.op_type != "Shape" or node.domain:
                continue
            # only values computed before this Shape: a later layer's would make a cycle
            before = [k for k in keepers if k.producer is None or position.get(id(k.producer), 1 << 60) < position[id(node)]]
            x = node.inputs[0]
            if x is None or x.is_graph_output or x.is_graph_input or x.is_const or x in keepers:
                continue
            if any(user.op_type != "Shape" or user.domain for user in x.consumers()):
                continue
            value = _rebuilt(graph, node, x, oracle, before)
            if value is not None:
                node.outputs[0].replace_all_uses_with(value)
                changed += 1
        if not changed:
            break
        replaced += changed
        graph.remove_dead()
    return replaced


def _rebuilt(graph: Graph, node: Node, x: Value, oracle: DimOracle, keepers: list[Value]) -> Value | None:
    if x.shape is None:
        return None
    sources: list[int | tuple[Value, int]] = []
    for axis in shape_axes(node, len(x.shape)):
        size = dim_of(x, axis)
        if isinstance(size, int):
            sources.append(size)
            continue
        found = next(((k, a) for k in keepers if k.shape is not None for a in range(len(k.shape))
                      if oracle.same(x, axis, k, a)), None)
        if found is None:
            return None
        sources.append(found)
    op = Builder(graph, node, node.name or "shape")
    parts = [op.const(np.asarray([s], np.int64)) if isinstance(s, int) else op.Shape(s[0], start=s[1], end=s[1] + 1)
             for s in sources]
    if not parts:
        return None
    out = parts[0] if len(parts) == 1 else op.Concat(*parts, axis=0)
    out.dtype, out.shape = node.outputs[0].dtype, node.outputs[0].shape
    return out
