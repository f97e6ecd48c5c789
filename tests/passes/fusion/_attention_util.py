"""Helpers for the attention tests: the pipeline with the attention passes, fixture compiles cached
per session, and a small hand-written attention layer to break in the negative tests."""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import infercc
from infercc.compiled import CompiledModel
from infercc.passes.fusion.attention_fuse import AttentionFusion
from infercc.passes.fusion.pack_projections import PackProjections
from infercc.passes.fusion.rotary import RotaryFusion
from infercc.passes.lowering import LowerCanonicalOps
from infercc.passes.pipeline import PIPELINE
from tests.fixtures import catalog

from ._util import original_session, run, session  # noqa: F401 - shared helpers, re-exported to the attention tests

TOLERANCE = 1e-4
FIXTURES = catalog.list_fixtures()
F = TensorProto.FLOAT


def pipeline(*, lower: bool = True) -> list:
    """Every pass of the pipeline, with the attention passes after cache insertion (so it leaves
    them uncached) and before projection packing and lowering."""
    classes = [c for c in PIPELINE if c not in (RotaryFusion, AttentionFusion)]
    at = classes.index(PackProjections)
    classes[at:at] = [RotaryFusion, AttentionFusion]
    if not lower:
        classes = [c for c in classes if c is not LowerCanonicalOps]
    return [c() for c in classes]


def compile_model(model, *, lowering: str = "ort", lower: bool = True, **options) -> CompiledModel:
    return infercc.compile(model, passes=pipeline(lower=lower), lowering=lowering, provider="cpu", **options)


@functools.cache
def compiled_fixture(name: str, lowering: str) -> CompiledModel:
    return compile_model(str(catalog.fixture_path(name)), lowering=lowering, strict=True)


def max_diff(expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> float:
    """Max |difference| over every position (padding included); NaNs must agree."""
    worst = 0.0
    for key, ref in expected.items():
        out = got[key]
        assert out.shape == ref.shape, key
        assert np.array_equal(np.isnan(out), np.isnan(ref)), f"{key}: NaN positions differ"
        diff = np.abs(np.nan_to_num(out.astype(np.float64)) - np.nan_to_num(ref.astype(np.float64)))
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return worst


def attention_info(cm: CompiledModel) -> dict:
    return cm.diagnostics["attention_fusion"].info.get("attention", {})


# -- a hand-written attention layer ------------------------------------------------------------
B, S, HID, HEADS, HEAD = 2, 6, 32, 4, 8


def _const(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def attention_layer(*, normalize: str = "Softmax", mask: str = "padding", kv_heads: int = HEADS,
                    repeat: str = "expand", v_heads: int | None = None, scale_input: bool = False,
                    return_probs: bool = False, causal: bool = False, mask_form: str = "where_add",
                    causal_form: str = "range", half: bool = False, cross: bool = False,
                    scale_last: bool = False, softcap: bool = False) -> onnx.ModelProto:
    """x [B, S, HID] -> one attention layer, as exporters write it, with knobs that break it.
    ``half``: float16 throughout except the softmax, run in float32 between two Casts (as HF's
    eager attention does for 16-bit models). ``cross``: K and V from ``memory`` [B, T, HID], masked by
    ``attention_mask`` [B, T] (cross-attention)."""
    rng = np.random.default_rng(0)
    ftype = np.float16 if half else np.float32
    v_heads = kv_heads if v_heads is None else v_heads
    inits = [
        _const("wq", (rng.standard_normal((HID, HEADS * HEAD)) * 0.3).astype(ftype)),
        _const("wk", (rng.standard_normal((HID, kv_heads * HEAD)) * 0.3).astype(ftype)),
        _const("wv", (rng.standard_normal((HID, v_heads * HEAD)) * 0.3).astype(ftype)),
        _const("split_q", np.array([0, 0, HEADS, HEAD], np.int64)),
        _const("split_k", np.array([0, 0, kv_heads, HEAD], np.int64)),
        _const("split_v", np.array([0, 0, v_heads, HEAD], np.int64)),
        _const("merge", np.array([0, 0, HEADS * HEAD], np.int64)),
        _const("sqrt_scale", np.array(HEAD ** -0.25, ftype)),
        _const("zero", np.array(0.0, ftype)), _const("fill", np.array(-np.inf, ftype)),
        _const("zero32", np.array(0.0, np.float32)),
        _const("axes12", np.array([1, 2], np.int64)), _const("axes2", np.array([2], np.int64)),
    ]
    nodes = [helper.make_node("Cast", ["attention_mask"], ["mask_bool"], to=TensorProto.BOOL)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT16 if half else F, ["batch", "seq", HID]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])]

    def heads(src: str, w: str, split: str, out: str) -> None:
        nodes.extend([helper.make_node("MatMul", [src, w], [out + "_p"]),
                      helper.make_node("Reshape", [out + "_p", split], [out + "_r"]),
                      helper.make_node("Transpose", [out + "_r"], [out], perm=[0, 2, 1, 3])])

    kv_src = "x"
    if cross:
        kv_src = "memory"
        inputs.append(helper.make_tensor_value_info("memory", TensorProto.FLOAT16 if half else F, ["batch", "mem", HID]))
        inputs[1] = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "mem"])
    heads("x", "wq", "split_q", "q4")
    heads(kv_src, "wk", "split_k", "k4")
    heads(kv_src, "wv", "split_v", "v4")
    k_read, v_read = "k4", "v4"
    if kv_heads != HEADS:
        rep = HEADS // kv_heads
        if repeat == "tile":
            inits.append(_const("tiles", np.array([1, rep, 1, 1], np.int64)))
            nodes.append(helper.make_node("Tile", ["k4", "tiles"], ["k_rep"]))
        else:
            inits += [_const("expand_k", np.array([1, 1, rep, 1, 1], np.int64)),
                      _const("merge_k", np.array([0, HEADS, -1, HEAD], np.int64))]
            nodes += [helper.make_node("Unsqueeze", ["k4", "axes2"], ["k_u"]),
                      helper.make_node("Expand", ["k_u", "expand_k"], ["k_e"]),
                      helper.make_node("Reshape", ["k_e", "merge_k"], ["k_rep"])]
        k_read = "k_rep"
    if v_heads != HEADS:
        rep = HEADS // v_heads
        inits += [_const("expand_v", np.array([1, 1, rep, 1, 1], np.int64)),
                  _const("merge_v", np.array([0, HEADS, -1, HEAD], np.int64))]
        nodes += [helper.make_node("Unsqueeze", ["v4", "axes2"], ["v_u"]),
                  helper.make_node("Expand", ["v_u", "expand_v"], ["v_e"]),
                  helper.make_node("Reshape", ["v_e", "merge_v"], ["v_rep"])]
        v_read = "v_rep"
    scale = "sqrt_scale"
    if scale_input:
        inputs.append(helper.make_tensor_value_info("scale", F, []))
        scale = "scale"
    if scale_last:  # HF's older "masked_fill, then divide by sqrt(d)"
        inits.append(_const("sqrt_d", np.array(HEAD ** 0.5, ftype)))
        nodes += [helper.make_node("Transpose", [k_read], ["kt"], perm=[0, 1, 3, 2]),
                  helper.make_node("MatMul", ["q4", "kt"], ["scores"])]
    else:
        nodes += [helper.make_node("Transpose", [k_read], ["kt"], perm=[0, 1, 3, 2]),
                  helper.make_node("Mul", ["q4", scale], ["qs"]),
                  helper.make_node("Mul", ["kt", "sqrt_scale"], ["kts"]),
                  helper.make_node("MatMul", ["qs", "kts"], ["scores"])]
    if softcap:  # Gemma 2: cap * tanh(scores / cap)
        nodes[-1].output[0] = "raw_scores"
        inits.append(_const("cap", np.array(5.0, ftype)))
        nodes += [helper.make_node("Div", ["raw_scores", "cap"], ["capped"]),
                  helper.make_node("Tanh", ["capped"], ["capped_t"]),
                  helper.make_node("Mul", ["capped_t", "cap"], ["scores"])]
    if mask_form == "additive":  # BERT's old (1 - mask) * -10000
        inits += [_const("one_f", np.array(1.0, ftype)), _const("big", np.array(-10000.0, ftype))]
        nodes += [helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT16 if half else F),
                  helper.make_node("Sub", ["one_f", "mask_f"], ["inv"]),
                  helper.make_node("Mul", ["inv", "big"], ["bias2"]),
                  helper.make_node("Unsqueeze", ["bias2", "axes12"], ["bias"]),
                  helper.make_node("Add", ["scores", "bias"], ["masked"])]
        if scale_last:  # the float mask is scaled with the scores
            nodes[-1].output[0] = "biased"
            nodes.append(helper.make_node("Div", ["biased", "sqrt_d"], ["masked"]))
    elif mask_form in ("scale_then_bias", "finite_fill_then_scale"):
        # GPT-J / HF eager: scores / sqrt(d) + Where(mask, 0, min); older code: masked_fill(min), then / sqrt(d)
        cond = _mask(nodes, inits, mask, causal, causal_form)
        inits.append(_const("min_fill", np.array(np.finfo(ftype).min, ftype)))
        if mask_form == "scale_then_bias":
            nodes += [helper.make_node("Div", ["scores", "sqrt_d"], ["scaled"]),
                      helper.make_node("Where", [cond, "zero", "min_fill"], ["bias"]),
                      helper.make_node("Add", ["scaled", "bias"], ["masked"])]
        else:
            nodes += [helper.make_node("Where", [cond, "scores", "min_fill"], ["filled"]),
                      helper.make_node("Div", ["filled", "sqrt_d"], ["masked"])]
    else:
        cond = _mask(nodes, inits, mask, causal, causal_form)
        if mask_form == "masked_fill":
            nodes.append(helper.make_node("Where", [cond, "scores", "fill"], ["masked"]))
            if scale_last:
                nodes[-1].output[0] = "filled"
                nodes.append(helper.make_node("Div", ["filled", "sqrt_d"], ["masked"]))
        else:
            nodes += [helper.make_node("Where", [cond, "zero", "fill"], ["bias"]),
                      helper.make_node("Add", ["scores", "bias"], ["masked"])]
    if normalize == "Softmax":
        scores_in, probs_out = ("masked32", "probs32") if half else ("masked", "probs")
        if half:
            nodes.append(helper.make_node("Cast", ["masked"], ["masked32"], to=F))
        nodes += [helper.make_node("Softmax", [scores_in], ["p0"], axis=-1),
                  helper.make_node("IsNaN", ["p0"], ["nan"]),
                  helper.make_node("Where", ["nan", "zero32", "p0"], [probs_out])]
        if half:
            nodes.append(helper.make_node("Cast", ["probs32"], ["probs"], to=TensorProto.FLOAT16))
    else:
        nodes.append(helper.make_node(normalize, ["masked"], ["probs"]))
    nodes += [helper.make_node("MatMul", ["probs", v_read], ["ctx4"]),
              helper.make_node("Transpose", ["ctx4"], ["ctx_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "merge"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT16 if half else F, None)]
    if return_probs:
        outputs.append(helper.make_tensor_value_info("probs", F, None))
    graph = helper.make_graph(nodes, "attention", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    proto.ir_version = 10
    return proto


def _mask(nodes: list, inits: list, mask: str, causal: bool, causal_form: str = "range") -> str:
    """The boolean mask (True = attend) of the layer; "data" derives it from the activations."""
    if mask == "data":
        inits.append(_const("last", np.array([2], np.int64)))
        nodes += [helper.make_node("ReduceMean", ["x", "last"], ["x_mean"], keepdims=0),
                  helper.make_node("Greater", ["x_mean", "zero"], ["x_pos"]),
                  helper.make_node("Unsqueeze", ["x_pos", "axes12"], ["cond"])]
        return "cond"
    nodes.append(helper.make_node("Unsqueeze", ["mask_bool", "axes12"], ["cond"]))
    if not causal:
        return "cond"
    inits += [_const("r0", np.array(0, np.int64)), _const("r1", np.array(1, np.int64)),
              _const("ax0", np.array([0], np.int64)), _const("ax1", np.array([1], np.int64)),
              _const("one", np.array([1], np.int64))]
    nodes.append(helper.make_node("Shape", ["x"], ["len"], start=1, end=2))
    if causal_form == "trilu":
        nodes += [helper.make_node("Concat", ["len", "len"], ["square"], axis=0),
                  helper.make_node("ConstantOfShape", ["square"], ["ones"],
                                   value=helper.make_tensor("v", TensorProto.INT64, [1], [1])),
                  helper.make_node("Trilu", ["ones"], ["lower"], upper=0),
                  helper.make_node("Cast", ["lower"], ["tri"], to=TensorProto.BOOL)]
    else:
        nodes += [helper.make_node("Squeeze", ["len", "ax0"], ["n"]),
                  helper.make_node("Range", ["r0", "n", "r1"], ["pos"]),
                  helper.make_node("Unsqueeze", ["pos", "ax1"], ["rows"]),
                  helper.make_node("LessOrEqual", ["pos", "rows"], ["tri"])]
    nodes.append(helper.make_node("And", ["cond", "tri"], ["cond_causal"]))
    return "cond_causal"


def layer_feeds(seed: int = 0, *, batch: int = B, seq: int = S, half: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    if batch > 1:
        mask[1, : seq // 2] = 0  # left padding: the first rows of batch 1 see no key
    x = rng.standard_normal((batch, seq, HID)).astype(np.float16 if half else np.float32)
    return {"x": x, "attention_mask": mask}
