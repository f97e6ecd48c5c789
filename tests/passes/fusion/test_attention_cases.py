"""Hand-written attention layers: the fusion takes the forms exporters write (grouped-query repeat,
single head, causal triangle) and leaves broken ones alone, saying why, with outputs unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from infercc.errors import ConfigError

from ._attention_util import (
    HEAD,
    HID,
    TOLERANCE,
    attention_info,
    attention_layer,
    compile_model,
    layer_feeds,
    max_diff,
    run,
    session,
)


def _compile_and_compare(proto, feeds, **options):
    expected = run(session(proto), feeds)
    results = {}
    for lowering in ("ort", "onnx"):
        cm = compile_model(proto, lowering=lowering, strict=True, **options)
        assert max_diff(expected, cm.run(feeds)) <= TOLERANCE, lowering
        results[lowering] = cm
    return results


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_written_attention_is_fused(kv_heads: int, causal: bool) -> None:
    proto = attention_layer(kv_heads=kv_heads, causal=causal)
    cms = _compile_and_compare(proto, layer_feeds())
    report = attention_info(cms["ort"])
    assert report["fused"] == 1, report
    site = report["sites"][0]
    assert (site["num_heads"], site["kv_num_heads"], site["causal"]) == (4, kv_heads, causal)
    assert site["scale"] == pytest.approx(HEAD ** -0.5)
    ops = cms["ort"].model.graph.op_histogram()
    assert "Softmax" not in ops and "Softmax" in cms["onnx"].model.graph.op_histogram()


@pytest.mark.parametrize(
    ("options", "causal", "mask"),
    [
        ({"causal": True, "causal_form": "trilu"}, True, "causal, padding"),
        ({"causal": True, "mask_form": "masked_fill"}, True, "causal, padding"),
        ({"mask_form": "masked_fill"}, False, "padding"),
        ({"mask_form": "additive"}, False, "additive bias"),
        ({"mask_form": "masked_fill", "scale_last": True, "causal": True}, True, "causal, padding"),
        ({"mask_form": "scale_then_bias", "scale_last": True, "causal": True}, True, "causal, padding"),
        ({"mask_form": "finite_fill_then_scale", "scale_last": True, "causal": True}, True, "causal, padding"),
        ({"softcap": True, "causal": True}, True, "causal, padding"),  # Gemma 2: cap * tanh(scores / cap)
    ],
)
def test_mask_forms_are_understood(options: dict, causal: bool, mask: str) -> None:
    cms = _compile_and_compare(attention_layer(**options), layer_feeds())
    site = attention_info(cms["ort"])["sites"][0]
    assert site["status"] == "fused" and site["causal"] == causal and site["mask"] == mask, site


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"mask": "data"}, "data-dependent"),
        ({"normalize": "Sigmoid"}, "normalized by Sigmoid, not Softmax"),
        ({"kv_heads": 2, "repeat": "tile"}, "repeated with Tile"),
        ({"kv_heads": 2, "v_heads": 4}, "K and V have different numbers of heads"),
        ({"scale_input": True}, "is not constant"),
        ({"return_probs": True}, "probabilities are also a graph output"),
        ({"mask_form": "additive", "scale_last": True}, "additive float mask is scaled together with the scores"),
    ],
)
def test_broken_attention_is_left_alone_with_the_reason(options: dict, reason: str) -> None:
    proto = attention_layer(**options)
    feeds = layer_feeds()
    if options.get("scale_input"):
        feeds["scale"] = np.array(HEAD ** -0.25, np.float32)
    cms = _compile_and_compare(proto, feeds)
    record = cms["ort"].diagnostics["attention_fusion"]
    report = record.info["attention"]
    assert report["fused"] == 0
    assert any(reason in site.get("reason", "") for site in report["sites"]), report["sites"]
    assert any(reason in s.reason for s in record.sites if s.status == "skipped")
    assert any("fused 0 of 1 expected" in w for w in record.warnings), record.warnings
    assert "Attention" not in " ".join(cms["ort"].model.graph.op_histogram())


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_half_precision_attention_keeps_its_float32_softmax(kv_heads: int) -> None:
    proto = attention_layer(half=True, causal=True, kv_heads=kv_heads)
    feeds = layer_feeds(half=True)
    expected = run(session(proto), feeds)
    for lowering in ("ort", "onnx"):
        cm = compile_model(proto, lowering=lowering, strict=True)
        site = attention_info(cm)["sites"][0]
        assert site["status"] == "fused", site
        assert site["softmax_precision"] == TensorProto.FLOAT
        if lowering == "ort":
            assert any(op.startswith("com.microsoft::") and "Attention" in op for op in cm.model.graph.op_histogram())
        assert max_diff(expected, cm.run(feeds)) <= 2e-3, lowering  # float16 outputs


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cross_attention_is_fused(kv_heads: int) -> None:
    """K/V from another sequence (an encoder's output): same canonical op, a longer key axis; with
    fewer K/V heads, MultiHeadAttention on repeated heads (GroupQueryAttention is self-attention)."""
    proto = attention_layer(cross=True, kv_heads=kv_heads)
    rng = np.random.default_rng(5)
    mask = np.ones((2, 9), np.int64)
    mask[1, 6:] = 0
    feeds = {"x": rng.standard_normal((2, 4, HID)).astype(np.float32),
             "memory": rng.standard_normal((2, 9, HID)).astype(np.float32), "attention_mask": mask}
    cms = _compile_and_compare(proto, feeds)
    site = attention_info(cms["ort"])["sites"][0]
    assert site["status"] == "fused" and not site["causal"], site
    assert site["projections"] == "separate MatMul K/V from another input"
    assert site["kv_num_heads"] == kv_heads
    assert "com.microsoft::MultiHeadAttention" in cms["ort"].model.graph.op_histogram()


def test_single_head_attention_becomes_multi_head_form() -> None:
    """[B, S, D] attention without a head split is the canonical op with one head."""
    rng = np.random.default_rng(1)
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [HID, HID], rng.standard_normal((HID, HID)).ravel() * 0.2)
             for n in ("wq", "wk", "wv")]
    inits.append(helper.make_tensor("s", TensorProto.FLOAT, [], [HID ** -0.5]))
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("MatMul", ["x", "wv"], ["v"]), helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["qk"]), helper.make_node("Div", ["qk", "s"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["y"]),
    ]
    # Div by 1/sqrt(D): the folded scale is sqrt(D)
    graph = helper.make_graph(nodes, "single", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", HID])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    proto.ir_version = 10
    feeds = {"x": rng.standard_normal((2, 5, HID)).astype(np.float32)}
    cms = _compile_and_compare(proto, feeds)
    site = attention_info(cms["ort"])["sites"][0]
    assert site["status"] == "fused" and site["num_heads"] == 1 and site["head_size"] == HID
    assert site["scale"] == pytest.approx(HID ** 0.5)


def test_masking_policy_causal_forces_a_causal_mask_with_a_warning() -> None:
    proto = attention_layer(causal=False)
    feeds = layer_feeds()
    cm = compile_model(proto, masking="causal", strict=True)
    record = cm.diagnostics["attention_fusion"]
    assert record.info["attention"]["sites"][0]["causal"] is True
    assert any("masking='causal'" in w for w in record.warnings)
    forced = cm.run(feeds)["y"]
    reference = run(session(attention_layer(causal=True)), feeds)["y"]
    np.testing.assert_allclose(forced, reference, atol=TOLERANCE)


def test_masking_policy_none_drops_the_causal_triangle_with_a_warning() -> None:
    feeds = layer_feeds()
    cm = compile_model(attention_layer(causal=True), masking="none", strict=True)
    record = cm.diagnostics["attention_fusion"]
    assert record.info["attention"]["sites"][0]["causal"] is False
    assert any("masking='none'" in w for w in record.warnings)
    bidirectional = run(session(attention_layer(causal=False)), feeds)["y"]
    np.testing.assert_allclose(cm.run(feeds)["y"], bidirectional, atol=TOLERANCE)


def test_auto_masking_keeps_encoders_bidirectional() -> None:
    cm = compile_model(attention_layer(causal=False), strict=True)
    record = cm.diagnostics["attention_fusion"]
    assert record.info["attention"]["sites"][0]["causal"] is False and not record.warnings


def test_masking_policy_is_validated() -> None:
    with pytest.raises(ConfigError, match="masking must be one of"):
        compile_model(attention_layer(), masking="bidirectional")
