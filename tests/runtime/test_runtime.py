"""Runtime pieces: feed checking, random feeds, numeric comparison, provider choice, ORT backend."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest

from infercc import ConfigError, InputError
from infercc.ir import DType
from infercc.runtime import feeds as feeds_mod
from infercc.runtime import ort_backend, providers
from infercc.runtime.feeds import check_feeds, random_feeds, signature
from infercc.runtime.numerics import NumericCheck, NumericMismatch, max_difference
from infercc.runtime.ort_backend import OrtBackend
from tests.fixtures import catalog
from tests.passes._build import I32, I64, B, F, init, make, node, ort_run, to_ir, vi


def _model():
    """x: float[batch, 4], ids: int64[batch, seq], mask: int64[batch, seq], flag: bool[], s: string[2]"""
    return make(
        [
            node("Relu", ["x"], ["y"]),
            node("Gather", ["table", "ids"], ["e"], axis=0),
            node("Cast", ["mask"], ["mf"], to=F),
            node("Not", ["flag"], ["nf"]),
        ],
        [vi("x", ["batch", 4]), vi("ids", ["batch", "seq"], I64), vi("mask", ["batch", "seq"], I64), vi("flag", [], B),
         vi("u", None, F)],
        [vi("y", ["batch", 4]), vi("e", ["batch", "seq", 4]), vi("mf", ["batch", "seq"]), vi("nf", [], B)],
        [init("table", np.zeros((7, 4), np.float32))],
    )


# ---------------------------------------------------------------------------------- feeds
def test_signature():
    g = to_ir(_model()).graph
    sig = signature(g.inputs)
    assert sig[0] == {"name": "x", "dtype": "float", "shape": ["batch", 4]}
    assert sig[3] == {"name": "flag", "dtype": "bool", "shape": []}
    assert sig[4] == {"name": "u", "dtype": "float", "shape": None}


def _good():
    return {
        "x": np.zeros((2, 4), np.float32), "ids": np.zeros((2, 3), np.int64), "mask": np.ones((2, 3), np.int64),
        "flag": np.array(True), "u": np.zeros((5, 1, 2), np.float32),
    }


def test_check_feeds_accepts_and_converts():
    g = to_ir(_model()).graph
    feeds = _good()
    feeds["ids"] = feeds["ids"].astype(np.int32)
    feeds["x"] = [[0.5, 1, 2, 3], [4, 5, 6, 7]]  # a list of Python numbers
    out = check_feeds(g, feeds)
    assert out["ids"].dtype == np.int64 and out["x"].dtype == np.float32
    assert out["u"].shape == (5, 1, 2)  # unknown rank: anything goes


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda f: f.update(bogus=np.zeros(1)), ["bogus", "unknown"]),
        (lambda f: f.pop("mask"), ["missing", "mask"]),
        (lambda f: f.update(x=np.zeros((2, 4, 1), np.float32)), ["'x'", "rank 2"]),
        (lambda f: f.update(x=np.zeros((2, 3), np.float32)), ["'x'", "axis 1 must be 4"]),
        (lambda f: f.update(mask=np.ones((2, 4), np.int64)), ["'ids'", "'mask'", "'seq'", "3 vs 4"]),
        (lambda f: f.update(mask=np.ones((3, 3), np.int64)), ["'x'", "'mask'", "'batch'"]),
        (lambda f: f.update(ids=np.zeros((2, 3), np.float32)), ["'ids'", "int64", "astype"]),
        (lambda f: f.update(flag=np.array(1)), ["'flag'", "bool"]),
        (lambda f: f.update(x=np.zeros((2, 4), np.complex64)), ["'x'", "float"]),
    ],
    ids=["unknown", "missing", "rank", "fixed-dim", "seq", "batch", "float-ids", "int-flag", "complex"],
)
def test_check_feeds_errors_name_the_input(change, words):
    g = to_ir(_model()).graph
    feeds = _good()
    change(feeds)
    with pytest.raises(InputError) as info:
        check_feeds(g, feeds)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_check_feeds_needs_a_mapping_of_arrays():
    g = to_ir(_model()).graph
    with pytest.raises(InputError, match="dict of input name"):
        check_feeds(g, [np.zeros((2, 4), np.float32)])
    feeds = _good()
    feeds["x"] = [[1.0, 2.0], [3.0]]  # ragged
    with pytest.raises(InputError, match="'x'"):
        check_feeds(g, feeds)
    feeds = _good()
    feeds["x"] = np.array([["a", "b", "c", "d"]] * 2)
    with pytest.raises(InputError, match="'x'"):
        check_feeds(g, feeds)


def test_random_feeds_follow_the_graph():
    g = to_ir(_model()).graph
    f = random_feeds(g, np.random.default_rng(0))
    assert f["x"].shape == (2, 4) and f["x"].dtype == np.float32
    assert f["ids"].shape == (2, 8) and f["ids"].dtype == np.int64  # "batch" -> 2, sequence-like dims -> 8
    assert f["mask"].tolist() == np.ones_like(f["mask"]).tolist()
    assert f["flag"].dtype == np.bool_ and f["flag"].shape == ()
    assert f["ids"].max() < 7  # the table it indexes has 7 rows
    check_feeds(g, f)


def test_random_feeds_sequence_dims_and_overrides():
    proto = make(
        [node("Gather", ["table", "input_ids"], ["e"], axis=0), node("Cast", ["position_ids"], ["p"], to=F)],
        [vi("input_ids", ["batch", "seq_len"], I64), vi("position_ids", ["batch", "seq_len"], I64)],
        [vi("e", ["batch", "seq_len", 2]), vi("p", ["batch", "seq_len"])],
        [init("table", np.zeros((50, 2), np.float32))],
    )
    g = to_ir(proto).graph
    f = random_feeds(g, np.random.default_rng(0))
    assert f["input_ids"].shape == (2, 8)
    assert f["position_ids"].tolist() == [list(range(8))] * 2
    f = random_feeds(g, np.random.default_rng(0), {"batch": 3, "seq_len": 5})
    assert f["input_ids"].shape == (3, 5) and 0 <= f["input_ids"].min() and f["input_ids"].max() < 50
    ort_run(proto, f)


def test_index_bound_follows_casts():
    proto = make(
        [node("Cast", ["ids"], ["i32"], to=I32), node("Gather", ["table", "i32"], ["e"], axis=0)],
        [vi("ids", [64], I64)], [vi("e", [64, 2])], [init("table", np.zeros((3, 2), np.float32))],
    )
    g = to_ir(proto).graph
    assert feeds_mod._index_bound(g.inputs[0]) == 3
    assert random_feeds(g, np.random.default_rng(1))["ids"].max() < 3


# ------------------------------------------------------------------------------- numerics
def test_max_difference_basics():
    a = {"y": np.array([1.0, 100.0], np.float32), "i": np.array([1, 2])}
    assert max_difference(a, {k: v.copy() for k, v in a.items()}) == (0.0, "")
    d, where = max_difference(a, {"y": np.array([1.5, 101.0], np.float32), "i": np.array([1, 2])})
    assert where == "y" and d == pytest.approx(0.5)  # relative to max(1, |ref|): 0.5/1 vs 1/100
    assert max_difference(a, {"y": a["y"], "i": np.array([1, 3])}) == (float("inf"), "i")
    d, where = max_difference(a, {"y": a["y"][:1], "i": a["i"]})
    assert d == float("inf") and "shape" in where
    d, where = max_difference(a, {"y": a["y"].astype(np.float16), "i": a["i"]})
    assert d == float("inf") and "dtype" in where


def test_max_difference_nan_and_inf():
    nan, inf = np.nan, np.inf
    ref = {"y": np.array([nan, 1.0, inf, -inf], np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert max_difference(ref, {"y": ref["y"].copy()})[0] == 0.0
        # same number of NaNs, different places
        assert max_difference(ref, {"y": np.array([1.0, nan, inf, -inf], np.float32)})[0] == float("inf")
        assert max_difference(ref, {"y": np.array([nan, 1.0, -inf, -inf], np.float32)})[0] == float("inf")
        assert max_difference(ref, {"y": np.array([nan, 1.0, 1e30, -inf], np.float32)})[0] == float("inf")
        all_nan = {"y": np.full(3, nan, np.float32)}
        assert max_difference(all_nan, {"y": all_nan["y"].copy()})[0] == 0.0
        assert max_difference({"y": np.zeros(0, np.float32)}, {"y": np.zeros(0, np.float32)})[0] == 0.0


def test_numeric_check_compares_with_the_reference():
    proto = make([node("Relu", ["x"], ["y"])], [vi("x", ["n", 3])], [vi("y", ["n", 3])])
    model = to_ir(proto)
    check = NumericCheck(model.clone(), 1e-6)
    assert check.compare(model) == 0.0
    model.graph.nodes[0].op_type = "Sigmoid"
    with pytest.raises(NumericMismatch, match="outputs changed"):
        check.compare(model)


# ------------------------------------------------------------------------------ providers
def test_cpu_provider():
    assert providers.choose_providers("cpu") == (["CPUExecutionProvider"], "CPU (requested)")


def test_auto_without_cuda(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    chosen, why = providers.choose_providers("auto")
    assert chosen == ["CPUExecutionProvider"] and why.startswith("CPU (auto")


def test_cuda_missing_is_a_config_error(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ConfigError, match="onnxruntime-gpu"):
        providers.choose_providers("cuda")


def test_cuda_available(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(providers, "_gpu_present", lambda: True)
    assert providers.choose_providers("cuda")[0] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers.choose_providers("auto")[0][0] == "CUDAExecutionProvider"
    monkeypatch.setattr(providers, "_gpu_present", lambda: False)
    assert providers.choose_providers("auto")[0] == ["CPUExecutionProvider"]


def test_gpu_probe_never_raises():
    assert providers._gpu_present() in (True, False)


# ----------------------------------------------------------------------------- ORT backend
def _weighty():
    w = np.arange(64 * 8, dtype=np.float32).reshape(64, 8) / 100
    return make([node("MatMul", ["x", "w"], ["y"])], [vi("x", ["n", 64])], [vi("y", ["n", 8])], [init("w", w)])


def test_backend_runs_and_names_outputs():
    model = to_ir(_weighty())
    backend = OrtBackend(model, ["CPUExecutionProvider"], intra_op_threads=1, inter_op_threads=1)
    x = np.ones((3, 64), np.float32)
    out = backend.run({"x": x})
    assert list(out) == ["y"] and backend.output_names == ["y"]
    np.testing.assert_allclose(out["y"], ort_run(_weighty(), {"x": x})["y"], rtol=1e-6)
    assert backend.providers == ["CPUExecutionProvider"]


def test_backend_external_data_path_for_huge_models(monkeypatch):
    """Above the protobuf limit the model goes to a temporary folder with external data."""
    monkeypatch.setattr(ort_backend, "PROTO_LIMIT", 0)
    model = to_ir(_weighty())
    backend = OrtBackend(model, ["CPUExecutionProvider"])
    assert backend._tmp is not None
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(backend.run({"x": x})["y"], ort_run(_weighty(), {"x": x})["y"], rtol=1e-6)


def test_backend_on_a_fixture():
    name = "llama_dynamo"
    model = to_ir(__import__("onnx").load(str(catalog.fixture_path(name))))
    feeds, outputs = catalog.reference(name)
    got = OrtBackend(model, ["CPUExecutionProvider"]).run(feeds)
    for k, v in outputs.items():
        np.testing.assert_allclose(got[k], v, atol=1e-4, rtol=1e-4)


def test_dtype_names_used_in_messages():
    assert str(DType.INT64) == "int64" and str(DType.FLOAT) == "float"
