"""Backtracking matcher for patterns (see pattern.py) against the IR."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
from onnx import defs

from ...ir import Node, Value
from .pattern import COMMUTATIVE, Attr, Const, OpOutput, OpPattern, Or, PatternValue, Var


@dataclasses.dataclass
class Match:
    """A successful match: ``bindings`` maps variable/attr/bind names to Values, values or Nodes;
    ``nodes`` are the graph nodes the pattern's op nodes matched (in pattern order)."""

    bindings: dict[str, Any]
    nodes: dict[int, Node]

    def fork(self) -> Match:
        return Match(dict(self.bindings), dict(self.nodes))


class Matcher:
    def __init__(self, root: OpOutput, opset: int = 99) -> None:
        self.root = root
        self.opset = opset
        #: Deepest failure seen during the last match attempt: (depth, reason).
        self.failure: tuple[int, str] = (-1, "")

    def match(self, value: Value) -> Match | None:
        for m in self.matches(value):
            return m
        return None

    def matches(self, value: Value) -> Iterator[Match]:
        """Every way the pattern matches at ``value`` (commutative orders, ``Or`` alternatives,
        optional nodes present or absent), best first; a caller whose check refuses one may try the
        next."""
        self.failure = (-1, "")
        yield from self._value(self.root, value, Match({}, {}), 0)

    @property
    def reason(self) -> str:
        return self.failure[1] or "pattern did not match"

    def _fail(self, depth: int, reason: str) -> None:
        if depth > self.failure[0]:
            self.failure = (depth, reason)

    # -------------------------------------------------------------------------------------
    def _value(self, pv: PatternValue, value: Value | None, m: Match, depth: int) -> Iterator[Match]:
        if isinstance(pv, Var):
            if value is None:
                self._fail(depth, f"missing input for {pv.name}")
                return
            yield from self._bind(pv.name, value, m, depth)
        elif isinstance(pv, Const):
            array = const_value(value)
            if array is None:
                self._fail(depth, f"%{value.name if value else '?'} is not a constant")
                return
            if pv.value is not None and not (array.size == 1 and np.allclose(array.astype(np.float64), pv.value, rtol=pv.rtol)):
                self._fail(depth, f"constant %{value.name} is not {pv.value}")
                return
            yield from self._bind(pv.name, value, m, depth)
        elif isinstance(pv, Or):
            for alt in pv.alternatives:
                yield from self._value(alt, value, m, depth)
        elif isinstance(pv, OpOutput):
            yield from self._op_output(pv, value, m, depth)
        else:  # pragma: no cover - pattern construction prevents this
            raise TypeError(pv)

    def _bind(self, name: str | None, value: Value, m: Match, depth: int) -> Iterator[Match]:
        """Bind a named variable or constant; a name used twice must see the same value."""
        if name is None:
            yield m
            return
        bound = m.bindings.get(name)
        if bound is not None and bound is not value:
            self._fail(depth, f"{name} must be the same value in both places, got %{bound.name} and %{value.name}")
            return
        m = m.fork()
        m.bindings[name] = value
        yield m

    def _op_output(self, pv: OpOutput, value: Value | None, m: Match, depth: int) -> Iterator[Match]:
        op = pv.op
        node = value.producer if value is not None else None
        if node is not None and value.index == pv.index and node.op_type == op.op_type and node.domain == op.domain:
            known = m.nodes.get(id(op))
            if known is None or known is node:
                yield from self._node(op, node, m, depth)
        elif value is not None:
            found = f"{node.op_type}" if node is not None else ("a constant" if value.is_const else "a graph input")
            self._fail(depth, f"expected {op.op_type} producing %{value.name}, found {found}")
        if op.optional and op.inputs:
            yield from self._value(op.inputs[0], value, m, depth)

    def _node(self, op: OpPattern, node: Node, m: Match, depth: int) -> Iterator[Match]:
        inputs = list(node.inputs)
        while inputs and inputs[-1] is None:
            inputs.pop()
        if len(inputs) < len(op.inputs) or (len(inputs) > len(op.inputs) and not op.allow_other_inputs):
            self._fail(depth, f"{node.op_type} {node.name!r} has {len(inputs)} inputs, pattern expects {len(op.inputs)}")
            return
        m = m.fork()
        for name, expected in op.attrs.items():
            actual = node_attr(node, name, self.opset)
            if isinstance(expected, Attr):
                m.bindings[expected.name] = actual
            elif not _attr_equal(actual, expected):
                self._fail(depth, f"{node.op_type} {node.name!r} has {name}={actual!r}, pattern needs {expected!r}")
                return
        m.nodes[id(op)] = node
        if op.bind:
            m.bindings[op.bind] = node
        orders = [list(range(len(op.inputs)))]
        if op.op_type in COMMUTATIVE and len(op.inputs) == 2:
            orders.append([1, 0])
        for order in orders:
            yield from self._inputs(op, [inputs[i] for i in order], 0, m, depth + 1)

    def _inputs(self, op: OpPattern, values: list[Value | None], k: int, m: Match, depth: int) -> Iterator[Match]:
        if k == len(op.inputs):
            yield m
            return
        for m2 in self._value(op.inputs[k], values[k], m, depth):
            yield from self._inputs(op, values, k + 1, m2, depth)


def const_value(value: Value | None) -> np.ndarray | None:
    """The array a value always holds (initializer or Constant node), else None."""
    if value is None or value.is_graph_input:
        return None
    if value.const is not None:
        return value.const.numpy()
    node = value.producer
    if node is not None and node.op_type == "Constant" and not node.domain:
        for key, a in node.attrs.items():
            if key == "value":
                return a.value.numpy()
            if key in ("value_float", "value_int"):
                return np.array(a.value, np.float32 if key == "value_float" else np.int64)
            if key in ("value_floats", "value_ints"):
                return np.array(a.value, np.float32 if key == "value_floats" else np.int64)
    return None


def node_attr(node: Node, name: str, opset: int = 99) -> Any:
    """An attribute's value, or the operator schema's default (at the model's opset) when the node
    omits it: Softmax's default axis, for one, changed at opset 13."""
    if name in node.attrs:
        return node.attrs[name].value
    try:
        schema = defs.get_schema(node.op_type, opset if not node.domain else 99, node.domain)
    except Exception:
        return None
    attr = schema.attributes.get(name)
    if attr is None or not attr.default_value.name:
        return None
    from onnx import helper

    return helper.get_attribute_value(attr.default_value)


def _attr_equal(actual: Any, expected: Any) -> bool:
    if isinstance(expected, (list, tuple)):
        return actual is not None and list(actual) == list(expected)
    if isinstance(expected, float):
        return actual is not None and abs(float(actual) - expected) <= 1e-6 * max(1.0, abs(expected))
    if isinstance(expected, str) and isinstance(actual, bytes):
        return actual.decode() == expected
    return actual == expected
