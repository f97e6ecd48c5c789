"""The LLaMA-family causal LM graph (LLaMA, Mistral, Qwen2, SmolLM and GGUF ``llama``): embedding,
pre-norm blocks of RMSNorm -> GQA attention with half-rotated RoPE -> RMSNorm -> SwiGLU MLP,
final RMSNorm and LM head. Weights come in with Hugging Face names and layouts (linear weights
[out, in]); the importers translate their checkpoints to that.

RoPE is the HF "rotate_half" form: the head dim is split in two halves that rotate together. GGUF
stores Q/K rows permuted for llama.cpp's interleaved-pair rotation; its importer undoes that
permutation, which makes the two forms compute the same attention.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from ..ir import Model, Value
from .checks import Expected, check_optional, check_shapes, require
from .graph_parts import (
    GraphBuilder,
    attention,
    attention_bias,
    finish,
    position_ids,
    repeat_kv,
    split_heads,
    text_inputs,
    tied_lm_head,
)

#: name -> float32 array in HF layout, or None when the checkpoint has no such tensor (biases).
WeightSource = Callable[[str], "np.ndarray | None"]


@dataclasses.dataclass(frozen=True)
class LlamaSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    #: Per layer: attention window (Mistral/Qwen2 sliding window) or None for full causal.
    sliding_windows: tuple[int | None, ...] = ()


def check_llama(spec: LlamaSpec, shapes: dict[str, tuple[int, ...]], source: str, keys: dict[str, str],
                tensor_name: Callable[[str], str] = lambda name: name) -> None:
    """``spec`` against itself and the tensor shapes (HF names, HF layouts) before anything is
    built; ``keys`` names each spec field as the file does. The layer count must already agree with
    the tensors (``checks.check_layer_count``): this walks every layer."""
    k = {**{f: f for f in dataclasses.asdict(spec)}, **keys}
    require(spec.num_heads % spec.num_kv_heads == 0, source,
            f"{k['num_heads']} {spec.num_heads} is not a multiple of {k['num_kv_heads']} {spec.num_kv_heads}")
    require(spec.head_dim % 2 == 0, source,
            f"the head size {spec.head_dim} ({k['head_dim']}) is odd; rotary embeddings rotate pairs of channels")
    require(len(spec.sliding_windows) in (0, spec.num_layers), source,
            f"{len(spec.sliding_windows)} per-layer attention types for {spec.num_layers} layers ({k['num_layers']})")
    check_shapes(llama_shapes(spec), shapes, source, dataclasses.asdict(spec), k, tensor_name)
    rows = {"q": spec.num_heads * spec.head_dim, "k": spec.num_kv_heads * spec.head_dim,
            "v": spec.num_kv_heads * spec.head_dim, "o": spec.hidden_size}
    for i in range(spec.num_layers):
        for proj, size in rows.items():
            check_optional(f"model.layers.{i}.self_attn.{proj}_proj.bias", (size,), shapes, source, tensor_name)


def llama_shapes(spec: LlamaSpec) -> Expected:
    """Required tensors (HF names) -> (shape in HF layout, the spec fields that determine it)."""
    hidden, vocab, ffn = spec.hidden_size, spec.vocab_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    h, qf, kvf, ff = ("hidden_size",), ("num_heads", "head_dim"), ("num_kv_heads", "head_dim"), ("intermediate_size",)
    out: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {
        "model.embed_tokens.weight": ((vocab, hidden), ("vocab_size", *h)), "model.norm.weight": ((hidden,), h)}
    if not spec.tie_word_embeddings:
        out["lm_head.weight"] = ((vocab, hidden), ("vocab_size", *h))
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        out.update({
            f"{p}.input_layernorm.weight": ((hidden,), h), f"{p}.post_attention_layernorm.weight": ((hidden,), h),
            f"{p}.self_attn.q_proj.weight": ((q, hidden), (*qf, *h)),
            f"{p}.self_attn.k_proj.weight": ((kv, hidden), (*kvf, *h)),
            f"{p}.self_attn.v_proj.weight": ((kv, hidden), (*kvf, *h)),
            f"{p}.self_attn.o_proj.weight": ((hidden, q), (*h, *qf)),
            f"{p}.mlp.gate_proj.weight": ((ffn, hidden), (*ff, *h)), f"{p}.mlp.up_proj.weight": ((ffn, hidden), (*ff, *h)),
            f"{p}.mlp.down_proj.weight": ((hidden, ffn), (*h, *ff)),
        })
    return out


def build_llama(spec: LlamaSpec, weight: WeightSource, metadata: dict[str, str]) -> Model:
    """input_ids [batch, sequence] (+ optional attention_mask) -> logits [batch, sequence, vocab]."""
    b = GraphBuilder("llama")
    ids, mask = text_inputs(b)

    def w(name: str) -> Value:
        return b.weight(name, _required(weight, name))

    def linear(x: Value, name: str) -> Value:
        matrix = b.weight(f"{name}.weight", _required(weight, f"{name}.weight").T)
        bias = weight(f"{name}.bias")
        return b.linear(x, matrix, b.weight(f"{name}.bias", bias) if bias is not None else None)

    table = b.weight("model.embed_tokens.weight", _required(weight, "model.embed_tokens.weight"))
    hidden = b.op("Gather", table, ids, axis=0)
    cos, sin = _rotary_tables(b, position_ids(b, mask), spec)
    biases: dict[int | None, Value] = {}
    windows = spec.sliding_windows or (None,) * spec.num_layers
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        if windows[i] not in biases:
            biases[windows[i]] = attention_bias(b, mask, windows[i])
        x = _rms_norm(b, hidden, w(f"{p}.input_layernorm.weight"), spec.rms_norm_eps)
        q = _rotate(b, split_heads(b, linear(x, f"{p}.self_attn.q_proj"), spec.num_heads, spec.head_dim), cos, sin, spec.head_dim)
        k = _rotate(b, split_heads(b, linear(x, f"{p}.self_attn.k_proj"), spec.num_kv_heads, spec.head_dim), cos, sin, spec.head_dim)
        v = split_heads(b, linear(x, f"{p}.self_attn.v_proj"), spec.num_kv_heads, spec.head_dim)
        repeats = spec.num_heads // spec.num_kv_heads
        k = repeat_kv(b, k, spec.num_kv_heads, repeats, spec.head_dim)
        v = repeat_kv(b, v, spec.num_kv_heads, repeats, spec.head_dim)
        context = attention(b, q, k, v, biases[windows[i]], spec.num_heads, spec.head_dim)
        hidden = b.op("Add", hidden, linear(context, f"{p}.self_attn.o_proj"))
        x = _rms_norm(b, hidden, w(f"{p}.post_attention_layernorm.weight"), spec.rms_norm_eps)
        gate = linear(x, f"{p}.mlp.gate_proj")
        swiglu = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), linear(x, f"{p}.mlp.up_proj"))
        hidden = b.op("Add", hidden, linear(swiglu, f"{p}.mlp.down_proj"))
    hidden = _rms_norm(b, hidden, w("model.norm.weight"), spec.rms_norm_eps)
    if spec.tie_word_embeddings:
        logits = tied_lm_head(b, hidden, table, ids)
    else:
        logits = b.op("MatMul", hidden, b.weight("lm_head.weight", _required(weight, "lm_head.weight").T), out="logits")
    return finish(b, logits, spec.vocab_size, metadata)


def _required(weight: WeightSource, name: str) -> np.ndarray:
    array = weight(name)
    if array is None:
        from ..errors import ModelLoadError

        raise ModelLoadError(f"checkpoint has no tensor {name!r}: the file is incomplete or not a LLaMA-family model")
    return array


def _rms_norm(b: GraphBuilder, x: Value, gamma: Value, eps: float) -> Value:
    """x / sqrt(mean(x^2) + eps) * gamma, decomposed as the exporters write it."""
    mean = b.op("ReduceMean", b.op("Pow", x, b.scalar(2.0)), b.ints(-1), keepdims=1)
    inverse = b.op("Reciprocal", b.op("Sqrt", b.op("Add", mean, b.scalar(eps))))
    return b.op("Mul", gamma, b.op("Mul", x, inverse))


def _rotary_tables(b: GraphBuilder, positions: Value, spec: LlamaSpec) -> tuple[Value, Value]:
    """cos/sin [batch, 1, sequence, head_dim] computed in-graph from the position ids, exactly as
    HF's rotary embedding does (float32 positions times inverse frequencies, both halves equal)."""
    exponents = np.arange(0, spec.head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(spec.head_dim)
    inv_freq = (1.0 / (np.float32(spec.rope_theta) ** exponents)).astype(np.float32)
    pos = b.op("Unsqueeze", b.op("Cast", positions, to=1), b.ints(-1))  # [b, s, 1]
    freqs = b.op("Mul", pos, b.const(inv_freq, np.float32, "rope_inv_freq"))
    angles = b.op("Concat", freqs, freqs, axis=-1)
    cos = b.op("Unsqueeze", b.op("Cos", angles), b.ints(1), out="rope_cos")
    sin = b.op("Unsqueeze", b.op("Sin", angles), b.ints(1), out="rope_sin")
    return cos, sin


def _rotate(b: GraphBuilder, x: Value, cos: Value, sin: Value, head_dim: int) -> Value:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = concat(-x2, x1)."""
    half = head_dim // 2
    first = b.op("Slice", x, b.ints(0), b.ints(half), b.ints(-1))
    second = b.op("Slice", x, b.ints(half), b.ints(head_dim), b.ints(-1))
    rotated = b.op("Concat", b.op("Neg", second), first, axis=-1)
    return b.op("Add", b.op("Mul", x, cos), b.op("Mul", rotated, sin))
