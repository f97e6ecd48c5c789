"""Model-family detection from graph structure and metadata, for reports and defaults.

Only semantics are used (what ops compute, names exporters keep), never one exporter's layout.
"""

from __future__ import annotations

from .ir import Model


def detect_family(model: Model) -> dict[str, object]:
    """A best guess: kind (decoder/encoder/unknown), likely family, and layer count."""
    graph = model.graph
    hist = graph.op_histogram()
    names = " ".join(list(graph.initializers) + [v.name for v in graph.inputs] + [v.name for v in graph.outputs]).lower()
    softmax = hist.get("Softmax", 0)
    attention_ops = sum(n for op, n in hist.items() if op.split("::")[-1] in (
        "Attention", "MultiHeadAttention", "GroupQueryAttention", "CanonicalAttention"))
    layers = softmax + attention_ops
    causal = any(op.endswith(k) for op in hist for k in ("Trilu",)) or "logits" in names or any(
        k in hist for k in ("LessOrEqual", "Less")) and "logits" in names
    kind = "decoder" if causal or "logits" in names else ("encoder" if layers else "unknown")
    paths = " ".join([names] + [n.name.replace("/", ".").lower() for n in graph.nodes])
    family = next((fam for fam, markers in _MARKERS if all(m in paths for m in markers)), "unknown")
    return {"kind": kind, "family": family, "attention_layers": layers}


#: (family, substrings that must all occur in the weight, input/output or node names, lowercased,
#: "/" read as "."): module paths survive both exporters (as initializer names with dynamo, as
#: node names with TorchScript). Most specific first: several families share "transformer.h.".
_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("deberta", ("deberta",)), ("distilbert", ("q_lin",)), ("roberta", ("roberta",)), ("electra", ("electra",)),
    ("bert", ("encoder.layer",)), ("bert", ("bert",)),
    ("gpt_neox", ("gpt_neox",)), ("gpt_neox", ("embed_in",)),
    ("mpt", ("transformer.blocks.",)), ("bloom", ("word_embeddings_layernorm",)),
    ("falcon", ("self_attention.query_key_value",)), ("opt", ("decoder.layers.", "fc1")),
    ("codegen", ("transformer.h.", "qkv_proj")), ("gptj", ("transformer.h.", "attn.q_proj")),
    ("gpt2", ("wte",)), ("gpt2", ("transformer.h.",)),
    ("phi3", ("gate_up_proj",)), ("qwen2", ("qwen",)), ("mistral", ("mistral",)), ("phi", ("phi",)),
    ("llama", ("llama",)), ("llama", ("model.layers.",)), ("llama", ("embed_tokens",)),
)
