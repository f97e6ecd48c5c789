"""Small helpers shared by the pass, runtime and facade tests: build tiny ONNX models, import them,
run one pass through the PassManager, and run models with onnxruntime."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from infercc.config import Config
from infercc.ir import Model, load_model, to_proto
from infercc.ir.shapes import infer_shapes
from infercc.passes import Diagnostics, Pass, PassContext, PassManager, PassRecord

F, I64, I32, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL
node = helper.make_node


def vi(name: str, shape: Sequence | None, elem: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def make(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    inits: Sequence[onnx.TensorProto] = (),
    *,
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def to_ir(proto: onnx.ModelProto) -> Model:
    model = load_model(proto)
    infer_shapes(model)
    return model


def run_pass(proto_or_model: onnx.ModelProto | Model, p: Pass, **config) -> tuple[Model, PassRecord]:
    """Run one pass the way the compiler does (snapshot, verify, rollback); returns model and record."""
    model = to_ir(proto_or_model) if isinstance(proto_or_model, onnx.ModelProto) else proto_or_model
    model, diagnostics = PassManager([p], Config(**config)).run(model, Diagnostics())
    return model, diagnostics.records[-1]


def context(**config) -> PassContext:
    return PassContext(Config(**config), PassRecord("test"))


def session(model: onnx.ModelProto | Model | str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    if isinstance(model, Model):
        model = to_proto(model, inline_external=True)
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def ort_run(model: onnx.ModelProto | Model | str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def ops(model: Model) -> list[str]:
    return [n.op_type for n in model.graph.nodes]


def assert_same_outputs(a: dict[str, np.ndarray], b: dict[str, np.ndarray], atol: float = 0.0) -> None:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for name in a:
        assert a[name].dtype == b[name].dtype, (name, a[name].dtype, b[name].dtype)
        assert a[name].shape == b[name].shape, (name, a[name].shape, b[name].shape)
        if atol:
            np.testing.assert_allclose(a[name], b[name], atol=atol, rtol=0, err_msg=name)
        else:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
