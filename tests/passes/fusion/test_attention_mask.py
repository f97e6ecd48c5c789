"""Mask analysis across layers: a mask shared by every layer is not data-dependent in a later layer
because an earlier (fused) layer read it; a mask really computed from activations still is."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ._attention_util import (
    HEAD,
    HEADS,
    HID,
    TOLERANCE,
    attention_info,
    compile_model,
    layer_feeds,
    max_diff,
    run,
    session,
)

F = TensorProto.FLOAT


def _const(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def two_layers(*, second_mask: str = "shared") -> onnx.ModelProto:
    """x -> two attention layers with residuals. The mask is built once, as MPT's export does: the
    padding mask becomes a float (1 = masked out) and is cast back to bool for each layer's
    ``Where(masked, min, scores)``. ``second_mask="data"`` gives layer 1 a mask computed from
    layer 0's output instead."""
    rng = np.random.default_rng(0)
    inits = [
        _const("split", np.array([0, 0, HEADS, HEAD], np.int64)), _const("merge", np.array([0, 0, HEADS * HEAD], np.int64)),
        _const("axes12", np.array([1, 2], np.int64)), _const("last", np.array([2], np.int64)),
        _const("zero", np.array(0.0, np.float32)), _const("one", np.array(1.0, np.float32)),
        _const("min_fill", np.array(np.finfo(np.float32).min, np.float32)),
        _const("scale", np.array(HEAD ** -0.5, np.float32)),
    ]
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["keep"], to=TensorProto.BOOL),
        helper.make_node("Unsqueeze", ["keep", "axes12"], ["keep4"]),
        helper.make_node("Where", ["keep4", "zero", "one"], ["masked_f"]),  # float, shared by the layers
        helper.make_node("Cast", ["masked_f"], ["masked"], to=TensorProto.BOOL),
    ]
    h = "x"
    for layer in range(2):
        p = f"l{layer}_"
        for w in "qkvo":
            inits.append(_const(p + "w" + w, (rng.standard_normal((HID, HID)) * 0.3).astype(np.float32)))
        for w in "qkv":
            nodes += [helper.make_node("MatMul", [h, p + "w" + w], [p + w + "_p"]),
                      helper.make_node("Reshape", [p + w + "_p", "split"], [p + w + "_r"]),
                      helper.make_node("Transpose", [p + w + "_r"], [p + w], perm=[0, 2, 1, 3])]
        cond = "masked"
        if layer == 1 and second_mask == "data":
            nodes += [helper.make_node("ReduceMean", [h, "last"], [p + "mean"], keepdims=0),
                      helper.make_node("Greater", [p + "mean", "zero"], [p + "pos"]),
                      helper.make_node("Unsqueeze", [p + "pos", "axes12"], [p + "cond"])]
            cond = p + "cond"
        nodes += [
            helper.make_node("Transpose", [p + "k"], [p + "kt"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", [p + "q", p + "kt"], [p + "qk"]),
            helper.make_node("Mul", [p + "qk", "scale"], [p + "scores"]),
            helper.make_node("Where", [cond, "min_fill", p + "scores"], [p + "filled"]),
            helper.make_node("Softmax", [p + "filled"], [p + "probs"], axis=-1),
            helper.make_node("MatMul", [p + "probs", p + "v"], [p + "ctx4"]),
            helper.make_node("Transpose", [p + "ctx4"], [p + "ctx_t"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [p + "ctx_t", "merge"], [p + "ctx"]),
            helper.make_node("MatMul", [p + "ctx", p + "wo"], [p + "out"]),
            helper.make_node("Add", [h, p + "out"], [p + "h"]),
        ]
        h = p + "h"
    graph = helper.make_graph(
        nodes, "two_layers",
        [helper.make_tensor_value_info("x", F, ["batch", "seq", HID]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info(h, F, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    proto.ir_version = 10
    return proto


def test_a_mask_shared_with_an_earlier_fused_layer_is_not_data_dependent() -> None:
    proto = two_layers()
    feeds = layer_feeds()
    expected = run(session(proto), feeds)
    for lowering in ("ort", "onnx"):
        cm = compile_model(proto, lowering=lowering, strict=True)
        report = attention_info(cm)
        assert report["fused"] == 2, report["sites"]
        assert max_diff(expected, cm.run(feeds)) <= TOLERANCE, lowering


def test_a_later_layer_mask_computed_from_the_activations_is_still_refused() -> None:
    proto = two_layers(second_mask="data")
    feeds = layer_feeds()
    cm = compile_model(proto, strict=True)
    sites = attention_info(cm)["sites"]
    assert [s["status"] for s in sites] == ["fused", "not fused"], sites
    assert "data-dependent" in sites[1]["reason"], sites
    assert max_diff(run(session(proto), feeds), cm.run(feeds)) <= TOLERANCE
