"""Mutated ONNX models (the GPT-2 TorchScript fixture, inline and with its weights in an external data
file) must compile and run, or fail with an InferccError: never another exception, a crash, a hang or
a runaway allocation. Mutations include hostile external-data paths and symbolic links out of the
model's folder.

Default run: 15 variants per model. ``python -m pytest -m slow tests/fuzz`` runs INFERCC_FUZZ_COUNT
(default 2000) per model.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from tests.fixtures.catalog import fixture_path
from tests.fuzz.harness import check_variants, default_seeds, slow_seeds

FIXTURE = "gpt2_torchscript"  # a small decoder (520 KB) that gets the whole pipeline: fusion, KV cache
BASES = ["inline", "external"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    source = fixture_path(FIXTURE)
    if not source.is_file():
        pytest.skip(f"fixture {source} not built (tests/fixtures/make_fixtures.py)")
    folder = tmp_path_factory.mktemp("fuzz-onnx")
    external = folder / "model.onnx"
    onnx.save_model(onnx.load(str(source)), str(external), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return {"inline": source, "external": external}


@pytest.mark.parametrize("name", BASES)
def test_mutated_onnx_fails_cleanly(name: str, models: dict[str, Path], tmp_path: Path) -> None:
    check_variants("onnx", models[name], default_seeds(), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", BASES)
def test_mutated_onnx_fails_cleanly_many(name: str, models: dict[str, Path], tmp_path: Path) -> None:
    check_variants("onnx", models[name], slow_seeds(), tmp_path)
