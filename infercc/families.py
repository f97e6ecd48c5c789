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
    family = "unknown"
    for key, fam in (
        ("wte", "gpt2"), ("transformer.h.", "gpt2"), ("gpt_neox", "gpt_neox"), ("embed_in", "gpt_neox"),
        ("qwen", "qwen2"), ("mistral", "mistral"), ("phi", "phi"), ("bert", "bert"), ("encoder.layer", "bert"),
        ("llama", "llama"), ("model.layers.", "llama"), ("embed_tokens", "llama"),
    ):
        if key in names:
            family = fam
            break
    return {"kind": kind, "family": family, "attention_layers": layers}
