"""Checkpoint importers: a Hugging Face folder (config.json + safetensors) or a GGUF file becomes
an IR Model of a causal LM (input_ids, optional attention_mask -> logits), built directly in
standard ONNX ops, without torch or an intermediate ONNX file.

Reading a checkpoint (``from_hf``, ``from_gguf``, ``dequant``) is kept apart from building its
graph (``llama_graph``, ``gpt2_graph`` over ``graph_parts``); what later stages need to know
about the model goes to ``Model.metadata_props`` (see ``metadata``).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..ir import Model
from .metadata import read_metadata

__all__ = ["import_checkpoint", "is_checkpoint", "read_metadata"]


def is_checkpoint(source: str | os.PathLike) -> bool:
    """Whether ``source`` names something these importers read: a .gguf file, or a folder with
    config.json or safetensors files (an ONNX file or anything else goes to the ONNX importer)."""
    path = Path(source)
    if path.suffix.lower() == ".gguf":
        return True
    return path.is_dir() and ((path / "config.json").is_file() or any(path.glob("*.safetensors")))


def import_checkpoint(source: str | os.PathLike) -> Model:
    """Import a GGUF file or a Hugging Face folder; a ModelLoadError names what is wrong."""
    path = Path(source)
    if path.suffix.lower() == ".gguf":
        from .from_gguf import import_gguf

        return import_gguf(path)
    from .from_hf import import_hf

    return import_hf(path)
