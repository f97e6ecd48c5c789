"""``logits_to_keep``: a cached graph computes the LM head only for the positions asked for.

Generation needs the logits of a prompt's last position only, yet the graph projects every
position onto the vocabulary: on a 100M-parameter LLaMA with 32k tokens that LM head is 13-22% of
a 128-token prefill. The cached-graph contract therefore takes an optional int64 scalar input
``logits_to_keep`` (Hugging Face's name and meaning): ``n > 0`` returns the logits of the last n
positions, ``0`` (the default, what a caller that does not feed it gets) all of them. The graph
slices the hidden state along the sequence axis right before the per-position tail that ends in
``logits`` (final norm, LM head, its bias, a softcap), so nothing before it changes.
"""

from __future__ import annotations

import numpy as np

from ...ir import DType, Graph, Node, Tensor, Value
from ..canonical import DOMAIN
from ..rewrite import Builder
from ..rewrite.matcher import const_value
from .contract import LOGITS
from .sequence import SequenceWorld

INPUT = "logits_to_keep"
#: The sliced sequence length: a new symbol (the output's dim 1 is then n, or the sequence when 0).
KEPT_DIM = "kept_sequence"
INT64_MAX = np.iinfo(np.int64).max
#: Ops applied to each position on its own (their other inputs constant): the tail may hold them.
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Tanh", "Cast", "Identity", "Softcap", "Relu", "Sigmoid"}
_PER_POSITION_CANONICAL = {"RMSNorm", "LayerNorm", "MatMulQuant"}


def add_logits_to_keep(graph: Graph, world: SequenceWorld) -> str:
    """Insert the input and the slice; returns what was done, or why not (the graph unchanged)."""
    logits = next((v for v in graph.outputs if v.name == LOGITS), None)
    if logits is None or logits.producer is None:
        return "no logits output computed by a node"
    if any(v.name == INPUT for v in graph.inputs):
        return f"the model already takes {INPUT!r}"
    tail, unflatten = _tail(logits, world)
    if not tail:
        return "the logits are not computed position by position from one hidden state"
    first, index = tail[0]
    hidden = first.inputs[index]
    keep = graph.add_input(INPUT, DType.INT64, ())
    keep.const = Tensor(np.asarray(0, np.int64))
    graph.initializers[keep.name] = keep
    op = Builder(graph, first, "logits_to_keep")
    start = op.Neg(op.Reshape(keep, op.const(np.asarray([1], np.int64), hint="one_dim")))
    sliced = op.Slice(hidden, start, op.const(np.asarray([INT64_MAX], np.int64), hint="end"),
                      op.const(np.asarray([1], np.int64), hint="axis"))
    sliced.dtype = hidden.dtype
    sliced.shape = (hidden.shape[0], KEPT_DIM, *hidden.shape[2:])
    first.set_input(index, sliced)
    for node, _ in tail:  # the tail's [batch, sequence, ...] values now span the kept positions
        out = node.outputs[0]
        if out.shape is not None and len(out.shape) >= 3:
            out.shape = (out.shape[0], KEPT_DIM, *out.shape[2:])
    if unflatten is not None:  # rows back to [batch, kept, ...]: the kept positions' leading dims
        rows = unflatten.inputs[0]
        at = Builder(graph, unflatten, "logits_to_keep")
        unflatten.set_input(1, at.Concat(at.Shape(sliced, end=-1), at.Shape(rows, start=-1), axis=0))
        out = unflatten.outputs[0]
        out.shape = None if out.shape is None else (out.shape[0], KEPT_DIM, *out.shape[2:])
    graph.sort()
    return f"the LM head ({first.op_type} {first.name!r} onwards) computes only the last {INPUT} positions"


def _tail(logits: Value, world: SequenceWorld) -> tuple[list[tuple[Node, int]], Node | None]:
    """The chain of (node, index of its activation input) that ends in ``logits``, first node
    first: every node per position, each value in it read only by the next, and the chain's input
    a [batch, sequence, ...] activation; empty when there is none. A head that works on rows
    (an importer's Reshape to [batch*sequence, hidden] -> Gemm -> Reshape back) is followed too:
    the Reshape back is returned separately, its target shape is rebuilt from the sliced value."""
    chain: list[tuple[Node, int]] = []
    node = logits.producer
    unflatten = None
    if _is_reshape(node) and _rank(node.inputs[0]) == 2 and len(node.inputs[0].uses) == 1 and _rank(logits) == 3:
        unflatten, node = node, node.inputs[0].producer
    flatten_at = None
    while node is not None:
        if unflatten is not None and flatten_at is None and _flattens(node):
            index = 0
            flatten_at = len(chain)
        elif (index := _per_position(node, world)) is None:
            break
        chain.append((node, index))
        x = node.inputs[index]
        if x.producer is None or len(x.uses) != 1 or x.is_graph_output:
            break
        node = x.producer
    while chain:  # the slice goes where the sequence is axis 1 of a [batch, sequence, ...] value
        if unflatten is not None and (flatten_at is None or len(chain) <= flatten_at):
            return [], None
        first, index = chain[-1]
        x = first.inputs[index]
        if x.shape is not None and len(x.shape) >= 3 and world.act_seq_axis(x) == 1:
            return chain[::-1], unflatten
        chain.pop()
    return [], None


def _rank(value: Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def _is_reshape(node: Node | None) -> bool:
    return node is not None and node.op_type == "Reshape" and not node.domain and len(node.inputs) >= 2


def _flattens(node: Node) -> bool:
    """A Reshape of [batch, sequence, hidden] to [rows, hidden] by a constant shape."""
    if not _is_reshape(node):
        return False
    x, shape = node.inputs[0], const_value(node.inputs[1])
    if shape is None or shape.shape != (2,) or _rank(x) != 3 or node.attr("allowzero", 0):
        return False
    return int(shape[0]) == -1 and isinstance(x.shape[-1], int) and int(shape[1]) == x.shape[-1]


def _per_position(node: Node, world: SequenceWorld) -> int | None:
    """The index of the node's one activation input when it maps each position alone (the other
    inputs weights: constants, or computed from constants only, as a tied head's transposed
    embedding); None otherwise."""
    if len(node.outputs) != 1:
        return None
    if node.domain == DOMAIN:
        if node.op_type not in _PER_POSITION_CANONICAL:
            return None
    elif node.domain or node.op_type not in _ELEMENTWISE | {"MatMul", "Gemm"}:
        return None
    acts = [i for i, v in enumerate(node.inputs) if v is not None and (world.is_act(v) or v.is_graph_input)]
    if len(acts) != 1:
        return None
    index = acts[0]
    if node.op_type in ("MatMul", "Gemm", "MatMulQuant") or node.domain == DOMAIN:
        return index if index == 0 and node.attr("transA", 0) == 0 else None
    rest = [v for i, v in enumerate(node.inputs) if v is not None and i != index]
    return index if all(_broadcasts_per_position(v) for v in rest) else None


def _broadcasts_per_position(v: Value) -> bool:
    """A weight that does not vary along the sequence axis: rank < 2, or rank 3 with dim 1 of
    size 1 (right-aligned against a [batch, sequence, ...] activation)."""
    shape = v.shape
    return shape is not None and (len(shape) < 2 or (len(shape) == 3 and shape[1] == 1))
