"""The GPT-2 causal LM graph: token + learned position embeddings, pre-LayerNorm blocks of fused
QKV attention and a GELU MLP, final LayerNorm and an LM head tied to the token embedding.

Weights come with HF GPT-2 names minus the ``transformer.`` prefix (``wte.weight``,
``h.0.attn.c_attn.weight``...). GPT-2's Conv1D weights are already stored [in, out], the layout
MatMul wants, so none of them is transposed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from ..errors import ModelLoadError
from ..ir import Model, Value
from .checks import Expected
from .graph_parts import (
    GraphBuilder,
    attention,
    attention_bias,
    finish,
    position_ids,
    split_heads,
    text_inputs,
    tied_lm_head,
)

#: name -> float32 array, or None when absent.
WeightSource = Callable[[str], "np.ndarray | None"]
#: HF activation names we emit, by formula.
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu")


@dataclasses.dataclass(frozen=True)
class Gpt2Spec:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"
    #: GPT-2's optional extra 1/(layer+1) attention scaling.
    scale_by_inverse_layer: bool = False


def gpt2_shapes(spec: Gpt2Spec, inner: int, positions: int) -> Expected:
    """Required tensors (names without ``transformer.``) -> (shape, the fields that determine it);
    ``inner`` is the MLP width, ``positions`` the rows of the learned position table."""
    n, h, i = spec.hidden_size, ("hidden_size",), ("inner",)
    out: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {
        "wte.weight": ((spec.vocab_size, n), ("vocab_size", *h)), "wpe.weight": ((positions, n), ("positions", *h)),
        "ln_f.weight": ((n,), h), "ln_f.bias": ((n,), h)}
    for layer in range(spec.num_layers):
        p = f"h.{layer}"
        out.update({
            f"{p}.ln_1.weight": ((n,), h), f"{p}.ln_1.bias": ((n,), h), f"{p}.ln_2.weight": ((n,), h),
            f"{p}.ln_2.bias": ((n,), h), f"{p}.attn.c_attn.weight": ((n, 3 * n), h),
            f"{p}.attn.c_attn.bias": ((3 * n,), h), f"{p}.attn.c_proj.weight": ((n, n), h),
            f"{p}.attn.c_proj.bias": ((n,), h), f"{p}.mlp.c_fc.weight": ((n, inner), (*h, *i)),
            f"{p}.mlp.c_fc.bias": ((inner,), i), f"{p}.mlp.c_proj.weight": ((inner, n), (*i, *h)),
            f"{p}.mlp.c_proj.bias": ((n,), h),
        })
    return out


def build_gpt2(spec: Gpt2Spec, weight: WeightSource, metadata: dict[str, str]) -> Model:
    """input_ids [batch, sequence] (+ optional attention_mask) -> logits [batch, sequence, vocab]."""
    if spec.activation not in ACTIVATIONS:
        raise ModelLoadError(
            f"GPT-2 activation_function {spec.activation!r} is not supported (supported: {list(ACTIVATIONS)}); "
            "use a checkpoint with a GELU activation."
        )
    b = GraphBuilder("gpt2")
    ids, mask = text_inputs(b)

    def w(name: str) -> Value:
        array = weight(name)
        if array is None:
            raise ModelLoadError(f"checkpoint has no tensor {name!r}: the file is incomplete or not a GPT-2 model")
        return b.weight(name, array)

    heads, hidden_size = spec.num_heads, spec.hidden_size
    head_dim = hidden_size // heads
    wte = w("wte.weight")
    hidden = b.op("Add", b.op("Gather", wte, ids, axis=0), b.op("Gather", w("wpe.weight"), position_ids(b, mask), axis=0))
    bias = attention_bias(b, mask)
    for i in range(spec.num_layers):
        p = f"h.{i}"
        x = _layer_norm(b, hidden, w(f"{p}.ln_1.weight"), w(f"{p}.ln_1.bias"), spec.layer_norm_eps)
        qkv = b.linear(x, w(f"{p}.attn.c_attn.weight"), w(f"{p}.attn.c_attn.bias"))
        parts = b.graph.make_node("Split", [qkv, b.ints(hidden_size, hidden_size, hidden_size)], num_outputs=3, attrs={"axis": -1}).outputs
        q, k, v = (split_heads(b, part, heads, head_dim) for part in parts)
        if spec.scale_by_inverse_layer:
            q = b.op("Mul", q, b.scalar(1.0 / (i + 1)))
        context = attention(b, q, k, v, bias, heads, head_dim)
        hidden = b.op("Add", hidden, b.linear(context, w(f"{p}.attn.c_proj.weight"), w(f"{p}.attn.c_proj.bias")))
        x = _layer_norm(b, hidden, w(f"{p}.ln_2.weight"), w(f"{p}.ln_2.bias"), spec.layer_norm_eps)
        up = _gelu(b, b.linear(x, w(f"{p}.mlp.c_fc.weight"), w(f"{p}.mlp.c_fc.bias")), spec.activation)
        hidden = b.op("Add", hidden, b.linear(up, w(f"{p}.mlp.c_proj.weight"), w(f"{p}.mlp.c_proj.bias")))
    hidden = _layer_norm(b, hidden, w("ln_f.weight"), w("ln_f.bias"), spec.layer_norm_eps)
    head = weight("lm_head.weight")
    if head is None:
        logits = tied_lm_head(b, hidden, wte, ids)
    else:
        logits = b.op("MatMul", hidden, b.weight("lm_head.weight", head.T), out="logits")
    return finish(b, logits, spec.vocab_size, metadata)


def _layer_norm(b: GraphBuilder, x: Value, gamma: Value, beta: Value, eps: float) -> Value:
    return b.op("LayerNormalization", x, gamma, beta, axis=-1, epsilon=eps)


def _gelu(b: GraphBuilder, x: Value, activation: str) -> Value:
    """GELU decomposed as exporters write it: erf form for "gelu", tanh approximation otherwise."""
    half_x = b.op("Mul", x, b.scalar(0.5))
    if activation == "gelu":
        erf = b.op("Erf", b.op("Mul", x, b.scalar(2 ** -0.5)))
        return b.op("Mul", half_x, b.op("Add", erf, b.scalar(1.0)))
    cubic = b.op("Mul", b.op("Pow", x, b.scalar(3.0)), b.scalar(0.044715))
    inner = b.op("Mul", b.op("Add", x, cubic), b.scalar(float(np.sqrt(2.0 / np.pi))))
    return b.op("Mul", half_x, b.op("Add", b.op("Tanh", inner), b.scalar(1.0)))
