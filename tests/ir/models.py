"""Hand-built ONNX models that exercise every corner of the format the IR must carry through.

Each builder returns ``(proto, feeds)``; ``feeds`` is None when onnxruntime cannot run the model (custom
domains without kernels), else inputs to run it with.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

OPSET = 21


def _opsets(*extra: tuple[str, int], default: int = OPSET) -> list[onnx.OperatorSetIdProto]:
    return [helper.make_opsetid("", default), *(helper.make_opsetid(d, v) for d, v in extra)]


def _model(graph: onnx.GraphProto, opsets, ir_version: int = 10, **kw) -> onnx.ModelProto:
    return helper.make_model(graph, opset_imports=opsets, ir_version=ir_version, **kw)


# ----------------------------------------------------------------------------- every attribute type
def attribute_model() -> tuple[onnx.ModelProto, None]:
    """A custom-domain node carrying one attribute of every AttributeProto type."""
    outer = helper.make_tensor_value_info("x", TP.FLOAT, [2, 3])
    body = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["body_out"], name="body_add")],  # reads outer-scope x
        "body",
        [],
        [helper.make_tensor_value_info("body_out", TP.FLOAT, [2, 3])],
    )
    body2 = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["body2_out"], name="body2_neg")],
        "body2",
        [],
        [helper.make_tensor_value_info("body2_out", TP.FLOAT, None)],
    )
    sparse = helper.make_sparse_tensor(
        helper.make_tensor("sp_values", TP.FLOAT, [2], [1.5, -2.0]),
        helper.make_tensor("sp_indices", TP.INT64, [2], [1, 4]),
        [2, 3],
    )
    seq_type = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TP.FLOAT, ["n", 3]))
    opt_type = helper.make_optional_type_proto(helper.make_tensor_type_proto(TP.INT64, []))
    bf16 = helper.make_tensor("bf16_attr", TP.BFLOAT16, [3], [1.0, -2.5, 3.25])
    int4 = helper.make_tensor("int4_attr", TP.INT4, [3], [1, -8, 7])
    strings_tensor = helper.make_tensor("str_attr", TP.STRING, [2], [b"ab", b"\xff\xfe"])
    node = helper.make_node(
        "Everything",
        ["x"],
        ["y"],
        name="everything",
        domain="custom.test",
        doc_string="a node with every attribute type",
        f=0.25,
        f_zero=0.0,
        i=-7,
        i_zero=0,
        s="utf-8 ✓",
        s_bytes=b"\x00\xff\xfe not utf-8",
        s_empty="",
        t=numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "t_attr"),
        t_bf16=bf16,
        t_int4=int4,
        t_str=strings_tensor,
        g=body,
        sparse=sparse,
        tp=seq_type,
        floats=[1.0, -0.5, 3.0e38],
        ints=[1, -2, 2**62],
        strings=["a", b"\x80\x81", "ü"],
        tensors=[numpy_helper.from_array(np.array([1, 2], np.int64), "ta"), bf16],
        graphs=[body, body2],
    )
    # The remaining list types have no helper.make_attribute spelling that infers them.
    node.attribute.append(helper.make_attribute("sparses", [sparse], attr_type=onnx.AttributeProto.SPARSE_TENSORS))
    node.attribute.append(helper.make_attribute("tps", [seq_type, opt_type], attr_type=onnx.AttributeProto.TYPE_PROTOS))
    node.attribute.append(helper.make_attribute("documented", 3, doc_string="attribute doc"))
    graph = helper.make_graph([node], "attrs", [outer], [helper.make_tensor_value_info("y", TP.FLOAT, [2, 3])])
    return _model(graph, _opsets(("custom.test", 3))), None


# ----------------------------------------------------------------------------- control flow
def control_flow_model() -> tuple[onnx.ModelProto, dict]:
    """If, Loop and Scan whose bodies read outer-scope values, one nested two levels deep."""
    f = TP.FLOAT
    then_g = helper.make_graph(
        [helper.make_node("Add", ["outer", "w"], ["then_out"], name="then_add")],
        "then_branch", [], [helper.make_tensor_value_info("then_out", f, [2, 3])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Sub", ["outer", "x"], ["else_out"], name="else_sub")],
        "else_branch", [], [helper.make_tensor_value_info("else_out", f, [2, 3])],
    )
    # Loop body with a nested If that reads the outermost `w` and the body's own `acc_in`.
    inner_then = helper.make_graph(
        [helper.make_node("Mul", ["acc_in", "w"], ["inner_then_out"], name="inner_mul")],
        "inner_then", [], [helper.make_tensor_value_info("inner_then_out", f, [2, 3])],
    )
    inner_else = helper.make_graph(
        [helper.make_node("Identity", ["acc_in"], ["inner_else_out"], name="inner_id")],
        "inner_else", [], [helper.make_tensor_value_info("inner_else_out", f, [2, 3])],
    )
    loop_body = helper.make_graph(
        [
            helper.make_node("Add", ["acc_in", "outer"], ["acc_sum"], name="loop_add"),
            helper.make_node("If", ["cond"], ["acc_out"], name="loop_if", then_branch=inner_then, else_branch=inner_else),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="loop_cond"),
            helper.make_node("Cast", ["iter"], ["iter_f"], name="loop_cast", to=f),
            helper.make_node("Add", ["acc_sum", "iter_f"], ["scan_like"], name="loop_scan_out"),
        ],
        "loop_body",
        [
            helper.make_tensor_value_info("iter", TP.INT64, []),
            helper.make_tensor_value_info("cond_in", TP.BOOL, []),
            helper.make_tensor_value_info("acc_in", f, [2, 3]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TP.BOOL, []),
            helper.make_tensor_value_info("acc_out", f, [2, 3]),
            helper.make_tensor_value_info("scan_like", f, [2, 3]),
        ],
    )
    scan_body = helper.make_graph(
        [
            helper.make_node("Add", ["state_in", "row"], ["state_out"], name="scan_add"),
            helper.make_node("Mul", ["row", "scale"], ["row_out"], name="scan_mul"),  # outer initializer
        ],
        "scan_body",
        [helper.make_tensor_value_info("state_in", f, [3]), helper.make_tensor_value_info("row", f, [3])],
        [helper.make_tensor_value_info("state_out", f, [3]), helper.make_tensor_value_info("row_out", f, [3])],
    )
    nodes = [
        helper.make_node("Add", ["x", "w"], ["outer"], name="outer_add"),
        helper.make_node("If", ["cond"], ["if_out"], name="if", then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["n", "", "x"], ["loop_out", "loop_scan"], name="loop", body=loop_body),
        helper.make_node("Scan", ["zeros3", "x"], ["scan_state", "scan_rows"], name="scan", body=scan_body, num_scan_inputs=1),
    ]
    graph = helper.make_graph(
        nodes,
        "control_flow",
        [
            helper.make_tensor_value_info("x", f, [2, 3]),
            helper.make_tensor_value_info("cond", TP.BOOL, []),
            helper.make_tensor_value_info("n", TP.INT64, []),
        ],
        [
            helper.make_tensor_value_info("if_out", f, [2, 3]),
            helper.make_tensor_value_info("loop_out", f, [2, 3]),
            helper.make_tensor_value_info("loop_scan", f, [None, 2, 3]),
            helper.make_tensor_value_info("scan_state", f, [3]),
            helper.make_tensor_value_info("scan_rows", f, [2, 3]),
        ],
        initializer=[
            numpy_helper.from_array(np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), "w"),
            numpy_helper.from_array(np.array([0.5, 2.0, -1.0], np.float32), "scale"),
            numpy_helper.from_array(np.zeros(3, np.float32), "zeros3"),
        ],
    )
    feeds = {
        "x": np.arange(6, dtype=np.float32).reshape(2, 3),
        "cond": np.array(True),
        "n": np.array(3, np.int64),
    }
    return _model(graph, _opsets()), feeds


# ----------------------------------------------------------------------------- functions and opsets
def function_model() -> tuple[onnx.ModelProto, dict]:
    """A model-local function (with an attribute reference) in a custom domain, plus extra imports."""
    fn = helper.make_function(
        "local.fn",
        "ScaledTanh",
        ["X"],
        ["Y"],
        [
            helper.make_node("Constant", [], ["alpha"], value_float=1.0, name="c"),
            helper.make_node("Tanh", ["X"], ["t"]),
            helper.make_node("Mul", ["t", "alpha"], ["Y"]),
        ],
        opset_imports=[helper.make_opsetid("", OPSET)],
        attributes=["alpha"],
        doc_string="scaled tanh",
    )
    # Make the Constant read the function attribute: value_float = $alpha.
    const = fn.node[0]
    del const.attribute[:]
    ref = onnx.AttributeProto(name="value_float", ref_attr_name="alpha", type=onnx.AttributeProto.FLOAT)
    const.attribute.append(ref)
    graph = helper.make_graph(
        [
            helper.make_node("ScaledTanh", ["x"], ["h"], domain="local.fn", name="call", alpha=0.5),
            helper.make_node("Relu", ["h"], ["y"], name="relu"),
        ],
        "functions",
        [helper.make_tensor_value_info("x", TP.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TP.FLOAT, ["batch", 4])],
    )
    model = _model(graph, _opsets(("local.fn", 1), ("com.microsoft", 1), ("ai.onnx.ml", 3)), functions=[fn])
    return model, {"x": np.linspace(-3, 3, 8, dtype=np.float32).reshape(2, 4)}


# ----------------------------------------------------------------------------- metadata everywhere
def metadata_model() -> tuple[onnx.ModelProto, dict]:
    """Doc strings and metadata_props on model, graph, node and values; value_info in an order that is
    not the node order, including an entry for an initializer and one without a type."""
    x = helper.make_tensor_value_info("x", TP.FLOAT, ["batch", 3], doc_string="input x")
    x.metadata_props.add(key="role", value="activation")
    y = helper.make_tensor_value_info("y", TP.FLOAT, ["batch", 3], doc_string="output y")
    y.metadata_props.add(key="unit", value="logits")
    n1 = helper.make_node("Add", ["x", "bias"], ["a"], name="add", doc_string="adds the bias")
    n1.metadata_props.add(key="source", value="layer0.add")
    n2 = helper.make_node("Relu", ["a"], ["r"], name="relu")
    n3 = helper.make_node("Mul", ["r", "x"], ["y"], name="mul")
    bias = numpy_helper.from_array(np.array([1.0, -1.0, 0.5], np.float32), "bias")
    bias.doc_string = "bias doc"
    vi_r = helper.make_tensor_value_info("r", TP.FLOAT, ["batch", None], doc_string="relu out")
    vi_r.metadata_props.add(key="k", value="v")
    vi_bias = helper.make_tensor_value_info("bias", TP.FLOAT, [3])
    vi_a = onnx.ValueInfoProto(name="a")  # an entry without a type: kept as it is
    graph = helper.make_graph(
        [n1, n2, n3], "meta", [x], [y], initializer=[bias], doc_string="graph doc",
        value_info=[vi_r, vi_bias, vi_a],
    )
    graph.metadata_props.add(key="graph_key", value="graph value")
    ann = onnx.TensorAnnotation(tensor_name="a")
    ann.quant_parameter_tensor_names.add(key="SCALE_TENSOR", value="bias")
    graph.quantization_annotation.append(ann)
    model = _model(
        graph, _opsets(), producer_name="hand", producer_version="1.2", domain="test.models", model_version=7,
        doc_string="model doc",
    )
    model.metadata_props.add(key="author", value="tests")
    model.metadata_props.add(key="utf8", value="ünïcödé")
    return model, {"x": np.linspace(-2, 2, 6, dtype=np.float32).reshape(2, 3)}


# ----------------------------------------------------------------------------- non-tensor types
def nontensor_model() -> tuple[onnx.ModelProto, dict]:
    """Sequence and optional values, including a sequence-typed graph output."""
    seq_t = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TP.FLOAT, [2, 3]))
    opt_t = helper.make_optional_type_proto(helper.make_tensor_type_proto(TP.FLOAT, [2, 3]))
    graph = helper.make_graph(
        [
            helper.make_node("SequenceConstruct", ["x", "x"], ["seq"], name="seq"),
            helper.make_node("SequenceAt", ["seq", "one"], ["second"], name="at"),
            helper.make_node("Optional", ["second"], ["opt"], name="opt"),
            helper.make_node("OptionalHasElement", ["opt"], ["has"], name="has"),
            helper.make_node("OptionalGetElement", ["opt"], ["got"], name="get"),
            helper.make_node("Abs", ["got"], ["y"], name="abs"),
        ],
        "nontensor",
        [helper.make_tensor_value_info("x", TP.FLOAT, [2, 3])],
        [
            helper.make_tensor_value_info("y", TP.FLOAT, [2, 3]),
            helper.make_value_info("seq", seq_t),
            helper.make_tensor_value_info("has", TP.BOOL, []),
        ],
        initializer=[numpy_helper.from_array(np.array(1, np.int64), "one")],
        value_info=[helper.make_value_info("opt", opt_t)],
    )
    return _model(graph, _opsets()), {"x": np.arange(6, dtype=np.float32).reshape(2, 3) - 2}


# ----------------------------------------------------------------------------- empty optional slots
def optional_slots_model() -> tuple[onnx.ModelProto, dict]:
    """Omitted optional inputs ("" in the middle and at the end) and outputs ("" in the middle)."""
    graph = helper.make_graph(
        [
            helper.make_node("Clip", ["x", "", "hi"], ["c"], name="clip"),  # no min
            helper.make_node(
                "LayerNormalization", ["c", "gamma", ""], ["ln", "", "inv_std"], name="ln", axis=-1, epsilon=1e-5
            ),
            helper.make_node("Dropout", ["ln", "", ""], ["d", ""], name="drop"),
            helper.make_node("Add", ["d", "inv_std"], ["y"], name="add"),
        ],
        "optional_slots",
        [helper.make_tensor_value_info("x", TP.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [2, 4])],
        initializer=[
            numpy_helper.from_array(np.array(1.5, np.float32), "hi"),
            numpy_helper.from_array(np.linspace(0.5, 2, 4, dtype=np.float32), "gamma"),
        ],
    )
    return _model(graph, _opsets()), {"x": np.linspace(-3, 3, 8, dtype=np.float32).reshape(2, 4)}


# ----------------------------------------------------------------------------- low-precision initializers
def low_precision_model() -> tuple[onnx.ModelProto, dict]:
    """bfloat16, float16 (raw and int32_data), int4/uint4 (odd element count), float8 initializers."""
    import ml_dtypes

    bf16_raw = numpy_helper.from_array(np.array([1.0, -2.5, 3.140625], dtype=ml_dtypes.bfloat16), "bf16_raw")
    bf16_vals = helper.make_tensor("bf16_vals", TP.BFLOAT16, [3], [0.5, 8.0, -0.25])  # int32_data
    fp16_raw = numpy_helper.from_array(np.array([0.1, 65504.0, -1e-4], np.float16), "fp16_raw")
    fp16_vals = helper.make_tensor("fp16_vals", TP.FLOAT16, [3], np.array([1, 2, 3], np.float16))
    int4 = helper.make_tensor("int4_w", TP.INT4, [5], [-8, -1, 0, 3, 7])  # odd count: last nibble padded
    uint4 = helper.make_tensor("uint4_w", TP.UINT4, [5], [0, 1, 9, 14, 15])
    f8 = numpy_helper.from_array(np.array([0.5, -3.0, 448.0], dtype=ml_dtypes.float8_e4m3fn), "f8")
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "scale")
    f = TP.FLOAT
    nodes = [
        helper.make_node("Cast", ["bf16_raw"], ["a"], to=f, name="c1"),
        helper.make_node("Cast", ["bf16_vals"], ["b"], to=f, name="c2"),
        helper.make_node("Cast", ["fp16_raw"], ["c"], to=f, name="c3"),
        helper.make_node("Cast", ["fp16_vals"], ["d"], to=f, name="c4"),
        helper.make_node("Cast", ["f8"], ["e"], to=f, name="c5"),
        helper.make_node("Concat", ["a", "b", "c", "d", "e", "x"], ["floats"], axis=0, name="cat"),
        helper.make_node("DequantizeLinear", ["int4_w", "scale"], ["dq4"], name="dq4"),
        helper.make_node("DequantizeLinear", ["uint4_w", "scale"], ["dqu4"], name="dqu4"),
        helper.make_node("Concat", ["dq4", "dqu4"], ["ints"], axis=0, name="cat2"),
    ]
    graph = helper.make_graph(
        nodes,
        "low_precision",
        [helper.make_tensor_value_info("x", f, [2])],
        [helper.make_tensor_value_info("floats", f, [17]), helper.make_tensor_value_info("ints", f, [10])],
        initializer=[bf16_raw, bf16_vals, fp16_raw, fp16_vals, int4, uint4, f8, scale],
    )
    return _model(graph, _opsets()), {"x": np.array([1.0, 2.0], np.float32)}


# ----------------------------------------------------------------------------- IR < 4: initializers as inputs
def ir3_model() -> tuple[onnx.ModelProto, dict]:
    """Old-style model where every initializer is also a graph input (overridable at run time)."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4) / 10, "W")
    b = helper.make_tensor("B", TP.FLOAT, [4], [0.5, -0.5, 1.0, 0.0])  # float_data, not raw
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "B"], ["y"]),
        ],
        "ir3",
        [
            helper.make_tensor_value_info("x", TP.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("W", TP.FLOAT, [3, 4]),
            helper.make_tensor_value_info("B", TP.FLOAT, [4]),
        ],
        [helper.make_tensor_value_info("y", TP.FLOAT, ["N", 4])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=3)
    return model, {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}


# ----------------------------------------------------------------------------- sparse initializer
def sparse_initializer_model() -> tuple[onnx.ModelProto, dict]:
    """A sparse initializer read by a node (onnxruntime densifies it)."""
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([1.0, 2.0, 3.0], np.float32), "S"),
        numpy_helper.from_array(np.array([0, 5, 10], np.int64), "S_indices"),
        [3, 4],
    )
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "S"], ["y"], name="mm")],
        "sparse",
        [helper.make_tensor_value_info("x", TP.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [2, 4])],
        sparse_initializer=[sparse],
    )
    return _model(graph, _opsets()), {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}


BUILDERS = {
    "attributes": attribute_model,
    "control_flow": control_flow_model,
    "functions": function_model,
    "metadata": metadata_model,
    "nontensor": nontensor_model,
    "optional_slots": optional_slots_model,
    "low_precision": low_precision_model,
    "ir3": ir3_model,
    "sparse_initializer": sparse_initializer_model,
}
