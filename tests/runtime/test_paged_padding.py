"""runtime/paged_padding.py: whether rows of different past lengths may be left-padded into one
call. The positions a graph computes must come from ``position_ids`` or a running count of the
mask's values; a count over the sequence's length (a Range) would move with each step's padding.
The end-to-end consequence (logits of padded rows) is tested in test_paged_runner.py."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from infercc.ir.onnx_import import load_model
from infercc.runtime.paged_padding import padding_problem, positions_from_mask_or_ids


def _graph(nodes: list[onnx.NodeProto], inputs: list[str], output: str):
    """A tiny model: int64 inputs [1, S], ``output`` a float tensor."""
    proto = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.INT64, [1, "S"]) for n in inputs],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)]), opset_imports=[helper.make_opsetid("", 17)])
    return load_model(proto)


def _value(model, name: str):
    return next(n.outputs[0] for n in model.graph.nodes if n.outputs[0].name == name)


def test_positions_from_a_cumsum_of_the_mask_or_from_position_ids() -> None:
    axis = helper.make_tensor("axis", TensorProto.INT64, [], [1])
    model = _graph([helper.make_node("Constant", [], ["axis"], value=axis),
                    helper.make_node("CumSum", ["attention_mask", "axis"], ["count"]),
                    helper.make_node("Cast", ["count"], ["from_mask"], to=TensorProto.FLOAT),
                    helper.make_node("Cast", ["position_ids"], ["from_ids"], to=TensorProto.FLOAT),
                    helper.make_node("Add", ["from_mask", "from_ids"], ["out"])],
                   ["attention_mask", "position_ids"], "out")
    ids = next(v for v in model.graph.inputs if v.name == "position_ids")
    assert positions_from_mask_or_ids(_value(model, "from_mask"), None)
    assert positions_from_mask_or_ids(_value(model, "from_ids"), ids)
    assert not positions_from_mask_or_ids(_value(model, "from_ids"), None)


def test_a_count_over_the_length_is_not_positions() -> None:
    """Range(0, Shape(mask)[1]) reads only the mask's shape: a Shape is not followed to its input,
    so the mask input is not reached."""
    zero = helper.make_tensor("zero", TensorProto.INT64, [], [0])
    one = helper.make_tensor("one", TensorProto.INT64, [], [1])
    model = _graph([helper.make_node("Constant", [], ["zero"], value=zero),
                    helper.make_node("Constant", [], ["one"], value=one),
                    helper.make_node("Shape", ["attention_mask"], ["shape"], start=1, end=2),
                    helper.make_node("Squeeze", ["shape"], ["length"]),
                    helper.make_node("Range", ["zero", "length", "one"], ["count"]),
                    helper.make_node("Cast", ["count"], ["out"], to=TensorProto.FLOAT)],
                   ["attention_mask"], "out")
    assert not positions_from_mask_or_ids(_value(model, "out"), None)


def test_a_graph_without_the_mask_input_is_refused_by_name() -> None:
    model = _graph([helper.make_node("Cast", ["input_ids"], ["out"], to=TensorProto.FLOAT)], ["input_ids"], "out")
    reason = padding_problem(model, masked_keys=False)
    assert reason is not None and "'attention_mask'" in reason
