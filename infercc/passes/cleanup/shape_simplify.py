"""Shape-arithmetic simplification.

Exporters compute reshape targets at run time (Shape -> Gather -> Unsqueeze -> Concat) even when
most entries are fixed. Where symbolic evaluation proves what such a tensor holds, we replace it:
by a constant when every entry is a number, and for Reshape by a constant target using 0 ("copy
this dim") and -1 ("infer") for the entries that are the input's own symbolic dims.
"""

from __future__ import annotations

import numpy as np

from ...ir import Model, Tensor
from ...ir.symbolic import dim_values
from ..base import Pass, PassContext


class ShapeSimplification(Pass):
    name = "shape_simplification"
    requires = frozenset()

    def run(self, model: Model, ctx: PassContext) -> None:
        graph = model.graph
        memo: dict = {}
        for node in list(graph.nodes):
            if node.graph is None:
                continue
            for value in node.outputs:
                if value.is_const or not value.uses or value.dtype is None or not value.dtype.is_integer:
                    continue
                dims = dim_values(value, memo)
                if dims is None or not all(isinstance(d, int) for d in dims) or node.op_type == "Constant":
                    continue
                array = np.array(dims, dtype=value.dtype.numpy)
                if value.shape is not None and len(value.shape) == 0:
                    array = array.reshape(())
                elif value.shape is None:
                    continue
                folded = graph.add_const(Tensor(array), value.name + "_static")
                value.replace_all_uses_with(folded)
                ctx.record.count("shape_values_made_constant")
        for node in list(graph.nodes):
            if node.graph is None or node.op_type != "Reshape" or node.domain or node.attr("allowzero", 0):
                continue
            data, target = node.inputs[0], node.inputs[1]
            if target is None or target.is_const:
                continue
            spec = _reshape_spec(data.shape, dim_values(target, memo))
            if spec is None:
                continue
            node.set_input(1, graph.add_const(Tensor(np.array(spec, np.int64)), target.name + "_static"))
            ctx.record.count("reshape_targets_made_constant")
        ctx.record.count("nodes_removed", graph.remove_dead())


def _reshape_spec(in_shape, target) -> list[int] | None:
    """A constant Reshape target equivalent to ``target``, or None if it needs run-time values."""
    if target is None or in_shape is None:
        return None
    spec: list[int] = []
    for i, d in enumerate(target):
        if isinstance(d, int):
            spec.append(d)
        elif i < len(in_shape) and in_shape[i] == d and d is not None:
            spec.append(0)
        else:
            spec.append(-1)
    if spec.count(-1) > 1 or (-1 in spec and -1 in [d for d in target if isinstance(d, int)]):
        return None
    return spec
