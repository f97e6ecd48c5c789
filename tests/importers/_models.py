"""Where the real checkpoints live (../shared/models from the repo root, never copied into the
repo) and what their REFERENCE.txt documents."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

MODELS = (Path(__file__).resolve().parents[2] / ".." / "shared" / "models").resolve()
STORIES = MODELS / "stories260K" / "stories260K.gguf"
SMOLLM2 = MODELS / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def require(path: Path) -> Path:
    """``path``, or skip the test saying which shared model is missing and where it belongs."""
    if not path.is_file():
        pytest.skip(f"shared model {path.name} not found at {path} (see that folder's SOURCE.txt to obtain it)")
    return path


def reference(path: Path) -> dict:
    """REFERENCE.txt beside ``path``: prompt text, prompt ids, generated ids."""
    text = (path.parent / "REFERENCE.txt").read_text()
    return {
        "prompt": re.search(r'prompt text\s*:\s*"(.*)"', text).group(1),
        "prompt_ids": ast.literal_eval(re.search(r"prompt ids\s*:\s*(\[[^\]]*\])", text).group(1)),
        "ids": ast.literal_eval(re.search(r"64 generated ids:\s*(\[[^\]]*\])", text).group(1)),
        "text": text,
    }
