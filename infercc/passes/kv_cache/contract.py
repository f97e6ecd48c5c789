"""The cached-graph contract and which graphs can follow it.

Contract (what the runtime's sessions build on; ONNX Runtime GenAI / Hugging Face conventions):

* inputs: ``input_ids`` [batch, sequence] int64 (the new tokens); ``attention_mask`` [batch,
  total_sequence] int64, 1 for real tokens and 0 for padding over past + new tokens (added when the
  source had none: it then only gives the total length, and must be all ones); per layer i
  ``past_key_values.{i}.key`` / ``.value`` [batch, kv_heads, past_sequence, head_size]; any other
  input of the source (``position_ids``, ``token_type_ids``) with its meaning for the new tokens;
* outputs: ``logits`` [batch, sequence, vocab] and per layer ``present.{i}.key`` / ``.value``
  [batch, kv_heads, total_sequence, head_size] (past + new);
* int8 caches add ``past_key_values.{i}.key_scale`` / ``value_scale`` inputs and ``present.{i}.
  key_scale`` / ``value_scale`` outputs [batch, kv_heads, length, 1] (see ``precision``).

A first call passes empty pasts (past_sequence = 0) and the prompt; later calls pass the presents
back as pasts. Padding is on the left, as every row shares one past length.
"""

from __future__ import annotations

from ...ir import DType, Graph, Node
from ..canonical import DOMAIN
from .sequence import IDS_NAME, SequenceWorld

BATCH_DIM, SEQ_DIM = "batch", "sequence"
PAST_DIM, TOTAL_DIM = "past_sequence", "total_sequence"
LOGITS = "logits"
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."


def past_name(layer: int, what: str) -> str:
    return f"{PAST_PREFIX}{layer}.{what}"


def present_name(layer: int, what: str) -> str:
    return f"{PRESENT_PREFIX}{layer}.{what}"


def attention_nodes(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if n.domain == DOMAIN and n.op_type == "Attention"]


def already_cached(graph: Graph) -> str | None:
    """Why the graph already has a cache (inputs or outputs named like one, or attention reading
    one), else None."""
    for v in graph.inputs:
        if v.name.startswith(("past_key_values", "past_key", "past_value", "past.")) or v.name == "past":
            return f"the model already takes a cache (input {v.name!r})"
    for v in graph.outputs:
        if v.name.startswith("present"):
            return f"the model already returns a cache (output {v.name!r})"
    for node in attention_nodes(graph):
        if len(node.inputs) > 4 and any(x is not None for x in node.inputs[4:]):
            return f"attention {node.name!r} already reads a past"
    return None


def not_a_causal_lm(graph: Graph) -> str | None:
    """Why the graph is not an uncached causal LM (input_ids [batch, seq] -> logits), else None."""
    inputs = {v.name: v for v in graph.inputs}
    ids = inputs.get(IDS_NAME)
    if ids is None or ids.const is not None:
        return f"the model has no {IDS_NAME!r} input, so it is not a text LM this pass knows"
    if ids.dtype not in (DType.INT64, DType.INT32) or ids.shape is None or len(ids.shape) != 2:
        return f"{IDS_NAME!r} is not a [batch, sequence] integer tensor ({ids!r})"
    if isinstance(ids.shape[1], int):
        return f"the sequence length of {IDS_NAME!r} is fixed at {ids.shape[1]}: the export has no dynamic length"
    if not attention_nodes(graph):
        return "the model has no fused attention (ai.infercc::Attention), so there is nothing to cache"
    return None


def layer_problem(node: Node, world: SequenceWorld) -> str | None:
    """Why this attention cannot be cached, else None."""
    q, k, v = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    if not int(node.attr("causal", 0)) and mask is None:
        return ("bidirectional attention (causal=0): every token sees later ones, so earlier tokens' keys and "
                "values change as the sequence grows (an encoder, not a causal LM)")
    if not int(node.attr("causal", 0)):
        return (f"no causal triangle was recognised in its mask %{mask.name} (see attention_fusion's mask "
                "description), so tokens may see later ones: bidirectional attention (an encoder) or a mask form "
                "the fusion does not know")
    for x, name in ((q, "query"), (k, "key"), (v, "value")):
        if not world.is_act(x):
            return f"its {name} is not computed from the tokens"
    if mask is not None and world.is_act(mask):
        return (f"its mask %{mask.name} is computed from the token values (input_ids), which the cached graph "
                "only has for the new tokens")
    if not world.oracle.same(q, 1, k, 1):
        return "its keys do not provably come from the same tokens as its queries (cross-attention?)"
    return None


def unfused_attention(graph: Graph, world: SequenceWorld) -> list[Node]:
    """Softmax nodes over activations along a dynamic axis: attention the fusion left unfused,
    which would need a cache of its own."""
    found = []
    for node in graph.nodes:
        if node.op_type != "Softmax" or node.domain or not world.is_act(node.inputs[0]):
            continue
        x = node.inputs[0]
        axis = node.attr("axis", -1)
        if x.shape is None or not isinstance(x.shape[axis % len(x.shape)], int):
            found.append(node)
    return found


#: Ops that combine the tokens of a sequence whatever their attributes (recurrences, convolutions).
_MIXING = {"CumSum", "Conv", "ConvTranspose", "LSTM", "GRU", "RNN", "Scan", "Loop"}
#: Ops that combine the tokens along the axes they are given.
_REDUCING = {"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceLogSumExp",
             "Softmax", "LogSoftmax", "ArgMax", "ArgMin", "TopK", "Hardmax"}


def sequence_mixing(graph: Graph, world: SequenceWorld) -> str | None:
    """Why an op outside the attention combines activations of different tokens (then earlier
    tokens' results would depend on later ones, or the new tokens on the past's activations, which
    the cache does not keep), else None. Attention itself is the canonical op; unfused attention
    is reported by ``unfused_attention``."""
    for node in graph.nodes:
        if node.domain or not node.inputs or node.inputs[0] is None or not world.is_act(node.inputs[0]):
            continue
        if node.op_type in _MIXING:
            return f"{node.op_type} {node.name!r} combines the tokens of the sequence outside attention"
        if node.op_type in _REDUCING:
            x = node.inputs[0]
            seq = world.act_seq_axis(x)
            axes = _axes(node, x)
            if seq is not None and axes is not None and seq in axes:
                return f"{node.op_type} {node.name!r} reduces activations along the sequence axis"
    return None


def _axes(node: Node, x) -> set[int] | None:
    from ..fusion.dims import ints

    rank = len(x.shape) if x.shape is not None else None
    if rank is None:
        return None
    if node.op_type in ("Softmax", "LogSoftmax", "Hardmax", "ArgMax", "ArgMin", "TopK"):
        default = -1 if node.op_type in ("Softmax", "LogSoftmax", "Hardmax", "TopK") else 0
        return {node.attr("axis", default) % rank}
    axes = node.attr("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = ints(node.inputs[1])
    if axes is None or not axes:
        return set(range(rank)) if not node.attr("noop_with_empty_axes", 0) else set()
    return {a % rank for a in axes}


def no_logits(graph: Graph) -> str | None:
    if any(v.name == LOGITS for v in graph.outputs):
        return None
    return f"the model has no {LOGITS!r} output (outputs: {[v.name for v in graph.outputs]})"


def non_token_outputs(graph: Graph, world: SequenceWorld) -> list[str]:
    """Outputs not computed from the tokens (a mask or positions returned as they are)."""
    return [v.name for v in graph.outputs if not world.is_act(v)]
