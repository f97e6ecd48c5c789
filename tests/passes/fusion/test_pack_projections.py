"""Projection packing: q/k/v and gate/up share one matmul (float or quantized), the outputs do not
move, and what cannot pack (a graph output, different bits) is left alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import infercc
from tests.fixtures.catalog import fixture_path, reference

OFF = ["pack_projections"]


def _max_rel(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    key = next(iter(a))
    span = float(a[key].max() - a[key].min()) or 1.0
    return float(np.abs(a[key] - b[key]).max()) / span


@pytest.mark.parametrize(("name", "groups"), [("llama_dynamo", 4), ("qwen2_torchscript", 4), ("gpt2_dynamo", 0)])
def test_fixtures_pack_and_keep_outputs(name: str, groups: int) -> None:
    feeds, _ = reference(name)
    packed = infercc.compile(fixture_path(name), strict=True)
    plain = infercc.compile(fixture_path(name), strict=True, disable_passes=OFF)
    record = packed.diagnostics["pack_projections"]
    assert record.changes.get("weights_packed", 0) == groups, record.changes
    if groups:  # q/k/v (3 -> 1) and gate/up (2 -> 1) per layer: 3 fewer matmuls a layer
        assert record.changes["matmuls_removed"] == 3 * groups // 2
        assert packed.model.graph.op_histogram()["MatMul"] == plain.model.graph.op_histogram()["MatMul"] - 3 * groups // 2
    else:  # GPT-2's attention projection is packed by the model itself; its MLP has no gate
        assert "no two matmuls" in " ".join(record.reasons)
    assert _max_rel(plain.run(feeds), packed.run(feeds)) < 1e-5


def test_quantized_siblings_pack_by_bits() -> None:
    """Mixed precision keeps some weights int8: those pack with int8 siblings only, and the packed
    int4 matmuls give the outputs of the separate ones."""
    feeds, _ = reference("llama_dynamo")
    options = {"quantize": "int4", "quant_int8_fraction": 0.25, "strict": True}
    packed = infercc.compile(fixture_path("llama_dynamo"), **options)
    plain = infercc.compile(fixture_path("llama_dynamo"), disable_passes=OFF, **options)
    layers = packed.diagnostics["quantize_weights"].info["layers"]
    assert {layer["bits"] for layer in layers if layer["role"] == "linear"} == {4, 8}
    removed = packed.diagnostics["pack_projections"].changes["matmuls_removed"]
    assert 0 < removed < 6  # some q/k/v or gate/up groups are split by their bits
    hist, before = packed.model.graph.op_histogram(), plain.model.graph.op_histogram()
    assert hist["com.microsoft::MatMulNBits"] == before["com.microsoft::MatMulNBits"] - removed
    assert _max_rel(plain.run(feeds), packed.run(feeds)) < 1e-5


def test_graph_output_and_lone_matmuls_stay() -> None:
    """x @ A and x @ B packed; x @ C is also a graph output (its name must stay): left alone."""
    rng = np.random.default_rng(0)
    weights = {n: rng.standard_normal((8, w)).astype(np.float32) for n, w in (("a", 4), ("b", 6), ("c", 5))}
    nodes = [helper.make_node("MatMul", ["x", n], [f"y{n}"]) for n in weights]
    nodes.append(helper.make_node("Concat", ["ya", "yb"], ["ab"], axis=-1))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 8])],
        [helper.make_tensor_value_info("ab", onnx.TensorProto.FLOAT, [2, 3, 10]),
         helper.make_tensor_value_info("yc", onnx.TensorProto.FLOAT, [2, 3, 5])],
        [numpy_helper.from_array(w, n) for n, w in weights.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    compiled = infercc.compile(proto, strict=True)
    assert compiled.diagnostics["pack_projections"].changes == {"weights_packed": 1, "matmuls_removed": 1}
    assert compiled.model.graph.op_histogram()["MatMul"] == 2 and [o.name for o in compiled.model.graph.outputs] == ["ab", "yc"]
    x = {"x": rng.standard_normal((2, 3, 8)).astype(np.float32)}
    expected = infercc.compile(proto, optimize=False).run(x)
    got = compiled.run(x)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6)
