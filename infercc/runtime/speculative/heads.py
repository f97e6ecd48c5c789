"""Medusa heads: their weights in Medusa-1's published safetensors layout, checked before use, and
their forward pass in NumPy.

Layout (``medusa_lm_head.safetensors``, the state dict of Medusa's ``ModuleList`` of heads, each
``Sequential(ResBlock * L, Linear(hidden, vocab, bias=False))``):

* ``{i}.{j}.linear.weight`` [hidden, hidden] and ``{i}.{j}.linear.bias`` [hidden] for ResBlock j
  of head i (``x + SiLU(x W^T + b)``);
* ``{i}.{L}.weight`` [vocab, hidden], head i's vocabulary projection. Heads trained by
  ``infercc train-heads`` leave it out and say ``"shared_lm_head": true`` in the config beside
  them (``config.json``: ``medusa_num_heads``, ``medusa_num_layers`` as in Medusa's): the base
  model's LM head (frozen) projects every head, so a head file is a few MB, not one LM head each.

A heads file comes from a user: tensor names, counts, dtypes and shapes are checked against the
target's hidden and vocabulary sizes from the header, before any tensor is read (``HeadsError``
naming the tensor, what was found and what was expected).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ...errors import InferccError
from .products import linear

HEADS_FILE = "medusa_lm_head.safetensors"
CONFIG_FILE = "config.json"
#: Most heads (and ResBlocks per head) a file may declare: Medusa uses 1..5 heads of 1 layer.
MAX_HEADS, MAX_LAYERS = 16, 8
_KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")


class HeadsError(InferccError):
    """A heads file that cannot serve this model (the message names the problem and the fix)."""


@dataclasses.dataclass
class MedusaHeads:
    """``blocks[i]``: head i's ResBlocks as (weight [hidden, hidden], bias [hidden]);
    ``projections[i]``: its [vocab, hidden] projection, or None = the shared LM head."""

    blocks: list[list[tuple[np.ndarray, np.ndarray]]]
    projections: list[np.ndarray | None]

    @property
    def num_heads(self) -> int:
        return len(self.blocks)

    def features(self, hidden: np.ndarray) -> np.ndarray:
        """Each head's ResBlock output for one hidden state [hidden] -> [heads, hidden]."""
        out = []
        for blocks in self.blocks:
            x = hidden.astype(np.float32, copy=False)
            for weight, bias in blocks:
                y = linear(x, weight) + bias
                x = x + y / (1.0 + np.exp(-y))  # x + SiLU(Wx + b)
            out.append(x)
        return np.stack(out)

    def top1(self, hidden: np.ndarray, lm_head: np.ndarray | None, k: int) -> tuple[list[int], list[float]]:
        """The most likely token of heads 0..k-1 for one hidden state and its probability (softmax
        over the projection's rows). ``lm_head`` [vocab, hidden] projects the heads without their
        own, all in one product: the projection is the largest matrix here, read once."""
        features = self.features(hidden)[:k]
        logits: list[np.ndarray | None] = [None] * len(features)
        shared = [i for i in range(len(features)) if self.projections[i] is None]
        if shared:
            for i, row in zip(shared, linear(features[shared], lm_head)):
                logits[i] = row
        tokens, probs = [], []
        for i, row in enumerate(logits):
            row = row if row is not None else linear(features[i], self.projections[i])
            best = int(np.argmax(row))
            tokens.append(best)
            probs.append(float(1.0 / np.exp(row - row[best]).sum()))
        return tokens, probs


def heads_path(path: str | Path) -> Path:
    """The safetensors file of a heads path (the file, or a folder holding ``HEADS_FILE``)."""
    path = Path(path)
    return path / HEADS_FILE if path.is_dir() else path


def read_config(file: Path) -> dict:
    """The JSON config beside a heads file ({} when there is none)."""
    config = file.parent / CONFIG_FILE
    if not config.is_file():
        return {}
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeadsError(f"{config} is not readable JSON ({exc}); rewrite it or remove it") from None
    if not isinstance(data, dict):
        raise HeadsError(f"{config} must hold a JSON object, got {type(data).__name__}")
    return data


def load_heads(path: str | Path, hidden: int, vocab: int) -> MedusaHeads:
    """Medusa heads for a model of ``hidden`` width and ``vocab`` tokens (see the module
    docstring); HeadsError for a file that is not one or does not fit."""
    file = heads_path(path)
    if not file.is_file():
        raise HeadsError(f"no Medusa heads at {file}; train them with `infercc train-heads MODEL -o DIR`")
    config = read_config(file)
    layout: list[tuple[int, int, bool]] = []
    tensors = read_tensors(file, lambda shapes: layout.append(_layout(file, shapes, hidden, vocab, config)),
                           "infercc train-heads, or Medusa's save of medusa_lm_head")
    heads, layers, shared = layout[0]
    blocks = [[(tensors[f"{i}.{j}.linear.weight"], tensors[f"{i}.{j}.linear.bias"]) for j in range(layers)]
              for i in range(heads)]
    projections = [None if shared else tensors[f"{i}.{layers}.weight"] for i in range(heads)]
    return MedusaHeads(blocks, projections)


def read_tensors(file: Path, check: Callable[[dict[str, tuple[tuple[int, ...], str]]], None],
                 writer: str) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file from a user, as float32: ``check`` sees every tensor's
    (shape, dtype) from the header first and raises for a layout that does not fit (so nothing
    is allocated for a file that lies); NaN or infinite values are refused. ``writer`` names what
    writes a good file, for the message."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="numpy") as f:
            shapes = {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
            check(shapes)
            tensors = {name: f.get_tensor(name).astype(np.float32) for name in shapes}
    except (SafetensorError, OSError, ValueError) as exc:
        raise HeadsError(f"{file} is not a readable safetensors file ({exc}); write it again ({writer})") from None
    for name, array in tensors.items():
        if not np.isfinite(array).all():
            raise HeadsError(f"{file}: tensor {name!r} holds NaN or infinite values; the file is corrupted, retrain it")
    return tensors


def _layout(file: Path, shapes: dict[str, tuple[tuple[int, ...], str]], hidden: int, vocab: int,
            config: dict) -> tuple[int, int, bool]:
    """(heads, ResBlocks per head, shared LM head) of a file whose tensors are ``shapes``, checked."""
    found: dict[tuple[int, int], set[str]] = {}
    for name, (_, dtype) in shapes.items():
        m = _KEY.match(name)
        if m is None:
            raise HeadsError(f"{file}: tensor {name!r} is not part of Medusa's head layout "
                             "({i}.{j}.linear.weight/bias, {i}.{L}.weight)")
        if dtype not in ("F32", "F16", "BF16"):
            raise HeadsError(f"{file}: tensor {name!r} has dtype {dtype}; heads must be F32, F16 or BF16")
        found.setdefault((int(m.group(1)), int(m.group(2))), set()).add(m.group(3))
    if not found:
        raise HeadsError(f"{file} holds no tensors; it is not a Medusa heads file")
    heads = max(i for i, _ in found) + 1
    block_ids = {j for (_, j), kinds in found.items() if "linear.weight" in kinds}
    layers = config.get("medusa_num_layers", max(block_ids) + 1 if block_ids else 0)
    if not isinstance(layers, int) or isinstance(layers, bool) or not 1 <= heads <= MAX_HEADS or not 0 <= layers <= MAX_LAYERS:
        raise HeadsError(f"{file}: {heads} heads of {layers} ResBlocks; expected 1..{MAX_HEADS} heads of "
                         f"0..{MAX_LAYERS} blocks")
    declared = config.get("medusa_num_heads")
    if declared is not None and declared != heads:
        raise HeadsError(f"{file}: {CONFIG_FILE} declares {declared!r} heads but the file holds {heads}")
    shared = bool(config.get("shared_lm_head", False))
    expected: dict[str, tuple[int, ...]] = {}
    for i in range(heads):
        for j in range(layers):
            expected[f"{i}.{j}.linear.weight"] = (hidden, hidden)
            expected[f"{i}.{j}.linear.bias"] = (hidden,)
        if not shared:
            expected[f"{i}.{layers}.weight"] = (vocab, hidden)
    for name, shape in expected.items():
        if name not in shapes:
            hint = " (heads sharing the base LM head say \"shared_lm_head\": true in config.json)" \
                if name.endswith(f".{layers}.weight") else ""
            raise HeadsError(f"{file}: tensor {name!r} is missing{hint}")
        if shapes[name][0] != shape:
            raise HeadsError(f"{file}: tensor {name!r} has shape {list(shapes[name][0])}, expected {list(shape)} "
                             f"for a model of hidden size {hidden} and {vocab} tokens; these heads were trained "
                             "for another model")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise HeadsError(f"{file}: unexpected tensor {extra[0]!r} for {heads} heads of {layers} ResBlocks")
    return heads, layers, shared


def save_heads(directory: str | Path, blocks: list[list[tuple[np.ndarray, np.ndarray]]],
               projections: list[np.ndarray | None], **config) -> Path:
    """Write heads in Medusa's layout (``HEADS_FILE``) and their ``config.json`` into ``directory``."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = len(blocks[0]) if blocks else 0
    tensors: dict[str, np.ndarray] = {}
    for i, head in enumerate(blocks):
        for j, (weight, bias) in enumerate(head):
            tensors[f"{i}.{j}.linear.weight"] = np.ascontiguousarray(weight, np.float32)
            tensors[f"{i}.{j}.linear.bias"] = np.ascontiguousarray(bias, np.float32)
        if projections[i] is not None:
            tensors[f"{i}.{layers}.weight"] = np.ascontiguousarray(projections[i], np.float32)
    shared = all(p is None for p in projections)
    save_file(tensors, str(directory / HEADS_FILE))
    meta = {"medusa_num_heads": len(blocks), "medusa_num_layers": layers, "shared_lm_head": shared, **config}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return directory / HEADS_FILE
