"""Understanding what an attention mask does, from how it was computed.

Exporters build one boolean mask per model (shared by the layers) as a conjunction: the causal
triangle (``LessOrEqual`` of a key-position Range and a query-position Range, or a ``Trilu``), a
sliding window (``Greater(k, q - w)``), padding (gathered from ``attention_mask``), constant
all-true pieces; then turn it into a bias with ``Where(mask, 0, fill)``. The analysis splits the
conjunction into literals and recognises the positional ones, which become the canonical op's
``causal``/``left_window``; whatever it does not recognise stays in the mask input unchanged, so a
fused node always computes what the original did. The one refusal: a mask computed from the
layer's own activations ("data-dependent"), which is not a mask but part of the computation.
"""

from __future__ import annotations

import dataclasses
import math

from ...ir import DType, Value
from ..canonical import DOMAIN
from ..rewrite import const_value, node_attr
from .attention_op import OP_NAME as ATTENTION
from .dims import DimOracle, ints, shape_elements
from .match_util import Mismatch, scalar_const

_COMPARE = {"Less": ("<", False), "LessOrEqual": ("<=", False), "Greater": (">", False), "GreaterOrEqual": (">=", False)}
_NEGATE = {"<": ">=", "<=": ">", ">": "<=", ">=": "<"}
_MIRROR = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}
_MAX_ANCESTORS = 20000
_ATTENTION_MASK = 3  # the canonical Attention's mask input (see attention_op)


@dataclasses.dataclass
class Literal:
    """One conjunct of the boolean mask: ``value`` (or its negation) must hold."""

    value: Value
    negated: bool = False


@dataclasses.dataclass
class MaskInfo:
    """What the mask terms added to the scores amount to."""

    causal: bool = False
    left_window: int = -1
    mask_value: float = -math.inf
    residual: list[Literal] = dataclasses.field(default_factory=list)
    floats: list[Value] = dataclasses.field(default_factory=list)
    labels: list[str] = dataclasses.field(default_factory=list)

    def describe(self) -> str:
        return ", ".join(self.labels) if self.labels else "no mask"


@dataclasses.dataclass(frozen=True)
class _Position:
    """A tensor holding ``index + offset`` along one axis (``axis`` counted from the end)."""

    axis: int
    offset: int
    rank: int
    length: object  # shape element of the Range's length (its limit, the start being 0)


class MaskAnalysis:
    """Analyses the terms a site adds to its scores. ``query``/``key`` are (value, axis) pairs whose
    dim is the query/key length: the position ranges must span them for the triangle to be the
    causal one."""

    def __init__(self, oracle: DimOracle, query: tuple[Value, int], key: tuple[Value, int],
                 activations: set[int]) -> None:
        self.oracle = oracle
        self.query, self.key = query, key
        self.activations = activations

    def analyse(self, where_terms: list[tuple[Value, bool, float]], floats: list[Value]) -> MaskInfo:
        """``where_terms``: (condition, negated, fill) of boolean masks turned into biases;
        ``floats``: float terms added as they are."""
        info = MaskInfo()
        fills = {fill for _, _, fill in where_terms}
        if len(fills) > 1:
            raise Mismatch(f"the boolean masks use different fill values {sorted(fills)}")
        if fills:
            info.mask_value = fills.pop()
        literals: list[Literal] = []
        for cond, negated, _ in where_terms:
            literals += self._conjuncts(cond, negated)
        for lit in literals + [Literal(f) for f in floats]:
            if self._data_dependent(lit.value):
                raise Mismatch(f"the mask is data-dependent: %{lit.value.name} is computed from the layer's activations")
        if floats:  # a bool mask and float biases: keep the bool mask whole, in one float bias
            info.residual = literals
            literals = []
        lo, hi, positional = -math.inf, math.inf, []
        for lit in literals:
            verdict = self._classify(lit)
            if verdict == "true":
                continue
            if verdict is None:
                info.residual.append(lit)
                continue
            positional.append(lit)
            lo, hi = max(lo, verdict[0]), min(hi, verdict[1])
        if positional and hi == 0 and lo <= 0:
            info.causal = True
            info.labels.append("causal")
            if lo > -math.inf:
                info.left_window = int(-lo)
                info.labels.append(f"sliding window of {int(-lo) + 1}")
        else:
            info.residual += positional
        for lit in info.residual:
            if lit.value.dtype not in (DType.BOOL, None):  # a float 0/1 triangle (scores.py) that is not the causal one
                raise Mismatch(f"the 0/1 mask %{lit.value.name} is not a triangle of the query and key positions")
            info.labels.append(self._label(lit))
        info.floats = list(floats)
        info.labels += ["additive bias"] * len(floats)
        return info

    # -- conjunctions -------------------------------------------------------------------------
    def _conjuncts(self, value: Value, negated: bool) -> list[Literal]:
        node = value.producer
        if node is not None and not node.domain:
            op = node.op_type
            if (op == "And" and not negated) or (op == "Or" and negated):
                return [lit for x in node.inputs for lit in self._conjuncts(x, negated)]
            if op == "Not":
                return self._conjuncts(node.inputs[0], not negated)
            if op in ("Identity", "Expand") or (op == "Cast" and node.inputs[0].dtype == DType.BOOL):
                return self._conjuncts(node.inputs[0], negated)
            if op == "Unsqueeze" and _leading_only(node, value):  # [S, Skv] -> [1, 1, S, Skv]
                return self._conjuncts(node.inputs[0], negated)
        return [Literal(value, negated)]

    def _classify(self, lit: Literal) -> tuple[float, float] | str | None:
        """(lo, hi) bounds on j - i for a positional literal, "true" for one that always holds, None
        for anything else (kept in the mask input)."""
        array = const_value(lit.value)
        if array is not None:
            holds = not array.any() if lit.negated else bool(array.all())
            return "true" if holds else None
        node = lit.value.producer
        if node is not None and node.op_type == "Cast" and node.inputs[0].producer is not None:
            if node.inputs[0].producer.op_type == "Trilu":  # a 0/1 triangle cast to bool
                node = node.inputs[0].producer
        if node is None or node.domain:
            return None
        if node.op_type == "Trilu":
            return self._trilu(node, lit.negated)
        if node.op_type not in _COMPARE:
            return None
        sign = _COMPARE[node.op_type][0]
        if lit.negated:
            sign = _NEGATE[sign]
        a, b = node.inputs
        pa, pb = self._position(a), self._position(b)
        if pa is not None and pb is not None:
            return self._relation(pa, pb, sign)
        if pa is not None and scalar_const(b) is not None:
            return _always(pa, sign, scalar_const(b))
        if pb is not None and scalar_const(a) is not None:
            return _always(pb, _MIRROR[sign], scalar_const(a))
        return None

    def _relation(self, pa: _Position, pb: _Position, sign: str) -> tuple[float, float] | None:
        if {pa.axis, pb.axis} != {-1, -2}:
            return None
        key, query = (pa, pb) if pa.axis == -1 else (pb, pa)
        if key is not pa:
            sign = _MIRROR[sign]
        if not (self.oracle.is_dim(key.length, *self.key) and self.oracle.is_dim(query.length, *self.query)):
            return None
        if not self.oracle.same(*self.query, *self.key):
            return None
        c = query.offset - key.offset  # (j + ok) sign (i + oq)  <=>  j - i sign oq - ok
        return {"<=": (-math.inf, c), "<": (-math.inf, c - 1), ">=": (c, math.inf), ">": (c + 1, math.inf)}[sign]

    def _trilu(self, node, negated: bool) -> tuple[float, float] | None:
        x = node.inputs[0]
        k = scalar_const(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else 0.0
        if k is None or not self._all_true_square(x):
            return None
        upper = bool(node_attr(node, "upper", 99))
        if upper != negated:  # keeps j >= i + k
            return (k, math.inf) if not negated else (-math.inf, k - 1)
        return (-math.inf, k) if not negated else (k + 1, math.inf)

    def _all_true_square(self, x: Value) -> bool:
        """An all-ones [S, Skv] tensor (ConstantOfShape(1) of the query and key lengths)."""
        node = x.producer
        while node is not None and node.op_type == "Cast":
            x, node = node.inputs[0], node.inputs[0].producer
        if node is None or node.op_type != "ConstantOfShape":
            return False
        fill = node.attr("value")
        if fill is None or not bool(fill.numpy().reshape(-1)[0]):
            return False
        elems = self.oracle.elements(node.inputs[0])
        return elems is not None and len(elems) >= 2 and self.oracle.is_dim(elems[-2], *self.query) and (
            self.oracle.is_dim(elems[-1], *self.key)
        )

    def _position(self, value: Value, depth: int = 0) -> _Position | None:
        node = value.producer
        if node is None or node.domain or depth > 16:
            return None
        op, ins = node.op_type, node.inputs
        if op == "Range":
            start, delta = scalar_const(ins[0]), scalar_const(ins[2])
            if start != 0 or delta != 1:
                return None
            limit = shape_elements(ins[1], self.oracle._memo)
            return _Position(-1, 0, 1, limit[0] if limit and len(limit) == 1 else None)
        if op in ("Cast", "Identity"):
            return self._position(ins[0], depth + 1)
        if op in ("Add", "Sub"):
            for x, c, sign in ((ins[0], ins[1], 1), (ins[1], ins[0], 1 if op == "Add" else None)):
                shift = scalar_const(c)
                if sign is None or shift is None or shift != int(shift):
                    continue
                inner = self._position(x, depth + 1)
                if inner is not None:
                    step = int(shift) if op == "Add" else -int(shift)
                    return dataclasses.replace(inner, offset=inner.offset + step)
            return None
        if op == "Unsqueeze":
            inner = self._position(ins[0], depth + 1)
            axes = ints(ins[1]) if len(ins) > 1 and ins[1] is not None else node_attr(node, "axes")
            if inner is None or axes is None:
                return None
            rank = inner.rank + len(axes)
            inserted = {a % rank for a in axes}
            kept = [k for k in range(rank) if k not in inserted]
            return _Position(kept[inner.rank + inner.axis] - rank, inner.offset, rank, inner.length)
        return None

    # -- data dependence ----------------------------------------------------------------------
    def _data_dependent(self, value: Value) -> bool:
        """Whether ``value`` reads (not just the shape of) a float value the layer's Q, K or V is
        computed from."""
        seen: set[int] = set()
        stack = [value]
        while stack and len(seen) < _MAX_ANCESTORS:
            v = stack.pop()
            if id(v) in seen or v.is_const:
                continue
            seen.add(id(v))
            if id(v) in self.activations:
                return True
            node = v.producer
            if node is None or node.op_type in ("Shape", "Size"):
                continue
            stack.extend(x for x in node.inputs if x is not None)
        return False

    def _label(self, lit: Literal) -> str:
        shape = lit.value.shape
        if shape is not None and len(shape) == 4 and shape[1] == 1 and shape[2] == 1:
            return "padding"
        return f"custom mask %{lit.value.name}" + (" (negated)" if lit.negated else "")


def _leading_only(node, value: Value) -> bool:
    """An Unsqueeze that only adds axes before the last two (the query and key axes stay last)."""
    axes = ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else node_attr(node, "axes")
    if axes is None or value.shape is None:
        return False
    rank = len(value.shape)
    return all(a % rank < rank - 2 for a in axes)


def _always(p: _Position, sign: str, c: float) -> str | None:
    """``index + offset sign c`` for every index >= 0: true when it holds at index 0 for >, >=."""
    lowest = p.offset
    if (sign == ">=" and lowest >= c) or (sign == ">" and lowest > c):
        return "true"
    return None


def activation_set(values: list[Value]) -> set[int]:
    """Ids of the float values ``values`` are computed from (data edges only, not shapes).

    The mask input of an attention fused earlier is no activation edge: the layers share one mask
    (MPT turns it into a float bias and back into a bool), so a later layer's Q/K/V are computed
    from the earlier layer's output and thereby from the mask; but the mask is not computed from
    the activations, and the later layer's mask, built from the same values, is no more
    data-dependent than the earlier one's."""
    found: set[int] = set()
    seen: set[int] = set()
    stack = list(values)
    while stack and len(seen) < _MAX_ANCESTORS:
        v = stack.pop()
        if id(v) in seen or v.is_const:
            continue
        seen.add(id(v))
        if v.dtype is not None and v.dtype.is_float:
            found.add(id(v))
        node = v.producer
        if node is None or node.op_type in ("Shape", "Size"):
            continue
        inputs = node.inputs
        if node.domain == DOMAIN and node.op_type == ATTENTION:
            inputs = [x for i, x in enumerate(inputs) if i != _ATTENTION_MASK]
        stack.extend(x for x in inputs if x is not None)
    return found
