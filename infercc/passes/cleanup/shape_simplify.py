"""Shape-arithmetic simplification.

Exporters compute reshape targets at run time (Shape -> Gather -> Unsqueeze -> Concat) even when
most entries are fixed. Where symbolic evaluation proves what such a tensor holds, we replace it:
by a constant when every entry is a number; for Reshape by a constant target using 0 ("copy this
dim") and -1 ("infer") for the entries that are the input's own symbolic dims; for Expand by 1
where the input already has the target dim.
"""

from __future__ import annotations

import numpy as np

from ...ir import Model, Tensor
from ...ir.shapes import infer_shapes
from ...ir.symbolic import dim_values
from ..base import Pass, PassContext
from .constant_folding import fold_constants


class ShapeSimplification(Pass):
    name = "shape_simplification"
    requires = frozenset()

    def run(self, model: Model, ctx: PassContext) -> None:
        graph = model.graph
        # Shape values made constant here make data computations constant (ConstantOfShape of a
        # now static shape, the mask arithmetic after it) and make more shapes known (a Slice
        # whose bounds were computed): fold those (constant folding ran before this pass) and
        # infer shapes again, until no new shape value is found.
        for _ in range(_MAX_ROUNDS):
            if not _make_shape_values_constant(graph, ctx):
                break
            ctx.record.count("nodes_folded", fold_constants(model, ctx))
            infer_shapes(model)
        memo: dict = {}
        for node in list(graph.nodes):
            if node.graph is None or node.op_type not in ("Reshape", "Expand") or node.domain:
                continue
            data, target = node.inputs[0], node.inputs[1]
            if target is None or target.is_const:
                continue
            dims = dim_values(target, memo)
            if node.op_type == "Reshape":
                # allowzero=1 (dynamo's default) only differs when the target holds a literal 0;
                # without one, switching to allowzero=0 lets 0 mean "copy this input dim".
                if node.attr("allowzero", 0) and (dims is None or 0 in dims):
                    continue
                spec = _reshape_spec(data.shape, dims)
            else:
                spec = _expand_spec(data.shape, dims)
            if spec is None:
                continue
            if node.op_type == "Reshape" and node.attr("allowzero", 0):
                node.set_attr("allowzero", 0)
            node.set_input(1, graph.add_const(Tensor(np.array(spec, np.int64)), target.name + "_static"))
            ctx.record.count(f"{node.op_type.lower()}_targets_made_constant")
        ctx.record.count("nodes_removed", graph.remove_dead())


_MAX_ROUNDS = 4


def _make_shape_values_constant(graph, ctx: PassContext) -> int:
    """Replace every integer value whose elements symbolic evaluation proves to be numbers."""
    memo: dict = {}
    made = 0
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
            made += 1
    return made


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
    return None if spec.count(-1) > 1 else spec


def _expand_spec(in_shape, target) -> list[int] | None:
    """Expand broadcasts: where the input already has the target's dim, 1 says the same thing."""
    if target is None or in_shape is None or len(target) != len(in_shape):
        return None
    spec = []
    for have, want in zip(in_shape, target):
        if isinstance(want, int):
            spec.append(want)
        elif have == want and have is not None:
            spec.append(1)
        else:
            return None
    return spec
