"""Layout canonicalization: detours through other shapes that amount to one Transpose.

The dynamo exporter writes ``k.transpose(-1, -2)`` on a 4-D tensor as Reshape to 3-D, Transpose,
Reshape back. Fusions look for a plain Transpose, so we put it back.
"""

from __future__ import annotations

from ...ir import Value
from ..rewrite import Attr, RewritePass, Rule


def _swap_last_two(op, x, merged_shape, split_shape):
    merged = op.Reshape(x, merged_shape, _allow_other_inputs=True)
    return op.Reshape(op.Transpose(merged, perm=Attr("perm")), split_shape, _bind="last", _allow_other_inputs=True)


def _check(x: Value, perm, last) -> bool:
    """x [*lead, s, d] -> [prod(lead), s, d] -> [prod(lead), d, s] -> [*lead, d, s] is a swap of the
    last two axes exactly when the final shape is the input's with those two swapped."""
    out = last.outputs[0]
    if perm is None or list(perm) != [0, 2, 1] or x.shape is None or out.shape is None:
        return False
    lead, tail = x.shape[:-2], x.shape[-2:]
    if len(x.shape) < 3 or len(out.shape) != len(x.shape) or any(d is None for d in x.shape):
        return False
    merged = last.inputs[0].producer.inputs[0]
    if merged.shape is None or len(merged.shape) != 3 or tuple(merged.shape[1:]) != tuple(tail):
        return False
    return tuple(out.shape) == tuple(lead) + (tail[1], tail[0])


def _transpose(op, x, last):
    rank = len(x.shape)
    return op.Transpose(x, perm=list(range(rank - 2)) + [rank - 1, rank - 2])


class LayoutCanonicalization(RewritePass):
    name = "layout_canonicalization"
    rules = [Rule("reshape_transpose_reshape", _swap_last_two, _transpose, check=_check)]
