"""Rotary fusion: ``x * cos + rotate_half(x) * sin`` becomes a canonical RotaryEmbedding.

Two declarative rules. The first matches the rotation exporters write right after splitting heads
(x [B, H, S, D], ``rotate_half`` as Slice/Neg/Concat, cos/sin [B|1, S, D] unsqueezed over heads);
its check proves the slices cut x in halves and that cos/sin repeat per half (``Cos(Concat(f,
f))``, possibly scaled), the invariant the canonical op's lowerings rely on. The second absorbs
partial rotary (GPT-NeoX, Phi): ``Concat(rotary(x[..., :R]), x[..., R:])`` is a rotary of x with
``rotary_dim`` R. The attention fusion later moves these before the head split.
"""

from __future__ import annotations

from ...ir import Value
from ..canonical import DOMAIN, DOMAIN_VERSION
from ..rewrite import Attr, RewritePass, Rule
from ..rewrite.rule import apply_rules
from .dims import dim_of, ints, last_axis_slice
from .match_util import scalar_const
from .rotary_interleaved import RULES as INTERLEAVED_RULES
from .rotary_op import make_node, partial_split_reason


def _rotate_half(op, x, cos, sin, lo_start, lo_end, hi_start, hi_end):
    lo = op.Slice(x, lo_start, lo_end, _allow_other_inputs=True, _bind="lo")
    hi = op.Slice(x, hi_start, hi_end, _allow_other_inputs=True, _bind="hi")
    rotated = op.Concat(op.Neg(hi), lo, axis=Attr("axis"))
    return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))


def _factors(value: Value, kind: str) -> Value | str:
    """cos/sin as [B|1, S, D]: the value unsqueezed over heads, checked to repeat per half."""
    node = value.producer
    axes = ints(node.inputs[1]) if node is not None and node.op_type == "Unsqueeze" and len(node.inputs) > 1 else None
    if axes != [1]:
        return f"the {kind} factors are not broadcast over heads as [B, 1, S, D]"
    factors = node.inputs[0]
    inner = factors
    while inner.producer is not None and inner.producer.op_type == "Mul":
        a, b = inner.producer.inputs
        if scalar_const(b) is not None:
            inner = a
        elif scalar_const(a) is not None:
            inner = b
        else:
            break
    trig = inner.producer
    if trig is None or trig.op_type != kind.capitalize():
        return f"the {kind} factors are not computed by {kind.capitalize()} (cannot show they repeat per half)"
    cat = trig.inputs[0].producer
    if cat is None or cat.op_type != "Concat" or len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1]:
        return f"the {kind} factors are not {kind}(concat(f, f)): the halves may differ"
    if cat.attr("axis") not in (-1, 2):
        return f"the {kind} factors repeat along another axis"
    return factors


def _check_half(x, cos, sin, lo, hi, axis) -> str | bool | None:
    if x.shape is None or len(x.shape) != 4:
        return False
    if axis not in (-1, 3):
        return "rotate_half concatenates along another axis than the last"
    width = dim_of(x, -1)
    low, high = last_axis_slice(lo, x), last_axis_slice(hi, x)
    if low is None or high is None:
        return "the rotation slices are not step-1 slices of the last axis"
    half = low[1]
    if low[0] != 0 or high != (half, 2 * half) or not isinstance(width, int) or width != 2 * half:
        return f"the rotation swaps {low} and {high} of {width} channels, not the two halves"
    for value, kind in ((cos, "cos"), (sin, "sin")):
        found = _factors(value, kind)
        if isinstance(found, str):
            return found
        if dim_of(found, -1) not in (None, width):
            return f"the {kind} factors have {dim_of(found, -1)} channels, the rotated tensor {width}"
    return None


def _replace_half(op, x, cos, sin):
    return make_node(op, x, _factors(cos, "cos"), _factors(sin, "sin"), num_heads=0, rotary_dim=dim_of(x, -1),
                     interleaved=0)


def _partial(op, x, cos, sin, head_start, head_end, tail_start, tail_end):
    head = op.Slice(x, head_start, head_end, _allow_other_inputs=True, _bind="head")
    rope = op.RotaryEmbedding(head, cos, sin, _domain=DOMAIN, _bind="rope")
    tail = op.Slice(x, tail_start, tail_end, _allow_other_inputs=True, _bind="tail")
    return op.Concat(rope, tail, axis=Attr("axis"))


def _check_partial(x, head, tail, rope, axis) -> str | bool | None:
    if x.shape is None or len(x.shape) != 4 or int(rope.attr("num_heads", 0)) != 0:
        return False
    return partial_split_reason(x, head, tail, rope, axis)


def _replace_partial(op, x, cos, sin, rope):
    return make_node(op, x, cos, sin, num_heads=0, rotary_dim=int(rope.attr("rotary_dim")),
                     interleaved=int(rope.attr("interleaved", 0)))


RULES = [
    Rule("rotary_half", _rotate_half, _replace_half, check=_check_half, report_mismatch=False),
    *INTERLEAVED_RULES,
    Rule("rotary_partial", _partial, _replace_partial, check=_check_partial),
]


class RotaryFusion(RewritePass):
    name = "rotary_fusion"
    rules = RULES

    def run(self, model, ctx) -> None:
        if apply_rules(model, self.rules, ctx):
            model.require_opset(DOMAIN, DOMAIN_VERSION)

