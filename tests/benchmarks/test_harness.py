"""Fast tests of the benchmark harness with trivial configurations; no assertion about speed."""

from __future__ import annotations

import json
import sys
from itertools import groupby
from pathlib import Path

import pytest

from benchmarks.__main__ import main
from benchmarks.harness import (
    RATIO_DIRECTION,
    BenchOptions,
    Case,
    ConfigResult,
    ConfigSpec,
    compute_ratios,
    run_case,
    summarize,
)
from benchmarks.machine import THREAD_ENV_VARS
from benchmarks.report import _info, format_table, write_all

TARGETS = "tests.benchmarks.targets"


def _logged(name: str, log: Path, n: int = 16) -> ConfigSpec:
    return ConfigSpec(name, f"{TARGETS}:logged_matmul", {"name": name, "log": str(log), "n": n})


def _opts(mode: str, rounds: int = 3) -> BenchOptions:
    return BenchOptions(mode=mode, rounds=rounds, warmup=1, repeat=2, threads=1, timeout_s=60)


def test_fresh_mode_interleaves_rounds_in_separate_processes(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    case = Case("t", "toy", [_logged("A", log, 8), _logged("B", log, 32)])
    result = run_case(case, _opts("fresh"))
    assert result.schedule == [(r, n) for r in range(3) for n in "AB"]
    setups = [line for line in log.read_text().splitlines() if line.startswith("setup")]
    assert setups == ["setup A", "setup B"] * 3  # one setup per round per configuration: fresh processes
    for res in result.configs:
        assert res.status == "ok" and all(v is not None for v in res.rounds_s)
        assert res.min_s <= res.median_s and res.iqr_s >= 0 and res.setup_s is not None
        assert res.metadata["threads"] == 1
    assert result.baseline == "A" and result.config("A").ratio == pytest.approx(1.0)


def test_inprocess_mode_sets_up_once_then_interleaves(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    case = Case("t", "toy", [_logged("A", log), _logged("B", log)], baseline="B")
    result = run_case(case, _opts("inprocess"))
    lines = log.read_text().splitlines()
    assert lines[:2] == ["setup A", "setup B"] and not any(x.startswith("setup") for x in lines[2:])
    blocks = [(key, len(list(group))) for key, group in groupby(lines[2:])]
    assert blocks == [("call A", 3), ("call B", 3)] * 3  # warmup 1 + repeat 2 per round, A B A B A B
    assert result.config("B").ratio == pytest.approx(1.0)
    assert all(c.status == "ok" for c in result.configs)


def test_ratio_is_baseline_over_config() -> None:
    base = ConfigResult("base", rounds_s=[2.0, 2.0, 4.0])
    fast = ConfigResult("fast", rounds_s=[1.0, 0.5, 2.0])
    slow = ConfigResult("slow", rounds_s=[4.0, None, 8.0])
    for res in (base, fast, slow):
        summarize(res)
    compute_ratios([base, fast, slow], "base")
    assert base.ratio == 1.0 and base.paired_ratio == 1.0
    assert fast.ratio == pytest.approx(2.0) and fast.paired_ratio == pytest.approx(2.0)  # faster -> > 1
    assert slow.ratio == pytest.approx(2.0 / 6.0) and slow.paired_ratio == pytest.approx(0.5)  # slower -> < 1
    assert (
        base.q1_s == pytest.approx(2.0)
        and base.q3_s == pytest.approx(3.0)
        and base.iqr_s == pytest.approx(1.0)
    )
    assert ">1 means faster" in RATIO_DIRECTION
    assert "NOISY" in _info(slow) and "NOISY" not in _info(
        ConfigResult("flat", rounds_s=[1.0, 1.0], median_s=1.0)
    )


@pytest.mark.parametrize("mode", ["fresh", "inprocess"])
def test_failing_and_skipped_setups_do_not_kill_the_run(tmp_path: Path, mode: str) -> None:
    configs = [
        _logged("ok", tmp_path / "log.txt"),
        ConfigSpec("bad", f"{TARGETS}:failing_setup"),
        ConfigSpec("skip", f"{TARGETS}:skipping_setup"),
    ]
    case = Case("t", "toy", configs, skipped={"pre": "known up front"})
    result = run_case(case, _opts(mode, rounds=2))
    assert result.config("ok").status == "ok" and result.config("ok").ratio == pytest.approx(1.0)
    bad, skip, pre = result.config("bad"), result.config("skip"), result.config("pre")
    assert bad.status == "failed" and "RuntimeError: boom: setup exploded" in bad.error and bad.ratio is None
    assert "failing_setup" in bad.traceback
    assert skip.status == "skipped" and "optional dependency missing" in skip.error
    assert pre.status == "skipped" and pre.error == "known up front"
    assert [name for _, name in result.schedule].count("bad") <= 1  # not retried after failing
    assert "boom" in format_table(result)


def test_crashing_worker_is_reported_as_failed(tmp_path: Path) -> None:
    case = Case(
        "t", "toy", [_logged("ok", tmp_path / "log.txt"), ConfigSpec("crash", f"{TARGETS}:crashing_setup")]
    )
    result = run_case(case, _opts("fresh", rounds=1))
    crash = result.config("crash")
    assert crash.status == "failed" and "exited with code 3" in crash.error
    assert result.config("ok").status == "ok"


def test_unknown_baseline_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="baseline"):
        run_case(Case("t", "toy", [_logged("A", tmp_path / "log")], baseline="nope"), _opts("inprocess"))


def test_report_writes_table_json_and_png(tmp_path: Path) -> None:
    case = Case("t", "toy", [_logged("A", tmp_path / "log"), ConfigSpec("bad", f"{TARGETS}:failing_setup")])
    result = run_case(case, _opts("inprocess", rounds=2))
    paths = write_all(result, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["ratio_direction"] == RATIO_DIRECTION and data["baseline"] == "A"
    assert [c["name"] for c in data["configs"]] == ["A", "bad"] and data["configs"][1]["status"] == "failed"
    assert {"cpu_model", "logical_cores", "packages"} <= set(data["machine"])
    assert {"onnxruntime", "onnx", "numpy", "infercc"} <= set(data["machine"]["packages"])
    assert data["options"]["threads"] == 1
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = paths["table"].read_text()
    assert RATIO_DIRECTION in table and "A *" in table and "FAILED" in table


def test_cli_list_and_toy_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in THREAD_ENV_VARS:
        monkeypatch.delenv(var, raising=False)  # main() pins them; monkeypatch restores them afterwards
    assert main(["--list"]) == 0
    assert "roundtrip" in capsys.readouterr().out
    out = tmp_path / "out"
    args = "matmul --sizes 16 8 --mode inprocess --rounds 2 --repeat 2 -q --out".split() + [str(out)]
    assert main(args) == 0
    assert "n16 *" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"results.txt", "results.json", "results.png"}


def test_roundtrip_case_runs_plain_onnxruntime(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in THREAD_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "rt"
    opts = "--layers 1 --hidden 64 --seq 8 --mode inprocess --rounds 1 --warmup 0 --repeat 1 -q --out"
    args = ["roundtrip", *opts.split(), str(out)]
    assert main(args) == 0
    data = json.loads((out / "results.json").read_text())
    by_name = {c["name"]: c for c in data["configs"]}
    assert set(by_name) == {"ort", "infercc-noopt", "infercc-opt"} and by_name["ort"]["status"] == "ok"
    from benchmarks.cases.roundtrip import infercc_unavailable

    expected = "ok" if infercc_unavailable() is None else "skipped"  # skipped with a reason, never silent
    for name in ("infercc-noopt", "infercc-opt"):
        assert by_name[name]["status"] == expected, by_name[name]["error"]
        assert expected == "ok" or by_name[name]["error"]
    assert (out / "model.onnx").exists()


def _signature_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "sequence"]),
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, None]),
        helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch_size", "sequence"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence"]),
    ]
    outputs = [
        helper.make_tensor_value_info(f"{i.name}_out", i.type.tensor_type.elem_type, None) for i in inputs
    ]
    nodes = [helper.make_node("Identity", [i.name], [f"{i.name}_out"]) for i in inputs]
    graph = helper.make_graph(nodes, "sig", inputs, outputs)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def test_random_feeds_follow_the_signature(tmp_path: Path) -> None:
    import numpy as np

    from benchmarks.cases.roundtrip import _session, make_feeds

    feeds = make_feeds(_session(str(_signature_model(tmp_path / "m.onnx")), 1), batch=2, seq=5)
    assert feeds["input_ids"].shape == (2, 5) and feeds["input_ids"].dtype == np.int64
    assert 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < 100
    assert (feeds["attention_mask"] == 1).all()
    assert feeds["x"].shape == (2, 3, 5) and feeds["x"].dtype == np.float32
    assert (feeds["token_type_ids"] == 0).all() and feeds["position_ids"].tolist() == [[0, 1, 2, 3, 4]] * 2


def test_roundtrip_accepts_model_and_feeds_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    for var in THREAD_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    model = _signature_model(tmp_path / "m.onnx")
    ints = np.zeros((1, 4), np.int64)
    names = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
    arrays = {f"feed:{n}": ints for n in names} | {"feed:x": np.zeros((1, 3, 2), np.float32)}
    np.savez(
        tmp_path / "feeds.npz", **arrays, **{"ort:x_out": np.zeros((1, 3, 2), np.float32)}
    )  # fixture layout
    out = tmp_path / "out"
    opts = f"--model {model} --feeds {tmp_path / 'feeds.npz'} --mode fresh --rounds 1 --repeat 1 -q --only ort --out"
    assert main(["roundtrip", *opts.split(), str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert [c["name"] for c in data["configs"]] == ["ort"] and data["configs"][0]["status"] == "ok"
    assert data["notes"]["built_in_model"] is False and not (out / "model.onnx").exists()


class _FakeCompiled:
    """Stands in for infercc.CompiledModel (contract: .run(feeds) -> dict) until the real one exists."""

    def __init__(self, model: str, optimize: bool, intra_op_threads: int, **options: object) -> None:
        import onnx

        from benchmarks.cases.roundtrip import _session

        self.model = onnx.load(model)
        self._sess = _session(model, intra_op_threads)
        self._names = [o.name for o in self._sess.get_outputs()]

    def run(self, feeds: dict) -> dict:
        return dict(zip(self._names, self._sess.run(None, feeds)))


def test_roundtrip_infercc_configs_against_the_api_contract(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    for var in THREAD_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    fake = types.ModuleType("infercc")
    fake.compile = lambda model, config=None, **options: _FakeCompiled(model, **options)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "infercc", fake)
    out = tmp_path / "rt"
    opts = "--layers 1 --hidden 64 --seq 8 --mode inprocess --rounds 2 --warmup 0 --repeat 1 -q --out"
    assert main(["roundtrip", *opts.split(), str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    by_name = {c["name"]: c for c in data["configs"]}
    for name in ("infercc-noopt", "infercc-opt"):
        assert by_name[name]["status"] == "ok", by_name[name]["error"]
        assert by_name[name]["metadata"]["max_abs_diff"] == 0.0
        assert by_name[name]["metadata"]["nodes"] == by_name["ort"]["metadata"]["nodes"]
        assert by_name[name]["ratio"] is not None
