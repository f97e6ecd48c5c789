"""Import -> export is lossless, for hand-built models covering the whole format and for the fixtures."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from infercc.ir import DType, Model, Tensor, load_model, to_proto, verify
from infercc.ir.node import AttrType

from ._util import assert_outputs_identical, assert_same_proto, ort_run, roundtrip
from .models import BUILDERS, attribute_model, control_flow_model, metadata_model


@pytest.fixture(params=sorted(BUILDERS))
def built(request) -> tuple[str, onnx.ModelProto, dict | None]:
    proto, feeds = BUILDERS[request.param]()
    return request.param, proto, feeds


def test_export_is_byte_identical(built):
    _, proto, _ = built
    model, out = roundtrip(proto)
    assert_same_proto(proto, out)
    # Exporting twice gives the same bytes again (export does not mutate the IR).
    assert to_proto(model).SerializeToString() == out.SerializeToString()


def test_verify_passes_after_import(built):
    _, proto, _ = built
    verify(load_model(proto))


def test_onnxruntime_outputs_identical(built):
    _, proto, feeds = built
    if feeds is None:
        pytest.skip("custom-domain ops: onnxruntime has no kernels for them")
    _, out = roundtrip(proto)
    assert_outputs_identical(ort_run(proto, feeds), ort_run(out, feeds))


def test_roundtrip_through_a_file(built, tmp_path):
    _, proto, _ = built
    src = tmp_path / "src.onnx"
    src.write_bytes(proto.SerializeToString())
    model = load_model(src)
    from infercc.ir import save_model

    files = save_model(model, tmp_path / "out" / "model.onnx", external_data=False)
    assert files == [str(tmp_path / "out" / "model.onnx")]
    assert (tmp_path / "out" / "model.onnx").read_bytes() == proto.SerializeToString()


def test_clone_exports_the_same(built):
    _, proto, _ = built
    model = load_model(proto)
    copy = model.clone()
    verify(copy)
    assert_same_proto(proto, to_proto(copy))


# ----------------------------------------------------------------------------- what import produces
def test_attribute_values_are_typed():
    proto, _ = attribute_model()
    node = load_model(proto).graph.nodes[0]
    assert node.domain == "custom.test"
    attrs = node.attrs
    assert attrs["f"].type == AttrType.FLOAT and attrs["f"].value == 0.25
    assert attrs["i"].value == -7
    assert attrs["s"].value == "utf-8 ✓"
    assert attrs["s_bytes"].value == b"\x00\xff\xfe not utf-8"  # not decodable: stays bytes
    assert attrs["strings"].value == ["a", b"\x80\x81", "ü"]
    assert isinstance(attrs["t"].value, Tensor)
    np.testing.assert_array_equal(attrs["t"].value.numpy(), np.arange(6, dtype=np.float32).reshape(2, 3))
    assert attrs["t_bf16"].value.dtype == DType.BFLOAT16
    assert attrs["t_int4"].value.dtype == DType.INT4
    assert attrs["ints"].value == [1, -2, 2**62]
    assert attrs["floats"].type == AttrType.FLOATS
    assert attrs["documented"].doc_string == "attribute doc"
    sub = attrs["g"].value
    assert sub.parent is node.graph
    # The body reads the outer-scope graph input x: the same Value object, with a use from inside.
    x = node.graph.inputs[0]
    body_add = sub.nodes[0]
    assert body_add.inputs[0] is x and body_add.inputs[1] is x
    assert (body_add, 0) in x.uses and (body_add, 1) in x.uses
    assert x in node.outer_inputs()
    assert [type(g).__name__ for g in attrs["graphs"].value] == ["Graph", "Graph"]


def test_control_flow_scopes():
    proto, _ = control_flow_model()
    model = load_model(proto)
    g = model.graph
    outer = g.value("outer")
    w = g.initializers["w"]
    loop = next(n for n in g.nodes if n.op_type == "Loop")
    assert loop.inputs[1] is None  # the omitted optional loop condition
    body = loop.attr("body")
    assert body.parent is g and body.names is g.names
    inner_if = next(n for n in body.nodes if n.op_type == "If")
    inner_then = inner_if.attr("then_branch")
    assert inner_then.parent is body
    mul = inner_then.nodes[0]
    assert mul.inputs[1] is w  # two scopes up
    assert mul.inputs[0] is body.inputs[2]  # the loop body's own acc_in
    assert {v.name for v in loop.outer_inputs()} == {"outer", "cond", "w"}
    assert any(user is mul for user, _ in w.uses)
    assert any(user.graph is body for user, _ in outer.uses)


def test_initializers_listed_as_inputs_share_one_value():
    from .models import ir3_model

    proto, _ = ir3_model()
    g = load_model(proto).graph
    assert [v.name for v in g.inputs] == ["x", "W", "B"]
    assert g.inputs[1] is g.initializers["W"]
    assert g.initializers["W"].is_graph_input and g.initializers["W"].is_const


def test_metadata_is_imported():
    proto, _ = metadata_model()
    model = load_model(proto)
    assert model.metadata_props == {"author": "tests", "utf8": "ünïcödé"}
    assert model.graph.metadata_props == {"graph_key": "graph value"}
    add = model.graph.nodes[0]
    assert add.metadata_props == {"source": "layer0.add"} and add.doc_string == "adds the bias"
    assert model.graph.inputs[0].metadata_props == {"role": "activation"}
    assert model.graph.value("r").doc_string == "relu out"
    assert model.graph.value("r").shape == ("batch", None)


# ----------------------------------------------------------------------------- clone independence
def test_clone_is_independent():
    proto, feeds = control_flow_model()
    model = load_model(proto)
    before = to_proto(model).SerializeToString()
    copy = model.clone()
    g = copy.graph
    # Edit everything reachable: nodes, values, attributes, subgraphs, metadata, opsets, names.
    add = g.nodes[0]
    add.op_type = "Sub"
    add.set_attr("new_attr", 1)
    add.metadata_props["edited"] = "yes"
    add.outputs[0].shape = (7, 7)
    add.outputs[0].metadata_props["x"] = "y"
    g.inputs[0].name = "renamed"
    loop = next(n for n in g.nodes if n.op_type == "Loop")
    body = loop.attr("body")
    body.nodes[0].op_type = "Mul"
    body.metadata_props["k"] = "v"
    inner_if = next(n for n in body.nodes if n.op_type == "If")
    inner_if.attr("then_branch").nodes[0].set_input(1, body.inputs[2])
    g.make_node("Identity", [g.inputs[0]], output_names=["extra"])
    g.remove_dead()
    g.initializers.pop("zeros3")
    copy.opset_imports["com.microsoft"] = 1
    copy.metadata_props["k"] = "v"
    g.names.fresh("brand_new")
    copy.graph.nodes[-1].attrs["num_scan_inputs"].value = 5
    assert to_proto(model).SerializeToString() == before
    assert to_proto(copy).SerializeToString() != before
    assert "brand_new" not in model.graph.names.used
    verify(model)
    assert_outputs_identical(ort_run(proto, feeds), ort_run(to_proto(model), feeds))


def test_clone_keeps_names_fresh():
    proto, _ = control_flow_model()
    copy = load_model(proto).clone()
    fresh = copy.graph.names.fresh("outer")
    assert fresh != "outer"
    loop = next(n for n in copy.graph.nodes if n.op_type == "Loop")
    body = loop.attr("body")
    assert body.names is copy.graph.names  # subgraphs share the model-wide scope
    assert body.make_node("Identity", [body.inputs[2]]).outputs[0].name not in {"acc_in", "outer"}


def test_clone_of_a_model_built_in_memory():
    from infercc.ir import Graph

    g = Graph("g")
    x = g.add_input("x", DType.FLOAT, ("n", 4))
    c = g.add_const(Tensor(np.ones(4, np.float32)), "one")
    y = g.make_node("Add", [x, c]).outputs[0]
    y.dtype, y.shape = DType.FLOAT, ("n", 4)
    g.outputs.append(y)
    model = Model(g, {"": 21}, ir_version=10)
    verify(model)
    copy = model.clone()
    verify(copy)
    assert to_proto(copy).SerializeToString() == to_proto(model).SerializeToString()
    out = ort_run(to_proto(copy), {"x": np.zeros((2, 4), np.float32)})
    np.testing.assert_array_equal(out[0], np.ones((2, 4), np.float32))


# ----------------------------------------------------------------------------- edits keep export valid
def test_export_after_renaming_values_keeps_value_info():
    proto, feeds = metadata_model()
    model = load_model(proto)
    r = model.graph.value("r")
    r.name = model.graph.names.fresh("relu_renamed")
    out = to_proto(model)
    onnx.checker.check_model(out)
    assert "relu_renamed" in {vi.name for vi in out.graph.value_info}
    assert "r" not in {vi.name for vi in out.graph.value_info}
    assert_outputs_identical(ort_run(proto, feeds), ort_run(out, feeds))


def test_export_after_removing_a_node_drops_its_value_info():
    proto, feeds = metadata_model()
    model = load_model(proto)
    g = model.graph
    relu = next(n for n in g.nodes if n.op_type == "Relu")
    relu.outputs[0].replace_all_uses_with(relu.inputs[0])
    g.remove(relu)
    verify(model)
    out = to_proto(model)
    assert "r" not in {vi.name for vi in out.graph.value_info}
    onnx.checker.check_model(out)
    ort_run(out, feeds)


def test_opset_import_spelling_is_kept():
    for domain in ("", "ai.onnx"):
        proto, _ = metadata_model()
        del proto.opset_import[:]
        proto.opset_import.add(domain=domain, version=21) if domain else proto.opset_import.add(version=21)
        model = load_model(proto)
        assert model.opset("") == 21 and model.opset("ai.onnx") == 21
        assert_same_proto(proto, to_proto(model))
        # A changed import is written from the dict; the untouched ones keep their spelling.
        model.require_opset("com.microsoft", 1)
        out = to_proto(model)
        assert {(i.domain, i.version) for i in out.opset_import} == {(domain, 21), ("com.microsoft", 1)}


def test_training_info_is_kept():
    proto, _ = metadata_model()
    ti = proto.training_info.add()
    ti.algorithm.name = "algo"
    assert_same_proto(proto, roundtrip(proto)[1])


# ----------------------------------------------------------------------------- real exporter output
def _fixture_names() -> list[str]:
    try:
        from tests.fixtures import catalog
    except ImportError:
        return []
    return catalog.list_fixtures()


@pytest.mark.parametrize("name", _fixture_names() or [pytest.param("none", marks=pytest.mark.skip("no fixtures yet"))])
def test_fixture_roundtrip(name):
    from tests.fixtures import catalog

    path = catalog.fixture_path(name)
    if not path.exists():
        pytest.skip(f"{path} not generated")
    source = onnx.load(str(path))
    model = load_model(path)
    verify(model)
    out = to_proto(model)
    assert {(i.domain, i.version) for i in out.opset_import} == {(i.domain, i.version) for i in source.opset_import}
    assert [t.name for t in out.graph.initializer] == [t.name for t in source.graph.initializer]
    for a, b in zip(out.graph.initializer, source.graph.initializer):
        assert a.SerializeToString() == b.SerializeToString(), a.name
    assert_same_proto(source, out)
    feeds, _ = catalog.reference(name)
    assert_outputs_identical(ort_run(source, feeds), ort_run(out, feeds))


def test_clone_copies_functions():
    from .models import function_model

    proto, feeds = function_model()
    model = load_model(proto)
    copy = model.clone()
    copy.functions[0].node[1].op_type = "Sigmoid"
    copy.functions.append(copy.functions[0])
    assert_same_proto(proto, to_proto(model))


def test_in_memory_constants_of_every_dtype_export():
    """Tensors built from numpy arrays (ml_dtypes for bfloat16/float8/int4) export with the right type and
    bytes, and onnxruntime reads them."""
    import ml_dtypes

    from infercc.ir import Graph, const

    arrays = {
        "bf16": np.array([1.5, -2.0, 0.125], ml_dtypes.bfloat16),
        "f16": np.array([1.5, -2.0, 0.125], np.float16),
        "f8": np.array([0.5, -3.0, 448.0], ml_dtypes.float8_e4m3fn),
        "i4": np.array([1, -8, 7], ml_dtypes.int4),
        "u4": np.array([0, 15, 3], ml_dtypes.uint4),
        "scalar": np.array(3.0, np.float32),
        "b": np.array([True, False, True]),
    }
    g = Graph("consts")
    x = g.add_input("x", DType.FLOAT, (3,))
    outs = []
    for name, arr in arrays.items():
        c = g.add_const(const(arr), name)
        assert c.dtype == DType.from_numpy(arr.dtype) and c.shape == arr.shape
        if name in ("i4", "u4"):
            scale = g.add_const(const(np.array(1.0, np.float32)), name + "_scale")
            out = g.make_node("DequantizeLinear", [c, scale]).outputs[0]
        else:
            out = g.make_node("Cast", [c], attrs={"to": int(DType.FLOAT)}).outputs[0]
        out.dtype = DType.FLOAT
        out = g.make_node("Add", [out, x]).outputs[0]
        out.dtype, out.shape = DType.FLOAT, (3,)
        out.name = g.names.claim(name + "_out")
        outs.append(out)
    g.outputs = outs
    model = Model(g, {"": 21}, ir_version=10)
    verify(model)
    proto = to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    got = ort_run(proto, {"x": np.zeros(3, np.float32)})
    for (name, arr), y in zip(arrays.items(), got):
        np.testing.assert_array_equal(y, np.broadcast_to(arr.astype(np.float32), (3,)), err_msg=name)
    # And the export round-trips exactly.
    assert_same_proto(proto, roundtrip(proto)[1])


def test_type_details_the_ir_does_not_model_are_kept():
    """Dim denotations and an explicitly empty elem_type survive while the value's type is unchanged;
    a changed shape is written from the IR."""
    from onnx import TensorProto as TP
    from onnx import helper

    x = helper.make_tensor_value_info("x", TP.FLOAT, ["b", 2], shape_denotation=["DATA_BATCH", "DATA_CHANNEL"])
    y = onnx.ValueInfoProto(name="y")
    y.type.tensor_type.elem_type = 0  # set, but undefined
    y.type.tensor_type.shape.dim.add().dim_param = "b"
    y.type.tensor_type.shape.dim.add().dim_value = 2
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model, out = roundtrip(proto)
    assert_same_proto(proto, out)
    model.graph.outputs[0].dtype = DType.FLOAT
    model.graph.inputs[0].shape = ("b", 3)
    out = to_proto(model)
    assert out.graph.output[0].type.tensor_type.elem_type == TP.FLOAT
    assert [d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim] == [0, 3]


def test_loaded_model_does_not_follow_later_edits_of_the_source_types():
    proto, _ = metadata_model()
    model = load_model(proto)
    proto.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT8
    assert to_proto(model).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
