"""Declarative patterns: a pattern is a Python function that builds a small dataflow graph of
pattern nodes, in the style of onnxscript's rewriter::

    def pattern(op, x, scale):
        return op.Softmax(op.Mul(x, scale), axis=-1)

Parameters after ``op`` are variables matching any value (bound by name, so a variable used twice
must match the same value). ``Const("name")`` matches only constants. Options on a pattern node:
``_domain``, ``_optional`` (the node may be absent: its first input flows through), ``_bind``
(capture the matched Node under that name), ``_allow_other_inputs`` (node may have more inputs).
Other keyword arguments must match attributes: a literal, or an ``Attr("name")`` capture.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

#: Binary ops whose two inputs may be swapped.
COMMUTATIVE = {"Add", "Mul", "Max", "Min", "Equal", "And", "Or", "Xor", "Sum"}


class PatternValue:
    """Something a pattern value position can hold."""


@dataclasses.dataclass(eq=False)
class Var(PatternValue):
    """Matches any value and binds it to ``name``; ``None`` name matches without binding."""

    name: str | None


@dataclasses.dataclass(eq=False)
class Const(PatternValue):
    """Matches a constant (initializer or Constant node), optionally a specific scalar value."""

    name: str | None = None
    value: float | None = None
    rtol: float = 1e-6


@dataclasses.dataclass(eq=False)
class Or(PatternValue):
    """Matches the first alternative that fits."""

    alternatives: tuple[PatternValue, ...]

    def __init__(self, *alternatives: PatternValue) -> None:
        self.alternatives = alternatives


@dataclasses.dataclass(eq=False)
class Attr:
    """Captures an attribute's value into the bindings (``None`` if absent and no default)."""

    name: str


@dataclasses.dataclass(eq=False)
class OpPattern:
    op_type: str
    domain: str
    inputs: list[PatternValue]
    attrs: dict[str, Any]
    optional: bool = False
    bind: str | None = None
    allow_other_inputs: bool = False
    num_outputs: int = 1


@dataclasses.dataclass(eq=False)
class OpOutput(PatternValue):
    op: OpPattern
    index: int = 0


class PatternBuilder:
    """The ``op`` object handed to pattern functions: ``op.MatMul(a, b)`` makes a pattern node."""

    def __getattr__(self, op_type: str) -> Callable[..., Any]:
        def make(*inputs: PatternValue, _domain: str = "", _optional: bool = False, _bind: str | None = None,
                 _allow_other_inputs: bool = False, _outputs: int = 1, **attrs: Any) -> Any:
            node = OpPattern(op_type, _domain, [_as_pattern(i) for i in inputs], attrs, _optional, _bind,
                             _allow_other_inputs, _outputs)
            if _outputs == 1:
                return OpOutput(node, 0)
            return tuple(OpOutput(node, i) for i in range(_outputs))

        return make


def _as_pattern(x: Any) -> PatternValue:
    if isinstance(x, PatternValue):
        return x
    if isinstance(x, (int, float)):
        return Const(None, float(x))
    if x is None:
        return Var(None)
    raise TypeError(f"pattern input {x!r} is not a pattern value")


def pattern_names(root: PatternValue) -> set[str]:
    """Every name a match of ``root`` may bind: variables, named constants, ``Attr`` captures and
    ``_bind`` names (some stay unbound when an ``_optional`` node is absent)."""
    names: set[str] = set()
    seen: set[int] = set()
    stack: list[PatternValue] = [root]
    while stack:
        pv = stack.pop()
        if id(pv) in seen:
            continue
        seen.add(id(pv))
        if isinstance(pv, (Var, Const)) and pv.name is not None:
            names.add(pv.name)
        elif isinstance(pv, Or):
            stack.extend(pv.alternatives)
        elif isinstance(pv, OpOutput):
            op = pv.op
            names.update(a.name for a in op.attrs.values() if isinstance(a, Attr))
            if op.bind:
                names.add(op.bind)
            stack.extend(op.inputs)
    return names


def build_pattern(fn: Callable[..., Any]) -> tuple[OpOutput, list[str]]:
    """Call a pattern function with variables for its parameters; returns its output pattern."""
    params = list(inspect.signature(fn).parameters)[1:]
    out = fn(PatternBuilder(), *[Var(p) for p in params])
    if not isinstance(out, OpOutput):
        raise TypeError(f"pattern {fn.__name__} must return the output of a pattern op")
    return out, params
