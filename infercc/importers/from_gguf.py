"""Import a GGUF file (llama.cpp's format) of the ``llama`` architecture into the IR.

Tensors are dequantized to float32 and renamed to HF names so the shared LLaMA builder makes
the graph. RoPE: llama.cpp rotates interleaved pairs (2i, 2i+1) of each head, and its converter
permutes HF's Q/K rows to match; we apply the inverse permutation to Q and K (rows only, so
quantization blocks, which run along the input dimension, are unaffected) and use HF's
half-rotation (i, i + d/2) in the graph. Both forms compute the same q.k products, so the model
is unchanged and one rotary form (the one the fusion passes expect) serves every importer.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from ..errors import ModelLoadError
from ..ir import Model
from .checks import check_layer_count, layer_indices, require
from .dequant import SUPPORTED, dequantize
from .fields import INT64_MAX, GGUFFields, known_ids
from .llama_graph import LlamaSpec, build_llama, check_llama
from .metadata import model_metadata

SUPPORTED_ARCHITECTURES = ("llama",)
#: GGUF tensor name (after the ``blk.N.`` prefix) -> HF name (after ``model.layers.N.``).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def open_gguf(path: Path) -> GGUFFields:
    """The file's metadata as typed fields (``.reader`` is the GGUFReader), or a ModelLoadError
    saying why the file cannot be read. Cached per file version: parsing a large vocabulary takes
    seconds, and the model importer and the tokenizer both need it."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file. Check the path to the .gguf model.")
    stat = path.stat()
    return _cached_fields(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _cached_fields(path: str, mtime_ns: int, size: int) -> GGUFFields:
    try:
        return GGUFFields(_bounded_reader()(path), path)
    except _Truncated as exc:
        raise ModelLoadError(
            f"{path} is cut short: it is {exc.size} bytes but its header places data up to byte {exc.end}; "
            "the download is truncated or the file damaged: re-download it."
        ) from None
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); "
                             "the download is truncated or not GGUF.") from None


class _Truncated(Exception):
    def __init__(self, end: int, size: int) -> None:
        super().__init__(f"read up to byte {end} of a {size}-byte file")
        self.end, self.size = end, size


@functools.cache
def _bounded_reader() -> type:
    """GGUFReader refusing reads past the end of the file. Upstream slices its memory map, which
    silently yields fewer items there: a truncated file fails later with an obscure reshape error,
    and a metadata array whose length field says 2**62 loops 2**62 times over empty reads."""
    import gguf

    class BoundedReader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, *args, **kwargs):
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > len(self.data):
                raise _Truncated(end, len(self.data))
            return super()._get(offset, dtype, count, *args, **kwargs)

        def _get_field_parts(self, orig_offs, raw_type):
            # An array's length is checked against the bytes left before the per-item loop: each
            # item takes at least its minimum size, so a length past the end fails at once instead
            # of after one Python iteration per byte of the file.
            if raw_type == gguf.GGUFValueType.ARRAY:
                item_type = int(self._get(orig_offs, np.uint32)[0])
                length = int(self._get(int(orig_offs) + 4, np.uint64)[0])
                end = int(orig_offs) + 12 + length * _min_item_bytes(gguf, item_type)
                if end > len(self.data):
                    raise _Truncated(end, len(self.data))
            return super()._get_field_parts(orig_offs, raw_type)

    return BoundedReader


def _min_item_bytes(gguf, item_type: int) -> int:
    """The fewest bytes one GGUF value of ``item_type`` takes: a scalar its size, a string its
    8-byte length, an array its type and length fields."""
    value_type = gguf.GGUFValueType
    if item_type == value_type.STRING:
        return 8
    if item_type == value_type.ARRAY:
        return 12
    try:
        scalar = gguf.GGUFReader.gguf_scalar_to_np.get(value_type(item_type))
    except ValueError:  # an unknown type: the upstream reader names it
        return 0
    return np.dtype(scalar).itemsize if scalar is not None else 0


def import_gguf(path: Path) -> Model:
    fields = open_gguf(path)
    reader = fields.reader
    arch = fields.text("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {list(SUPPORTED_ARCHITECTURES)}); "
            "import the original Hugging Face folder instead."
        )
    if not reader.tensors:
        raise ModelLoadError(f"{path} holds no tensors (a vocabulary-only GGUF?); infercc needs the model's "
                             "weights: use the full model .gguf file.")
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
    # HF layout ([out, in]): GGUF lists dims innermost first.
    shapes = {hf: tuple(int(d) for d in reversed(tensors[name].shape)) for hf, name in hf_to_gguf.items()}
    spec, keys = _spec(path, fields, arch, shapes)
    check_layer_count(spec.num_layers, layer_indices(tensors, "blk."), str(path), keys["num_layers"], "blk.")
    check_llama(spec, shapes, str(path), keys, lambda hf: hf_to_gguf.get(hf) or _gguf_name(hf))

    def weight(name: str) -> np.ndarray | None:
        gguf_name = hf_to_gguf.get(name)
        if gguf_name is None:
            return None
        t = tensors[gguf_name]
        array = dequantize(t.data, t.tensor_type, shapes[name])
        if ".q_proj." in name:
            return _unpermute(array, spec.num_heads)
        if ".k_proj." in name:
            return _unpermute(array, spec.num_kv_heads)
        return array

    return build_llama(spec, weight, _metadata(path, fields, arch, spec))


def _spec(path: Path, f: GGUFFields, arch: str, shapes: dict[str, tuple[int, ...]]) -> tuple[LlamaSpec, dict[str, str]]:
    """The LLaMA hyper-parameters, each read typed and checked against the others (shapes are
    ``check_llama``'s), and the GGUF key each spec field came from, for messages."""
    keys = {"hidden_size": f"{arch}.embedding_length", "num_heads": f"{arch}.attention.head_count",
            "num_kv_heads": f"{arch}.attention.head_count_kv", "intermediate_size": f"{arch}.feed_forward_length",
            "num_layers": f"{arch}.block_count", "head_dim": f"{arch}.attention.key_length",
            "vocab_size": "vocabulary size (token_embd.weight rows)"}
    scaling = f.text(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", ""):
        raise ModelLoadError(f"{path}: rope scaling {scaling!r} is not supported (only unscaled RoPE).")
    hidden, heads = f.integer(keys["hidden_size"]), f.integer(keys["num_heads"])
    kv_heads = f.integer(keys["num_kv_heads"], heads)
    if not f.has(keys["head_dim"]):
        keys["head_dim"] = f"head size ({keys['hidden_size']} / {keys['num_heads']})"
        require(hidden % heads == 0, str(path),
                f"{keys['hidden_size']} {hidden} is not a multiple of {keys['num_heads']} {heads}")
    head_dim = f.integer(f"{arch}.attention.key_length", hidden // heads)
    if f.integer(f"{arch}.attention.value_length", head_dim) != head_dim:
        raise ModelLoadError(f"{path}: {arch}.attention.value_length differs from the key length {head_dim}; "
                             "separate key and value head sizes are not supported.")
    if f.integer(f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise ModelLoadError(f"{path}: partial rotary embeddings (rope.dimension_count != head dim) are not supported.")
    embedding = shapes.get("model.embed_tokens.weight") or (0,)
    vocab = embedding[0]
    for key, count in ((f"{arch}.vocab_size", lambda: f.integer(f"{arch}.vocab_size")),
                       ("tokenizer.ggml.tokens", lambda: len(f.texts("tokenizer.ggml.tokens")))):
        if f.has(key) and "model.embed_tokens.weight" in shapes and count() != vocab:
            raise ModelLoadError(f"{path}: GGUF metadata {key} gives {count()} tokens but token_embd.weight has "
                                 f"{vocab} rows; the vocabulary does not match the weights: re-convert the model.")
    spec = LlamaSpec(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=f.integer(keys["intermediate_size"]),
        num_layers=f.integer(keys["num_layers"]), num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        rms_norm_eps=f.number(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5, minimum=0.0),
        rope_theta=f.number(f"{arch}.rope.freq_base", 10000.0, positive=True),
        tie_word_embeddings="lm_head.weight" not in shapes,
    )
    return spec, keys


def _hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; unknown names kept."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    return gguf_name


def _gguf_name(hf_name: str) -> str:
    """Inverse of ``_hf_name`` (for messages about tensors the file lacks)."""
    for gguf, hf in _GLOBAL_NAMES.items():
        if hf_name.startswith(hf + "."):
            return gguf + hf_name[len(hf):]
    parts = hf_name.split(".", 3)
    if hf_name.startswith("model.layers.") and len(parts) == 4:
        inverse = {hf: gguf for gguf, hf in _LAYER_NAMES.items()}
        stem, _, suffix = parts[3].rpartition(".")
        if stem in inverse:
            return f"blk.{parts[2]}.{inverse[stem]}.{suffix}"
    return hf_name


def _unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's convert permute: per head, rows (i, half) -> (half, i)."""
    shape = rows.shape
    return rows.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


#: Texts of control tokens that end generation even when the file names another EOS (what
#: llama.cpp treats as end-of-generation): a chat model's raw completion ends with <|endoftext|>.
_END_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<EOT>")


def eos_ids(f: GGUFFields, vocab_size: int) -> list[int]:
    """The declared eos/eot/eom ids, then control tokens whose text ends generation; ids outside
    the vocabulary are dropped with a warning (as llama.cpp does)."""
    declared = [f.integer(f"tokenizer.ggml.{k}_token_id", None, minimum=0) for k in ("eos", "eot", "eom")]
    tokens = f.texts("tokenizer.ggml.tokens", [])
    types = f.integers("tokenizer.ggml.token_type", [], minimum=-INT64_MAX)
    ends = [i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == 3 and t in _END_TEXTS]
    found = [e for e in dict.fromkeys([*declared, *ends]) if e is not None]
    return known_ids(found, vocab_size, f.where("tokenizer.ggml.eos_token_id"))


def _metadata(path: Path, f: GGUFFields, arch: str, spec: LlamaSpec) -> dict[str, str]:
    bos = known_ids([f.integer("tokenizer.ggml.bos_token_id", None, minimum=0)], spec.vocab_size,
                    f.where("tokenizer.ggml.bos_token_id"))
    return model_metadata(
        architecture=arch, source=path, source_format="gguf", vocab_size=spec.vocab_size,
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=eos_ids(f, spec.vocab_size),
        context_length=f.integer(f"{arch}.context_length", None),
        chat_template=f.text("tokenizer.chat_template", None),
        num_layers=spec.num_layers, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
        hidden_size=spec.hidden_size, head_dim=spec.head_dim,
    )
