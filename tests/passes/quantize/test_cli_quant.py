"""``infercc convert --quantize``: the printed report and what manifest.json records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infercc.cli import main
from tests.fixtures.catalog import fixture_path


def test_convert_quantize_prints_report_and_records_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "q"
    argv = ["convert", str(fixture_path("llama_torchscript")), "-o", str(out), "--quantize", "int4",
            "--quant-method", "rtn", "--quant-block-size", "64"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for expected in ("quantization: int4 (rtn", "worst 10 layers", "end-to-end vs the float model", "artifact", "x)"):
        assert expected in text, expected
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["quantize"] == "int4" and manifest["config"]["quant_block_size"] == 64
    record = next(r for r in manifest["diagnostics"] if r["pass"] == "quantize_weights")
    assert record["status"] == "applied"
    assert record["info"]["end_to_end"]["outputs"]["logits"]["cosine"] > 0.9
    assert all(layer["method"] == "rtn" for layer in record["info"]["layers"])


def test_convert_rejects_bad_quantization_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["convert", str(fixture_path("llama_dynamo")), "-o", str(tmp_path), "--quantize", "int3"])
    assert main(["convert", str(fixture_path("llama_dynamo")), "-o", str(tmp_path), "--quantize", "int8", "--check"]) == 0
