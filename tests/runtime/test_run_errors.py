"""What onnxruntime would refuse is refused at compile() by node; what only fails when run comes
back as our error naming the node and op, with onnxruntime's first line kept; bad feeds (token ids
outside the vocabulary, empty sequences, wrong dtype or rank) are InputErrors naming the input,
the value and the valid range. Real models, real onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import infercc
from infercc.errors import InferccError, InputError, ModelLoadError, RunError
from infercc.runtime.ort_check import ORT_ERRORS
from tests.fixtures import catalog

from ._cached_model import VOCAB, tiny_lm


def _model(nodes, inputs, outputs, inits=(), *, opset: int = 21, extra_opsets=(), functions=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10, functions=list(functions))


def _vec(name: str, shape=(2,), dtype=TP.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, list(shape))


def _compile_error(proto: onnx.ModelProto) -> str:
    with pytest.raises(ModelLoadError) as info:
        infercc.compile(proto, provider="cpu")
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def _ort_refuses(proto: onnx.ModelProto) -> None:
    """The premise of every compile-time check below: onnxruntime itself refuses the model."""
    feeds = {i.name: np.ones([d.dim_value for d in i.type.tensor_type.shape.dim], np.float32) for i in proto.graph.input}
    with pytest.raises(ORT_ERRORS):
        ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


# ----------------------------------------------------------------------------- refused at compile
def test_unknown_op_in_the_default_domain():
    proto = _model([helper.make_node("Relux", ["x"], ["y"], name="act")], [_vec("x")], [_vec("y")])
    _ort_refuses(proto)
    msg = _compile_error(proto)
    assert "node 'act' (Relux)" in msg and "no operator 'Relux'" in msg and "did you mean 'Relu'" in msg
    assert "onnxruntime" in msg and "fix the op type" in msg


def test_unknown_op_in_onnxruntime_domain():
    proto = _model([helper.make_node("FancyAttention", ["x"], ["y"], name="fa", domain="com.microsoft")],
                   [_vec("x")], [_vec("y")], extra_opsets=[("com.microsoft", 1)])
    _ort_refuses(proto)
    msg = _compile_error(proto)
    assert "node 'fa' (FancyAttention)" in msg and "'com.microsoft'" in msg and "no operator" in msg


def test_op_in_a_domain_nobody_knows():
    proto = _model([helper.make_node("Foo", ["x"], ["y"], name="foo", domain="com.example")],
                   [_vec("x")], [_vec("y")], extra_opsets=[("com.example", 1)])
    _ort_refuses(proto)
    msg = _compile_error(proto)
    assert "node 'foo' (Foo)" in msg and "neither onnx nor onnxruntime knows operator domain 'com.example'" in msg


@pytest.mark.parametrize(("node", "expect"), [
    (helper.make_node("Add", ["x"], ["y"], name="bad"), "Add-14 takes 2 inputs but the node has 1"),
    (helper.make_node("Relu", ["x", "x"], ["y"], name="bad"), "Relu-14 takes 1 inputs but the node has 2"),
    (helper.make_node("Relu", ["x"], ["y", "z"], name="bad"), "takes 1 outputs but the node has 2"),
    (helper.make_node("Add", ["x", ""], ["y"], name="bad"), "input 1 (B) of Add-14 is required but left empty"),
    (helper.make_node("Cast", ["x"], ["y"], name="bad"), "requires attribute(s) to"),
    (helper.make_node("Cast", ["x"], ["y"], name="bad", to=4096), "attribute 'to' of Cast-21 is 4096, which is no tensor"),
    (helper.make_node("Cast", ["x"], ["y"], name="bad", to=1.0), "attribute 'to' of Cast-21 must be INT"),
])
def test_malformed_node(node, expect):
    proto = _model([node], [_vec("x")], [_vec("y")])
    _ort_refuses(proto)
    msg = _compile_error(proto)
    assert f"node 'bad' ({node.op_type})" in msg and expect in msg and "re-export" in msg


def test_op_newer_than_the_imported_opset():
    proto = _model([helper.make_node("Gelu", ["x"], ["y"], name="gelu")], [_vec("x")], [_vec("y")], opset=17)
    _ort_refuses(proto)
    msg = _compile_error(proto)
    assert "node 'gelu' (Gelu)" in msg and "first appears in opset 20" in msg and "imports version 17" in msg


def test_nested_bad_node_is_found():
    body = helper.make_graph([helper.make_node("Frobnicate", ["x"], ["t"], name="inner")], "then", [], [_vec("t")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="ident")], "else", [], [_vec("e")])
    proto = _model([helper.make_node("If", ["c"], ["y"], name="if", then_branch=body, else_branch=other)],
                   [_vec("x"), _vec("c", (), TP.BOOL)], [_vec("y")])
    assert "node 'inner' (Frobnicate)" in _compile_error(proto)


def test_model_local_function_and_contrib_ops_are_accepted():
    """No over-refusal: an op defined by the model's own function, and onnxruntime's contrib ops."""
    double = helper.make_function("local.fn", "Double", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                                  [helper.make_opsetid("", 21)])
    proto = _model(
        [helper.make_node("Double", ["x"], ["d"], name="dbl", domain="local.fn"),
         helper.make_node("FastGelu", ["d"], ["y"], name="gelu", domain="com.microsoft")],
        [_vec("x")], [_vec("y")], extra_opsets=[("local.fn", 1), ("com.microsoft", 1)], functions=[double],
    )
    compiled = infercc.compile(proto, provider="cpu", optimize=False)
    out = compiled.run({"x": np.array([0.0, 1.0], np.float32)})["y"]
    assert out[0] == 0.0 and out[1] == pytest.approx(1.9545, abs=1e-3)  # FastGelu(2)


def test_compile_creates_no_session():
    """The schema check is what compile() pays; the session stays lazy (large models)."""
    compiled = infercc.compile(_model([helper.make_node("Relu", ["x"], ["y"])], [_vec("x")], [_vec("y")]), provider="cpu")
    assert compiled._backend is None


# ----------------------------------------------------------------------------- refused when run
def test_incompatible_shapes_name_the_node_when_the_session_is_made():
    proto = _model([helper.make_node("Add", ["x", "w"], ["y"], name="addw")], [_vec("x")], [_vec("y")],
                   [numpy_helper.from_array(np.ones(3, np.float32), "w")])
    compiled = infercc.compile(proto, provider="cpu", optimize=False)  # not checkable without shapes
    with pytest.raises(ModelLoadError) as info:
        compiled.run({"x": np.ones(2, np.float32)})
    msg = str(info.value)
    assert "onnxruntime refused the model at node 'addw' (Add)" in msg and "Incompatible dimensions" in msg
    assert "[ONNXRuntimeError]" in msg and "\n" not in msg  # onnxruntime's first line, kept
    assert type(info.value.__cause__).__module__.startswith("onnxruntime")


def test_failure_during_run_is_a_run_error_naming_node_and_op():
    """A Reshape that only fails for some input sizes: onnxruntime accepts the model, fails the run."""
    proto = _model([helper.make_node("Reshape", ["x", "shape"], ["y"], name="rs")], [_vec("x", ["n"])],
                   [_vec("y", [3, None])], [numpy_helper.from_array(np.array([3, -1], np.int64), "shape")])
    compiled = infercc.compile(proto, provider="cpu", optimize=False)
    assert compiled.run({"x": np.ones(6, np.float32)})["y"].shape == (3, 2)
    with pytest.raises(RunError) as info:
        compiled.run({"x": np.ones(4, np.float32)})
    assert isinstance(info.value, InferccError) and isinstance(info.value, RuntimeError)
    msg = str(info.value)
    assert "node 'rs' (Reshape)" in msg and "onnxruntime failed running the model" in msg and "\n" not in msg
    assert "CompiledModel.inputs" in msg


def test_run_error_names_the_node_in_an_optimized_model():
    """After passes the node names are the compiled graph's: the op is found from them."""
    proto = _model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                    helper.make_node("Reshape", ["r", "shape"], ["y"], name="rs")], [_vec("x", ["n"])],
                   [_vec("y", [3, None])], [numpy_helper.from_array(np.array([3, -1], np.int64), "shape")])
    compiled = infercc.compile(proto, provider="cpu")
    with pytest.raises(RunError, match=r"\(Reshape\)"):
        compiled.run({"x": np.ones(4, np.float32)})


# ----------------------------------------------------------------------------- feeds
def _embedding_model(ids_dtype=TP.INT64, cast: bool = False, name: str = "input_ids") -> onnx.ModelProto:
    table = numpy_helper.from_array(np.arange(20, dtype=np.float32).reshape(10, 2), "wte")
    nodes = [helper.make_node("Gather", ["wte", "ids64" if cast else name], ["y"], name="embed")]
    if cast:
        nodes.insert(0, helper.make_node("Cast", [name], ["ids64"], to=TP.INT64))
    return _model(nodes, [_vec(name, ["batch", "seq"], ids_dtype)], [_vec("y", ["batch", "seq", 2])], [table])


@pytest.fixture(scope="module")
def embedding():
    return infercc.compile(_embedding_model(), provider="cpu")


def _input_error(compiled, feeds) -> str:
    with pytest.raises(InputError) as info:
        compiled.run(feeds)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_valid_ids_run(embedding):
    ids = np.array([[0, 9, 3]])
    np.testing.assert_array_equal(embedding.run({"input_ids": ids})["y"][0, 1], [18.0, 19.0])


@pytest.mark.parametrize("bad", [10, 12345, -1, -10])
def test_token_id_outside_the_vocabulary(embedding, bad):
    msg = _input_error(embedding, {"input_ids": np.array([[1, 2], [3, bad]])})
    assert "'input_ids'" in msg and f"holds {bad} at index [1, 1]" in msg and "0 to 9" in msg
    assert "'wte'" in msg and "vocabulary size 10" in msg


def test_ids_checked_through_a_cast():
    compiled = infercc.compile(_embedding_model(TP.INT32, cast=True), provider="cpu", optimize=False)
    assert compiled.run({"input_ids": np.array([[9]], np.int32)})["y"].shape == (1, 1, 2)
    assert "holds 10" in _input_error(compiled, {"input_ids": np.array([[10]], np.int32)})


def test_other_index_inputs_may_count_from_the_end():
    """Gather allows -rows..rows-1; only token ids must be >= 0."""
    compiled = infercc.compile(_embedding_model(name="rows"), provider="cpu", optimize=False)
    np.testing.assert_array_equal(compiled.run({"rows": np.array([[-1]])})["y"][0, 0], [18.0, 19.0])
    msg = _input_error(compiled, {"rows": np.array([[-11]])})
    assert "'rows'" in msg and "holds -11" in msg and "-10 to 9" in msg


@pytest.mark.parametrize("shape", [(0, 3), (2, 0), (0, 0)])
def test_empty_batch_or_sequence(embedding, shape):
    msg = _input_error(embedding, {"input_ids": np.zeros(shape, np.int64)})
    assert "'input_ids' is empty" in msg and f"shape {list(shape)}" in msg and "at least one token" in msg
    axis = shape.index(0)
    assert f"axis {axis} ('{['batch', 'seq'][axis]}')" in msg


def test_ids_that_do_not_fit_an_int32_input():
    compiled = infercc.compile(_embedding_model(TP.INT32, cast=True), provider="cpu", optimize=False)
    msg = _input_error(compiled, {"input_ids": np.array([[2**33]], np.int64)})
    assert f"holds {2**33}" in msg and "int32" in msg and "2147483647" in msg


def test_wrong_dtype_and_rank(embedding):
    msg = _input_error(embedding, {"input_ids": np.array([[1.5]], np.float32)})
    assert "'input_ids' must be int64" in msg and "astype" in msg
    msg = _input_error(embedding, {"input_ids": np.array([1, 2])})
    assert "rank 2" in msg and "[2]" in msg


def test_cached_language_model_refuses_ids_outside_its_vocabulary():
    compiled = infercc.compile(tiny_lm(cached=True), provider="cpu", optimize=False)
    assert compiled.run({"input_ids": np.array([[1, VOCAB - 1]])})["logits"].shape == (1, 2, VOCAB)
    msg = _input_error(compiled, {"input_ids": np.array([[1, VOCAB]])})
    assert f"holds {VOCAB}" in msg and f"0 to {VOCAB - 1}" in msg
    assert "'input_ids' is empty" in _input_error(compiled, {"input_ids": np.zeros((1, 0), np.int64)})


def test_quantized_embedding_table_is_checked():
    """After int8 quantization the embedding is a GatherBlockQuantized: its rows still bound the ids."""
    compiled = infercc.compile(catalog.fixture_path("llama_dynamo"), provider="cpu", quantize="int8",
                               quant_embeddings="int8", quant_method="rtn")
    assert any(n.op_type == "GatherBlockQuantized" for n in compiled.model.graph.nodes)
    msg = _input_error(compiled, {"input_ids": np.array([[1, 5000]]), "attention_mask": np.ones((1, 2), np.int64)})
    assert "holds 5000" in msg and "0 to 255" in msg and "GatherBlockQuantized" in msg


# ----------------------------------------------------------------------------- broken graphs, at random
@pytest.mark.parametrize("seed", range(3))
def test_randomly_broken_graphs_end_in_our_errors(seed):
    """Random edits of a small model (rewired inputs, other op types, dropped or added inputs,
    changed dims, data types and domains): compile() and run() succeed or raise an InferccError,
    never a raw exception."""
    rng = np.random.default_rng(seed)
    names = ["wte", "input_ids", "h0", "h1", "h2", "y", "w1", "shape", ""]
    ops = ["Gather", "MatMul", "Add", "Relu", "Reshape", "Frob", "Concat", "Transpose", "If"]
    outcomes = set()
    for _ in range(40):
        proto = _model(
            [helper.make_node("Gather", ["wte", "input_ids"], ["h0"], name="embed"),
             helper.make_node("MatMul", ["h0", "w1"], ["h1"], name="mm"),
             helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
             helper.make_node("Reshape", ["h2", "shape"], ["y"], name="reshape")],
            [_vec("input_ids", ["batch", "seq"], TP.INT64)], [helper.make_tensor_value_info("y", TP.FLOAT, None)],
            [numpy_helper.from_array(np.ones((10, 4), np.float32), "wte"),
             numpy_helper.from_array(np.ones((4, 4), np.float32), "w1"),
             numpy_helper.from_array(np.array([0, -1], np.int64), "shape")],
        )
        node = proto.graph.node[int(rng.integers(4))]
        init = proto.graph.initializer[int(rng.integers(3))]
        kind = int(rng.integers(7))
        if kind == 0:
            node.input[int(rng.integers(len(node.input)))] = names[int(rng.integers(len(names)))]
        elif kind == 1:
            node.op_type = ops[int(rng.integers(len(ops)))]
        elif kind == 2:
            node.input.append(names[int(rng.integers(len(names)))])
        elif kind == 3:
            init.dims[int(rng.integers(len(init.dims)))] = int(rng.integers(-1, 12))
        elif kind == 4:
            init.data_type = int(rng.integers(0, 30))
        elif kind == 5:
            node.output[0] = names[int(rng.integers(len(names)))]
        else:
            node.domain = ["com.microsoft", "ai.onnx.ml", "x.y"][int(rng.integers(3))]
        feeds = {"input_ids": rng.integers(-1, 11, (int(rng.integers(0, 3)), int(rng.integers(0, 3))))}
        try:
            infercc.compile(proto, provider="cpu", optimize=bool(rng.integers(2))).run(feeds)
            outcomes.add("ok")
        except InferccError as exc:
            assert "\n" not in str(exc)
            outcomes.add(type(exc).__name__)
    assert "ModelLoadError" in outcomes
