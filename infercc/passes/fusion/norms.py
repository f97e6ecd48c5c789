"""Norm fusion: LayerNorm and RMSNorm, however the exporter spelled them, become one canonical op;
then a residual Add feeding a norm joins it as SkipLayerNorm / SkipRMSNorm.

Patterns describe what is computed, not one exporter's node order: the mean of squares may be
Pow(x, 2) or Mul(x, x); the division by sqrt(var + eps) may be Div, Mul by Reciprocal, Mul by
Div(1, .) or Mul by Pow(., -0.5); HF's Cast to float32 and back around an RMSNorm is optional.
Constants are captured as variables and judged by the checks, so a near miss (a mean over another
axis, a non-constant epsilon, Pow(x, 3)) is reported with its reason instead of silently ignored.
"""

from __future__ import annotations

import numpy as np

from ...ir import Graph, Model, Node, Value
from ..base import Pass, PassContext
from ..canonical import DOMAIN, DOMAIN_VERSION
from ..diagnostics import APPLIED, Site
from ..rewrite import Builder, Or, Rule, Var, apply_rules, const_value, node_attr
from . import norm_ops
from .site_checks import (
    LOW_PRECISION,
    cast_pair,
    dedupe_sites,
    first_reason,
    float_input,
    hidden_vector,
    last_axis_mean,
    same_shape,
    scalar,
    scalar_value,
)

NORM_OPS = ("LayerNorm", "RMSNorm")


# -- pattern pieces -----------------------------------------------------------------------------
def _square(op, v):
    return Or(op.Pow(v, Var("exponent")), op.Mul(v, v))


def _over_rms(op, v, stat, eps):
    """v / sqrt(stat + eps), in the spellings exporters use."""
    std = op.Sqrt(op.Add(stat, eps))
    return Or(
        op.Div(v, std),
        op.Mul(v, op.Reciprocal(std)),
        op.Mul(v, op.Div(Var("one"), std)),
        op.Mul(v, op.Pow(op.Add(stat, eps), Var("neg_half"))),
    )


def _ln_core(op, x, eps):
    centered = op.Sub(x, op.ReduceMean(x, _allow_other_inputs=True, _bind="reduce"))
    var = op.ReduceMean(_square(op, centered), _allow_other_inputs=True, _bind="reduce_var")
    return _over_rms(op, centered, var, eps)


def _layer_norm(op, x, scale, bias, eps):
    return op.Add(op.Mul(_ln_core(op, x, eps), scale), bias)


def _layer_norm_no_bias(op, x, scale, eps):
    return op.Mul(_ln_core(op, x, eps), scale)


def _layer_norm_op(op, x, scale):
    return op.LayerNormalization(x, scale, _allow_other_inputs=True, _bind="ln")


def _rms_norm(op, x, scale, eps):
    xf = op.Cast(x, _optional=True, _bind="upcast")
    mean_square = op.ReduceMean(_square(op, xf), _allow_other_inputs=True, _bind="reduce")
    return op.Mul(scale, op.Cast(_over_rms(op, xf, mean_square, eps), _optional=True, _bind="downcast"))


def _rms_stats(op, x, eps):
    xf = op.Cast(x, _optional=True, _bind="upcast")
    return xf, op.Add(op.ReduceMean(_square(op, xf), _allow_other_inputs=True, _bind="reduce"), eps)


# RMSNorm whose scale the no-op pass removed (a weight of ones, as in freshly initialized models):
# one rule per spelling of x / sqrt(mean(x^2) + eps), since a rule is anchored on one op type.
def _rms_unscaled_div(op, x, eps):
    xf, stat = _rms_stats(op, x, eps)
    return op.Div(xf, op.Sqrt(stat))


def _rms_unscaled_reciprocal(op, x, eps):
    xf, stat = _rms_stats(op, x, eps)
    return op.Mul(xf, Or(op.Reciprocal(op.Sqrt(stat)), op.Div(Var("one"), op.Sqrt(stat)), op.Pow(stat, Var("neg_half"))))


# -- checks -------------------------------------------------------------------------------------
def _check_stats(x: Value, eps: Value, reduce: Node, reduce_var: Node | None = None, exponent: Value | None = None,
                 one: Value | None = None, neg_half: Value | None = None) -> str | None:
    return first_reason(
        float_input(x),
        x.shape is not None and last_axis_mean(reduce, len(x.shape)),
        x.shape is not None and last_axis_mean(reduce_var, len(x.shape)),
        scalar(eps, "epsilon"),
        eps is not None and const_value(eps) is not None and scalar_value(eps) < 0 and "epsilon is negative",
        scalar(exponent, "the exponent of the square", 2.0),
        scalar(one, "the numerator of the reciprocal", 1.0),
        scalar(neg_half, "the exponent of the reciprocal square root", -0.5),
    )


def _check_layer_norm(x: Value, scale: Value, eps: Value, reduce: Node, reduce_var: Node, bias: Value | None = None,
                      exponent: Value | None = None, one: Value | None = None, neg_half: Value | None = None) -> str | None:
    return first_reason(
        _check_stats(x, eps, reduce, reduce_var, exponent, one, neg_half),
        hidden_vector(scale, x, "scale"), hidden_vector(bias, x, "bias"),
    )


def _check_rms_norm(x: Value, scale: Value, eps: Value, reduce: Node, exponent: Value | None = None,
                    one: Value | None = None, neg_half: Value | None = None, upcast: Node | None = None,
                    downcast: Node | None = None) -> str | None:
    return first_reason(
        _check_stats(x, eps, reduce, None, exponent, one, neg_half),
        cast_pair(upcast, downcast, x), hidden_vector(scale, x, "scale"),
    )


def _check_layer_norm_op(x: Value, scale: Value, ln: Node) -> str | None:
    reason = float_input(x)
    if reason:
        return reason
    axis = node_attr(ln, "axis", 17)
    if axis % len(x.shape) != len(x.shape) - 1:
        return f"LayerNormalization {ln.name!r} normalizes from axis {axis}, not over the last axis only"
    if x.dtype in LOW_PRECISION and node_attr(ln, "stash_type", 17) != 1:
        return "16-bit LayerNormalization with stash_type=0 computes its statistics in 16 bits"
    bias = ln.inputs[2] if len(ln.inputs) > 2 else None
    return first_reason(hidden_vector(scale, x, "scale"), hidden_vector(bias, x, "bias"))


def _check_rms_unscaled(x: Value, eps: Value, reduce: Node, exponent: Value | None = None, one: Value | None = None,
                        neg_half: Value | None = None, upcast: Node | None = None) -> str | bool | None:
    if x.shape is None or not x.shape or not isinstance(x.shape[-1], int):
        return False  # the ones-scale needs a known hidden size
    return first_reason(_check_stats(x, eps, reduce, None, exponent, one, neg_half),
                        upcast is not None and "an upcast without its downcast is not an RMSNorm output")


# -- replacements -------------------------------------------------------------------------------
def _make_layer_norm(op: Builder, x: Value, scale: Value, eps: Value, bias: Value | None = None) -> Value:
    return op.LayerNorm(x, scale, bias, _domain=DOMAIN, epsilon=scalar_value(eps))


def _make_layer_norm_op(op: Builder, x: Value, scale: Value, ln: Node) -> Value:
    bias = ln.inputs[2] if len(ln.inputs) > 2 else None
    return op.LayerNorm(x, scale, bias, _domain=DOMAIN, epsilon=float(node_attr(ln, "epsilon", 17)))


def _make_rms_norm(op: Builder, x: Value, scale: Value, eps: Value) -> Value:
    return op.RMSNorm(x, scale, _domain=DOMAIN, epsilon=scalar_value(eps))


def _make_rms_unscaled(op: Builder, x: Value, eps: Value) -> Value:
    ones = op.const(np.ones(x.shape[-1], x.dtype.numpy), hint="rms_scale")
    return op.RMSNorm(x, ones, _domain=DOMAIN, epsilon=scalar_value(eps))


RULES = [
    Rule("fuse_layernorm_op", _layer_norm_op, _make_layer_norm_op, _check_layer_norm_op),
    Rule("fuse_layernorm", _layer_norm, _make_layer_norm, _check_layer_norm),
    Rule("fuse_layernorm", _layer_norm_no_bias, _make_layer_norm, _check_layer_norm),
    # After the LayerNorm rules: a centred input also matches RMSNorm's pattern.
    Rule("fuse_rmsnorm", _rms_norm, _make_rms_norm, _check_rms_norm),
    # After the scaled rule, which owns every RMSNorm that still has its scale.
    Rule("fuse_rmsnorm_unscaled", _rms_unscaled_div, _make_rms_unscaled, _check_rms_unscaled),
    Rule("fuse_rmsnorm_unscaled", _rms_unscaled_reciprocal, _make_rms_unscaled, _check_rms_unscaled),
]


# -- residual (skip) fusion ---------------------------------------------------------------------
def _bias_add(v: Value) -> tuple[Value, Value, Node] | None:
    """``v`` = Add(m, bias) with a constant 1-D bias of the hidden size, used only by the residual Add:
    returns (m, bias, the Add) so the bias can ride along in the skip-norm."""
    node = v.producer
    if node is None or node.op_type != "Add" or node.domain or len(v.uses) != 1 or v.is_graph_output:
        return None
    for m, bias in (node.inputs, node.inputs[::-1]):
        if const_value(bias) is not None and const_value(m) is None and hidden_vector(bias, v, "bias") is None:
            if same_shape(m, v):
                return m, bias, node
    return None


def _skip_candidate(norm: Node) -> Node | None:
    add = norm.inputs[0].producer
    if add is None or add.op_type != "Add" or add.domain or len(add.inputs) != 2 or None in add.inputs:
        return None
    if any(const_value(v) is not None for v in add.inputs):
        return None  # a bias add, not a residual connection
    return add


def _skip_reason(add: Node, norm: Node) -> str | None:
    a, b = add.inputs
    if a.dtype != b.dtype:
        return f"the residual operands differ in type ({a.dtype} vs {b.dtype})"
    if add.outputs[0].shape is None or len(add.outputs[0].shape) not in (2, 3):
        return "the residual sum is not known to be 2-D or 3-D"
    operands = norm_ops.ort_skip_operands(a, b)
    return operands if isinstance(operands, str) else None


def fuse_skip(graph: Graph, norm: Node, add: Node) -> Node:
    """Replace ``add`` -> ``norm`` by one Skip* node whose second output is the sum."""
    total = add.outputs[0]
    x, skip = add.inputs
    skip_bias = bias_add = None
    for first, second in ((x, skip), (skip, x)):
        folded = _bias_add(second)
        if folded is not None:
            x, (skip, skip_bias, bias_add) = first, folded
            break
    hint = norm.name.removesuffix(f"/{norm.op_type}") or norm.op_type
    op = Builder(graph, add, hint)
    eps = norm.attr("epsilon")
    if norm.op_type == "LayerNorm":
        bias = norm.inputs[2] if len(norm.inputs) > 2 else None
        y, s = op.SkipLayerNorm(x, skip, norm.inputs[1], bias, skip_bias, _domain=DOMAIN, _outputs=2, epsilon=eps)
    else:
        y, s = op.SkipRMSNorm(x, skip, norm.inputs[1], skip_bias, _domain=DOMAIN, _outputs=2, epsilon=eps)
    for v in (y, s):
        v.dtype, v.shape = total.dtype, total.shape
    norm.outputs[0].replace_all_uses_with(y)
    graph.remove(norm)
    total.replace_all_uses_with(s)
    graph.remove(add)
    if bias_add is not None:
        graph.remove(bias_add)
    return op.nodes[0]


class NormFusion(Pass):
    """LayerNorm / RMSNorm fusion, then residual-add folding into SkipLayerNorm / SkipRMSNorm."""

    name = "fuse_norms"

    def run(self, model: Model, ctx: PassContext) -> None:
        graph = model.graph
        before = {id(n) for n in graph.nodes}
        apply_rules(model, RULES, ctx)
        fused = [n for n in graph.nodes if n.domain == DOMAIN and n.op_type in NORM_OPS and id(n) not in before]
        for node in fused:
            ctx.record.sites.append(Site(f"{node.op_type} {node.name!r}", APPLIED))
        for node in [n for n in graph.nodes if n.domain == DOMAIN and n.op_type in NORM_OPS]:
            add = _skip_candidate(node)
            if add is None:
                continue
            where = f"Add {add.name!r} + {node.op_type} {node.name!r}"
            reason = _skip_reason(add, node)
            if reason:
                ctx.record.skipped(where, f"fuse_skip_norm: {reason}")
                continue
            fuse_skip(graph, node, add)
            ctx.record.applied(where, "fuse_skip_norm")
        dedupe_sites(ctx.record)
        if any(n.domain == DOMAIN for n in graph.nodes):
            model.require_opset(DOMAIN, DOMAIN_VERSION)

