"""Metadata over the whole sequence: positions, rotary tables, position embeddings and masks.

Principle: the cached graph must compute for the new tokens what the uncached graph computes for
them when it is given the whole sequence (past + new). Metadata depends only on the mask, the
sequence length and position ids, never on the tokens (see ``sequence``), so it can be computed
exactly over the whole sequence: :class:`FullContext` clones its computation with every length that
was "the number of tokens" replaced by the total length (``attention_mask`` then spans past + new)
and :meth:`FullContext.take_last` keeps the new tokens' rows. That is what makes it independent of
how an exporter wrote positions: ``arange(seq)`` becomes ``arange(total)[past:]``, ``cumsum(mask) -
1`` runs over the full mask and keeps its last ``seq`` entries, GPT-2's ``Gather(wpe, positions)``
gathers the new positions, and a ``position_ids`` input (already the new tokens' positions) is
read as it is.

Cutting early: :meth:`take_last` moves the cut up through ops that work row by row along the
sequence axis (casts, trigonometry, broadcasting arithmetic, concatenations along other axes, the
index side of a Gather), so a decode step computes one row of cos/sin, not ``total``, and stops
at ops that mix rows (CumSum, Range), where the whole sequence is needed.
"""

from __future__ import annotations

import numpy as np

from ...ir import Graph, Node, Value
from ..rewrite import Builder
from .sequence import Refusal, SequenceWorld

_ROW_WISE_UNARY = {
    "Cast", "Cos", "Sin", "Neg", "Identity", "Sqrt", "Exp", "Log", "Abs", "Not", "Reciprocal", "Relu", "Sigmoid",
    "Tanh", "Floor", "Ceil", "Round", "Sign", "Erf", "IsNaN", "IsInf",
}
_ROW_WISE_BINARY = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "And", "Or", "Equal", "Less", "LessOrEqual",
    "Greater", "GreaterOrEqual", "Mod",
}
INT64_MAX = np.iinfo(np.int64).max


class FullContext:
    """Clones metadata computations so that they run over past + new tokens."""

    def __init__(self, world: SequenceWorld, op: Builder, mask: Value, new_mask: Value | None) -> None:
        self.world = world
        self.graph: Graph = world.graph
        self.op = op
        self.mask = mask
        self.total = op.Shape(mask, start=1, end=2)  # [past + seq]
        self.seq = op.Shape(world.ids, start=1, end=2)  # [seq]
        self._memo: dict[int, Value] = {}
        if new_mask is not None:  # query-world reads of the mask were redirected to its last seq columns
            self._memo[id(new_mask)] = mask
        if world.mask is not None:
            self._memo[id(world.mask)] = mask
        self._cut: dict[tuple[int, int], Value] = {}
        self.cloned: list[Node] = []
        self.reads_positions = False

    # -- cloning ------------------------------------------------------------------------------
    def value(self, v: Value) -> Value:
        """``v`` as computed over the whole sequence (Refusal if it cannot be)."""
        found = self._memo.get(id(v))
        if found is not None:
            return found
        if v.is_const:
            return v
        if self.world.positions is not None and v is self.world.positions:
            self.reads_positions = True  # the new tokens' positions, as given
            return v
        if v.is_graph_input:
            raise Refusal(f"it reads the values of input {v.name!r}, which the cached graph only has for the new "
                          "tokens")
        if self.world.is_act(v):
            raise Refusal(f"it reads the activation %{v.name} (data-dependent)")
        node = v.producer
        if node is None:
            raise Refusal(f"%{v.name} has no producer")
        if node.op_type == "Shape" and not node.domain and self._token_world(node.inputs[0]):
            result = [self._full_shape(node)]
        else:
            result = self._clone(node)
        for out, new in zip(node.outputs, result):
            self._memo[id(out)] = new
        return self._memo[id(v)]

    def _token_world(self, x: Value) -> bool:
        return self.world.is_act(x) or (x.is_graph_input and x is not self.world.mask)

    def _full_shape(self, node: Node) -> Value:
        """Shape(x) of a token-world x with the sequence dims read as the total length."""
        x = node.inputs[0]
        if x.shape is None:
            raise Refusal(f"the rank of %{x.name} is unknown")
        rank = len(x.shape)
        start, end = node.attr("start", 0), node.attr("end", rank)
        start, end = max(0, start + rank if start < 0 else start), min(rank, end + rank if end < 0 else end)
        parts = [self.total if self.world.seq_axis(x, k) else self.op.Shape(x, start=k, end=k + 1)
                 for k in range(start, end)]
        if not parts:
            return self.op.Shape(x, start=start, end=end)
        return parts[0] if len(parts) == 1 else self.op.Concat(*parts, axis=0)

    def _clone(self, node: Node) -> list[Value]:
        if any(True for _ in node.subgraphs()):
            raise Refusal(f"{node.op_type} {node.name!r} has subgraphs")
        ins = [None if x is None else self.value(x) for x in node.inputs]
        if all(a is b for a, b in zip(ins, node.inputs)):
            return list(node.outputs)  # reads nothing that changes
        made = self.graph.make_node(
            node.op_type, ins, num_outputs=len(node.outputs), domain=node.domain,
            attrs={k: a for k, a in node.attrs.items()}, name=self.graph.names.fresh(f"{node.name or node.op_type}/full"),
            output_names=[f"{o.name}/full" for o in node.outputs], before=self.op.anchor,
        )
        self.op.nodes.append(made)
        self.cloned.append(made)
        for old, new in zip(node.outputs, made.outputs):
            new.dtype = old.dtype
            if old.shape is not None:  # same rank; sizes that may be the sequence are unknown now
                new.shape = tuple(d if isinstance(d, int) else None for d in old.shape)
        return list(made.outputs)

    # -- cutting ------------------------------------------------------------------------------
    def take_last(self, v: Value, axis: int) -> Value:
        """The last ``seq`` entries of a full-context value along ``axis`` (a size-1 axis, which
        broadcasts, is left as it is)."""
        key = (id(v), axis)
        if key not in self._cut:
            self._cut[key] = self._take_last(v, axis)
        return self._cut[key]

    def _take_last(self, v: Value, axis: int) -> Value:
        if v.shape is not None and axis < len(v.shape) and v.shape[axis] == 1:
            return v
        node = v.producer
        if node is not None and node in self.cloned and len(node.outputs) == 1:
            pushed = self._push(node, v, axis)
            if pushed is not None:
                return pushed
        op = self.op
        cut = op.Slice(v, op.Neg(self.seq), op.const(np.asarray([INT64_MAX], np.int64), hint="end"),
                       op.const(np.asarray([axis], np.int64), hint="axis"))
        self._annotate(cut, v, axis)
        return cut

    def _annotate(self, cut: Value, full: Value, axis: int) -> None:
        """The cut's type, its sequence axis named as input_ids' (shape inference cannot tell)."""
        cut.dtype = full.dtype
        if full.shape is not None and self.world.ids.shape is not None:
            cut.shape = full.shape[:axis] + (self.world.ids.shape[1],) + full.shape[axis + 1:]

    def _push(self, node: Node, v: Value, axis: int) -> Value | None:
        """The cut moved above ``node`` (None where the op mixes rows along ``axis``)."""
        op, ins = node.op_type, node.inputs
        rank = len(v.shape) if v.shape is not None else None
        if node.domain or rank is None:
            return None
        if op in _ROW_WISE_UNARY:
            new_ins = [self.take_last(ins[0], axis)] + list(ins[1:])
        elif op in _ROW_WISE_BINARY or (op == "Concat" and (node.attr("axis") or 0) % rank != axis):
            new_ins = []
            for x in ins:
                if x is None or x.shape is None:
                    return None
                mine = axis - (rank - len(x.shape))
                new_ins.append(x if mine < 0 else self.take_last(x, mine))
        elif op == "Unsqueeze":
            from ..fusion.dims import ints

            axes = ints(ins[1]) if len(ins) > 1 else None
            if axes is None:
                return None
            inserted = sorted(a % rank for a in axes)
            if axis in inserted:
                return None
            new_ins = [self.take_last(ins[0], axis - sum(a < axis for a in inserted)), ins[1]]
        elif op == "Gather":
            data, idx = ins
            g = (node.attr("axis") or 0) % len(data.shape) if data.shape is not None else None
            if g is None or idx.shape is None or not g <= axis < g + len(idx.shape):
                return None
            new_ins = [data, self.take_last(idx, axis - g)]
        else:
            return None
        made = self.graph.make_node(op, new_ins, domain=node.domain, attrs=dict(node.attrs),
                                    name=self.graph.names.fresh(f"{node.name}/new"),
                                    output_names=[f"{v.name}/new"], before=self.op.anchor)
        self.op.nodes.append(made)
        self.cloned.append(made)
        self._annotate(made.outputs[0], v, axis)
        return made.outputs[0]
