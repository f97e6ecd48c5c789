"""Import a GGUF file (llama.cpp's format) of the ``llama`` architecture into the IR.

Tensors are dequantized to float32 and renamed to HF names so the shared LLaMA builder makes
the graph. RoPE: llama.cpp rotates interleaved pairs (2i, 2i+1) of each head, and its converter
permutes HF's Q/K rows to match; we apply the inverse permutation to Q and K (rows only, so
quantization blocks, which run along the input dimension, are unaffected) and use HF's
half-rotation (i, i + d/2) in the graph. Both forms compute the same q.k products, so the model
is unchanged and one rotary form (the one the fusion passes expect) serves every importer.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelLoadError
from ..ir import Model
from .dequant import SUPPORTED, dequantize
from .llama_graph import LlamaSpec, build_llama
from .metadata import model_metadata

SUPPORTED_ARCHITECTURES = ("llama",)
#: GGUF tensor name (after the ``blk.N.`` prefix) -> HF name (after ``model.layers.N.``).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def open_gguf(path: Path):
    """A GGUFReader, or a ModelLoadError saying why the file cannot be one. Readers are cached
    per file version: parsing a large vocabulary takes seconds, and the model importer and the
    tokenizer both need it."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file. Check the path to the .gguf model.")
    stat = path.stat()
    return _cached_reader(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int, size: int):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({exc}); the download is truncated or not GGUF.") from None


def field(reader, key: str, default: Any = None) -> Any:
    """A metadata value as a Python value (str, number, list), or ``default`` when absent."""
    found = reader.fields.get(key)
    return default if found is None else found.contents()


def import_gguf(path: Path) -> Model:
    reader = open_gguf(path)
    arch = field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {list(SUPPORTED_ARCHITECTURES)}); "
            "import the original Hugging Face folder instead."
        )
    spec = _spec(path, reader, arch)
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ModelLoadError(f"{path}: scaled RoPE (rope_freqs.weight, LLaMA-3.1 style) is not supported (only unscaled RoPE).")
    unsupported = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in SUPPORTED})
    if unsupported:
        names = [t.name for t in reader.tensors if t.tensor_type.name in unsupported][:3]
        raise ModelLoadError(
            f"{path}: tensor type(s) {unsupported} (e.g. {names}) are not supported; infercc reads "
            f"{[q.name for q in SUPPORTED]}: re-quantize with llama-quantize (e.g. to Q8_0 or Q4_0) or use an F16 GGUF."
        )
    hf_to_gguf = {_hf_name(name): name for name in tensors}

    def weight(name: str) -> np.ndarray | None:
        gguf_name = hf_to_gguf.get(name)
        if gguf_name is None:
            return None
        t = tensors[gguf_name]
        array = dequantize(t.data, t.tensor_type, tuple(int(d) for d in reversed(t.shape)))
        if ".q_proj." in name:
            return _unpermute(array, spec.num_heads)
        if ".k_proj." in name:
            return _unpermute(array, spec.num_kv_heads)
        return array

    if "lm_head.weight" not in hf_to_gguf:
        spec = dataclasses.replace(spec, tie_word_embeddings=True)
    return build_llama(spec, weight, _metadata(path, reader, arch, spec))


def _spec(path: Path, reader, arch: str) -> LlamaSpec:
    def get(key: str, default: Any = None) -> Any:
        value = field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata {arch}.{key} is missing; the file is incomplete.")
        return value

    scaling = field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", ""):
        raise ModelLoadError(f"{path}: rope scaling {scaling!r} is not supported (only unscaled RoPE).")
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ModelLoadError(f"{path}: partial rotary embeddings (rope.dimension_count != head dim) are not supported.")
    tokens = field(reader, "tokenizer.ggml.tokens") or []
    vocab = field(reader, f"{arch}.vocab_size") or len(tokens)
    if not vocab:
        vocab = int(next(t.shape[-1] for t in reader.tensors if t.name == "token_embd.weight"))
    return LlamaSpec(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")), num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
    )


def _hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; unknown names kept."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    return gguf_name


def _unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's convert permute: per head, rows (i, half) -> (half, i)."""
    shape = rows.shape
    return rows.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


#: Texts of control tokens that end generation even when the file names another EOS (what
#: llama.cpp treats as end-of-generation): a chat model's raw completion ends with <|endoftext|>.
_END_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<EOT>")


def eos_ids(reader) -> list[int]:
    """The declared eos/eot/eom ids, then control tokens whose text ends generation."""
    declared = [field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    tokens = field(reader, "tokenizer.ggml.tokens") or []
    types = field(reader, "tokenizer.ggml.token_type") or []
    ends = [i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == 3 and t in _END_TEXTS]
    return list(dict.fromkeys(int(e) for e in [*declared, *ends] if e is not None))


def _metadata(path: Path, reader, arch: str, spec: LlamaSpec) -> dict[str, str]:
    return model_metadata(
        architecture=arch, source=path, source_format="gguf", vocab_size=spec.vocab_size,
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids(reader),
        context_length=field(reader, f"{arch}.context_length"),
        chat_template=field(reader, "tokenizer.chat_template"),
        num_layers=spec.num_layers, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
        hidden_size=spec.hidden_size, head_dim=spec.head_dim,
    )
