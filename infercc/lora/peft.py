"""Read a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, as
``peft``'s ``save_pretrained`` writes it) into plain NumPy factors per target module.

The folder is a user's file, so it is read as hostile: both files must resolve inside the folder
(links and '..' followed first), the safetensors header's length is checked against the file before
it is parsed, every tensor's dtype, shape and byte range is checked before an array is made, and the
config's fields are checked for type and range. What comes back is one ``LoraAdapter``: rank,
alpha, the scaling PEFT applies (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with
``use_rslora``), and per module (``model.layers.0.self_attn.q_proj``, GPT-2's ``h.0.attn.c_attn``)
the factors A [r, in] and B [out, r] in PEFT's layout: ``delta(x) = scaling * (x @ A.T) @ B.T``.

Not read (refused by name, never silently dropped): DoRA (``use_dora``), trained biases
(``bias`` other than "none"), ``modules_to_save``, per-module ``rank_pattern`` / ``alpha_pattern``,
embedding LoRA and any tensor this reader does not know.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from pathlib import Path

import numpy as np

from ..errors import InputError, ModelLoadError
from ..importers.paths import confined, read_json_object

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: Largest safetensors header read (the JSON index of the tensors; real adapters' are a few KB).
MAX_HEADER = 16 << 20
#: Largest adapter file read into memory.
MAX_FILE = 4 << 30
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None, "F64": np.float64}
_KEY = re.compile(r"^(?P<module>[A-Za-z0-9_.]+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")
#: Prefixes PEFT and HF put before the module path the importers use.
_PREFIXES = ("base_model.model.", "transformer.")


class AdapterError(InputError):
    """A LoRA adapter that cannot be used: the message names the file, field or module and the fix."""


@dataclasses.dataclass(frozen=True)
class LoraModule:
    """One adapted projection: A [r, in], B [out, r] (float32, PEFT's layout)."""

    a: np.ndarray
    b: np.ndarray

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    path: str
    rank: int
    alpha: float
    scaling: float
    #: module path as the importers name it (without ``base_model.model.`` / ``transformer.``) -> factors
    modules: dict[str, LoraModule]
    target_modules: tuple[str, ...] = ()
    use_rslora: bool = False

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())


def read_adapter(path: str | os.PathLike) -> LoraAdapter:
    """The adapter in folder ``path``; AdapterError naming the problem otherwise."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: not a folder; a PEFT LoRA adapter is a folder holding {CONFIG_FILE} and "
                           f"{WEIGHTS_FILE} (peft_model.save_pretrained(folder) writes one)")
    try:
        config = read_json_object(folder, CONFIG_FILE)
        weights = confined(folder, WEIGHTS_FILE)
    except ModelLoadError as exc:
        raise AdapterError(str(exc).replace("a Hugging Face checkpoint folder", "a PEFT adapter folder")) from None
    if not weights.is_file():
        found = sorted(p.name for p in folder.iterdir())[:8]
        hint = " (adapter_model.bin is a pickle: infercc reads safetensors only; re-save it with " \
               "save_pretrained(folder, safe_serialization=True))" if "adapter_model.bin" in found else ""
        raise AdapterError(f"{folder / WEIGHTS_FILE}: no such file{hint}; the folder holds {found}")
    rank, alpha, scaling, targets = _read_config(config, folder / CONFIG_FILE)
    tensors = read_safetensors(weights)
    modules = _modules(tensors, weights, rank)
    return LoraAdapter(str(folder), rank, alpha, scaling, modules, targets, bool(config.get("use_rslora", False)))


def _read_config(config: dict, where: Path) -> tuple[int, float, float, tuple[str, ...]]:
    def bad(field: str, expected: str) -> AdapterError:
        return AdapterError(f"{where}: field {field!r} is {config.get(field)!r}; expected {expected}")

    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise bad("peft_type", "'LORA' (other PEFT methods are not LoRA adapters)")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= 65536:
        raise bad("r", "an integer rank >= 1")
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise bad("lora_alpha", "a finite number")
    for field, allowed in (("use_dora", (False, None)), ("bias", ("none", None)), ("modules_to_save", (None, [])),
                           ("rank_pattern", (None, {})), ("alpha_pattern", (None, {})), ("lora_bias", (False, None)),
                           ("target_parameters", (None, [])), ("trainable_token_indices", (None,)),
                           ("layer_replication", (None,))):
        if config.get(field) not in allowed:
            raise bad(field, f"{allowed[0]!r}: infercc serves plain LoRA (A, B and a scaling per adapter)")
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise bad("use_rslora", "true or false")
    scaling = float(alpha) / (math.sqrt(rank) if rslora else rank)
    targets = config.get("target_modules") or ()
    targets = (targets,) if isinstance(targets, str) else tuple(str(t) for t in targets) if isinstance(targets, list) else ()
    return rank, float(alpha), scaling, targets


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a float32 array, checked before anything is allocated:
    the header length against the file, each entry's dtype, shape and byte range."""
    size = path.stat().st_size
    if size > MAX_FILE:
        raise AdapterError(f"{path}: {size} bytes, more than the {MAX_FILE} an adapter may have")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterError(f"{path}: {len(head)} bytes, too short for a safetensors file (corrupted?); re-save it")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER, size - 8):
            raise AdapterError(f"{path}: the safetensors header claims {length} bytes but the file has {size}; the "
                               "file is corrupted or not safetensors: re-save the adapter")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError) as exc:
            raise AdapterError(f"{path}: the safetensors header is not valid JSON ({exc}); re-save the adapter") from None
        if not isinstance(header, dict):
            raise AdapterError(f"{path}: the safetensors header is not a JSON object; re-save the adapter")
        data_size = size - 8 - length
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        for name, entry in entries.items():
            _check_entry(path, name, entry, data_size)
        data = f.read(data_size)
    out = {}
    for name, entry in entries.items():
        begin, end = entry["data_offsets"]
        raw = np.frombuffer(data, np.uint8, end - begin, begin)
        kind = _DTYPES[entry["dtype"]]
        array = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32) if kind is None else raw.view(kind)
        out[name] = array.reshape(entry["shape"]).astype(np.float32)
        if not np.isfinite(out[name]).all():
            raise AdapterError(f"{path}: tensor {name!r} holds NaN or infinite values; the adapter is damaged")
    return out


def _check_entry(path: Path, name: str, entry: object, data_size: int) -> None:
    if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        raise AdapterError(f"{path}: tensor {name!r} has dtype {dtype!r}; LoRA factors must be one of "
                           f"{sorted(_DTYPES)}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 31
                                            for d in shape)):
        raise AdapterError(f"{path}: tensor {name!r} has shape {shape!r}; expected a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool)
                                                                    for o in offsets)):
        raise AdapterError(f"{path}: tensor {name!r} has data_offsets {offsets!r}; expected [begin, end]")
    itemsize = 2 if entry["dtype"] in ("F16", "BF16") else 8 if entry["dtype"] == "F64" else 4
    begin, end = offsets
    if not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * itemsize:
        raise AdapterError(f"{path}: tensor {name!r} claims bytes [{begin}, {end}) for shape {shape} of "
                           f"{entry['dtype']}, outside the file's {data_size} data bytes or of the wrong size; the file "
                           "is truncated or corrupted: re-save the adapter")


def _modules(tensors: dict[str, np.ndarray], path: Path, rank: int) -> dict[str, LoraModule]:
    halves: dict[str, dict[str, np.ndarray]] = {}
    for key, array in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(f"{path}: tensor {key!r} is not a LoRA factor (<module>.lora_A.weight / lora_B.weight); "
                               "embedding LoRA, DoRA magnitudes and saved modules are not supported")
        module = match["module"]
        for prefix in _PREFIXES:
            module = module.removeprefix(prefix)
        halves.setdefault(module, {})[match["which"]] = array
    if not halves:
        raise AdapterError(f"{path}: holds no LoRA factors (lora_A / lora_B tensors)")
    modules = {}
    for module, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{path}: module {module!r} has lora_{''.join(pair)} but not its other factor")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(f"{path}: module {module!r} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; with "
                               f"r={rank} they must be [{rank}, in] and [out, {rank}]")
        modules[module] = LoraModule(np.ascontiguousarray(a), np.ascontiguousarray(b))
    return modules


def write_adapter(folder: str | os.PathLike, modules: dict[str, LoraModule], *, alpha: float,
                  use_rslora: bool = False) -> Path:
    """Write ``modules`` (module path -> A [r, in], B [out, r], one rank) as a PEFT folder that
    ``read_adapter`` and ``peft.PeftModel.from_pretrained`` read (keys ``base_model.model.<module>
    .lora_A.weight``); for adapters made outside torch (benchmarks, synthetic tests)."""
    from safetensors.numpy import save_file

    ranks = {m.rank for m in modules.values()}
    if len(ranks) != 1:
        raise AdapterError(f"write_adapter: the modules have ranks {sorted(ranks)}; one adapter has one rank")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, factor in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(factor.a, np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(factor.b, np.float32)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    config = {"peft_type": "LORA", "r": ranks.pop(), "lora_alpha": alpha, "use_rslora": use_rslora,
              "target_modules": targets, "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return folder
