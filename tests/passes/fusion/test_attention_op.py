"""The canonical Attention and RotaryEmbedding ops on their own: each lowering (ORT contrib ops,
ONNX opset-23 ops, decomposition) computes what the op's docstring defines, checked against NumPy,
including rows where every key is masked."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import infercc
from infercc.passes.canonical import DOMAIN
from infercc.passes.lowering import LowerCanonicalOps

from ._attention_util import TOLERANCE

F32_MIN = float(np.finfo(np.float32).min)
B, S = 2, 6


def _model(node: onnx.NodeProto, inputs: list, opset: int) -> onnx.ModelProto:
    graph = helper.make_graph([node], "canonical", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)])
    proto.ir_version = 10
    return proto


def _lower(proto: onnx.ModelProto, lowering: str):
    return infercc.compile(proto, passes=[LowerCanonicalOps()], lowering=lowering, provider="cpu", strict=True)


def _softmax_nan_to_zero(scores: np.ndarray) -> np.ndarray:
    scores = scores.astype(np.float64)
    with np.errstate(invalid="ignore"):
        shifted = scores - scores.max(-1, keepdims=True)
        p = np.exp(shifted)
        p = p / p.sum(-1, keepdims=True)
    return np.nan_to_num(p, nan=0.0)


def reference_attention(q, k, v, mask, *, heads, kv_heads, scale, causal=0, left_window=-1, mask_value=-np.inf):
    batch, s, _ = q.shape
    skv = k.shape[1]
    d = q.shape[2] // heads
    q4 = q.reshape(batch, s, heads, d).transpose(0, 2, 1, 3)
    k4 = np.repeat(k.reshape(batch, skv, kv_heads, d).transpose(0, 2, 1, 3), heads // kv_heads, axis=1)
    v4 = np.repeat(v.reshape(batch, skv, kv_heads, -1).transpose(0, 2, 1, 3), heads // kv_heads, axis=1)
    scores = (q4 @ k4.transpose(0, 1, 3, 2)) * np.float32(scale)
    i, j, off = np.arange(s)[:, None], np.arange(skv)[None, :], skv - s
    allowed = np.ones((s, skv), bool)
    if mask is not None and mask.dtype == bool:
        allowed = allowed & mask
    if causal:
        allowed = allowed & (j <= i + off)
    if left_window >= 0:
        allowed = allowed & (j >= i + off - left_window)
    scores = scores + np.where(allowed, np.float32(0), np.float32(mask_value))
    if mask is not None and mask.dtype != bool:
        scores = scores + mask
    out = _softmax_nan_to_zero(scores.astype(np.float32)) @ v4
    return out.transpose(0, 2, 1, 3).reshape(batch, s, -1).astype(np.float32)


CASES = {
    "mha": dict(heads=4, kv_heads=4),
    "mha_causal": dict(heads=4, kv_heads=4, causal=1),
    "mha_causal_padding_min": dict(heads=4, kv_heads=4, causal=1, mask="padding", mask_value=F32_MIN),
    "mha_padding_inf": dict(heads=4, kv_heads=4, mask="padding"),
    "mha_float_bias": dict(heads=4, kv_heads=4, mask="float"),
    "gqa_causal": dict(heads=4, kv_heads=2, causal=1),
    "gqa_window": dict(heads=4, kv_heads=2, causal=1, left_window=2),
    "gqa_window_padding": dict(heads=4, kv_heads=2, causal=1, left_window=2, mask="padding"),
    "gqa_causal_padding_min": dict(heads=4, kv_heads=2, causal=1, mask="padding", mask_value=F32_MIN),
    "mqa_padding": dict(heads=4, kv_heads=1, mask="padding"),
}


def _case(name: str, seed: int = 0):
    case = dict(CASES[name])
    heads, kv_heads, d = case["heads"], case["kv_heads"], 8
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, S, heads * d)).astype(np.float32)
    k = rng.standard_normal((B, S, kv_heads * d)).astype(np.float32)
    v = rng.standard_normal((B, S, kv_heads * d)).astype(np.float32)
    kind = case.pop("mask", None)
    mask = None
    if kind == "padding":
        pad = np.ones((B, S), bool)
        pad[1, :4] = False  # left padding: early rows of batch 1 see no key at all when causal
        mask = pad[:, None, None, :]
    elif kind == "float":
        mask = (rng.standard_normal((1, heads, S, S)) * 2).astype(np.float32)
    attrs = {"num_heads": heads, "kv_num_heads": kv_heads, "head_size": d, "v_head_size": d, "scale": d ** -0.5,
             "causal": case.get("causal", 0), "left_window": case.get("left_window", -1),
             "mask_value": case.get("mask_value", -np.inf)}
    names = ["q", "k", "v"] + (["mask"] if mask is not None else [])
    node = helper.make_node("Attention", names, ["y"], domain=DOMAIN, **attrs)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", x.shape[2]]) for n, x in zip("qkv", (q, k, v))]
    feeds = {"q": q, "k": k, "v": v}
    if mask is not None:
        elem = TensorProto.BOOL if mask.dtype == bool else TensorProto.FLOAT
        inputs.append(helper.make_tensor_value_info("mask", elem, list(mask.shape)))
        feeds["mask"] = mask
    expected = reference_attention(q, k, v, mask, heads=heads, kv_heads=kv_heads, scale=attrs["scale"],
                                   causal=attrs["causal"], left_window=attrs["left_window"],
                                   mask_value=attrs["mask_value"])
    return node, inputs, feeds, expected


@pytest.mark.parametrize("opset", [20, 23])
@pytest.mark.parametrize("lowering", ["ort", "onnx"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_attention_lowerings_match_the_definition(name: str, lowering: str, opset: int) -> None:
    node, inputs, feeds, expected = _case(name)
    cm = _lower(_model(node, inputs, opset), lowering)
    ops = cm.model.graph.op_histogram()
    record = cm.diagnostics["lower_canonical_ops"]
    if lowering == "ort":
        kernel = "MultiHeadAttention" if CASES[name]["kv_heads"] == CASES[name]["heads"] else "GroupQueryAttention"
        assert ops.get(f"com.microsoft::{kernel}") == 1, (ops, record.warnings)
    elif opset >= 23:
        assert ops.get("Attention") == 1, (ops, record.warnings)
    else:
        assert "Softmax" in ops and any("needs opset 23" in w for w in record.warnings)
    got = cm.run(feeds)["y"]
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=TOLERANCE)


def reference_rotary(x, cos, sin, *, heads, rotary_dim, interleaved):
    four = x.ndim == 4
    x4 = x if four else x.reshape(x.shape[0], x.shape[1], heads, -1)
    c = cos[:, None] if four else cos[:, :, None]
    s = sin[:, None] if four else sin[:, :, None]
    rot = x4[..., :rotary_dim]
    if interleaved:
        turned = np.stack([-rot[..., 1::2], rot[..., 0::2]], axis=-1).reshape(rot.shape)
    else:
        half = rotary_dim // 2
        turned = np.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = np.concatenate([rot * c + turned * s, x4[..., rotary_dim:]], axis=-1)
    return out if four else out.reshape(x.shape)


@pytest.mark.parametrize("opset", [20, 23])
@pytest.mark.parametrize("lowering", ["ort", "onnx"])
@pytest.mark.parametrize(("layout", "rotary_dim", "interleaved"),
                         [("3d", 8, 0), ("3d", 4, 0), ("4d", 8, 0), ("4d", 4, 0), ("3d", 8, 1), ("4d", 4, 1)])
def test_rotary_lowerings_match_the_definition(layout, rotary_dim, interleaved, lowering, opset) -> None:
    heads, d = 4, 8
    rng = np.random.default_rng(3)
    positions = np.arange(S)[:, None] / (100.0 ** (np.arange(rotary_dim // 2) / (rotary_dim // 2)))
    pairs = np.repeat(positions, 2, axis=-1) if interleaved else np.concatenate([positions, positions], axis=-1)
    cos, sin = np.cos(pairs)[None].astype(np.float32), np.sin(pairs)[None].astype(np.float32)
    shape = (B, heads, S, d) if layout == "4d" else (B, S, heads * d)
    x = rng.standard_normal(shape).astype(np.float32)
    node = helper.make_node("RotaryEmbedding", ["x", "cos", "sin"], ["y"], domain=DOMAIN,
                            num_heads=0 if layout == "4d" else heads, rotary_dim=rotary_dim, interleaved=interleaved)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape)),
              helper.make_tensor_value_info("cos", TensorProto.FLOAT, [1, S, rotary_dim]),
              helper.make_tensor_value_info("sin", TensorProto.FLOAT, [1, S, rotary_dim])]
    cm = _lower(_model(node, inputs, opset), lowering)
    ops = cm.model.graph.op_histogram()
    if lowering == "ort":
        assert ops.get("com.microsoft::RotaryEmbedding") == 1, ops
    elif opset >= 23:
        assert ops.get("RotaryEmbedding") == 1, ops
    got = cm.run({"x": x, "cos": cos, "sin": sin})["y"]
    expected = reference_rotary(x, cos, sin, heads=heads, rotary_dim=rotary_dim, interleaved=interleaved)
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=TOLERANCE)
