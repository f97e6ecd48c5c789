"""The softmax end of an attention site: from Softmax back to Q·Kᵀ (scalings and masks on the way)
and forward to ·V (through the NaN guard exporters add for fully masked rows)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ...ir import DType, Node, Value
from ..rewrite import node_attr
from .match_util import Mismatch, peel_scale, scalar_const


@dataclasses.dataclass
class Scores:
    """Softmax(scale * Q·Kᵀ + masks): what the softmax input was built from."""

    qk: Node
    scale: float
    where_terms: list[tuple[Value, bool, float]] = dataclasses.field(default_factory=list)
    floats: list[Value] = dataclasses.field(default_factory=list)
    nodes: list[Node] = dataclasses.field(default_factory=list)
    #: c of a ``c * tanh(x / c)`` cap between the scaled scores and the masks (0: none).
    softcap: float = 0.0


def probability_matmul(softmax: Node, opset: int) -> Node:
    """The P·V MatMul a Softmax feeds (through an optional ``Where(IsNaN(p), 0, p)``)."""
    x = softmax.inputs[0]
    axis = node_attr(softmax, "axis", opset)
    rank = len(x.shape) if x.shape is not None else None
    if axis is None or not (axis == -1 or (rank is not None and axis == rank - 1)):
        raise Mismatch(f"the softmax is over axis {axis}, not the key axis (the last)")
    if opset < 13 and axis != -1 and rank is None:
        raise Mismatch("the softmax (before opset 13) flattens an input of unknown rank")
    probs = softmax.outputs[0]
    users = probs.consumers()
    guard = _nan_guard(probs, users)
    if guard is not None:
        probs, users = guard.outputs[0], guard.outputs[0].consumers()
    while len(users) == 1 and users[0].op_type == "Cast" and not probs.is_graph_output:  # back to V's type
        probs = users[0].outputs[0]
        users = probs.consumers()
    if probs.is_graph_output:
        raise Mismatch("the attention probabilities are also a graph output")
    if len(users) != 1:
        readers = ", ".join(f"{u.op_type} {u.name!r}" for u in users[:3])
        raise Mismatch(f"the attention probabilities are also used elsewhere (read by {readers})")
    matmul = users[0]
    if matmul.op_type == "Reshape" and not matmul.domain:
        raise Mismatch("the attention probabilities are reshaped before the product with V (heads folded into "
                       "the batch axis): that layout is not supported")
    if matmul.op_type != "MatMul" or matmul.domain or matmul.inputs[0] is not probs:
        raise Mismatch(f"the softmax output goes to {matmul.op_type}, not to a product with V")
    if not _activation(matmul.inputs[1]):
        raise Mismatch("the attention weights multiply a constant, not V")
    return matmul


def attention_shaped(softmax: Node) -> bool:
    """Whether a softmax looks like attention even though the fusion refused it: its output (through
    guards and casts) multiplies an activation, or its input is a product of two activations. Such
    sites count towards the layers the report expects to be fused."""
    frontier = [softmax.outputs[0]]
    for _ in range(4):
        following = []
        for value in frontier:
            for user in value.consumers():
                if user.op_type == "MatMul" and not user.domain and all(_activation(x) for x in user.inputs):
                    return True
                if user.op_type in ("IsNaN", "Where", "Cast", "Dropout", "Identity", "Reshape", "Unsqueeze", "Squeeze"):
                    following += user.outputs[:1]  # heads folded into the batch (BLOOM, DeBERTa) included
        frontier = following
    return _reaches_matmul(softmax.inputs[0])


def _nan_guard(probs: Value, users: list[Node]) -> Node | None:
    """``Where(IsNaN(p), 0, p)`` reading only p: the guard for rows with no allowed key."""
    isnan = [u for u in users if u.op_type == "IsNaN"]
    where = [u for u in users if u.op_type == "Where"]
    if len(users) != 2 or len(isnan) != 1 or len(where) != 1:
        return None
    w = where[0]
    if w.inputs[0] is not isnan[0].outputs[0] or w.inputs[2] is not probs or scalar_const(w.inputs[1]) != 0.0:
        return None
    if isnan[0].outputs[0].consumers() != [w]:
        return None
    return w


def scores_of(softmax: Node) -> Scores:
    """Walk from the softmax input to the Q·Kᵀ MatMul, collecting scalings and mask terms."""
    value = softmax.inputs[0]
    scale = 1.0
    where_terms: list[tuple[Value, bool, float]] = []
    floats: list[Value] = []
    nodes: list[Node] = []
    # Walking back from the softmax meets the last operation first: a scale found here multiplies
    # Q·Kᵀ and every mask applied before it (found later in the walk), not the masks found so far.
    softcap = 0.0
    for _ in range(16):
        node = value.producer
        if node is None or node.domain:
            raise Mismatch(f"the softmax input %{value.name} is not computed from Q·Kᵀ")
        op = node.op_type
        if op == "MatMul":
            if not _activation(node.inputs[0]) or not _activation(node.inputs[1]):
                raise Mismatch("the softmax input is a product with constant weights, not Q·Kᵀ")
            return Scores(node, scale, where_terms, floats, nodes, softcap)
        nodes.append(node)
        capped = _softcap(node)
        if op == "Cast" or op == "Identity":
            value = node.inputs[0]
        elif capped is not None:
            if softcap or scale != 1.0:
                raise Mismatch("the soft-capped scores are capped twice or scaled after the cap")
            softcap, inner, cap_nodes = capped
            nodes += cap_nodes
            value = inner
        elif op in ("Mul", "Div"):
            inner, factor, _ = peel_scale(value, "the scores")
            if inner is value:
                raise Mismatch(f"the scores are multiplied by a tensor ({op} {node.name!r}), not a constant scale")
            if factor <= 0:
                raise Mismatch(f"the scores are scaled by {factor:g}: a mask before it would turn into its opposite")
            scale *= factor
            value = inner
        elif op == "Add":
            a, b = node.inputs
            from_a, from_b = _reaches_matmul(a), _reaches_matmul(b)
            if from_a and from_b:
                raise Mismatch("cannot tell the scores from the mask in a sum of two products")
            if not (from_a or from_b):
                stops = sorted({f"{n.op_type} {n.name!r}" for n in (_stop(a), _stop(b)) if n is not None})
                raise Mismatch("neither operand of the sum before the softmax reaches Q·Kᵀ through scales and masks"
                               + (f" (the scores go through {stops[0]} first, e.g. a tanh soft-cap)" if stops else ""))
            scores, term = (a, b) if from_a else (b, a)
            if softcap:
                raise Mismatch("a mask is added before the scores' soft-cap")
            _add_term(term, where_terms, floats, scale)
            value = scores
        elif op == "Where":
            if softcap:
                raise Mismatch("a mask is applied before the scores' soft-cap")
            value = _masked_fill(node, where_terms, scale)
        else:
            raise Mismatch(f"the scores go through {op} {node.name!r} before the softmax (not a scale or a mask)")
    raise Mismatch("the softmax input is too far from Q·Kᵀ")


def _softcap(node: Node) -> tuple[float, Value, list[Node]] | None:
    """``c * tanh(x / c)`` (or ``x * (1/c)``) at ``node`` (the outer Mul): (c, x, the inner nodes)."""
    if node.op_type != "Mul" or node.domain:
        return None
    for tanh_out, c_value in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        c, tanh = scalar_const(c_value), tanh_out.producer
        if c is None or c <= 0 or tanh is None or tanh.op_type != "Tanh" or len(tanh_out.consumers()) != 1:
            continue
        div = tanh.inputs[0].producer
        if div is None or div.domain or len(tanh.inputs[0].consumers()) != 1:
            continue
        for x, d in ((div.inputs[0], div.inputs[1]), (div.inputs[1], div.inputs[0])):
            f = scalar_const(d)
            if f is None:
                continue
            inverse = f if div.op_type == "Div" and x is div.inputs[0] else (1.0 / f if div.op_type == "Mul" and f else None)
            if inverse is not None and math.isclose(inverse, c, rel_tol=1e-6):
                return c, x, [tanh, div]
    return None


def _add_term(term: Value, where_terms: list, floats: list, scale: float) -> None:
    """An added mask; ``scale`` is what the scores are multiplied by after it (a boolean mask's
    fill is scaled with them, a float mask would have to be)."""
    node = term.producer
    if node is not None and not node.domain and node.op_type == "Where":
        cond, then, other = node.inputs
        t, o = scalar_const(then), scalar_const(other)
        if t == 0.0 and o is not None and o < 0:
            where_terms.append((cond, False, _scaled(o, scale)))
            return
        if o == 0.0 and t is not None and t < 0:
            where_terms.append((cond, True, _scaled(t, scale)))
            return
    indicator = _indicator_bias(term)
    if indicator is not None:
        where_terms.append((indicator[0], False, _scaled(indicator[1], scale)))
        return
    if scale != 1.0:
        raise Mismatch("an additive float mask is scaled together with the scores")
    floats.append(term)


def _indicator_bias(term: Value) -> tuple[Value, float] | None:
    """A 0/1 float mask M turned into a bias by arithmetic, ``(M - 1) * c`` or ``(1 - M) * -c``
    (c > 0: older GPT-2 exports, hand-written decoders over ``tril(ones)``): the same as
    ``Where(M, 0, -c)``. (M, -c) when M is a triangle of ones (``Trilu``, the mask analysis reads
    its bounds) or a cast of a boolean mask (which then stands for M); else None."""
    node = term.producer
    if node is None or node.domain or node.op_type != "Mul":
        return None
    for diff, factor in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        c, sub = scalar_const(factor), diff.producer
        if c is None or sub is None or sub.domain or sub.op_type != "Sub":
            continue
        first, second = scalar_const(sub.inputs[0]), scalar_const(sub.inputs[1])
        if second == 1.0 and first is None and c > 0:      # (M - 1) * c
            mask = sub.inputs[0]
        elif first == 1.0 and second is None and c < 0:    # (1 - M) * -c
            mask = sub.inputs[1]
        else:
            continue
        cond = _zero_one(mask)
        if cond is not None:
            return cond, -abs(c)
    return None


def _zero_one(mask: Value) -> Value | None:
    """The value standing for a 0/1 float mask as a boolean literal: the bool a Cast came from, or
    the Trilu itself (recognised by its structure); None for anything else."""
    node = mask.producer
    if node is None or node.domain:
        return None
    if node.op_type == "Cast" and node.inputs[0].dtype == DType.BOOL:
        return node.inputs[0]
    if node.op_type == "Trilu":
        return mask
    return None


def _masked_fill(node: Node, where_terms: list, scale: float) -> Value:
    """``Where(mask, scores, fill)`` (or the negated form): a boolean mask replacing scores, its
    fill multiplied by the ``scale`` applied after it (GPT-J masks first, then divides)."""
    cond, then, other = node.inputs
    for scores, fill, negated in ((then, other, False), (other, then, True)):
        f = scalar_const(fill)
        if f is not None and _reaches_matmul(scores):
            f = _scaled(f, scale)
            if not (math.isinf(f) and f < 0) and f > -1e30:
                raise Mismatch(f"masked scores are replaced by {f:g}: only an infinite or absorbing fill "
                               "is the same as adding it")
            where_terms.append((cond, negated, f))
            return scores
    raise Mismatch(f"Where {node.name!r} before the softmax is not a mask on the scores")


def _scaled(fill: float, scale: float) -> float:
    """The fill as the softmax sees it, rounded to float32 like the scores it replaces."""
    return float(np.float32(fill) * np.float32(scale)) if not math.isinf(fill) else fill


def _stop(value: Value) -> Node | None:
    """The first node on the way back from ``value`` that is neither a scale, a mask nor Q·Kᵀ: what
    stops the scores from being recognised (None when the walk ends at an input or constant)."""
    for _ in range(8):
        node = value.producer
        if node is None or node.domain or node.op_type == "MatMul":
            return None
        if node.op_type in ("Mul", "Div", "Cast", "Identity"):
            value = node.inputs[0] if scalar_const(node.inputs[0]) is None else node.inputs[1]
        elif node.op_type in ("Add", "Where"):
            found = [_stop(x) for x in node.inputs if x is not None and not x.is_const]
            return next((f for f in found if f is not None), None)
        else:
            return node if _product_upstream(node) else None
    return None


def _product_upstream(node: Node, depth: int = 12) -> bool:
    """Whether a product of two activations lies behind ``node`` through any ops (the scores side
    of a sum, as opposed to the mask side)."""
    frontier = [node]
    for _ in range(depth):
        following = []
        for n in frontier:
            if n.op_type == "MatMul" and all(_activation(x) for x in n.inputs):
                return True
            following += [x.producer for x in n.inputs if x is not None and not x.is_const and x.producer is not None]
        frontier = following[:8]
    return False


def _reaches_matmul(value: Value) -> bool:
    for _ in range(8):
        node = value.producer
        if node is None or node.domain:
            return False
        if node.op_type == "MatMul":
            return _activation(node.inputs[0]) and _activation(node.inputs[1])
        if node.op_type in ("Mul", "Div", "Cast", "Identity", "Tanh"):
            value = node.inputs[0] if scalar_const(node.inputs[0]) is None else node.inputs[1]
        elif node.op_type in ("Add", "Where"):
            return any(_reaches_matmul(x) for x in node.inputs if x is not None)
        else:
            return False
    return False


def _activation(value: Value) -> bool:
    return not value.is_const and not (value.producer is not None and value.producer.op_type == "Constant")
