"""The profiler on both runtimes: a real profiling C build and a real ONNX Runtime profile, their
tables (op types, layers, percentages, calls) and the Chrome trace (one event per executed step,
one track per run), and bench's measurements for a decoder and an encoder."""

from __future__ import annotations

import json

import pytest

import infercc
from infercc.errors import InputError
from infercc.runtime.bench import bench
from infercc.runtime.profiler import CRecorder, OrtRecorder, open_recorder
from tests.fixtures import catalog


def _compile(name: str, backend: str) -> infercc.CompiledModel:
    compiled = infercc.compile(catalog.fixture_path(name), backend=backend)
    compiled.config = compiled.config.replace(intra_op_threads=1)
    return compiled


@pytest.mark.parametrize("backend", ["c", "ort"])
def test_decoder_profile_tables_and_trace(backend: str, tmp_path) -> None:
    compiled = _compile("llama_dynamo", backend)
    result = bench(compiled, prompt_tokens=6, new_tokens=3, repeats=2, profile=True)
    assert result.runtime == backend and result.kind == "decoder"
    assert len(result.prefill_s) == len(result.decode_s) == 2 and result.decode_tokens_per_second > 0
    profile = result.profile
    assert profile is not None and profile.runtime == backend
    assert [r.label for r in profile.runs] == ["prefill", "decode 1", "decode 2", "decode 3"]  # the last repetition
    for run in profile.runs:
        assert run.events and all(e.dur_us >= 0 and e.start_us >= 0 for e in run.events)
        assert sum(e.dur_us for e in run.events) <= run.dur_us * 1.01 + 1  # ORT rounds to whole us
    starts = [r.start_us for r in profile.runs]
    assert starts[0] == 0 and starts == sorted(starts)

    ops = profile.rows("op")
    assert {"MatMul"} <= {r.key for r in ops}
    assert abs(sum(r.percent for r in ops) - 100) < 1e-6
    assert sum(r.calls for r in ops) == sum(len(r.events) for r in profile.runs)
    assert [r.ms for r in ops] == sorted((r.ms for r in ops), reverse=True)
    layers = profile.rows("layer")
    assert [r.key for r in layers] == ["layers.0", "layers.1", "-"]
    assert abs(sum(r.ms for r in layers) - profile.total_ms) < 1e-6
    attention = "ai.infercc::Attention" if backend == "c" else "com.microsoft::GroupQueryAttention"
    assert next(r for r in ops if r.key == attention).calls == 2 * len(profile.runs)  # one per layer per run
    assert "MatMul" in profile.table("op", limit=3) and "more)" in profile.table("op", limit=3)

    path = profile.write_trace(tmp_path / "trace.json")
    trace = json.loads(path.read_text())
    steps = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(steps) == sum(len(r.events) for r in profile.runs)
    assert {e["tid"] for e in steps} == {1, 2, 3, 4}  # one track per run
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert names == {1: "prefill", 2: "decode 1", 3: "decode 2", 4: "decode 3"}
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in steps)


def test_c_steps_are_the_program_steps() -> None:
    compiled = _compile("llama_dynamo", "c")
    recorder, reason = open_recorder(compiled)
    assert isinstance(recorder, CRecorder) and reason.startswith("generated C")
    result = bench(compiled, prompt_tokens=4, new_tokens=1, repeats=1, profile=True)
    steps = len(compiled.model.graph.nodes)
    assert [len(r.events) for r in result.profile.runs] == [steps, steps]


def test_ort_profile_names_our_nodes() -> None:
    """ONNX Runtime's kernel events are matched to the lowered graph's nodes by name (op types
    with their domain, layers from the step table), runs to its model_run spans."""
    compiled = _compile("bert_torchscript", "ort")
    recorder, reason = open_recorder(compiled)
    assert isinstance(recorder, OrtRecorder) and "ONNX Runtime" in reason
    result = bench(compiled, prompt_tokens=5, repeats=1, profile=True)
    assert result.kind == "encoder" and result.new_tokens == 0 and not result.decode_s
    (run,) = result.profile.runs
    assert run.label == "forward"
    names = {n.name for n in compiled.model.graph.nodes}
    assert sum(e.name in names for e in run.events) >= 0.8 * len(run.events)
    assert any(e.op.startswith("com.microsoft::") for e in run.events)
    assert {"layers.0", "layers.1"} <= {e.layer for e in run.events}
    assert [e.start_us for e in run.events] == sorted(e.start_us for e in run.events)


def test_encoder_forward_on_c_without_profile() -> None:
    compiled = _compile("bert_dynamo", "c")
    result = bench(compiled, prompt_tokens=4, repeats=2)
    assert result.runtime == "c" and result.kind == "encoder" and result.profile is None
    assert len(result.prefill_s) == 2 and all(s > 0 for s in result.prefill_s)


def test_bad_counts_are_input_errors() -> None:
    compiled = _compile("bert_dynamo", "ort")
    with pytest.raises(InputError, match="--prompt-tokens"):
        bench(compiled, prompt_tokens=0)


def test_unwritable_trace_is_an_input_error(tmp_path) -> None:
    compiled = _compile("bert_dynamo", "c")
    profile = bench(compiled, prompt_tokens=3, repeats=1, profile=True).profile
    (tmp_path / "dir").mkdir()
    with pytest.raises(InputError, match="--trace"):
        profile.write_trace(tmp_path / "dir")
