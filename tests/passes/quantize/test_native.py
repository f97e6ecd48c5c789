"""Already-quantized weights (GGUF Q4_0 / Q4_1 / Q8_0 grids) are carried exactly, not re-rounded."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import infercc
from infercc.cli import main
from infercc.importers.dequant import dequantize
from infercc.passes.quantize.methods import relative_error
from infercc.passes.quantize.native import find_native, fit_integer_grid

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def _grid(kind: str, shape=(48, 64), seed: int = 0) -> np.ndarray:
    """Rows [N, K] as the importer reads a tensor stored as ``kind`` (blocks of 32 along K)."""
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.05
    qtype = getattr(Q, kind)
    return dequantize(gguf.quants.quantize(w, qtype).reshape(-1), qtype, shape)


@pytest.mark.parametrize(("kind", "bits", "form"), [("Q4_0", 4, "zero_point"), ("Q4_1", 4, "offset"), ("Q8_0", 8, "zero_point")])
def test_native_grids_are_recovered_exactly(kind: str, bits: int, form: str) -> None:
    rows = _grid(kind)
    native = find_native(rows, bits)
    assert native is not None and native.kind == form and native.quantized.block_size == 32
    np.testing.assert_array_equal(native.dequantize(), rows)
    q = native.quantized
    assert q.codes.max() <= (1 << bits) - 1 and q.zero_points.max() <= (1 << bits) - 1


def test_float_and_off_grid_weights_are_not_native() -> None:
    assert find_native(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), 4) is None
    assert find_native(_grid("Q8_0"), 4) is None  # 255 levels do not fit 4 bits
    rows = _grid("Q4_1")
    rows[7, 40] += 1e-3  # one weight off its block's grid
    assert find_native(rows, 4) is None
    assert find_native(np.ascontiguousarray(_grid("Q4_1")[:, :48]), 4) is None  # K not a multiple of 32


def _matmul_model(rows: np.ndarray) -> onnx.ModelProto:
    n, k = rows.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", "s", k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", "s", n])],
        [numpy_helper.from_array(np.ascontiguousarray(rows.T), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_pass_carries_the_grid(kind: str, quantize: str) -> None:
    """int4 (and int8: a 4-bit grid is exact and smaller) stores the source's 4-bit blocks; the
    standard-ONNX lowering then computes x @ W exactly, and under ORT (whose MatMulNBits rounds
    activations to int8 at accuracy_level 4) the error is that rounding's alone, below what
    re-rounding the weight adds to it. A Q4_1 grid is exact under quant_native_exact=True (its
    correction side path); the default moves it, see the next test."""
    rows = _grid(kind)
    proto = _matmul_model(rows)
    x = np.random.default_rng(1).standard_normal((2, 5, rows.shape[1])).astype(np.float32)
    expected = x @ rows.T
    compiled = infercc.compile(proto, quantize=quantize, strict=True, quant_native_exact=True)
    layer = compiled.diagnostics["quantize_weights"].info["layers"][0]
    assert layer["method"] == "native" and layer["bits"] == 4 and layer["rel_error"] < 1e-6
    assert layer["native"] == ("offset" if kind == "Q4_1" else "zero_point")
    hist = compiled.model.graph.op_histogram()
    assert hist["com.microsoft::MatMulNBits"] == 1 and ("MatMul" in hist) == (kind == "Q4_1")  # the correction

    def error(**options) -> float:
        return float(np.abs(infercc.compile(proto, strict=True, **options).run({"x": x})["y"] - expected).mean())

    rerounded = {"quantize": "int4", "quant_native": False, "quant_method": "rtn"}
    exact = {"quantize": quantize, "quant_native_exact": True}
    assert error(lowering="onnx", **exact) < 1e-3 * error(lowering="onnx", **rerounded)
    assert error(**exact) < error(**rerounded)


@pytest.mark.parametrize(("shape", "sums"), [((48, 64), "MatMul"), ((16, 256), "ReduceSum")])
def test_offset_grid_correction_forms(shape: tuple[int, int], sums: str) -> None:
    """The exact Q4_1 correction sums each block of the activation by a MatMul with a 0/1 matrix
    where that is small beside the weight (blocks * 16 <= N), else by Reshape + ReduceSum; both
    give x @ W^T up to MatMulNBits' int8 activation rounding (the onnx lowering: to float rounding)."""
    rows = _grid("Q4_1", shape, seed=4)
    proto = _matmul_model(rows)
    x = np.random.default_rng(5).standard_normal((2, 3, shape[1])).astype(np.float32)
    expected = x @ rows.T
    compiled = infercc.compile(proto, quantize="auto", strict=True, quant_native_exact=True)
    hist = compiled.model.graph.op_histogram()
    assert hist["com.microsoft::MatMulNBits"] == 1 and hist["Add"] == 1
    assert hist["MatMul"] == (2 if sums == "MatMul" else 1) and ("ReduceSum" in hist) == (sums == "ReduceSum")
    got = compiled.run({"x": x})["y"]
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()
    exact = infercc.compile(proto, quantize="auto", strict=True, quant_native_exact=True, lowering="onnx").run({"x": x})["y"]
    np.testing.assert_allclose(exact, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantize", ["auto", "int4"])
def test_offset_grid_moves_to_integer_zero_points_on_request(quantize: str) -> None:
    """quant_native_exact=False: a Q4_1 weight becomes one MatMulNBits on the refitted
    integer-zero-point grid, with no side path, and the diagnostics give its error against the
    exact values, which is below rounding the zero point's."""
    rows = _grid("Q4_1")
    proto = _matmul_model(rows)
    compiled = infercc.compile(proto, quantize=quantize, strict=True, quant_native_exact=False)
    assert compiled.model.graph.op_histogram() == {"com.microsoft::MatMulNBits": 1}
    record = compiled.diagnostics["quantize_weights"]
    layer = record.info["layers"][0]
    assert layer["method"] == "native" and layer["native"] == "fitted" and layer["bits"] == 4
    native = find_native(rows, 4)
    fitted = fit_integer_grid(rows, native).quantized
    assert 0 < layer["rel_error"] == round(relative_error(rows, fitted), 6)
    assert layer["rel_error"] < relative_error(rows, native.quantized)  # d * (q - rint(-m / d))
    assert record.info["native_fitted"]["weights"] == 1 and record.info["native_fitted"]["rel_error_max"] == layer["rel_error"]
    note = next(r for r in record.reasons if "offset grid" in r)
    assert "integer zero points" in note and "quant_native_exact=True, the default" in note and f"{layer['rel_error']:.4f}" in note
    # What the graph computes is the refitted grid and nothing else (the standard-ONNX lowering is exact).
    x = np.random.default_rng(1).standard_normal((2, 5, rows.shape[1])).astype(np.float32)
    got = infercc.compile(proto, quantize=quantize, strict=True, lowering="onnx", quant_native_exact=False).run({"x": x})["y"]
    np.testing.assert_allclose(got, x @ fitted.dequantize().T, atol=1e-5)


@pytest.mark.parametrize("scale_dtype", [np.float32, np.float16])
def test_fitted_grid_is_never_worse_than_rounding_the_zero_point(scale_dtype: type) -> None:
    """Block by block, the refit's squared error is at most that of the source grid with its zero
    point rounded (d * (q - rint(-m / d))), scales as the stored type holds them (a float16 weight's
    constant block: its step need not be a float16)."""
    rows = _grid("Q4_1", (96, 256), seed=3)
    rows[:4] = _grid("Q4_1", (4, 256), seed=4) * 64  # other magnitudes (steps still exact in float16)
    rows[4, :32] = rows[4, 0]  # a constant block
    native = find_native(rows, 4)
    assert native is not None and native.kind == "offset"
    fitted = fit_integer_grid(rows, native, scale_dtype=scale_dtype)
    q = fitted.quantized
    assert fitted.kind == "fitted" and fitted.offsets is None and (q.bits, q.block_size, q.k) == (4, 32, 256)
    assert q.codes.max() <= 15 and q.zero_points.max() <= 15
    np.testing.assert_array_equal(q.scales.astype(scale_dtype).astype(np.float32), q.scales)

    def block_errors(values: np.ndarray) -> np.ndarray:
        return ((values.astype(np.float64) - rows).reshape(-1, 32) ** 2).sum(1)

    start = dataclasses.replace(native.quantized, scales=native.quantized.scales.astype(scale_dtype).astype(np.float32))
    rounded, refit = block_errors(start.dequantize()), block_errors(q.dequantize())
    assert np.all(refit <= rounded * (1 + 1e-6) + 1e-12)  # float32 ties at most
    assert np.mean(refit < rounded * 0.999) > 0.5 and refit.sum() < 0.85 * rounded.sum()


def test_cli_fast_grids_drops_the_side_path(tmp_path, capsys: pytest.CaptureFixture) -> None:
    """``convert --fast-grids`` clears quant_native_exact (the report says the offset grid moved);
    without it the saved model holds the exact correction."""
    import json

    source = tmp_path / "q41.onnx"
    onnx.save(_matmul_model(_grid("Q4_1")), source)
    assert main(["convert", str(source), "-o", str(tmp_path / "fast"), "--fast-grids"]) == 0
    assert "1 offset-grid (Q4_1-like) weights moved to integer zero points" in capsys.readouterr().out
    assert main(["convert", str(source), "-o", str(tmp_path / "exact")]) == 0
    for folder, exact in (("fast", False), ("exact", True)):
        manifest = json.loads((tmp_path / folder / "manifest.json").read_text())
        assert manifest["config"]["quant_native_exact"] is exact
        saved = onnx.load(str(tmp_path / folder / "model.onnx"))
        assert any(n.op_type == "MatMul" for n in saved.graph.node) is exact  # the correction


def test_auto_keeps_grids_and_leaves_float_weights_float() -> None:
    """quantize='auto' (the default): a weight on a Q4_1 (with quant_native_exact) / Q8_0 grid
    keeps it exactly, a float weight beside it stays float, and the diagnostics say which and why."""
    q41, q80 = _grid("Q4_1", (64, 64)), _grid("Q8_0", (64, 64), seed=1)
    floats = np.random.default_rng(2).standard_normal((64, 64)).astype(np.float32) * 0.05
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"]), helper.make_node("MatMul", ["h0", "w1"], ["h1"]),
             helper.make_node("MatMul", ["h1", "w2"], ["h2"]), helper.make_node("Tanh", ["h2"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 64])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}") for i, w in enumerate((q41, q80, floats))],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    compiled = infercc.compile(proto, strict=True, lowering="onnx", quant_native_exact=True)
    record = compiled.diagnostics["quantize_weights"]
    layers = {layer["weight"]: layer for layer in record.info["layers"]}
    assert set(layers) == {"w0", "w1"} and record.info["quantize"] == "auto"
    assert layers["w0"]["bits"] == 4 and layers["w0"]["native"] == "offset"
    assert layers["w1"]["bits"] == 8 and layers["w1"]["native"] == "zero_point"
    assert [s["weight"] for s in record.info["skipped"]] == ["w2"] and "stays float" in record.info["skipped"][0]["reason"]
    assert any("kept on their source grids" in r for r in record.reasons)
    x = np.random.default_rng(3).standard_normal((3, 64)).astype(np.float32)
    expected = np.tanh(x @ q41.T @ q80.T @ floats.T)
    np.testing.assert_allclose(compiled.run({"x": x})["y"], expected, atol=1e-5)
    off = infercc.compile(proto, strict=True, quantize=None)
    assert "com.microsoft::MatMulNBits" not in off.model.graph.op_histogram()


@pytest.mark.slow  # ~35 s: the whole 135M checkpoint quantized and run on ONNX Runtime
def test_smollm2_q4_1_runs_at_4_bit_by_default() -> None:
    """The demo's model: the Q4_1 file compiles to its exact 4-bit grids (not to float), and its
    greedy text follows the dequantized float model's. Teacher-forced on the float model's greedy
    continuation, the 4-bit model picks the same token at >= 95% of 32 steps (the difference being
    MatMulNBits' int8 activation rounding; the fast grid, quant_native_exact=False: 0.66)."""
    from tests.importers._models import SMOLLM2, require

    path = require(SMOLLM2)
    kept = infercc.compile(path)
    record = kept.diagnostics["quantize_weights"]
    assert record.status == "applied" and record.info["kept_native"] == {"int4 (offset)": 210, "int8 (zero point)": 1}
    assert record.info["size"]["weights_after"] < 0.25 * record.info["size"]["weights_before"]
    floats = infercc.compile(path, quantize=None)
    messages = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]
    reference = floats.generate(messages, max_new_tokens=32)
    prompt = reference.prompt_token_ids
    ids = np.array([list(prompt) + list(reference.token_ids)], np.int64)

    def greedy(compiled) -> np.ndarray:
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        return compiled.run(feeds)["logits"][0, len(prompt) - 1:-1].argmax(-1)

    assert np.mean(greedy(kept) == greedy(floats)) >= 0.95
