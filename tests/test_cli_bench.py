"""`infercc bench` end to end on fixture models, both runtimes: the speed lines, the profile tables
and a trace file that parses; encoder-only models get the forward time; bad arguments end in one
`error:` line."""

from __future__ import annotations

import json

import pytest

from infercc import cli
from tests.fixtures import catalog

FAST = ["--prompt-tokens", "6", "--new-tokens", "2", "--repeats", "1", "--threads", "1"]


@pytest.mark.parametrize("backend", ["c", "ort"])
def test_bench_profile_decoder(backend: str, tmp_path, capsys) -> None:
    trace = tmp_path / "trace.json"
    code = cli.main(["bench", str(catalog.fixture_path("llama_dynamo")), "--backend", backend, *FAST,
                     "--profile", "--trace", str(trace)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert ("generated C" if backend == "c" else "ONNX Runtime") in out.splitlines()[1]
    assert "prefill    6 tokens in" in out and "decode     2 tokens at" in out
    # C: the decode loop generate() runs (the cache appended in place), its timers read per token
    assert ("the C decode loop" if backend == "c" else "one run per token") in out
    assert "time per op type" in out and "MatMul" in out
    assert "time per layer" in out and "layers.1" in out
    assert f"trace: {trace}" in out
    events = json.loads(trace.read_text())["traceEvents"]
    runs = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert runs == {"prefill", "decode 1", "decode 2"}
    assert sum(e["ph"] == "X" for e in events) > 3 * 10


def test_bench_encoder_has_no_decode(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # --profile without --trace writes ./trace.json
    code = cli.main(["bench", str(catalog.fixture_path("bert_torchscript")), *FAST, "--profile"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "forward    6 tokens in" in out and "encoder-only: no decode" in out and "decode     " not in out
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"]


def test_bench_without_profile_writes_no_trace(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", str(catalog.fixture_path("gpt2_dynamo")), "--backend", "c", *FAST]) == 0
    out = capsys.readouterr().out
    assert "decode" in out and "time per op type" not in out and "one run per token" not in out
    assert not (tmp_path / "trace.json").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--trace", "/nonexistent-folder/t.json"], "--trace /nonexistent-folder/t.json: the folder"),
    (["--prompt-tokens", "0"], "--prompt-tokens must be >= 1"),
])
def test_bench_bad_arguments(args: list[str], message: str, capsys) -> None:
    assert cli.main(["bench", str(catalog.fixture_path("bert_dynamo")), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err


def test_bench_times_the_c_decode_loop_generate_uses(monkeypatch) -> None:
    """A C library's decode is timed in its own loop (what ``generate`` runs), not one
    Python-driven run per token; with --profile too, its timers read at each token: the profile
    then shows the cache appended in place, as generate runs it, not copied each step."""
    import infercc
    from infercc.runtime.bench import bench
    from infercc.runtime.model_runner import ModelRunner

    compiled = infercc.compile(catalog.fixture_path("llama_dynamo"), backend="c", intra_op_threads=1)
    steps = []
    step = ModelRunner.step
    monkeypatch.setattr(ModelRunner, "step", lambda self, *a, **k: steps.append(1) or step(self, *a, **k))
    ticks = []
    result = bench(compiled, prompt_tokens=6, new_tokens=3, repeats=2, on_run=lambda: ticks.append(1))
    assert steps == [] and len(ticks) == 3 * 4
    assert len(result.prefill_s) == len(result.decode_s) == 2 and min(result.decode_s) > 0
    profiled = bench(compiled, prompt_tokens=6, new_tokens=3, repeats=1, profile=True)
    runs = profiled.profile.runs
    assert steps == [] and profiled.decode_loop
    assert [r.label for r in runs] == ["prefill", "decode 1", "decode 2", "decode 3"]
    assert all(len(r.events) == len(compiled.model.graph.nodes) and r.dur_us > 0 for r in runs)
    assert [r.start_us for r in runs] == sorted(r.start_us for r in runs)  # four distinct runs, in order
    assert len({r.start_us for r in runs}) == 4
