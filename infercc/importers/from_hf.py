"""Import a Hugging Face checkpoint folder (config.json + *.safetensors, sharded or not) into the
IR. Reading stops at config and weights; the graph comes from the shared builders."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..errors import ModelLoadError
from ..ir import Model
from .checks import check_layer_count, check_optional, check_shapes, layer_indices, require
from .fields import JsonFields, chat_template, known_ids
from .gpt2_graph import Gpt2Spec, build_gpt2, gpt2_shapes
from .llama_graph import LlamaSpec, build_llama, check_llama
from .metadata import model_metadata
from .paths import confined, read_json_object

#: config.json model_type -> builder family.
LLAMA_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_TYPES = (*LLAMA_TYPES, "gpt2")
INDEX = "model.safetensors.index.json"


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def import_hf(folder: Path) -> Model:
    """Config first (its errors name fields), then the safetensors headers, then every
    hyper-parameter against the tensor shapes, and only then any weight is read."""
    config = read_json_object(folder, "config.json")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in SUPPORTED_TYPES:
        raise ModelLoadError(
            f"{folder}: model_type {model_type!r} is not supported (supported: {list(SUPPORTED_TYPES)}); "
            "export that model to ONNX and compile the .onnx file instead."
        )
    fields = JsonFields(config, folder / "config.json", needs=f"a {model_type} model")
    if model_type == "gpt2":
        return _import_gpt2(folder, fields)
    spec, keys = _llama_spec(folder, fields)
    weights = SafetensorsWeights(folder)
    source = str(folder)
    check_layer_count(spec.num_layers, layer_indices(weights.shapes, "model.layers."), source, keys["num_layers"],
                      "model.layers.")
    # Per-layer windows only now that the layer count is known to match the tensors.
    spec = dataclasses.replace(spec, sliding_windows=_sliding_windows(fields, spec.num_layers))
    check_llama(spec, weights.shapes, source, keys)
    return build_llama(spec, weights.get, _metadata(
        folder, fields, vocab=spec.vocab_size, layers=spec.num_layers, heads=spec.num_heads,
        kv_heads=spec.num_kv_heads, hidden=spec.hidden_size, head_dim=spec.head_dim,
        context=fields.integer("max_position_embeddings", None)))


def _import_gpt2(folder: Path, f: JsonFields) -> Model:
    spec = Gpt2Spec(
        vocab_size=f.integer("vocab_size"), hidden_size=f.integer("n_embd"), num_layers=f.integer("n_layer"),
        num_heads=f.integer("n_head"), layer_norm_eps=f.number("layer_norm_epsilon", 1e-5, minimum=0.0),
        activation=f.text("activation_function", "gelu_new"),
        scale_by_inverse_layer=f.flag("scale_attn_by_inverse_layer_idx", False),
    )
    source = str(folder)
    require(spec.hidden_size % spec.num_heads == 0, source,
            f"n_embd {spec.hidden_size} is not a multiple of n_head {spec.num_heads}")
    inner = f.integer("n_inner", 4 * spec.hidden_size)
    weights = SafetensorsWeights(folder)
    prefix = "transformer." if "transformer.wte.weight" in weights else ""
    shapes = {name.removeprefix(prefix): shape for name, shape in weights.shapes.items()}
    check_layer_count(spec.num_layers, layer_indices(shapes, "h."), source, "n_layer", prefix + "h.")
    wpe = shapes.get("wpe.weight") or (0,)
    positions = f.integer("n_positions", wpe[0])
    keys = {"hidden_size": "n_embd", "vocab_size": "vocab_size", "inner": "n_inner", "positions": "n_positions"}
    values = {**dataclasses.asdict(spec), "inner": inner, "positions": positions}
    rename = lambda name: name if name == "lm_head.weight" else prefix + name  # noqa: E731
    check_shapes(gpt2_shapes(spec, inner, positions), shapes, source, values, keys, rename)
    check_optional("lm_head.weight", (spec.vocab_size, spec.hidden_size), shapes, source)
    return build_gpt2(spec, lambda name: weights.get(rename(name)), _metadata(
        folder, f, vocab=spec.vocab_size, layers=spec.num_layers, heads=spec.num_heads, kv_heads=spec.num_heads,
        hidden=spec.hidden_size, head_dim=None, context=positions))


def _llama_spec(folder: Path, f: JsonFields) -> tuple[LlamaSpec, dict[str, str]]:
    """The LLaMA hyper-parameters, typed, and the config key of each spec field (for messages)."""
    if f.text("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{folder}: hidden_act {f.text('hidden_act')!r} is not supported; LLaMA-family import needs 'silu'.")
    rope, scaling = f.nested("rope_parameters"), f.nested("rope_scaling")
    rope_type = (rope.text("rope_type", None) or scaling.text("rope_type", None) or scaling.text("type", None)
                 or "default")
    if rope_type != "default":
        raise ModelLoadError(
            f"{folder}: rope scaling {rope_type!r} is not supported (only unscaled RoPE); "
            "use a checkpoint without rope_scaling or export the model to ONNX."
        )
    if f.number("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError(f"{folder}: partial rotary embeddings are not supported; export the model to ONNX instead.")
    keys = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
            "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim"}
    heads, hidden = f.integer("num_attention_heads"), f.integer("hidden_size")
    if not f.has("head_dim"):
        keys["head_dim"] = "head size (hidden_size / num_attention_heads)"
        require(hidden % heads == 0, str(folder), f"hidden_size {hidden} is not a multiple of num_attention_heads "
                                                  f"{heads} (and config.json gives no head_dim)")
    layers = f.integer("num_hidden_layers")
    spec = LlamaSpec(
        vocab_size=f.integer("vocab_size"), hidden_size=hidden, intermediate_size=f.integer("intermediate_size"),
        num_layers=layers, num_heads=heads, num_kv_heads=f.integer("num_key_value_heads", heads),
        head_dim=f.integer("head_dim", hidden // heads),
        rms_norm_eps=f.number("rms_norm_eps", 1e-6, minimum=0.0),
        rope_theta=rope.number("rope_theta", f.number("rope_theta", 10000.0, positive=True), positive=True),
        tie_word_embeddings=f.flag("tie_word_embeddings", False),
    )
    return spec, keys


def _sliding_windows(f: JsonFields, layers: int) -> tuple[int | None, ...]:
    """Mistral slides every layer when sliding_window is set; Qwen2 only layers its layer_types
    (or use_sliding_window) mark as sliding. Empty: no layer slides."""
    window = f.integer("sliding_window", 0, minimum=0)
    if not window:
        return ()
    if f.text("model_type") == "mistral":
        return (window,) * layers
    kinds = f.texts("layer_types", None)
    if kinds:
        return tuple(window if kind == "sliding_attention" else None for kind in kinds)
    if f.flag("use_sliding_window", False):
        first_full = f.integer("max_window_layers", layers, minimum=0)
        return tuple(window if i >= first_full else None for i in range(layers))
    return ()


def _metadata(folder: Path, config: JsonFields, *, vocab: int, layers: int, heads: int, kv_heads: int,
              hidden: int, head_dim: int | None, context: int | None) -> dict[str, str]:
    template, _ = chat_template(folder, read_json_object(folder, "tokenizer_config.json", missing_ok=True))
    generation = JsonFields(read_json_object(folder, "generation_config.json", missing_ok=True),
                            folder / "generation_config.json")
    source = generation if generation.has("eos_token_id") else config
    eos = known_ids(source.token_ids("eos_token_id", []), vocab, source.where("eos_token_id"))
    source = generation if generation.has("bos_token_id") else config
    bos = known_ids([source.integer("bos_token_id", None, minimum=0)], vocab, source.where("bos_token_id"))
    return model_metadata(
        architecture=config.text("model_type"), source=folder, source_format="hf", vocab_size=vocab,
        bos_token_id=bos[0] if bos else None, eos_token_ids=eos, context_length=context, chat_template=template,
        num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, hidden_size=hidden, head_dim=head_dim,
    )


class SafetensorsWeights:
    """Tensors of every *.safetensors shard in a folder, by name, read on demand as float32;
    ``shapes`` (from the headers alone) lets the importer check the config before reading data.
    Every shard is confined to the folder (``paths.confined``), whether globbed or named by
    model.safetensors.index.json.

    Read with the ``safetensors`` library; bfloat16 (which NumPy cannot name) is read from the
    file's own header and widened by a bit shift, since bf16 is the upper half of a float32.
    """

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        files = self._files(folder)
        self._handles = {}
        self._file_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="numpy")
                names = list(handle.keys())
                shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in names}
            except Exception as exc:
                raise ModelLoadError(f"{file} is not a readable safetensors file ({exc}); re-download it.") from None
            self._handles[file] = handle
            for name in names:
                self._file_of[name] = file
            self.shapes.update(shapes)

    @staticmethod
    def _files(folder: Path) -> list[Path]:
        if confined(folder, INDEX).is_file():
            index = JsonFields(read_json_object(folder, INDEX), folder / INDEX)
            weight_map = index.nested("weight_map").data
            bad = next((v for v in weight_map.values() if not isinstance(v, str)), None)
            if bad is not None:
                raise index.bad("weight_map", bad, "an object mapping tensor names to shard file names")
            names = sorted(set(weight_map.values()))
            files = [confined(folder, name) for name in names]
            missing = [name for name, file in zip(names, files) if not file.is_file()]
            if missing:
                raise ModelLoadError(f"{folder}: shard(s) {missing} listed in {INDEX} are missing; download them.")
        else:
            files = sorted(file for file in (confined(folder, p.name) for p in folder.glob("*.safetensors"))
                           if file.is_file())
        if not files:
            others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".h5", ".msgpack"))
            hint = f" (found {others}: re-save with model.save_pretrained(folder), which writes safetensors)" if others else ""
            raise ModelLoadError(f"{folder}: no *.safetensors weights{hint}; infercc reads safetensors checkpoints only.")
        return files

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> np.ndarray | None:
        file = self._file_of.get(name)
        if file is None:
            return None
        handle = self._handles[file]
        try:
            if handle.get_slice(name).get_dtype() == "BF16":
                return _read_bf16(file, name)
            array = handle.get_tensor(name)
            return array if array.dtype == np.float32 else array.astype(np.float32)
        except Exception as exc:  # a dtype NumPy cannot hold (float8...), or data changed since opened
            raise ModelLoadError(f"{file}: tensor {name!r} cannot be read as float32 ({exc}); "
                                 "re-save the checkpoint in float32, float16 or bfloat16.") from None


def _read_bf16(file: Path, name: str) -> np.ndarray:
    with open(file, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(header_size))[name]
        start, end = info["data_offsets"]
        f.seek(8 + header_size + start)
        raw = np.frombuffer(f.read(end - start), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
