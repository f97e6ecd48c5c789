"""Canonical norm ops (domain ai.infercc): what they compute, their shapes, and how each becomes
ONNX Runtime or standard ONNX.

* ``LayerNorm(x, scale, bias?)``: (x - mean) / sqrt(var + epsilon) * scale + bias over the last axis.
* ``RMSNorm(x, scale)``: x / sqrt(mean(x^2) + epsilon) * scale over the last axis.
* ``SkipLayerNorm(x, skip, scale, bias?, skip_bias?)`` and ``SkipRMSNorm(x, skip, scale, skip_bias?)``:
  the residual sum s = x + skip (+ skip_bias) normalized; output 0 is the norm, output 1 is s itself
  (the residual stream continues with it), as ORT's Skip*LayerNormalization ops return it.

Statistics of 16-bit inputs are computed in float32 (ONNX's stash_type=1), like HF's casts do.
"""

from __future__ import annotations

import numpy as np

from ...ir import DType, Node, Value
from ...ir.shapes import shape_rule
from ...ir.symbolic import broadcast
from ..canonical import CanonicalOp, register
from ..capabilities import MS, context_of
from ..rewrite import Builder
from .site_checks import LOW_PRECISION, same_dim, same_shape


def _eps(node: Node) -> float:
    return float(node.attr("epsilon", 1e-5))


def _opt(node: Node, i: int) -> Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


def _trim(inputs: list[Value | None]) -> list[Value | None]:
    while inputs and inputs[-1] is None:
        inputs.pop()
    return inputs


# -- shapes -------------------------------------------------------------------------------------
def _infer_norm(node: Node):
    x = node.inputs[0]
    return [(x.dtype, x.shape)]


def _infer_skip(node: Node):
    x, skip = node.inputs[0], node.inputs[1]
    shape = broadcast(x.shape, skip.shape) if x.shape is not None and skip.shape is not None else None
    return [(x.dtype, shape), (x.dtype, shape)]


@shape_rule("", "SimplifiedLayerNormalization")
def _infer_simplified(node: Node):
    x = node.inputs[0]
    return [(x.dtype, x.shape)] + [(DType.FLOAT, None)] * (len(node.outputs) - 1)


@shape_rule(MS, "SkipLayerNormalization", "SkipSimplifiedLayerNormalization")
def _infer_ort_skip(node: Node):
    x = node.inputs[0]
    return [(x.dtype, x.shape), (DType.FLOAT, None), (DType.FLOAT, None), (x.dtype, x.shape)][: len(node.outputs)]


# -- decompositions (standard ONNX, any opset) --------------------------------------------------
def _mean_last(op: Builder, x: Value) -> Value:
    if context_of(op).opset >= 18:
        return op.ReduceMean(x, op.const(np.array([-1], np.int64), hint="axes"), keepdims=1)
    return op.ReduceMean(x, axes=[-1], keepdims=1)


def normalize(op: Builder, x: Value, epsilon: float, *, center: bool, dtype: DType | None) -> Value:
    """(x - mean(x)) / sqrt(var + eps) if ``center`` else x / sqrt(mean(x^2) + eps), last axis;
    ``dtype`` is x's element type (x may be a value just built, whose type is not inferred yet)."""
    low = dtype in LOW_PRECISION
    xf = op.Cast(x, to=int(DType.FLOAT)) if low else x
    np_dtype = np.float32 if low or dtype is None else dtype.numpy
    if center:
        xf = op.Sub(xf, _mean_last(op, xf))
    var = _mean_last(op, op.Mul(xf, xf))
    std = op.Sqrt(op.Add(var, op.const(np.array(epsilon, np_dtype), hint="epsilon")))
    y = op.Div(xf, std)
    return op.Cast(y, to=int(dtype)) if low else y


def _affine(op: Builder, y: Value, scale: Value, bias: Value | None) -> Value:
    y = op.Mul(y, scale)
    return op.Add(y, bias) if bias is not None else y


def _residual(op: Builder, node: Node, bias_at: int) -> Value:
    x, skip, skip_bias = node.inputs[0], node.inputs[1], _opt(node, bias_at)
    return op.Add(x, op.Add(skip, skip_bias) if skip_bias is not None else skip)


def _normalize(op: Builder, node: Node, x: Value, *, center: bool) -> Value:
    return normalize(op, x, _eps(node), center=center, dtype=node.inputs[0].dtype)


def _decompose_ln(op: Builder, node: Node) -> list[Value]:
    return [_affine(op, _normalize(op, node, node.inputs[0], center=True), node.inputs[1], _opt(node, 2))]


def _decompose_rms(op: Builder, node: Node) -> list[Value]:
    return [_affine(op, _normalize(op, node, node.inputs[0], center=False), node.inputs[1], None)]


def _decompose_skip_ln(op: Builder, node: Node) -> list[Value]:
    s = _residual(op, node, 4)
    return [_affine(op, _normalize(op, node, s, center=True), node.inputs[2], _opt(node, 3)), s]


def _decompose_skip_rms(op: Builder, node: Node) -> list[Value]:
    s = _residual(op, node, 3)
    return [_affine(op, _normalize(op, node, s, center=False), node.inputs[2], None), s]


# -- lowerings ----------------------------------------------------------------------------------
def _ln_op(op: Builder, x: Value, scale: Value, bias: Value | None, eps: float) -> Value:
    return op.LayerNormalization(*_trim([x, scale, bias]), axis=-1, epsilon=eps, stash_type=1)


def _lower_ln_ort(op: Builder, node: Node) -> list[Value] | str:
    # ORT keeps its pre-opset-17 LayerNormalization kernel, so this works at any opset.
    reason = context_of(op).unsupported("", "LayerNormalization", node.inputs[0].dtype)
    return reason or [_ln_op(op, node.inputs[0], node.inputs[1], _opt(node, 2), _eps(node))]


def _lower_ln_onnx(op: Builder, node: Node) -> list[Value] | str:
    reason = context_of(op).needs_opset("LayerNormalization")
    return reason or [_ln_op(op, node.inputs[0], node.inputs[1], _opt(node, 2), _eps(node))]


def _lower_rms_ort(op: Builder, node: Node) -> list[Value] | str:
    reason = context_of(op).unsupported("", "SimplifiedLayerNormalization", node.inputs[0].dtype)
    if reason:
        return reason
    return [op.SimplifiedLayerNormalization(node.inputs[0], node.inputs[1], axis=-1, epsilon=_eps(node), stash_type=1)]


def _rms_op(op: Builder, x: Value, scale: Value, eps: float) -> Value:
    return op.RMSNormalization(x, scale, axis=-1, epsilon=eps, stash_type=1)


def _lower_rms_onnx(op: Builder, node: Node) -> list[Value] | str:
    reason = context_of(op).needs_opset("RMSNormalization")
    return reason or [_rms_op(op, node.inputs[0], node.inputs[1], _eps(node))]


def ort_skip_operands(x: Value, skip: Value) -> tuple[Value, Value] | str:
    """(input, skip) in the order ORT's Skip*LayerNormalization accepts: a 2-D or 3-D input, and a
    skip of the same shape, or (1, S, H) / (S, H) against a (B, S, H) input."""
    for a, b in ((x, skip), (skip, x)):
        if a.shape is None or b.shape is None or len(a.shape) not in (2, 3):
            continue
        if same_shape(a, b):
            return a, b
        if len(a.shape) == 3 and len(b.shape) in (2, 3) and all(same_dim(p, q) for p, q in zip(a.shape[1:], b.shape[-2:])):
            if len(b.shape) == 2 or b.shape[0] == 1:
                return a, b
    shapes = [None if v.shape is None else list(v.shape) for v in (x, skip)]
    return (
        f"ORT's skip-norm ops need a 2-D or 3-D input and a skip of the same shape (or (1, S, H), "
        f"(S, H)); the operands have shapes {shapes[0]} and {shapes[1]}"
    )


def _ort_skip(op: Builder, node: Node, op_type: str, extra: list[Value | None]) -> list[Value] | str:
    x, skip = node.inputs[0], node.inputs[1]
    operands = ort_skip_operands(x, skip)
    if isinstance(operands, str):
        return operands
    reason = context_of(op).unsupported(MS, op_type, x.dtype)
    if reason:
        return reason
    outs = getattr(op, op_type)(*_trim([*operands, node.inputs[2], *extra]), _domain=MS, _outputs=4, epsilon=_eps(node))
    y, mean, inv_std, total = outs
    for absent in (mean, inv_std) + (() if node.outputs[1].uses or node.outputs[1].is_graph_output else (total,)):
        absent.metadata_props["infercc.absent"] = "1"
    for v in (y, total):
        v.dtype, v.shape = node.outputs[0].dtype, operands[0].shape
    return [y, total]


def _lower_skip_ln_ort(op: Builder, node: Node) -> list[Value] | str:
    return _ort_skip(op, node, "SkipLayerNormalization", [_opt(node, 3), _opt(node, 4)])


def _lower_skip_rms_ort(op: Builder, node: Node) -> list[Value] | str:
    return _ort_skip(op, node, "SkipSimplifiedLayerNormalization", [_opt(node, 3)])


def _lower_skip_ln_onnx(op: Builder, node: Node) -> list[Value] | str:
    reason = context_of(op).needs_opset("LayerNormalization")
    if reason:
        return reason
    s = _residual(op, node, 4)
    return [_ln_op(op, s, node.inputs[2], _opt(node, 3), _eps(node)), s]


def _lower_skip_rms_onnx(op: Builder, node: Node) -> list[Value] | str:
    reason = context_of(op).needs_opset("RMSNormalization")
    if reason:
        return reason
    s = _residual(op, node, 3)
    return [_rms_op(op, s, node.inputs[2], _eps(node)), s]


LAYER_NORM = register(CanonicalOp(
    "LayerNorm", _infer_norm, _decompose_ln, {"ort": _lower_ln_ort, "onnx": _lower_ln_onnx}))
RMS_NORM = register(CanonicalOp(
    "RMSNorm", _infer_norm, _decompose_rms, {"ort": _lower_rms_ort, "onnx": _lower_rms_onnx}))
SKIP_LAYER_NORM = register(CanonicalOp(
    "SkipLayerNorm", _infer_skip, _decompose_skip_ln, {"ort": _lower_skip_ln_ort, "onnx": _lower_skip_ln_onnx}))
SKIP_RMS_NORM = register(CanonicalOp(
    "SkipRMSNorm", _infer_skip, _decompose_skip_rms, {"ort": _lower_skip_rms_ort, "onnx": _lower_skip_rms_onnx}))
