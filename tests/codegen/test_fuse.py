"""Fusions of the generated code (codegen/fuse.py): the fused program computes what the unfused
one does, on hand-made graphs (both gate orders, a gate that something else reads too) and on a
real LLaMA fixture's packed gate/up MLP, against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import infercc
from infercc.codegen import fuse
from infercc.ir import load_model
from infercc.passes.canonical import DOMAIN
from infercc.runtime.c_backend import CBackend
from tests.fixtures import catalog


def _mlp(gate_second: int, gate_is_output: bool = False) -> onnx.ModelProto:
    """x [2, 3, 16] -> Split in halves -> SiLU(gate) * up; the gate half is output `gate_second`."""
    nodes = [helper.make_node("Split", ["x", "widths"], ["a", "b"], axis=-1),
             helper.make_node("SiLU", ["b" if gate_second else "a"], ["s"], domain=DOMAIN),
             helper.make_node("Mul", ["a" if gate_second else "b", "s"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 8])]
    if gate_is_output:
        outputs.append(helper.make_tensor_value_info("b" if gate_second else "a", TensorProto.FLOAT, [2, 3, 8]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 16])],
                              outputs, [numpy_helper.from_array(np.array([8, 8], np.int64), "widths")],
                              value_info=[helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, 8])
                                          for n in ("a", "b", "s") if n not in {o.name for o in outputs}])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])


@pytest.mark.parametrize("gate_second", [0, 1])
def test_swiglu_equals_split_silu_mul(gate_second: int, tmp_path) -> None:
    path = tmp_path / "mlp.onnx"
    onnx.save(_mlp(gate_second), path)
    model = load_model(path)
    assert [g.name for g in {id(v): v for v in fuse.plan(model.graph).values()}.values()] == ["SwiGLU"]
    backend = CBackend(model, intra_op_threads=1)
    assert "icc_swiglu(" in backend.source and "fused into SwiGLU" in backend.source
    x = np.random.default_rng(0).normal(0, 4, (2, 3, 16)).astype(np.float32)
    x[0, 0, :3] = [-100.0, 100.0, 0.0]  # sigmoid's saturated ends and its middle
    gate, up = (x[..., 8:], x[..., :8]) if gate_second else (x[..., :8], x[..., 8:])
    expected = gate / (1 + np.exp(-gate.astype(np.float64))) * up
    np.testing.assert_allclose(backend.run({"x": x})["y"], expected, rtol=1e-5, atol=1e-6)


def test_a_gate_read_elsewhere_is_not_fused(tmp_path) -> None:
    path = tmp_path / "mlp.onnx"
    onnx.save(_mlp(0, gate_is_output=True), path)
    model = load_model(path)
    assert fuse.plan(model.graph) == {}
    backend = CBackend(model, intra_op_threads=1)
    assert "icc_swiglu(" not in backend.source.split("icc_forward")[-1]
    x = np.random.default_rng(1).normal(size=(2, 3, 16)).astype(np.float32)
    out = backend.run({"x": x})
    np.testing.assert_allclose(out["a"], x[..., :8])
    np.testing.assert_allclose(out["y"], x[..., :8] / (1 + np.exp(-x[..., :8])) * x[..., 8:], rtol=1e-5, atol=1e-6)


def test_llama_fixture_mlp_is_fused_and_equals_ort() -> None:
    path = str(catalog.fixture_path("llama_dynamo"))
    c_model = infercc.compile(path, backend="c", kv_cache=False)
    ort_model = infercc.compile(path, backend="ort", kv_cache=False)
    assert c_model.runtime == "c", c_model.runtime_reason
    assert c_model.backend.source.count("fused into SwiGLU") >= 2  # SiLU and Mul of each layer
    ids = np.random.default_rng(2).integers(0, 100, (2, 7)).astype(np.int64)
    feeds = {i["name"]: (ids if i["name"] == "input_ids" else np.ones_like(ids)) for i in c_model.inputs}
    np.testing.assert_allclose(c_model.run(feeds)["logits"], ort_model.run(feeds)["logits"], atol=1e-4, rtol=0)


def _lora_delta() -> onnx.ModelProto:
    """The LoRA variant's delta in its portable form (passes/lora): y + ((x @ A) * mask[:, None]) @ B."""
    f = TensorProto.FLOAT
    nodes = [helper.make_node("Unsqueeze", ["mask", "axis1"], ["rows"]),
             helper.make_node("MatMul", ["x", "a"], ["low"]),
             helper.make_node("Mul", ["low", "rows"], ["picked"]),
             helper.make_node("MatMul", ["picked", "b"], ["delta"]),
             helper.make_node("Add", ["y", "delta"], ["out"])]
    inputs = [helper.make_tensor_value_info(n, f, s) for n, s in
              (("x", [2, 3, 16]), ("y", [2, 3, 12]), ("a", [16, 10]), ("b", [10, 12]), ("mask", [2, 10]))]
    inner = [helper.make_tensor_value_info(n, f, s) for n, s in
             (("rows", [2, 1, 10]), ("low", [2, 3, 10]), ("picked", [2, 3, 10]), ("delta", [2, 3, 12]))]
    graph = helper.make_graph(nodes, "lora", inputs, [helper.make_tensor_value_info("out", f, [2, 3, 12])],
                              [numpy_helper.from_array(np.array([1], np.int64), "axis1")], value_info=inner)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_lora_delta_reads_only_each_rows_columns(tmp_path) -> None:
    path = tmp_path / "lora.onnx"
    onnx.save(_lora_delta(), path)
    model = load_model(path)
    assert [g.name for g in {id(v): v for v in fuse.plan(model.graph).values()}.values()] == ["LoraDelta"]
    backend = CBackend(model, intra_op_threads=1)
    assert "icc_lora_delta(" in backend.source and "fused into LoraDelta" in backend.source
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(2, 3, 16)).astype(np.float32), rng.normal(size=(2, 3, 12)).astype(np.float32)
    a, b = rng.normal(size=(16, 10)).astype(np.float32), rng.normal(size=(10, 12)).astype(np.float32)
    for mask in (np.array([[1, 1, 1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0.5, 0.5, 0.5, 0]], np.float32),
                 np.zeros((2, 10), np.float32)):  # two adapters (one weighted, in two runs); no adapter at all
        expected = y + ((x.astype(np.float64) @ a) * mask[:, None, :]) @ b
        out = backend.run({"x": x, "y": y, "a": a, "b": b, "mask": mask})["out"]
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(backend.run({"x": x, "y": y, "a": a, "b": b, "mask": mask})["out"], y)


@pytest.mark.parametrize("transpose_read_elsewhere", [False, True])
def test_a_tied_lm_head_packs_the_transposed_table(transpose_read_elsewhere: bool, tmp_path) -> None:
    """Gather(table) + MatMul(h, Transpose(table)) (torch exports of a tied embedding): the MatMul
    packs table^T at build time and the Transpose emits nothing, unless its result is read by
    something else too; outputs equal onnxruntime either way."""
    table = np.random.default_rng(2).standard_normal((40, 24)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"]),
             helper.make_node("Transpose", ["table"], ["t"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "t"], ["logits"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 3, 40])]
    if transpose_read_elsewhere:
        outputs.append(helper.make_tensor_value_info("t", TensorProto.FLOAT, [24, 40]))
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
                              outputs, [numpy_helper.from_array(table, "table")],
                              value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 3, 24])]
                              + ([] if transpose_read_elsewhere else
                                 [helper.make_tensor_value_info("t", TensorProto.FLOAT, [24, 40])]))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "tied.onnx"
    onnx.save(proto, path)
    backend = CBackend(load_model(path), intra_op_threads=1)
    forward = backend.source.split("static int icc_forward")[-1]
    assert ("icc_transpose(" in forward) == transpose_read_elsewhere and "icc_gemm_f32(" in forward
    ids = np.array([[0, 5, 39], [7, 7, 1]], np.int64)
    expected = dict(zip([o.name for o in outputs], onnxruntime_run(proto, {"ids": ids})))
    got = backend.run({"ids": ids})
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5)


def onnxruntime_run(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
