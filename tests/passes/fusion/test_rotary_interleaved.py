"""Interleaved (GPT-J) rotary written out by hand in both layouts: fused into the canonical op with
``interleaved=1``, outputs unchanged with both lowerings; a factor table that does not repeat its
pairs is left alone with the reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import infercc

B, H, S, D = 2, 3, 5, 8


def _model(layout: str, rotary_dim: int = D, tiled: bool = True) -> onnx.ModelProto:
    """x [B, H, S, D] ("bhsd") or [B, S, H, D] ("bshd"), half-width angles [1, S, R/2] repeated per
    pair (``tiled``; else full-width angles [1, S, R] used as they are) -> rotated x."""
    heads_axis = 1 if layout == "bhsd" else 2
    shape = [B, H, S, D] if layout == "bhsd" else [B, S, H, D]
    r = rotary_dim
    inits = {
        "ax_heads": np.array([heads_axis], np.int64), "ax_last": np.array([-1], np.int64),
        "reps": np.array([1, 1, 1, 1, 2], np.int64), "merge": np.array([1, 0, 1, -1], np.int64) if layout == "bshd"
        else np.array([1, 1, 0, -1], np.int64),
        "s0": np.array([0], np.int64), "s1": np.array([1], np.int64), "big": np.array([1 << 62], np.int64),
        "last": np.array([3], np.int64), "two": np.array([2], np.int64), "r": np.array([r], np.int64),
        "flat": np.array(shape[:3] + [r], np.int64),
    }
    nodes = []
    for kind, trig in (("cos", "Cos"), ("sin", "Sin")):
        nodes += [helper.make_node(trig, ["angles"], [f"{kind}_h"]),
                  helper.make_node("Unsqueeze", [f"{kind}_h", "ax_heads"], [f"{kind}_u" if tiled else kind])]
        if tiled:
            nodes += [helper.make_node("Unsqueeze", [f"{kind}_u", "ax_last"], [f"{kind}_u2"]),
                      helper.make_node("Tile", [f"{kind}_u2", "reps"], [f"{kind}_t"]),
                      helper.make_node("Reshape", [f"{kind}_t", "merge"], [kind])]
    rot_in = "x"
    if r < D:
        nodes += [helper.make_node("Slice", ["x", "s0", "r", "last"], ["x_rot"]),
                  helper.make_node("Slice", ["x", "r", "big", "last"], ["x_pass"])]
        rot_in = "x_rot"
    nodes += [
        helper.make_node("Slice", [rot_in, "s0", "big", "last", "two"], ["even"]),
        helper.make_node("Slice", [rot_in, "s1", "big", "last", "two"], ["odd"]),
        helper.make_node("Neg", ["odd"], ["neg_odd"]),
        helper.make_node("Unsqueeze", ["neg_odd", "ax_last"], ["a"]),
        helper.make_node("Unsqueeze", ["even", "ax_last"], ["b"]),
        helper.make_node("Concat", ["a", "b"], ["pairs"], axis=-1),
        helper.make_node("Reshape", ["pairs", "flat"], ["rotated"]),
        helper.make_node("Mul", [rot_in, "cos"], ["xc"]),
        helper.make_node("Mul", ["rotated", "sin"], ["rs"]),
        helper.make_node("Add", ["xc", "rs"], ["y_rot" if r < D else "y"]),
    ]
    if r < D:
        nodes.append(helper.make_node("Concat", ["y_rot", "x_pass"], ["y"], axis=-1))
    graph = helper.make_graph(
        nodes, "rotary", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
                          helper.make_tensor_value_info("angles", TensorProto.FLOAT, [1, S, r // 2 if tiled else r])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _feeds(r: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((B, H, S, D)).astype(np.float32),
            "angles": rng.uniform(-3, 3, (1, S, r // 2)).astype(np.float32)}


@pytest.mark.parametrize(("layout", "rotary_dim"), [("bhsd", D), ("bshd", D), ("bshd", 4)])
@pytest.mark.parametrize("lowering", ["ort", "onnx"])
def test_interleaved_rotary_fuses_and_keeps_outputs(layout: str, rotary_dim: int, lowering: str) -> None:
    proto = _model(layout, rotary_dim)
    feeds = _feeds(rotary_dim)
    if layout == "bshd":
        feeds["x"] = np.ascontiguousarray(feeds["x"].transpose(0, 2, 1, 3))
    compiled = infercc.compile(proto, lowering=lowering, strict=True)
    changes = compiled.diagnostics["rotary_fusion"].changes
    assert changes.get("rotary_interleaved") == 1, changes
    assert changes.get("rotary_partial_bshd", 0) == (1 if rotary_dim < D else 0), changes
    expected = infercc.compile(proto, optimize=False).run(feeds)["y"]
    np.testing.assert_allclose(compiled.run(feeds)["y"], expected, rtol=1e-5, atol=1e-5)


def test_factors_that_do_not_repeat_pairs_are_left_alone() -> None:
    """Full-width angles: nothing shows the pairs share a factor, so nothing is fused."""
    proto = _model("bhsd", D, tiled=False)
    feeds = _feeds(2 * D)
    compiled = infercc.compile(proto, strict=True)
    assert not compiled.diagnostics["rotary_fusion"].changes.get("rotary_interleaved")
    expected = infercc.compile(proto, optimize=False).run(feeds)["y"]
    np.testing.assert_allclose(compiled.run(feeds)["y"], expected, rtol=1e-6, atol=1e-6)
