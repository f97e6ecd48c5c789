"""Mutated GGUF files (stories260K and a synthetic file with every tensor type we read) must compile and
generate, or fail with an InferccError: never another exception, a crash, a hang or a runaway allocation.

Default run: 15 variants per file. ``python -m pytest -m slow tests/fuzz`` runs INFERCC_FUZZ_COUNT
(default 2000) per file; see harness.py for reproducing a failing seed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.harness import check_variants, default_seeds, slow_seeds
from tests.fuzz.synthetic import write_tiny_gguf
from tests.importers._models import STORIES, require

BASES = ["stories260K", "tiny"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("fuzz-gguf") / "tiny.gguf")


def _base(name: str, tiny: Path) -> Path:
    return require(STORIES) if name == "stories260K" else tiny


@pytest.mark.parametrize("name", BASES)
def test_mutated_gguf_fails_cleanly(name: str, tiny_gguf: Path, tmp_path: Path) -> None:
    check_variants("gguf", _base(name, tiny_gguf), default_seeds(), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", BASES)
def test_mutated_gguf_fails_cleanly_many(name: str, tiny_gguf: Path, tmp_path: Path) -> None:
    check_variants("gguf", _base(name, tiny_gguf), slow_seeds(), tmp_path)
