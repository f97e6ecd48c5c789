"""GPTQ: lower output error than RTN and mse on correlated inputs, MatMulNBits-compatible blocks,
determinism; in the pass: calibration inputs generated from the model, fallbacks, artifacts."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import infercc
from infercc.passes.quantize.gptq import gptq_rows, output_error
from infercc.passes.quantize.methods import quantize_rows
from infercc.passes.quantize.pack import to_nbits
from tests.fixtures.catalog import fixture_path, real_token_mask, reference

from ._util import realistic_weights, run_single


def _activations(k: int, rows: int = 2048, seed: int = 0) -> np.ndarray:
    """Correlated inputs with a few large channels, as a norm's output looks (the mixing matrix
    is fixed; ``seed`` draws other samples of the same distribution)."""
    mix = np.eye(k) + np.random.default_rng(0).standard_normal((k, k)) / np.sqrt(k)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((rows, k)) @ mix
    x[:, np.random.default_rng(0).choice(k, 4, replace=False)] *= 8.0
    return x.astype(np.float32)


@pytest.mark.parametrize(("bits", "block"), [(4, 32), (4, 128), (8, 0)])
def test_gptq_output_error_below_rtn_and_mse(bits: int, block: int) -> None:
    for rows in realistic_weights():
        k = rows.shape[1]
        x = _activations(k)
        h = x.T.astype(np.float64) @ x
        size = block or k
        errors = {m: output_error(rows, quantize_rows(rows, bits, size, method=m).dequantize(), h) for m in ("rtn", "mse")}
        errors["gptq"] = output_error(rows, gptq_rows(rows, h, bits, size).dequantize(), h)
        assert errors["gptq"] < 0.9 * min(errors["rtn"], errors["mse"]), errors
        # measured on inputs it did not see (same distribution), the gain holds
        fresh = _activations(k, seed=1)
        h2 = fresh.T.astype(np.float64) @ fresh
        assert output_error(rows, gptq_rows(rows, h, bits, size).dequantize(), h2) < errors["rtn"]


def test_gptq_blocks_run_in_matmulnbits_and_pad() -> None:
    """K = 72 (not a multiple of the block): codes, scales and integer zero points in the
    MatMulNBits layout, and ORT computes x @ dequant(W)^T with them."""
    rng = np.random.default_rng(4)
    rows = rng.standard_normal((24, 72)).astype(np.float32)
    x = _activations(72, rows=256)
    q = gptq_rows(rows, x.T.astype(np.float64) @ x, 4, 32)
    assert q.codes.shape == (24, 3, 32) and q.codes.max() <= 15 and q.zero_points.max() <= 15
    assert np.all(q.codes[:, 2, 8:] == q.zero_points[:, 2:3])  # padding is exactly zero
    b, scales, zero_points = to_nbits(q, False, np.float32)
    node = helper.make_node("MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft", K=72, N=24, bits=4, block_size=32)
    out = run_single(node, {"x": x[:8]}, {"b": b, "s": scales, "z": zero_points})
    np.testing.assert_allclose(out, x[:8] @ q.dequantize().T, rtol=1e-4, atol=1e-4)


def test_gptq_deterministic_and_handles_dead_inputs() -> None:
    rows = realistic_weights()[0]
    x = _activations(rows.shape[1])
    x[:, :3] = 0.0  # inputs that never fire: zero curvature, weights kept (not zeroed)
    h = x.T.astype(np.float64) @ x
    a, b = gptq_rows(rows, h, 4, 32), gptq_rows(rows, h, 4, 32)
    for u, v in ((a.codes, b.codes), (a.scales, b.scales), (a.zero_points, b.zero_points)):
        assert u.tobytes() == v.tobytes()
    deq = a.dequantize()
    assert np.all(np.isfinite(deq))
    # the first columns are quantized before any feedback reaches them: plain rounding for the
    # block's (scale, zero point)
    s, z = a.scales[:, :1], a.zero_points[:, :1].astype(np.float32)
    np.testing.assert_array_equal(deq[:, :3], (np.clip(np.rint(rows[:, :3] / s) + z, 0, 15) - z) * s)


# -- in the pass ------------------------------------------------------------------------------------
def _logits_error(name: str, **options) -> float:
    feeds, expected = reference(name)
    key = next(iter(expected))
    mask = real_token_mask(feeds)
    got = infercc.compile(fixture_path(name), strict=True, **options).run(feeds)[key][mask]
    return float(np.abs(got - expected[key][mask]).mean())


@pytest.mark.parametrize("name", ["llama_dynamo", "gpt2_torchscript", "bert_dynamo"])
def test_pass_gptq_beats_rtn_on_fixture_outputs(name: str) -> None:
    """On the fixtures' own reference inputs (never seen by calibration), int4 GPTQ lands closer
    to the float outputs than RTN."""
    rtn = _logits_error(name, quantize="int4", quant_method="rtn")
    gptq = _logits_error(name, quantize="int4", quant_method="gptq")
    assert gptq < rtn, (gptq, rtn)


def test_pass_reports_calibration_and_methods() -> None:
    decoder = infercc.compile(fixture_path("llama_dynamo"), quantize="int4").diagnostics["quantize_weights"].info
    assert decoder["method"] == "gptq" and "sampled from the model" in decoder["calibration"]["inputs"]
    linear = [layer for layer in decoder["layers"] if layer["role"] == "linear"]
    int4 = [layer for layer in linear if layer["bits"] == 4]
    assert int4 and all(layer["method"] == "gptq" and 0 < layer["output_error"] < layer["rel_error"] for layer in int4)
    # mixed precision (default 5%): the kept int8 weights are quantized data-free, and say why
    assert all(layer["method"] == "mse" and "mixed precision" in layer["fallback"] for layer in linear if layer["bits"] == 8)
    # an embedding table is read by a Gather: no activations, quantized data-free
    assert {layer["method"] for layer in decoder["layers"] if layer["role"] == "embedding"} == {"mse"}
    encoder = infercc.compile(fixture_path("bert_dynamo"), quantize="int4").diagnostics["quantize_weights"].info
    assert "uniform random token ids" in encoder["calibration"]["inputs"]


def _float_input_model() -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 32])], [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_pass_without_token_inputs_falls_back_to_mse() -> None:
    compiled = infercc.compile(_float_input_model(), quantize="int4", strict=True)
    record = compiled.diagnostics["quantize_weights"]
    assert [layer["method"] for layer in record.info["layers"]] == ["mse"]
    assert any("no calibration inputs" in w and "no integer input" in w for w in record.warnings)


def test_pass_gptq_artifact_is_deterministic_and_holds_no_float_copy(tmp_path: Path) -> None:
    name = "qwen2_dynamo"
    files = []
    for i in range(2):
        compiled = infercc.compile(fixture_path(name), quantize="int4", quant_method="gptq")
        compiled.save(tmp_path / str(i))
        files.append((tmp_path / str(i) / "model.onnx").read_bytes())
    assert files[0] == files[1]
    source = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(fixture_path(name))).graph.initializer}
    layers = compiled.diagnostics["quantize_weights"].info["layers"]
    quantized = [source[layer["weight"]] for layer in layers if layer["weight"] in source and layer["method"] == "gptq"]
    assert quantized
    fingerprints = {hashlib.sha1(np.ascontiguousarray(w).tobytes()).hexdigest() for w in quantized}
    fingerprints |= {hashlib.sha1(np.ascontiguousarray(w.T).tobytes()).hexdigest() for w in quantized}
    saved = onnx.load(str(tmp_path / "0" / "model.onnx"))
    floats = [numpy_helper.to_array(i) for i in saved.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert not {hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest() for a in floats} & fingerprints


def test_mixed_precision_keeps_the_most_sensitive_weights_int8() -> None:
    compiled = infercc.compile(fixture_path("llama_dynamo"), quantize="int4", quant_int8_fraction=0.25, strict=True)
    info = compiled.diagnostics["quantize_weights"].info
    mixed = info["mixed_precision"]
    assert 0 < mixed["kept_int8"] < mixed["candidates"]
    assert mixed["int8_parameters"] <= 0.25 * (mixed["int8_parameters"] + mixed["int4_parameters"])
    linear = [layer for layer in info["layers"] if layer["role"] == "linear"]
    assert all("sensitivity" in layer for layer in linear)
    kept = [layer for layer in linear if layer.get("fallback")]
    assert len(kept) == mixed["kept_int8"] and all(layer["bits"] == 8 and "sensitivity rank" in layer["fallback"] for layer in kept)
    off = infercc.compile(fixture_path("llama_dynamo"), quantize="int4", quant_int8_fraction=0).diagnostics["quantize_weights"].info
    assert "mixed_precision" not in off and all(layer["bits"] == 4 for layer in off["layers"] if layer["role"] == "linear")
