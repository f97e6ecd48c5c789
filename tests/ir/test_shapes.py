"""Shape inference: onnx's first, then our symbolic propagation where it stops."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from infercc.ir import DType, load_model, to_proto, verify
from infercc.ir import shapes as shapes_mod
from infercc.ir.shapes import infer_shapes, shape_rule
from infercc.ir.symbolic import arith, broadcast, dim_values, range_length, reshape_dims


def ints(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def make(nodes, inputs, outputs, inits=(), opset=21, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets], ir_version=10
    )


@pytest.fixture(params=["with_onnx", "ours_only"])
def mode(request, monkeypatch):
    """Run each test twice: with onnx's inference, and with it failing so only our rules run."""
    if request.param == "ours_only":
        def broken(*args, **kwargs):
            raise onnx.shape_inference.InferenceError("[ShapeInferenceError] simulated failure")

        monkeypatch.setattr(onnx.shape_inference, "infer_shapes", broken)
    return request.param


def shape_of(model, name):
    v = model.graph.value(name)
    return v.dtype, v.shape


def split_heads_model(heads=8, head_dim=64):
    """x[batch, seq, 512] -> Shape -> Gather(0), Gather(1) -> Unsqueeze -> Concat(.., [8, 64]) -> Reshape."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["b"], axis=0),
        helper.make_node("Gather", ["s", "i1"], ["q"], axis=0),
        helper.make_node("Unsqueeze", ["b", "ax0"], ["bu"]),
        helper.make_node("Unsqueeze", ["q", "ax0"], ["qu"]),
        helper.make_node("Concat", ["bu", "qu", "heads"], ["tgt"], axis=0),
        helper.make_node("Reshape", ["x", "tgt"], ["y"]),
        helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 2, 1, 3]),
    ]
    return make(
        nodes,
        [helper.make_tensor_value_info("x", TP.FLOAT, ["batch", "seq", heads * head_dim])],
        [helper.make_tensor_value_info("yt", TP.FLOAT, None)],
        [ints("i0", 0), ints("i1", 1), ints("ax0", [0]), ints("heads", [heads, head_dim])],
    )


def test_shape_gather_concat_reshape_is_symbolic(mode):
    model = load_model(split_heads_model())
    notes = infer_shapes(model)
    assert shape_of(model, "y") == (DType.FLOAT, ("batch", "seq", 8, 64))
    assert dim_values(model.graph.value("tgt")) == ["batch", "seq", 8, 64]
    assert shape_of(model, "s") == (DType.INT64, (3,))
    if mode == "ours_only":
        assert any("onnx shape inference failed" in n and "simulated failure" in n for n in notes)
    else:
        assert shape_of(model, "yt") == (DType.FLOAT, ("batch", 8, "seq", 64))
    verify(model)


def test_inferred_shapes_are_exported_and_valid():
    model = load_model(split_heads_model())
    infer_shapes(model)
    out = to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    infos = {vi.name: vi for vi in out.graph.value_info}
    dims = [d.dim_param or d.dim_value for d in infos["y"].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq", 8, 64]


@pytest.mark.parametrize(
    "x_shape, target, expected",
    [
        (["batch", 512], [0, 8, -1], ("batch", 8, 64)),  # 0 copies, -1 resolves from the known factors
        (["batch", "seq", 8, 64], [0, 0, -1], ("batch", "seq", 512)),
        (["batch", "seq", 8, 64], [-1, 64], (None, 64)),  # batch*seq*8 is not one symbol: unknown
        ([4, 6], [-1], (24,)),
        (["n", 6], [3, -1], (None,) * 0 + (3, None)),  # n*2 unknown
        (["n", 6], [-1, 6], ("n", 6)),
        (["n", 6], [6, 0], (6, 6)),
    ],
)
def test_reshape_with_minus_one_and_zero(mode, x_shape, target, expected):
    model = load_model(make(
        [helper.make_node("Reshape", ["x", "t"], ["y"])],
        [helper.make_tensor_value_info("x", TP.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TP.FLOAT, None)],
        [ints("t", target)],
    ))
    infer_shapes(model)
    dtype, shape = shape_of(model, "y")
    assert dtype == DType.FLOAT
    if mode == "ours_only":
        assert shape == expected
    else:  # onnx may know more than us (it never knows less than a consistent answer)
        assert len(shape) == len(expected)
        for got, want in zip(shape, expected):
            assert want is None or got == want


def test_reshape_target_from_shape_arithmetic(mode):
    """Target [batch, seq * 8, 64] computed with Mul over Shape outputs gives an expression dim."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Slice", ["s", "st", "en"], ["bs"]),  # [batch, seq]
        helper.make_node("Gather", ["s", "i1"], ["q"], axis=0),
        helper.make_node("Mul", ["q", "eight"], ["q8"]),
        helper.make_node("Unsqueeze", ["q8", "ax0"], ["q8u"]),
        helper.make_node("Gather", ["bs", "i0"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "ax0"], ["bu"]),
        helper.make_node("Concat", ["bu", "q8u", "d"], ["tgt"], axis=0),
        helper.make_node("Reshape", ["x", "tgt"], ["y"]),
    ]
    model = load_model(make(
        nodes,
        [helper.make_tensor_value_info("x", TP.FLOAT, ["batch", "seq", 8, 64])],
        [helper.make_tensor_value_info("y", TP.FLOAT, None)],
        [ints("st", [0]), ints("en", [2]), ints("i0", 0), ints("i1", 1), ints("eight", 8), ints("ax0", [0]),
         ints("d", [64])],
    ))
    infer_shapes(model)
    assert dim_values(model.graph.value("bs")) == ["batch", "seq"]
    assert dim_values(model.graph.value("tgt")) == ["batch", "(seq*8)", 64]
    _, shape = shape_of(model, "y")
    assert shape[0] == "batch" and shape[2] == 64
    if mode == "ours_only":
        assert shape == ("batch", "(seq*8)", 64)


def test_expand(mode):
    nodes = [
        helper.make_node("Shape", ["ids"], ["s"]),
        helper.make_node("Expand", ["row", "s"], ["y"]),
        helper.make_node("Expand", ["col", "s"], ["z"]),
    ]
    model = load_model(make(
        nodes,
        [helper.make_tensor_value_info("ids", TP.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("row", TP.FLOAT, [1, "seq"]),
         helper.make_tensor_value_info("col", TP.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("y", TP.FLOAT, None), helper.make_tensor_value_info("z", TP.FLOAT, None)],
    ))
    infer_shapes(model)
    assert shape_of(model, "y") == (DType.FLOAT, ("batch", "seq"))
    assert shape_of(model, "z") == (DType.FLOAT, ("batch", "seq"))


def test_expand_to_larger_rank(mode):
    model = load_model(make(
        [helper.make_node("Expand", ["x", "t"], ["y"])],
        [helper.make_tensor_value_info("x", TP.FLOAT, ["n", 1])],
        [helper.make_tensor_value_info("y", TP.FLOAT, None)],
        [ints("t", [2, 1, 5])],
    ))
    infer_shapes(model)
    assert shape_of(model, "y") == (DType.FLOAT, (2, "n", 5))


def test_constant_of_shape(mode):
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("ConstantOfShape", ["s"], ["zeros"], value=numpy_helper.from_array(np.array([0], np.int64))),
        helper.make_node("ConstantOfShape", ["s"], ["floats"]),
        helper.make_node("ConstantOfShape", ["fixed"], ["fixed_out"], value=helper.make_tensor("v", TP.FLOAT16, [1], [1])),
    ]
    model = load_model(make(
        nodes,
        [helper.make_tensor_value_info("x", TP.FLOAT, ["batch", "seq"])],
        [helper.make_tensor_value_info(n, TP.UNDEFINED, None) for n in ("zeros", "floats", "fixed_out")],
        [ints("fixed", [3, 4])],
    ))
    infer_shapes(model)
    assert shape_of(model, "zeros") == (DType.INT64, ("batch", "seq"))
    assert shape_of(model, "floats") == (DType.FLOAT, ("batch", "seq"))
    assert shape_of(model, "fixed_out") == (DType.FLOAT16, (3, 4))


def test_custom_domain_rule(mode, monkeypatch):
    monkeypatch.setattr(shapes_mod, "_RULES", dict(shapes_mod._RULES))  # registration is global

    @shape_rule("custom.test", "SplitLast")
    def _split_last(node):
        x = node.inputs[0]
        if x.shape is None:
            return None
        half = x.shape[-1] // 2 if isinstance(x.shape[-1], int) else None
        return [(x.dtype, (*x.shape[:-1], half))] * len(node.outputs)

    nodes = [
        helper.make_node("SplitLast", ["x"], ["a", "b"], domain="custom.test"),
        helper.make_node("Relu", ["a"], ["ra"]),  # downstream of the custom op: onnx cannot know it
        helper.make_node("Add", ["ra", "b"], ["y"]),
        helper.make_node("Other", ["x"], ["unknown"], domain="custom.test"),
    ]
    model = load_model(make(
        nodes,
        [helper.make_tensor_value_info("x", TP.FLOAT16, ["batch", 10])],
        [helper.make_tensor_value_info("y", TP.UNDEFINED, None)],
        extra_opsets=[helper.make_opsetid("custom.test", 1)],
    ))
    notes = infer_shapes(model)
    for name in ("a", "b", "ra", "y"):
        assert shape_of(model, name) == (DType.FLOAT16, ("batch", 5)), name
    assert shape_of(model, "unknown") == (None, None)
    assert not any("unknown" in n for n in notes)  # only used values are reported; `unknown` has no use
    verify(model)


def test_unknown_outputs_are_reported(mode):
    nodes = [
        helper.make_node("Mystery", ["x"], ["m"], domain="custom.test"),
        helper.make_node("Relu", ["m"], ["y"]),
    ]
    model = load_model(make(
        nodes,
        [helper.make_tensor_value_info("x", TP.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TP.FLOAT, None)],
        extra_opsets=[helper.make_opsetid("custom.test", 1)],
    ))
    notes = infer_shapes(model)
    assert any("no inferred type (first: m)" in n for n in notes)


def test_declared_shapes_are_not_overwritten_by_less_specific_ones(mode):
    """A value declared [batch, 8] in value_info keeps its symbol; onnx's unk__ names never replace it."""
    proto = split_heads_model()
    proto.graph.value_info.append(helper.make_tensor_value_info("y", TP.FLOAT, ["batch", "seq", 8, 64]))
    model = load_model(proto)
    infer_shapes(model)
    assert shape_of(model, "y") == (DType.FLOAT, ("batch", "seq", 8, 64))


def test_infer_shapes_on_control_flow(mode):
    from .models import control_flow_model

    proto, _ = control_flow_model()
    proto.graph.ClearField("value_info")
    model = load_model(proto)
    infer_shapes(model)
    verify(model)
    assert shape_of(model, "outer") == (DType.FLOAT, (2, 3))


def test_infer_shapes_on_fixtures():
    try:
        from tests.fixtures import catalog
    except ImportError:
        pytest.skip("fixture catalog not present")
    names = catalog.list_fixtures()
    if not names:
        pytest.skip("no fixtures")
    for name in names:
        model = load_model(catalog.fixture_path(name))
        infer_shapes(model)
        verify(model)
        onnx.checker.check_model(to_proto(model))
        typed = [v for n in model.graph.nodes for v in n.outputs if v.uses]
        assert all(v.dtype is not None for v in typed), name


# ----------------------------------------------------------------------------- symbolic helpers
def test_arith_and_broadcast():
    assert arith("Add", "seq", 0) == "seq" and arith("Mul", 1, "seq") == "seq"
    assert arith("Add", "seq", 1) == "(seq+1)" and arith("Div", 8, 0) is None
    assert arith("Sub", 7, 3) == 4 and arith("Mul", None, 3) is None
    assert broadcast(("batch", 1, 4), ("seq", 1)) == ("batch", "seq", 4)
    assert broadcast((1,), ()) == (1,)
    assert broadcast(("a",), ("b",)) == (None,)
    assert broadcast(("a",), (3,)) == (3,)


def test_reshape_dims_helper():
    assert reshape_dims(("b", "s", 512), ["b", "s", 8, -1]) == ("b", "s", 8, 64)
    assert reshape_dims(("b", 0), [0, 0], allowzero=1) == (0, 0)
    assert reshape_dims(None, [0, -1]) == (None, None)  # 0 copies an unknown dim: unknown, not 0
    assert reshape_dims(None, [0, 4], allowzero=1) == (0, 4)
    assert reshape_dims(("b", "s"), ["b", "s"]) == ("b", "s")


# --------------------------------------------------------- the mask and rotary arithmetic of HF exports
def _hf_mask_model():
    """What transformers' eager mask and rotary tables export to (TorchScript, opset 17):
    torch.arange(batch / seq) as Range over a Shape element; the mask expanded to
    ``[batch, -1, seq, seq]`` with -1 made 1 by ``Where(Equal(t, -1), 1, t)`` (torch's expand()); a
    [1, seq, 1, d] rotary table repeated by Tile; the scores plus the mask."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["b"], axis=0),
        helper.make_node("Gather", ["s", "i1"], ["n"], axis=0),
        helper.make_node("Range", ["i0", "b", "i1"], ["batch_idx"]),
        helper.make_node("Range", ["i0", "n", "i1"], ["pos"]),
        helper.make_node("Unsqueeze", ["pos", "ax1"], ["rows"]),
        helper.make_node("LessOrEqual", ["pos", "rows"], ["tri"]),
        helper.make_node("Unsqueeze", ["tri", "ax01"], ["tri4"]),
        helper.make_node("Unsqueeze", ["b", "ax0"], ["bu"]),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["nu"]),
        helper.make_node("Concat", ["bu", "minus1", "nu", "nu"], ["tgt"], axis=0),
        helper.make_node("Equal", ["tgt", "minus1x4"], ["is_keep"]),
        helper.make_node("Where", ["is_keep", "ones4", "tgt"], ["fixed"]),
        helper.make_node("Expand", ["tri4", "fixed"], ["mask"]),
        helper.make_node("Where", ["mask", "zero", "fill"], ["bias"]),
        helper.make_node("Add", ["scores", "bias"], ["masked"]),
        helper.make_node("Unsqueeze", ["x", "ax3"], ["x4"]),
        helper.make_node("Tile", ["x4", "reps"], ["tiled"]),
    ]
    f32 = lambda name, v: numpy_helper.from_array(np.array(v, np.float32), name)  # noqa: E731
    return make(
        nodes,
        [helper.make_tensor_value_info("x", TP.FLOAT, ["batch", "seq", 8]),
         helper.make_tensor_value_info("scores", TP.FLOAT, ["batch", 4, "seq", "seq"])],
        [helper.make_tensor_value_info(n, TP.FLOAT, None) for n in ("masked", "tiled")],
        [ints("i0", 0), ints("i1", 1), ints("ax0", [0]), ints("ax1", [1]), ints("ax01", [0, 1]), ints("ax3", [3]),
         ints("minus1", [-1]), ints("minus1x4", [-1] * 4), ints("ones4", [1] * 4), ints("reps", [1, 1, 1, 2]),
         f32("zero", 0.0), f32("fill", -np.inf)],
        opset=17,
    )


def test_hf_mask_and_rotary_arithmetic_keep_batch_and_seq():
    """Range, the Equal/Where fix-up of an expand target and Tile have rules where onnx's leave
    symbolic dims unknown; onnx's own rules (Unsqueeze, LessOrEqual) then carry them on. Without
    these, scores + mask lost batch and seq ([?, 4, ?, ?]), and with them the next layer's reshape
    targets (CodeGen's second layer was not fused)."""
    model = load_model(_hf_mask_model())
    infer_shapes(model)
    assert shape_of(model, "batch_idx") == (DType.INT64, ("batch",))
    assert shape_of(model, "pos") == (DType.INT64, ("seq",))
    assert dim_values(model.graph.value("fixed")) == ["batch", 1, "seq", "seq"]
    assert shape_of(model, "mask") == (DType.BOOL, ("batch", 1, "seq", "seq"))
    assert shape_of(model, "masked") == (DType.FLOAT, ("batch", 4, "seq", "seq"))
    assert shape_of(model, "tiled") == (DType.FLOAT, ("batch", "seq", 8, 2))
    verify(model)


def test_slice_with_computed_bounds_keeps_the_axes_it_does_not_slice(mode):
    """m[:, -seq:] with seq read from another input: onnx's rule leaves every dim unknown (OPT's
    positions after KV-cache insertion lost their batch, so a SkipLayerNorm was decomposed)."""
    nodes = [
        helper.make_node("Shape", ["ids"], ["n"], start=1, end=2),
        helper.make_node("Neg", ["n"], ["start"]),
        helper.make_node("Slice", ["m", "start", "big", "ax1"], ["cut"]),
        helper.make_node("Slice", ["x", "two", "six", "ax2"], ["fixed"]),
        helper.make_node("Slice", ["x", "zero", "big"], ["all_axes"]),
    ]
    model = load_model(make(
        nodes,
        [helper.make_tensor_value_info("m", TP.INT64, ["batch", "total"]),
         helper.make_tensor_value_info("ids", TP.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("x", TP.FLOAT, ["batch", "seq", 8])],
        [helper.make_tensor_value_info("cut", TP.INT64, None),
         *(helper.make_tensor_value_info(n, TP.FLOAT, None) for n in ("fixed", "all_axes"))],
        [ints("big", [2**63 - 1]), ints("ax1", [1]), ints("ax2", [-1]), ints("two", [2]), ints("six", [6]),
         ints("zero", [0])],
    ))
    infer_shapes(model)
    assert shape_of(model, "cut") == (DType.INT64, ("batch", None))
    assert shape_of(model, "fixed") == (DType.FLOAT, ("batch", "seq", 4))
    assert shape_of(model, "all_axes")[1][1:] == ("seq", 8)  # axes default to the first len(starts)


def test_expand_target_fix_up_written_with_constant_of_shape():
    """Older exports write torch's expand() fix-up as Reshape(t, [-1]), ConstantOfShape(Shape(..))
    and a Mul by -1: each keeps the elements it is given."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "ax0"], ["bu"]),
        helper.make_node("Concat", ["bu", "minus1", "seq8"], ["tgt"], axis=0),
        helper.make_node("Reshape", ["tgt", "minus1"], ["flat"]),
        helper.make_node("Shape", ["flat"], ["len"]),
        helper.make_node("ConstantOfShape", ["len"], ["ones"], value=helper.make_tensor("v", TP.INT64, [1], [1])),
        helper.make_node("Mul", ["ones", "minus1"], ["minus_ones"]),
        helper.make_node("Equal", ["flat", "minus_ones"], ["is_keep"]),
        helper.make_node("Where", ["is_keep", "ones", "flat"], ["fixed"]),
        helper.make_node("Expand", ["y", "fixed"], ["out"]),
    ]
    model = load_model(make(
        nodes,
        [helper.make_tensor_value_info("x", TP.FLOAT, ["batch", 8]),
         helper.make_tensor_value_info("y", TP.FLOAT, [1, 1, 8])],
        [helper.make_tensor_value_info("out", TP.FLOAT, None)],
        [ints("i0", 0), ints("ax0", [0]), ints("minus1", [-1]), ints("seq8", [8])],
        opset=13,
    ))
    infer_shapes(model)
    assert dim_values(model.graph.value("ones")) == [1, 1, 1]
    assert dim_values(model.graph.value("is_keep")) == [0, 1, 0]
    assert dim_values(model.graph.value("fixed")) == ["batch", 1, 8]
    assert shape_of(model, "out") == (DType.FLOAT, ("batch", 1, 8))


def test_range_length_and_undecidable_comparisons():
    assert range_length([0], ["seq"], [1]) == "seq" and range_length([1], ["seq"], [1]) == "(seq-1)"
    assert range_length([0], [5], [2]) == 3 and range_length([5], [0], [-2]) == 3 and range_length([3], [1], [1]) == 0
    assert range_length([0], ["seq"], [2]) is None and range_length(None, [4], [1]) is None
    # a difference of dims may be negative: not provably unlike -1
    model = load_model(make(
        [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Sub", ["s", "one"], ["d"]),
         helper.make_node("Equal", ["d", "minus1"], ["eq"]), helper.make_node("Equal", ["s", "minus1"], ["eq_dim"])],
        [helper.make_tensor_value_info("x", TP.FLOAT, ["n"])],
        [helper.make_tensor_value_info(n, TP.BOOL, None) for n in ("eq", "eq_dim")],
        [ints("one", [1]), ints("minus1", [-1])],
    ))
    assert dim_values(model.graph.value("d")) == ["(n-1)"]
    assert dim_values(model.graph.value("eq")) == [None]
    assert dim_values(model.graph.value("eq_dim")) == [0]
