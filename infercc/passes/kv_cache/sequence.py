"""What in a causal LM graph depends on the tokens, and what only on the sequence around them.

Cache insertion splits the graph into two worlds:

* the *token world*: values computed from the token data (``input_ids``, ``token_type_ids``,
  embeddings...), the activations. With a cache they exist for the new tokens only, and every
  length they read (reshape targets, slices) must stay the number of new tokens;
* *metadata*: values computed only from the mask, the position ids and shapes (positions, rotary
  tables, learned position embeddings, attention masks). They describe where the tokens sit in the
  whole sequence, so with a cache they must be computed over past + new tokens (see
  ``positions.FullContext``) and cut to the new tokens where they meet the activations.

The places where metadata meets the activations ("sinks") are classified by how the consuming op
reads them: a shape argument (stays per new token), a per-position operand (recomputed over the
full sequence), or the attention mask.
"""

from __future__ import annotations

import dataclasses

from ...ir import Graph, Node, Value
from ..canonical import DOMAIN
from ..fusion.dims import DimOracle

MASK_NAME = "attention_mask"
POSITIONS_NAME = "position_ids"
IDS_NAME = "input_ids"

#: (op_type, input index) pairs that read a shape, a size or an index into the new tokens.
SHAPE_SLOTS: dict[str, set[int] | None] = {
    "Reshape": {1}, "Expand": {1}, "Slice": {1, 2, 3, 4}, "Unsqueeze": {1}, "Squeeze": {1}, "Tile": {1},
    "Pad": {1, 2, 3}, "Split": {1}, "ConstantOfShape": {0}, "Range": {0, 1, 2}, "TopK": {1}, "Resize": {1, 2, 3},
    "Gather": {1}, "GatherElements": {1}, "GatherND": {1}, "ReduceSum": {1}, "ReduceMean": {1}, "ReduceMax": {1},
    "ReduceMin": {1}, "ReduceProd": {1}, "ReduceL2": {1}, "CumSum": {1},
}
#: Elementwise ops: a metadata operand broadcasts against the activations along their axes.
ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "And", "Or", "Xor", "Equal", "Less", "LessOrEqual",
    "Greater", "GreaterOrEqual", "Mod", "BitShift",
}

#: Canonical ops (ai.infercc) whose listed inputs are added elementwise (residual + skip).
CANONICAL_ELEMENTWISE = {"SkipLayerNorm": {0, 1}, "SkipRMSNorm": {0, 1}}


class Refusal(Exception):
    """The graph cannot take a cache; the message says why, for the diagnostics."""


@dataclasses.dataclass(frozen=True)
class Sink:
    """A metadata value read by an activation op: ``node.inputs[index]``. ``axis`` is the value's
    sequence (query) axis, None when the slot reads a shape or index (kept per new token)."""

    node: Node
    index: int
    kind: str  # "shape", "mask", "rotary", "positional"
    axis: int | None


class SequenceWorld:
    """The token/metadata split of one graph (read-only analysis)."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.oracle = DimOracle()
        inputs = {v.name: v for v in graph.inputs}
        self.ids = inputs[IDS_NAME]
        self.mask = inputs.get(MASK_NAME)
        self.positions = inputs.get(POSITIONS_NAME)
        self.token_inputs = [v for v in graph.inputs if v.name not in (MASK_NAME, POSITIONS_NAME) and v.const is None]
        self.acts = _activations(graph, self.token_inputs)

    def is_act(self, value: Value) -> bool:
        return id(value) in self.acts

    def seq_axis(self, value: Value, axis: int) -> bool:
        """Whether dim ``axis`` of ``value`` (a token-world value) is the number of tokens: True,
        False (a static size or the batch), or Refusal when it cannot be told."""
        dim = value.shape[axis] if value.shape is not None else None
        if isinstance(dim, int):
            return False
        if self.oracle.same(value, axis, self.ids, 1):
            return True
        if self.oracle.same(value, axis, self.ids, 0):
            return False
        ids = self.ids.shape or (None, None)
        if isinstance(dim, str) and dim in ids:
            return dim == ids[1]
        raise Refusal(f"cannot tell whether dim {axis} of %{value.name} is the sequence length")

    def act_seq_axis(self, value: Value) -> int | None:
        """The sequence axis of an activation, None when it has none (or its rank is unknown)."""
        if value.shape is None:
            return None
        for axis in range(len(value.shape)):
            try:
                if self.seq_axis(value, axis):
                    return axis
            except Refusal:
                continue
        return None

    def depends_on_sequence(self, value: Value) -> bool:
        """Whether a metadata value reads a graph input or an activation (even only its shape):
        constants and values computed from constants alone do not."""
        seen: set[int] = set()
        stack = [value]
        while stack:
            v = stack.pop()
            if id(v) in seen or v.is_const:
                continue
            seen.add(id(v))
            if v.is_graph_input or self.is_act(v):
                return True
            node = v.producer
            if node is not None:
                stack.extend(x for x in node.inputs if x is not None)
                stack.extend(node.outer_inputs())
        return False

    def sinks(self) -> list[Sink]:
        """Every metadata value an activation op reads, classified (Refusal for one that is not
        understood)."""
        found = []
        for node in self.graph.nodes:
            if not any(self.is_act(o) for o in node.outputs):
                continue
            for index, x in enumerate(node.inputs):
                if x is None or self.is_act(x) or not self.depends_on_sequence(x):
                    continue
                found.append(self._classify(node, index, x))
        return found

    def _classify(self, node: Node, index: int, x: Value) -> Sink:
        op = node.op_type
        if node.domain == DOMAIN and op == "Attention" and index == 3:
            return Sink(node, index, "mask", 2)
        if node.domain == DOMAIN and op == "RotaryEmbedding" and index in (1, 2):
            return Sink(node, index, "rotary", 1)
        if not node.domain and index in (SHAPE_SLOTS.get(op) or set()):
            return Sink(node, index, "shape", None)
        elementwise = index in CANONICAL_ELEMENTWISE.get(op, set()) if node.domain == DOMAIN else (
            not node.domain and (op in ELEMENTWISE or op == "Concat"))
        if elementwise:
            return Sink(node, index, "positional", self._broadcast_axis(node, x))
        raise Refusal(f"%{x.name}, computed from the sequence, is read by {op} {node.name!r} in a way the cache "
                      "insertion does not model")

    def _broadcast_axis(self, node: Node, x: Value) -> int | None:
        """x's axis aligned (numpy broadcasting) with an activation operand's sequence axis."""
        if x.shape is None:
            raise Refusal(f"the rank of %{x.name} is unknown, so its sequence axis cannot be found")
        for other in node.inputs:
            if other is None or not self.is_act(other):
                continue
            axis = self.act_seq_axis(other)
            if axis is None or other.shape is None:
                continue
            if node.op_type == "Concat" and (node.attr("axis") or 0) % len(other.shape) == axis:
                raise Refusal(f"{node.name!r} concatenates %{x.name} with activations along the sequence")
            mine = axis - (len(other.shape) - len(x.shape))
            return mine if mine >= 0 else None
        raise Refusal(f"no activation read by {node.op_type} {node.name!r} has a known sequence axis")


def _activations(graph: Graph, sources: list[Value]) -> set[int]:
    """Ids of the values computed from the token data (data edges; Shape/Size end the chain)."""
    acts = {id(v) for v in sources}
    for node in graph.nodes:
        if node.op_type in ("Shape", "Size") and not node.domain:
            continue
        reads = [x for x in node.inputs if x is not None] + node.outer_inputs()
        if any(id(x) in acts for x in reads):
            acts.update(id(o) for o in node.outputs)
    return acts
