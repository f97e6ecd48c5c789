"""The EAGLE draft layer: its weights (one safetensors file + ``config.json``, checked before use)
and its forward pass in NumPy over a KV cache of its own.

What the layer computes (EAGLE-1, Li et al. 2024) at a position j of a sequence: the input is the
embedding of token j + 1 (the target's own embedding table, frozen) concatenated with the
target's feature f_j at position j (the state whose logits chose token j + 1), reduced by ``fc``
(2H -> H, with bias); then one decoder layer of the LLaMA form (RMSNorm, attention with rotary
positions over the draft's cached keys/values of the earlier positions, RMSNorm, SwiGLU MLP, both
residual) gives f'_{j+1}, the guess of the target's next feature. The target's LM head (frozen)
turns it into the guess of token j + 2, and f'_{j+1} is the feature of the next draft position.

Which feature: our graphs expose the LM head's input (passes/hidden_output.py), i.e. the state
*after* the final norm, where EAGLE-1 regresses the one before it. One output then serves Medusa
and EAGLE, the fused final norm of the generated C (a skip-add + norm kernel) needs no second
output, and a normed feature has a fixed scale, which keeps the regression well conditioned; the
layer has no final norm of its own since its output goes straight into the LM head.

Layout (``eagle_draft.safetensors``; names as EAGLE's own, shapes from ``config.json``):
``fc.weight`` [H, 2H], ``fc.bias`` [H], ``layer.input_layernorm.weight`` [H],
``layer.self_attn.{q,k,v}_proj.weight`` [A, H], ``layer.self_attn.o_proj.weight`` [H, A],
``layer.post_attention_layernorm.weight`` [H], ``layer.mlp.{gate,up}_proj.weight`` [I, H],
``layer.mlp.down_proj.weight`` [H, I], with A = ``num_attention_heads * head_dim`` and I =
``intermediate_size``: the attention and MLP may be narrower than the target's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from .heads import CONFIG_FILE, HeadsError, read_config, read_tensors
from .products import attend, linear

DRAFT_FILE = "eagle_draft.safetensors"
_INT_FIELDS = {"num_attention_heads": 64, "head_dim": 512, "intermediate_size": 1 << 16}


def expected_shapes(hidden: int, heads: int, head_dim: int, intermediate: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of a draft layer and its shape."""
    a = heads * head_dim
    return {"fc.weight": (hidden, 2 * hidden), "fc.bias": (hidden,),
            "layer.input_layernorm.weight": (hidden,), "layer.post_attention_layernorm.weight": (hidden,),
            "layer.self_attn.q_proj.weight": (a, hidden), "layer.self_attn.k_proj.weight": (a, hidden),
            "layer.self_attn.v_proj.weight": (a, hidden), "layer.self_attn.o_proj.weight": (hidden, a),
            "layer.mlp.gate_proj.weight": (intermediate, hidden), "layer.mlp.up_proj.weight": (intermediate, hidden),
            "layer.mlp.down_proj.weight": (hidden, intermediate)}


class DraftCache:
    """The draft's keys and values of one sequence, positions ``base .. base + length - 1``."""

    def __init__(self, base: int, heads: int, head_dim: int) -> None:
        self.base = base
        self.length = 0
        self.k = np.empty((16, heads, head_dim), np.float32)
        self.v = np.empty_like(self.k)

    def append(self, k: np.ndarray, v: np.ndarray) -> None:
        end = self.length + len(k)
        if end > len(self.k):  # grow by doubling: a sequence's cache grows a few rows per step
            size = max(end, 2 * len(self.k))
            self.k = np.concatenate([self.k[:self.length], np.empty((size - self.length, *k.shape[1:]), np.float32)])
            self.v = np.concatenate([self.v[:self.length], np.empty((size - self.length, *v.shape[1:]), np.float32)])
        self.k[self.length:end], self.v[self.length:end] = k, v
        self.length = end


@dataclasses.dataclass
class EagleDraft:
    """The draft layer's weights (float32) and hyper-parameters (see the module docstring)."""

    weights: dict[str, np.ndarray]
    heads: int
    head_dim: int
    rope_theta: float = 10000.0
    eps: float = 1e-5
    #: Where the forward runs (eagle_c.CDraft runs the same layer on the generated-C runtime).
    runs_on: str = "the draft layer runs in NumPy"

    @property
    def hidden(self) -> int:
        return int(self.weights["fc.bias"].shape[0])

    @property
    def macs(self) -> int:
        """Multiply-adds of one position (the LM head apart)."""
        return sum(int(w.size) for name, w in self.weights.items() if w.ndim == 2)

    def new_cache(self, base: int) -> DraftCache:
        return DraftCache(base, self.heads, self.head_dim)

    def forward(self, cache: DraftCache, features: np.ndarray, embeds: np.ndarray) -> np.ndarray:
        """f' [n, H] of the n positions after the cache's (inputs ``features``, ``embeds`` [n, H]);
        their keys and values are appended to ``cache``."""
        w = self.weights
        n = len(features)
        x = np.concatenate([embeds, features], axis=1).astype(np.float32, copy=False)
        h = linear(x, w["fc.weight"]) + w["fc.bias"]
        a = rms_norm(h, w["layer.input_layernorm.weight"], self.eps)
        shape = (n, self.heads, self.head_dim)
        q = linear(a, w["layer.self_attn.q_proj.weight"]).reshape(shape)
        k = linear(a, w["layer.self_attn.k_proj.weight"]).reshape(shape)
        v = linear(a, w["layer.self_attn.v_proj.weight"]).reshape(shape)
        past = cache.length
        positions = np.arange(cache.base + past, cache.base + past + n)
        cos, sin = rotary(positions, self.head_dim, self.rope_theta)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        cache.append(k, v)
        o = attend(q, cache.k[:cache.length], cache.v[:cache.length], 1.0 / np.sqrt(self.head_dim), past)
        h = h + linear(o, w["layer.self_attn.o_proj.weight"])
        m = rms_norm(h, w["layer.post_attention_layernorm.weight"], self.eps)
        gate = linear(m, w["layer.mlp.gate_proj.weight"])
        up = linear(m, w["layer.mlp.up_proj.weight"])
        return h + linear(gate / (1.0 + np.exp(-gate)) * up, w["layer.mlp.down_proj.weight"])

    def step(self, cache: DraftCache, features: np.ndarray, embeds: np.ndarray,
             lm_head: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``forward``, then the logits [rows of ``lm_head``] of its last position: what the
        proposer guesses from (eagle_c.CDraft computes both in one run)."""
        feature = self.forward(cache, features, embeds)
        return feature, linear(feature[-1:], lm_head)[0]

def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(eps)) * weight


def rotary(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [n, 1, head_dim / 2] of LLaMA's rotary embedding (rotate-half form)."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = positions[:, None].astype(np.float64) * inv[None]
    return np.cos(angles).astype(np.float32)[:, None], np.sin(angles).astype(np.float32)[:, None]


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def draft_path(path: str | Path) -> Path:
    """The safetensors file of a draft path (the file, or a folder holding ``DRAFT_FILE``)."""
    path = Path(path)
    return path / DRAFT_FILE if path.is_dir() else path


def load_draft(path: str | Path, hidden: int) -> tuple[EagleDraft, dict]:
    """The draft layer in ``path`` for a target of ``hidden`` width, and its config; HeadsError
    naming the problem for a file that is not one or does not fit."""
    file = draft_path(path)
    config = read_config(file)
    if config.get("architecture") != "eagle":
        raise HeadsError(f"{file.parent}/{CONFIG_FILE} does not describe an EAGLE draft (\"architecture\": \"eagle\"); "
                         "train one with `infercc train-heads MODEL -o DIR --kind eagle`")
    sizes = {}
    for name, most in _INT_FIELDS.items():
        value = config.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
            raise HeadsError(f"{file.parent}/{CONFIG_FILE}: {name} must be an integer in 1..{most}, got {value!r}")
        sizes[name] = value
    if sizes["head_dim"] % 2:
        raise HeadsError(f"{file.parent}/{CONFIG_FILE}: head_dim must be even (rotary pairs), got {sizes['head_dim']}")
    floats = {}
    for name, default in (("rope_theta", 10000.0), ("rms_norm_eps", 1e-5)):
        value = config.get(name, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1e9:
            raise HeadsError(f"{file.parent}/{CONFIG_FILE}: {name} must be a positive number, got {value!r}")
        floats[name] = float(value)
    expected = expected_shapes(hidden, sizes["num_attention_heads"], sizes["head_dim"], sizes["intermediate_size"])

    def check(shapes: dict[str, tuple[tuple[int, ...], str]]) -> None:
        for name, (shape, dtype) in shapes.items():
            if name not in expected:
                raise HeadsError(f"{file}: tensor {name!r} is not part of the EAGLE draft layout ({sorted(expected)})")
            if dtype not in ("F32", "F16", "BF16"):
                raise HeadsError(f"{file}: tensor {name!r} has dtype {dtype}; the draft must be F32, F16 or BF16")
            if shape != expected[name]:
                raise HeadsError(f"{file}: tensor {name!r} has shape {list(shape)}, expected {list(expected[name])} for "
                                 f"a model of hidden size {hidden}; this draft was trained for another model")
        missing = sorted(set(expected) - set(shapes))
        if missing:
            raise HeadsError(f"{file}: tensor {missing[0]!r} is missing")

    weights = read_tensors(file, check, "infercc train-heads --kind eagle")
    draft = EagleDraft(weights, sizes["num_attention_heads"], sizes["head_dim"], floats["rope_theta"],
                       floats["rms_norm_eps"])
    return draft, config


def save_draft(directory: str | Path, weights: dict[str, np.ndarray], **config) -> Path:
    """Write a draft layer (``DRAFT_FILE``) and its ``config.json`` into ``directory``."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({name: np.ascontiguousarray(w, np.float32) for name, w in weights.items()}, str(directory / DRAFT_FILE))
    meta = {"architecture": "eagle", **config}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return directory / DRAFT_FILE
