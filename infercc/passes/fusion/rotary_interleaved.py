"""Interleaved rotary (GPT-J, CodeGen): ``x * cos + rotate_every_two(x) * sin`` becomes a canonical
RotaryEmbedding with ``interleaved=1``.

``rotate_every_two`` pairs channel 2c with 2c + 1: ``stack((-x[..., 1::2], x[..., ::2]), -1)``
flattened back to x's shape (Slice step 2, Neg, two Unsqueezes, Concat, Reshape). The factors are
``repeat_interleave``'d: each of the R/2 per-pair values written twice, side by side (an Unsqueeze
on a new last axis, a Tile or Expand by 2 on it, a Reshape merging it back); the check proves that
repetition, which is the invariant the canonical op's lowerings rely on.

Two layouts: x [B, H, S, R] (factors [B|1, 1, S, R]) becomes the canonical op as it is; x
[B, S, H, R] (factors [B|1, S, 1, R]: GPT-J rotates before transposing heads) is read as
[B, S, H*R] with ``num_heads`` = H and reshaped back. The second rule absorbs partial rotary
around that reshaped form, like ``rotary_partial`` does around the plain one.
"""

from __future__ import annotations

from ...ir import Value
from ..canonical import DOMAIN
from ..rewrite import Attr, Rule
from .build_util import i64
from .dims import dim_of, ints, shape_elements
from .rotary_op import make_node, partial_split_reason

_BIG = 1 << 62


def _rotate_pairs(op, x, cos, sin, axis_odd, axis_even, shape):
    even = op.Slice(x, _allow_other_inputs=True, _bind="even")
    odd = op.Slice(x, _allow_other_inputs=True, _bind="odd")
    pairs = op.Concat(op.Unsqueeze(op.Neg(odd), axis_odd), op.Unsqueeze(even, axis_even), axis=Attr("axis"))
    return op.Add(op.Mul(x, cos), op.Mul(op.Reshape(pairs, shape, _allow_other_inputs=True), sin))


def _strided(node, x: Value, start: int) -> bool:
    """``node`` is x[..., start::2] along the last axis."""
    ins = node.inputs
    if len(ins) < 5 or ins[3] is None or ins[4] is None:
        return False
    starts, ends, axes, steps = ints(ins[1]), ints(ins[2]), ints(ins[3]), ints(ins[4])
    rank = x.rank
    if None in (starts, ends, axes, steps) or rank is None:
        return False
    width = dim_of(x, -1)
    end_ok = ends[0] >= _BIG or (isinstance(width, int) and ends[0] >= width)
    return starts == [start] and steps == [2] and axes[0] % rank == rank - 1 and len(axes) == 1 and end_ok


def pair_factors(value: Value, x: Value, kind: str) -> tuple[Value, int] | str:
    """(factors, heads axis) for ``value`` = repeat_interleave(f, 2) along the last axis, broadcast
    over x's heads by a size-1 axis (1 or 2: the one where x has a known head count) that the
    canonical op's [B|1, S, R] factors drop."""
    node = value.producer
    if node is None or node.op_type != "Reshape":
        return f"the {kind} factors are not a repetition merged by a Reshape (cannot show pairs repeat)"
    rep = node.inputs[0].producer
    if rep is None or rep.op_type not in ("Tile", "Expand"):
        return f"the {kind} factors are not repeated by Tile or Expand"
    counts = ints(rep.inputs[1])
    if counts is None or counts[-1] != 2 or (rep.op_type == "Tile" and any(c != 1 for c in counts[:-1])):
        return f"the {kind} factors are not repeated twice along a new last axis"
    unsq = rep.inputs[0].producer
    if unsq is None or unsq.op_type != "Unsqueeze" or unsq.inputs[0].rank is None or len(unsq.inputs) < 2:
        return f"the {kind} factors do not get their repetition axis from an Unsqueeze"
    rank = unsq.inputs[0].rank + 1
    axes, half = ints(unsq.inputs[1]), dim_of(unsq.inputs[0], -1)
    if axes is None or [a % rank for a in axes] != [rank - 1]:
        return f"the {kind} factors are not repeated along a new last axis"
    # Row-major, any 4-D target whose last entry is R keeps each R/2 x 2 block in one row: a
    # leading split can differ, the pairs still repeat (a last entry of -1 is R in a valid graph,
    # where the factors multiply x's last axis).
    target = shape_elements(node.inputs[1])
    if target is None or len(target) != 4 or target[-1] not in (-1, 2 * half if isinstance(half, int) else -1):
        return f"the {kind} factors' Reshape does not merge the repetition into the last axis"
    heads = [a for a in (1, 2) if 1 in (dim_of(value, a), target[a]) and isinstance(dim_of(x, a), int)]
    if len(heads) != 1:
        return f"the {kind} factors are not broadcast over the rotated tensor's heads"
    return value, heads[0]


def _check_pairs(x, cos, sin, even, odd, axis_odd, axis_even, shape, axis) -> str | bool | None:
    if x.rank != 4:
        return False
    if not (_strided(even, x, 0) and _strided(odd, x, 1)):
        return "the rotation does not take every second channel of the last axis"
    if any(ints(a) not in ([-1], [4]) for a in (axis_odd, axis_even)) or axis not in (-1, 4):
        return "the rotated pairs are not stacked along a new last axis"
    target, width = shape_elements(shape), dim_of(x, -1)
    if target is None or len(target) != 4 or target[-1] not in (-1, width):
        return "the stacked pairs are not reshaped back to the rotated tensor's shape"
    found = [pair_factors(f, x, k) for f, k in ((cos, "cos"), (sin, "sin"))]
    for f in found:
        if isinstance(f, str):
            return f
    if found[0][1] != found[1][1]:
        return "cos and sin are broadcast over different axes"
    if not isinstance(width, int) or width % 2:
        return f"the rotated width {width} is not a known even number"
    return None


def _replace_pairs(op, x, cos, sin, **_):
    (cos4, axis), (sin4, _) = pair_factors(cos, x, "cos"), pair_factors(sin, x, "sin")
    cos3, sin3 = op.Squeeze(cos4, i64(op, [axis])), op.Squeeze(sin4, i64(op, [axis]))
    width = dim_of(x, -1)
    if axis == 1:  # x [B, H, S, R]: the canonical layout
        return make_node(op, x, cos3, sin3, num_heads=0, rotary_dim=width, interleaved=1)
    return _rotate_bshd(op, x, cos3, sin3, rotary_dim=width, interleaved=1)


def _rotate_bshd(op, x, cos, sin, *, rotary_dim: int, interleaved: int):
    """The canonical rotary of x [B, S, H, D], read as [B, S, H*D] and reshaped back."""
    heads, width = dim_of(x, 2), dim_of(x, -1)
    packed = op.Reshape(x, i64(op, [0, 0, heads * width]))
    rotated = make_node(op, packed, cos, sin, num_heads=heads, rotary_dim=rotary_dim, interleaved=interleaved)
    return op.Reshape(rotated, i64(op, [0, 0, heads, width]))


def _partial_bshd(op, x, cos, sin, head_start, head_end, tail_start, tail_end, s_in, s_out):
    head = op.Slice(x, head_start, head_end, _allow_other_inputs=True, _bind="head")
    rope = op.RotaryEmbedding(op.Reshape(head, s_in), cos, sin, _domain=DOMAIN, _bind="rope")
    tail = op.Slice(x, tail_start, tail_end, _allow_other_inputs=True, _bind="tail")
    return op.Concat(op.Reshape(rope, s_out), tail, axis=Attr("axis"))


def _check_partial_bshd(x, head, tail, rope, axis, **_) -> str | bool | None:
    if x.rank != 4 or not int(rope.attr("num_heads", 0)):
        return False
    if dim_of(x, 2) != int(rope.attr("num_heads")):
        return "the rotated heads are not the tensor's heads"
    return partial_split_reason(x, head, tail, rope, axis)


def _replace_partial_bshd(op, x, cos, sin, rope, **_):
    return _rotate_bshd(op, x, cos, sin, rotary_dim=int(rope.attr("rotary_dim")), interleaved=int(rope.attr("interleaved", 0)))


RULES = [
    Rule("rotary_interleaved", _rotate_pairs, _replace_pairs, check=_check_pairs, report_mismatch=False),
    Rule("rotary_partial_bshd", _partial_bshd, _replace_partial_bshd, check=_check_partial_bshd),
]
