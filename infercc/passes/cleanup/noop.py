"""No-op elimination, written as rewrite rules: each pattern is an op that returns its input
unchanged, and each check proves that (types and shapes equal, constants neutral)."""

from __future__ import annotations

import numpy as np

from ...ir import Value
from ..rewrite import Attr, RewritePass, Rule, const_value


def _same_type(a: Value, b: Value) -> bool:
    """Output provably equals input in type and shape (else not a no-op; nothing to report)."""
    if a.dtype is None or a.dtype != b.dtype or a.shape is None or b.shape is None:
        return False
    return len(a.shape) == len(b.shape) and all(x == y and x is not None for x, y in zip(a.shape, b.shape))


def _neutral(x: Value, c: Value, out: Value, neutral: float) -> str | bool:
    array = const_value(c)
    if array is None or not np.all(array == neutral):
        return False
    if not _same_type(x, out):
        return f"operand is {neutral} but broadcasting changes the shape or type, so the op is kept"
    return True


def _identity(op, x):
    return op.Identity(x, _bind="node")


def _dropout(op, x):
    return op.Dropout(x, _bind="node", _allow_other_inputs=True)


def _dropout_check(node) -> str | None:
    """A Dropout is a no-op at inference unless its mask is read or training mode may be on."""
    if len(node.outputs) > 1 and node.outputs[1].uses:
        return "its mask output is used"
    training = node.inputs[2] if len(node.inputs) > 2 else None
    if training is not None and not (const_value(training) is not None and not const_value(training).any()):
        return "training_mode is not constant false"
    return None


def _cast(op, x):
    return op.Cast(x, to=Attr("to"), _bind="node")


def _reshape(op, x, shape):
    return op.Reshape(x, shape, _bind="node")


def _expand(op, x, shape):
    return op.Expand(x, shape, _bind="node")


def _transpose(op, x):
    return op.Transpose(x, perm=Attr("perm"), _bind="node")


def _transpose_check(x, perm, node) -> bool:
    return perm is not None and list(perm) == list(range(len(perm)))


def _add0(op, x, c):
    return op.Add(x, c, _bind="node")


def _sub0(op, x, c):
    return op.Sub(x, c, _bind="node")


def _mul1(op, x, c):
    return op.Mul(x, c, _bind="node")


def _div1(op, x, c):
    return op.Div(x, c, _bind="node")


def _concat1(op, x):
    return op.Concat(x, _bind="node")


def _out(node) -> Value:
    return node.outputs[0]


def _pass_through(op, x):
    return x


RULES = [
    Rule("identity", _identity, _pass_through),
    Rule("dropout", _dropout, _pass_through, check=_dropout_check),
    Rule("cast_to_same_type", _cast, _pass_through,
         check=lambda x, to, node: x.dtype is not None and int(x.dtype) == to),
    Rule("reshape_to_same_shape", _reshape, _pass_through, check=lambda x, node: _same_type(x, _out(node))),
    Rule("expand_to_same_shape", _expand, _pass_through, check=lambda x, node: _same_type(x, _out(node))),
    Rule("identity_transpose", _transpose, _pass_through, check=_transpose_check),
    Rule("add_zero", _add0, _pass_through, check=lambda x, c, node: _neutral(x, c, _out(node), 0.0)),
    Rule("sub_zero", _sub0, _pass_through, check=lambda x, c, node: _neutral(x, c, _out(node), 0.0)),
    Rule("mul_one", _mul1, _pass_through, check=lambda x, c, node: _neutral(x, c, _out(node), 1.0)),
    Rule("div_one", _div1, _pass_through, check=lambda x, c, node: _neutral(x, c, _out(node), 1.0)),
    Rule("single_input_concat", _concat1, _pass_through, check=lambda x, node: _same_type(x, _out(node))),
]


class NoOpElimination(RewritePass):
    name = "noop_elimination"
    rules = RULES

