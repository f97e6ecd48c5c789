"""What an imported checkpoint tells later stages (generation, tokenizers, KV-cache graph
builders), kept in ``Model.metadata_props`` under ``infercc.*`` keys so it survives passes,
saving and loading. Values are strings: JSON for lists, decimal for numbers.

Keys: architecture, source (file or folder the model was read from; also where its tokenizer
lives), source_format ("gguf" or "hf"), vocab_size, bos_token_id, eos_token_ids (JSON list),
context_length, chat_template, num_layers, num_heads, num_kv_heads, hidden_size, head_dim.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..ir import Model

PREFIX = "infercc."
_LISTS = ("eos_token_ids",)
_INTS = ("vocab_size", "bos_token_id", "context_length", "num_layers", "num_heads", "num_kv_heads", "hidden_size", "head_dim")


def model_metadata(**fields: Any) -> dict[str, str]:
    """``infercc.<field>`` -> string; fields that are None are left out."""
    out: dict[str, str] = {}
    for key, value in fields.items():
        if value is None:
            continue
        if key in _LISTS:
            out[PREFIX + key] = json.dumps([int(v) for v in value])
        elif isinstance(value, os.PathLike):
            out[PREFIX + key] = os.fspath(os.path.abspath(value))
        else:
            out[PREFIX + key] = str(int(value)) if key in _INTS else str(value)
    if fields.get("head_dim") is None and fields.get("hidden_size") and fields.get("num_heads"):
        out[PREFIX + "head_dim"] = str(int(fields["hidden_size"]) // int(fields["num_heads"]))
    return out


def read_metadata(model: Model) -> dict[str, Any]:
    """The ``infercc.*`` fields of ``model``, decoded (ints as int, lists as lists), prefix dropped."""
    out: dict[str, Any] = {}
    for key, value in model.metadata_props.items():
        if not key.startswith(PREFIX):
            continue
        name = key[len(PREFIX):]
        out[name] = json.loads(value) if name in _LISTS else int(value) if name in _INTS else value
    return out
