"""Import a Hugging Face checkpoint folder (config.json + *.safetensors, sharded or not) into the
IR. Reading stops at config and weights; the graph comes from the shared builders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelLoadError
from ..ir import Model
from .gpt2_graph import Gpt2Spec, build_gpt2
from .llama_graph import LlamaSpec, build_llama
from .metadata import model_metadata

#: config.json model_type -> builder family.
LLAMA_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_TYPES = (*LLAMA_TYPES, "gpt2")


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def import_hf(folder: Path) -> Model:
    config = _read_json(folder / "config.json")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise ModelLoadError(
            f"{folder}: model_type {model_type!r} is not supported (supported: {list(SUPPORTED_TYPES)}); "
            "export that model to ONNX and compile the .onnx file instead."
        )
    try:
        return _import(folder, config)
    except KeyError as exc:
        raise ModelLoadError(f"{folder / 'config.json'} has no {exc.args[0]!r}, which a {model_type} model needs; "
                             "re-save it with save_pretrained.") from None


def _import(folder: Path, config: dict[str, Any]) -> Model:
    if config["model_type"] == "gpt2":
        spec = Gpt2Spec(
            vocab_size=config["vocab_size"], hidden_size=config["n_embd"], num_layers=config["n_layer"],
            num_heads=config["n_head"], layer_norm_eps=config.get("layer_norm_epsilon", 1e-5),
            activation=config.get("activation_function", "gelu_new"),
            scale_by_inverse_layer=bool(config.get("scale_attn_by_inverse_layer_idx", False)),
        )
        weights = SafetensorsWeights(folder)
        prefix = "transformer." if "transformer.wte.weight" in weights else ""
        return build_gpt2(spec, lambda name: weights.get(name if name == "lm_head.weight" else prefix + name),
                          _metadata(folder, config))
    spec = _llama_spec(folder, config)
    return build_llama(spec, SafetensorsWeights(folder).get, _metadata(folder, config))


def _llama_spec(folder: Path, config: dict[str, Any]) -> LlamaSpec:
    if config.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{folder}: hidden_act {config['hidden_act']!r} is not supported; LLaMA-family import needs 'silu'.")
    rope = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ModelLoadError(
            f"{folder}: rope scaling {rope_type!r} is not supported (only unscaled RoPE); "
            "use a checkpoint without rope_scaling or export the model to ONNX."
        )
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ModelLoadError(f"{folder}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError(f"{folder}: partial rotary embeddings are not supported; export the model to ONNX instead.")
    layers = config["num_hidden_layers"]
    return LlamaSpec(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        sliding_windows=_sliding_windows(config, layers),
    )


def _sliding_windows(config: dict[str, Any], layers: int) -> tuple[int | None, ...]:
    """Mistral slides every layer when sliding_window is set; Qwen2 only layers its layer_types
    (or use_sliding_window) mark as sliding."""
    window = config.get("sliding_window")
    if not window:
        return (None,) * layers
    if config.get("model_type") == "mistral":
        return (window,) * layers
    kinds = config.get("layer_types")
    if kinds:
        return tuple(window if kind == "sliding_attention" else None for kind in kinds)
    if config.get("use_sliding_window"):
        first_full = config.get("max_window_layers", layers)
        return tuple(window if i >= first_full else None for i in range(layers))
    return (None,) * layers


def _metadata(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    tokenizer_config = _read_json(folder / "tokenizer_config.json", missing_ok=True)
    generation = _read_json(folder / "generation_config.json", missing_ok=True)
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    return model_metadata(
        architecture=config["model_type"], source=folder, source_format="hf",
        vocab_size=config["vocab_size"],
        bos_token_id=generation.get("bos_token_id", config.get("bos_token_id")),
        eos_token_ids=eos if isinstance(eos, list) else ([] if eos is None else [eos]),
        context_length=config.get("max_position_embeddings") or config.get("n_positions"),
        chat_template=template,
        num_layers=config.get("num_hidden_layers") or config.get("n_layer"),
        num_heads=config.get("num_attention_heads") or config.get("n_head"),
        num_kv_heads=config.get("num_key_value_heads") or config.get("num_attention_heads") or config.get("n_head"),
        hidden_size=config.get("hidden_size") or config.get("n_embd"),
        head_dim=config.get("head_dim"),
    )


def _read_json(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    if not path.is_file():
        if missing_ok:
            return {}
        raise ModelLoadError(f"{path}: no such file; a Hugging Face checkpoint folder needs it.")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc}); re-download the checkpoint.") from None


class SafetensorsWeights:
    """Tensors of every *.safetensors shard in a folder, by name, read on demand as float32.

    Read with the ``safetensors`` library; bfloat16 (which NumPy cannot name) is read from the
    file's own header and widened by a bit shift, since bf16 is the upper half of a float32.
    """

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({folder / f for f in _read_json(index).get("weight_map", {}).values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ModelLoadError(f"{folder}: shard(s) {missing} listed in {index.name} are missing; download them.")
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".h5", ".msgpack"))
            hint = f" (found {others}: re-save with model.save_pretrained(folder), which writes safetensors)" if others else ""
            raise ModelLoadError(f"{folder}: no *.safetensors weights{hint}; infercc reads safetensors checkpoints only.")
        self._handles = {}
        self._file_of: dict[str, Path] = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="numpy")
            except Exception as exc:
                raise ModelLoadError(f"{file} is not a readable safetensors file ({exc}); re-download it.") from None
            self._handles[file] = handle
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                self._file_of[name] = file

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> np.ndarray | None:
        file = self._file_of.get(name)
        if file is None:
            return None
        handle = self._handles[file]
        if handle.get_slice(name).get_dtype() == "BF16":
            return _read_bf16(file, name)
        array = handle.get_tensor(name)
        return array if array.dtype == np.float32 else array.astype(np.float32)


def _read_bf16(file: Path, name: str) -> np.ndarray:
    with open(file, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(header_size))[name]
        start, end = info["data_offsets"]
        f.seek(8 + header_size + start)
        raw = np.frombuffer(f.read(end - start), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
