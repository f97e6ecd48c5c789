"""The committed LoRA fixtures (tests/fixtures/make_lora.py made them with peft): tiny base
models, their adapters and PEFT's torch logits, and compiled models shared by a test module."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

import infercc

DATA = Path(__file__).resolve().parents[1] / "fixtures" / "data" / "lora"
ADAPTERS = {"llama": ("a", "b", "c", "d"), "qwen2": ("a",), "gpt2": ("a",)}
#: fp32 tolerance against PEFT's torch logits (the issue's acceptance bound).
TOL = 1e-4


@functools.cache
def references() -> dict[str, np.ndarray]:
    with np.load(DATA / "references.npz") as refs:
        return {k: refs[k] for k in refs.files}


def prompt(arch: str) -> list[int]:
    return [int(t) for t in references()[f"{arch}/ids"][0]]


def compiled(arch: str, *adapters: str, **config) -> infercc.CompiledModel:
    """A fresh compile of ``arch``'s base with ``adapters`` loaded under their own names."""
    model = infercc.compile(DATA / arch / "base", infercc.Config(**config))
    for name in adapters:
        model.add_adapter(name, DATA / arch / name)
    return model
