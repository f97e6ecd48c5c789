"""Activation fusion: GELU (exact erf form and the tanh approximation) and SiLU become canonical
ops; a constant bias added just before a GELU joins it (ORT's BiasGelu / FastGelu take it).

GELU is 0.5 * x * (1 + phi) with phi = erf(x / sqrt 2) or tanh(sqrt(2/pi) * (x + 0.044715 x^3)).
Exporters associate the three factors in any order and spell x / sqrt 2 as a Div or a Mul by
1/sqrt 2, the cube as Pow(x, 3) or x * x * x, the tanh argument as k * (x + a x^3) or
k x + (k a) x^3: each spelling is a pattern alternative. Constants are captured and judged by the
checks, so a near miss (0.05 instead of 0.044715) is reported with its reason.

SiLU-gated MLPs (silu(x W_gate) * (x W_up), LLaMA-style) are recognised and reported but kept as
they are: ORT has no dense gated-MLP kernel to lower to. Their two projections share one matmul
later (``pack_projections``; ``python -m benchmarks packing``: one decoding step 4% faster, prefill
of 128 and 512 tokens level within noise on the benchmark LLaMA).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...ir import Model, Value
from ..base import Pass, PassContext
from ..canonical import DOMAIN, DOMAIN_VERSION
from ..diagnostics import APPLIED, Site
from ..rewrite import Builder, Const, Matcher, Or, Rule, Var, apply_rules
from ..rewrite.pattern import build_pattern
from . import activation_ops
from .activation_ops import CUBIC, SQRT_2, SQRT_2_OVER_PI
from .site_checks import dedupe_sites, first_reason, float_input, hidden_vector, scalar

ACTIVATION_OPS = ("Gelu", "SiLU")


# -- patterns -----------------------------------------------------------------------------------
def _erf(op, x):
    return op.Erf(Or(op.Div(x, Var("erf_div")), op.Mul(x, Var("erf_mul"))))


def _tanh(op, x):
    cube = Or(op.Pow(x, Var("three")), op.Mul(x, op.Mul(x, x)))
    return op.Tanh(Or(
        op.Mul(op.Add(x, op.Mul(cube, Var("cubic"))), Var("scale")),
        op.Add(op.Mul(x, Var("scale")), op.Mul(cube, Var("scaled_cubic"))),
    ))


def _gelu_form(phi: Callable[..., Any], form: str) -> Callable[..., Any]:
    """0.5 * x * (1 + phi(x)) associated as (x * 0.5) * c, x * (0.5 * c) or 0.5 * (x * c)."""

    def pattern(op, x):
        core = op.Add(phi(op, x), Var("one"))
        if form == "x_half":
            return op.Mul(op.Mul(x, Var("half")), core)
        if form == "half_core":
            return op.Mul(x, op.Mul(Var("half"), core))
        return op.Mul(Var("half"), op.Mul(x, core))

    pattern.__name__ = f"gelu_{phi.__name__.strip('_')}_{form}"
    return pattern


def _gelu_standard(op, x):
    return op.Gelu(x, _bind="gelu")


def _biased_gelu(op, x):
    return op.Gelu(op.Add(x, Const("bias")), _domain=DOMAIN, _bind="gelu")


def _silu(op, x):
    return op.Mul(x, op.Sigmoid(x))


def _gated_mlp(op, h):
    gate = op.SiLU(op.MatMul(h, Var("w_gate")), _domain=DOMAIN)
    return op.Mul(gate, op.MatMul(h, Var("w_up")))


# -- checks -------------------------------------------------------------------------------------
def _check_erf(x: Value, half: Value, one: Value, erf_div: Value | None = None, erf_mul: Value | None = None) -> str | None:
    return first_reason(
        float_input(x), scalar(half, "the GELU half factor", 0.5), scalar(one, "the GELU one", 1.0),
        scalar(erf_div, "the erf divisor", SQRT_2), scalar(erf_mul, "the erf scale", 1 / SQRT_2),
    )


def _check_tanh(x: Value, half: Value, one: Value, scale: Value, three: Value | None = None, cubic: Value | None = None,
                scaled_cubic: Value | None = None) -> str | None:
    return first_reason(
        float_input(x), scalar(half, "the GELU half factor", 0.5), scalar(one, "the GELU one", 1.0),
        scalar(three, "the cube's exponent", 3.0), scalar(scale, "the tanh scale", SQRT_2_OVER_PI),
        scalar(cubic, "the cubic coefficient (GELU's tanh approximation uses 0.044715)", CUBIC),
        scalar(scaled_cubic, "the scaled cubic coefficient", SQRT_2_OVER_PI * CUBIC),
    )


def _check_gelu_standard(x: Value, gelu) -> str | None:
    approximate = gelu.attr("approximate", "none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    return float_input(x) or (None if approximate in ("none", "tanh") else f"unknown approximate={approximate!r}")


def _check_bias(x: Value, bias: Value) -> str | None:
    return float_input(x) or hidden_vector(bias, x, "the bias")


def _check_silu(x: Value) -> str | None:
    return float_input(x)


# -- replacements -------------------------------------------------------------------------------
def _make_gelu(approximate: str) -> Callable[..., Value]:
    def replacement(op: Builder, x: Value) -> Value:
        return op.Gelu(x, _domain=DOMAIN, approximate=approximate)

    return replacement


def _make_gelu_standard(op: Builder, x: Value, gelu) -> Value:
    return _make_gelu(activation_ops._approximate(gelu))(op, x)


def _make_biased_gelu(op: Builder, x: Value, bias: Value, gelu) -> Value:
    return op.Gelu(x, bias, _domain=DOMAIN, approximate=activation_ops._approximate(gelu))


def _make_silu(op: Builder, x: Value) -> Value:
    return op.SiLU(x, _domain=DOMAIN)


FORMS = ("x_half", "half_core", "half_outer")
RULES = [
    Rule("fuse_gelu_op", _gelu_standard, _make_gelu_standard, _check_gelu_standard),
    *(Rule("fuse_gelu_erf", _gelu_form(_erf, f), _make_gelu("none"), _check_erf) for f in FORMS),
    *(Rule("fuse_gelu_tanh", _gelu_form(_tanh, f), _make_gelu("tanh"), _check_tanh) for f in FORMS),
    Rule("fuse_silu", _silu, _make_silu, _check_silu),
]
#: Second round, on the canonical ops: fold a constant bias Add into the GELU.
BIAS_RULES = [Rule("fold_gelu_bias", _biased_gelu, _make_biased_gelu, _check_bias)]


class ActivationFusion(Pass):
    """GELU / SiLU fusion, GELU bias folding, and (reported only) SiLU-gated MLP recognition."""

    name = "fuse_activations"

    def run(self, model: Model, ctx: PassContext) -> None:
        graph = model.graph
        for rules, what in ((RULES, ""), (BIAS_RULES, " (bias folded in)")):
            before = {id(n) for n in graph.nodes}
            apply_rules(model, rules, ctx)
            for node in graph.nodes:
                if node.domain == DOMAIN and node.op_type in ACTIVATION_OPS and id(node) not in before:
                    ctx.record.sites.append(Site(f"{node.op_type} {node.name!r}{what}", APPLIED))
        _report_gated_mlps(model, ctx)
        dedupe_sites(ctx.record)
        if any(n.domain == DOMAIN for n in graph.nodes):
            model.require_opset(DOMAIN, DOMAIN_VERSION)


_GATED = build_pattern(_gated_mlp)[0]


def _report_gated_mlps(model: Model, ctx: PassContext) -> None:
    matcher = Matcher(_GATED)
    found = 0
    for node in model.graph.nodes:
        if node.op_type == "Mul" and not node.domain and matcher.match(node.outputs[0]) is not None:
            found += 1
            ctx.record.skipped(
                f"Mul {node.name!r}",
                "SiLU-gated MLP silu(x W_gate) * (x W_up) recognised and kept as SiLU + Mul: ONNX Runtime has no "
                "dense gated-MLP kernel, and the generated C fuses the pair itself (codegen/fuse.py); "
                "pack_projections later gives the two projections one matmul",
            )
    if found:
        ctx.record.info["gated_mlp_sites"] = found
