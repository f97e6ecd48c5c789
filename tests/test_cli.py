"""The infercc command line: real runs of the entry point, errors as one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import infercc
from infercc import cli
from infercc.cli import main
from infercc.errors import ModelLoadError
from tests.fixtures.catalog import fixture_path, reference


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infercc.cli", *args], capture_output=True, text=True, timeout=120)


def test_convert_writes_artifact_that_loads_and_matches(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli("convert", str(fixture_path("llama_dynamo")), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "constant_folding" in proc.stdout and "wrote" in proc.stdout
    assert (out / "model.onnx").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert {r["pass"] for r in manifest["diagnostics"]} >= {"constant_folding", "dead_code_elimination"}
    feeds, expected = reference("llama_dynamo")
    got = infercc.load(out).run(feeds)
    real = feeds["attention_mask"].astype(bool)  # padding positions are unspecified (passes/kv_cache/gqa.py)
    np.testing.assert_allclose(got["logits"][real], expected["logits"][real], atol=1e-5)


def test_inspect_reports_structure_and_passes(capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(fixture_path("bert_torchscript")), "--sites"]) == 0
    text = capsys.readouterr().out
    for expected in ("family", "bert", "op histogram", "input_ids", "what each pass would do", "constant_folding"):
        assert expected in text


def test_inspect_json_and_compiled_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    infercc.compile(fixture_path("gpt2_dynamo")).save(tmp_path / "c")
    assert main(["inspect", str(tmp_path / "c"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"]["kind"] == "decoder"
    assert report["diagnostics"]["passes"]


@pytest.mark.parametrize(
    "content, needle",
    [(None, "no such file"), (b"definitely not onnx \x00\xff" * 10, "not a readable ONNX model"), (b"", "empty")],
)
def test_bad_input_is_one_line_error(tmp_path: Path, content: bytes | None, needle: str) -> None:
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    proc = run_cli("convert", str(path), "-o", str(tmp_path / "out"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_pass_name_is_one_line_error(tmp_path: Path) -> None:
    proc = run_cli("convert", str(fixture_path("gpt2_dynamo")), "-o", str(tmp_path / "o"), "--disable-pass", "nope")
    assert proc.returncode == 1 and "unknown pass" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def raiser(exc: BaseException):
    def command(args) -> int:
        raise exc

    return command


@pytest.mark.parametrize(
    "exc, expected, bug",
    [
        (ModelLoadError("m.onnx: broken; fix it"), "error: m.onnx: broken; fix it", False),
        (FileNotFoundError(2, "No such file or directory", "m.onnx"),
         "error: FileNotFoundError: [Errno 2] No such file or directory: 'm.onnx'", False),
        (MemoryError(), "error: out of memory (MemoryError); close other programs, or use a smaller model", False),
        (KeyError("weights"), "error: KeyError: 'weights' (this is a bug in infercc; rerun with --debug for the "
                              "traceback)", True),
        (RuntimeError("first\n  second"), "error: RuntimeError: first second (this is a bug", True),
        (ValueError(), "error: ValueError (this is a bug", True),
    ],
    ids=["ours", "os", "memory", "key", "runtime-two-lines", "value-no-text"],
)
def test_every_failure_is_one_line_and_exit_1(monkeypatch, capsys, exc, expected, bug) -> None:
    """The handler of main(): the command is replaced by one that raises (the failure's origin
    does not matter to the handler; real failures are covered by the subprocess tests above)."""
    monkeypatch.setattr(cli, "cmd_inspect", raiser(exc))
    assert main(["inspect", "m.onnx"]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), captured.err
    assert ("this is a bug in infercc" in lines[0]) is bug
    assert captured.out == ""


def test_interrupt_is_exit_130_and_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "cmd_inspect", raiser(KeyboardInterrupt()))
    assert main(["inspect", "m.onnx"]) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


@pytest.mark.parametrize("exc", [KeyError("weights"), ModelLoadError("m.onnx: broken"), KeyboardInterrupt()],
                         ids=["unexpected", "ours", "interrupt"])
def test_debug_shows_the_traceback(monkeypatch, exc) -> None:
    monkeypatch.setattr(cli, "cmd_inspect", raiser(exc))
    with pytest.raises(type(exc)):
        main(["--debug", "inspect", "m.onnx"])


def test_usage_errors_stay_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["convert", "m.onnx"])  # -o is required
    assert info.value.code == 2 and "required" in capsys.readouterr().err


def test_demo_runs(capsys: pytest.CaptureFixture) -> None:
    assert main(["demo", "--tiny"]) == 0
    text = capsys.readouterr().out
    diff = float(text.split("max difference vs the unoptimized model ")[1].split()[0])
    assert diff < 1e-5
    assert "constant_folding" in text and "saved and reloaded" in text


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "models"


@pytest.mark.skipif(not (SHARED / "stories260K").is_dir(), reason="needs ../shared/models/stories260K beside the repo")
def test_inspect_takes_a_gguf_checkpoint(capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(SHARED / "stories260K" / "stories260K.gguf")]) == 0
    text = capsys.readouterr().out
    assert "input_ids" in text and "attention_fusion" in text and "would do" in text
