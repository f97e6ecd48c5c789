"""Emitters of codegen/ops.py that choose a layout: a tied embedding table (one constant read by a
Gather and, transposed, by the LM head's MatMul/Gemm) is stored once in the weight blob, as the
head's panels, and the Gather reads its rows from them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import infercc
from infercc.codegen.emit import emit
from infercc.codegen.packing import PANEL
from infercc.runtime.c_backend import CRunError

VOCAB, HIDDEN = 37, 24  # a vocabulary that is no multiple of the panel width: the last panel is padded


def _tied_model(path, head: str, table: np.ndarray) -> None:
    """ids -> Gather(table) -> Tanh -> logits = h @ table^T, the head spelled as ``head``:
    "gemm" (Gemm transB=1, the importers' form) or "matmul" (MatMul(h, Transpose(table)), torch's)."""
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0),
             helper.make_node("Tanh", ["emb"], ["h"])]
    if head == "gemm":
        nodes += [helper.make_node("Reshape", ["h", "rows_shape"], ["rows"]),
                  helper.make_node("Gemm", ["rows", "table"], ["flat"], transB=1),
                  helper.make_node("Shape", ["ids"], ["ids_shape"]),
                  helper.make_node("Concat", ["ids_shape", "vocab"], ["out_shape"], axis=0),
                  helper.make_node("Reshape", ["flat", "out_shape"], ["logits"])]
    else:
        nodes += [helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
                  helper.make_node("MatMul", ["h", "table_t"], ["logits"])]
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([-1, HIDDEN], np.int64), "rows_shape"),
             numpy_helper.from_array(np.array([VOCAB], np.int64), "vocab")]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", VOCAB])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(onnx.shape_inference.infer_shapes(model), path)  # types for the C emitters (no passes run)


def _steps(source: str) -> str:
    """The generated part of the source (after the inlined kernel headers)."""
    return source[source.index("static int icc_forward(void) {"):]


@pytest.mark.parametrize("head", ["gemm", "matmul"])
def test_tied_table_is_stored_once_and_gathered_from_the_head_panels(tmp_path, head: str) -> None:
    table = np.random.default_rng(1).standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    _tied_model(tmp_path / "tied.onnx", head, table)
    compiled = infercc.compile(tmp_path / "tied.onnx", backend="c", passes=[])
    ids = np.array([[0, 5, VOCAB - 1, 16], [-1, 31, 17, 2]], np.int64)  # first/last row, a negative id, panel edges
    got = compiled.run({"ids": ids})["logits"]
    assert compiled.runtime == "c", compiled.runtime_reason
    rows = table[ids]
    np.testing.assert_array_equal(compiled.backend.library.run([ids])[0], got)
    np.testing.assert_allclose(got, np.tanh(rows) @ table.T, rtol=1e-5, atol=1e-5)
    program = emit(compiled.model)
    assert "icc_gather_panels(" in _steps(program.source) and "icc_gather(" not in _steps(program.source)
    panels = -(-VOCAB // PANEL) * PANEL * HIDDEN * 4
    assert [k for k in program.blob.offsets if k[0] == "f32panels"] != [] and program.blob.size < panels + table.nbytes
    assert program.blob.size == pytest.approx(panels, abs=4 * 64)  # the panels (+ small constants), not the table too


def test_gather_from_panels_rejects_an_index_out_of_range(tmp_path) -> None:
    table = np.arange(VOCAB * HIDDEN, dtype=np.float32).reshape(VOCAB, HIDDEN)
    _tied_model(tmp_path / "tied.onnx", "gemm", table)
    compiled = infercc.compile(tmp_path / "tied.onnx", backend="c", passes=[])
    assert compiled.runtime == "c", compiled.runtime_reason
    with pytest.raises(CRunError, match="Gather index out of range"):  # the kernel's own check (run() checks feeds first)
        compiled.backend.run({"ids": np.array([[VOCAB]], np.int64)})


def test_untied_gather_keeps_the_plain_table(tmp_path) -> None:
    table = np.random.default_rng(2).standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["out"], axis=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", HIDDEN])],
                              [numpy_helper.from_array(table, "table")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "g.onnx")
    compiled = infercc.compile(tmp_path / "g.onnx", backend="c", passes=[])
    ids = np.array([3, 0, VOCAB - 1], np.int64)
    np.testing.assert_array_equal(compiled.run({"ids": ids})["out"], table[ids])
    assert "icc_gather_panels(" not in _steps(emit(compiled.model).source)
