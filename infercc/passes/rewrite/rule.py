"""Rules (pattern + check + replacement) and the pass that applies a set of them to fixpoint."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from ...ir import Graph, Model, Node, Tensor, Value
from ..base import Pass, PassContext
from .matcher import Match, Matcher
from .pattern import build_pattern, pattern_names

#: A check returns None/True when the rule applies; False when the site is not a candidate after all
#: (nothing recorded); a reason (str) when it is a candidate that must be left alone (recorded as a
#: skipped site, so users see why).
Check = Callable[..., "str | bool | None"]


class Builder:
    """The ``op`` object handed to replacement functions: ``op.MatMul(a, b)`` creates a real node
    (inserted before ``anchor``) and returns its output value(s)."""

    def __init__(self, graph: Graph, anchor: Node, name_hint: str) -> None:
        self.graph = graph
        self.anchor = anchor
        self.hint = name_hint
        self.nodes: list[Node] = []

    def __getattr__(self, op_type: str) -> Callable[..., Any]:
        def make(*inputs: Value | None, _domain: str = "", _outputs: int = 1, **attrs: Any) -> Any:
            node = self.graph.make_node(
                op_type, list(inputs), num_outputs=_outputs, domain=_domain, attrs=attrs,
                name=self.graph.names.fresh(f"{self.hint}/{op_type}"), before=self.anchor,
            )
            self.nodes.append(node)
            return node.outputs[0] if _outputs == 1 else tuple(node.outputs)

        return make

    def const(self, array: Any, dtype: Any = None, hint: str = "c") -> Value:
        return self.graph.add_const(Tensor(np.asarray(array, dtype=dtype)), f"{self.hint}/{hint}")


@dataclasses.dataclass
class Rule:
    """``pattern(op, *vars)`` describes what to find; ``check(**bindings)`` may refuse with a reason;
    ``replacement(op, **bindings)`` builds what replaces the pattern's output value."""

    name: str
    pattern: Callable[..., Any]
    replacement: Callable[..., Value]
    check: Check | None = None
    #: Record sites whose anchor op matched but the rest did not (for fusions users care about).
    report_mismatch: bool = False

    def __post_init__(self) -> None:
        self.root, self.params = build_pattern(self.pattern)
        self.names = pattern_names(self.root)

    @property
    def anchor(self) -> tuple[str, str]:
        return self.root.op.domain, self.root.op.op_type


def _call(fn: Callable[..., Any], *args: Any, bindings: dict[str, Any], names: Iterable[str] = ()) -> Any:
    """Call a check or replacement with the bindings it names. A name the pattern can bind but this
    match left unbound (an absent ``_optional`` node's captures) is passed as None."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return fn(*args, **bindings)
    kwargs = {k: v for k, v in bindings.items() if k in params}
    for name in names:
        p = params.get(name)
        if p is not None and name not in kwargs and p.default is p.empty and p.kind != p.POSITIONAL_ONLY:
            kwargs[name] = None
    return fn(*args, **kwargs)


def apply_rules(model: Model, rules: Sequence[Rule], ctx: PassContext, *, max_rounds: int = 8) -> int:
    """Apply rules until nothing changes (bounded). Returns the number of rewrites made."""
    total = 0
    opset = model.opset("") or 99
    reported: set[tuple] = set()  # a site refused in every round is reported once
    for _ in range(max_rounds):
        changed = 0
        for rule in rules:
            changed += _apply_rule(model.graph, rule, ctx, opset, reported)
        total += changed
        if not changed:
            break
    return total


#: How many alternative matches of one site are tried before giving up on it.
MAX_MATCHES_PER_SITE = 64


def _apply_rule(graph: Graph, rule: Rule, ctx: PassContext, opset: int, reported: set[tuple] | None = None) -> int:
    domain, op_type = rule.anchor
    matcher = Matcher(rule.root, opset)
    count = 0
    for node in list(graph.nodes):
        if node.graph is not graph or node.op_type != op_type or node.domain != domain:
            continue
        target = node.outputs[rule.root.index]
        where = f"{node.op_type} {node.name!r}"
        # A check (or the use of an intermediate) may refuse one way of matching and accept another
        # (Mul(c, x) against Mul(x, c)): try each, remember the first refusal for the diagnostics.
        match, refusal, matched = None, None, False
        for candidate in itertools.islice(matcher.matches(target), MAX_MATCHES_PER_SITE):
            matched = True
            reason = _blocked(candidate, target, graph)
            if reason is None and rule.check is not None:
                verdict = _call(rule.check, bindings=candidate.bindings, names=rule.names)
                if verdict is False:
                    continue
                if isinstance(verdict, str):
                    reason = verdict
            if reason is None:
                match = candidate
                break
            refusal = refusal or reason
        if match is None:
            reason = refusal if refusal is not None else (matcher.reason if not matched and rule.report_mismatch else None)
            key = (id(node), rule.name, reason)
            if reason is not None and (reported is None or key not in reported):
                ctx.record.skipped(where, f"{rule.name}: {reason}")
                if reported is not None:
                    reported.add(key)
            continue
        builder = Builder(graph, node, node.name or rule.name)
        new = _call(rule.replacement, builder, bindings=match.bindings, names=rule.names)
        if new is None or _only_moves_output_name(new, target, node, match, builder):
            for made in reversed(builder.nodes):  # a replacement that gave up leaves nothing behind
                if not any(o.uses for o in made.outputs):
                    graph.remove(made, force=True)
            continue
        if new.dtype is None:
            new.dtype = target.dtype
        if new.shape is None:
            new.shape = target.shape
        target.replace_all_uses_with(new)
        _remove_matched(graph, match)
        ctx.record.count(f"{rule.name}")
        count += 1
    return count


def _only_moves_output_name(new: Value, target: Value, node: Node, match: Match, builder: Builder) -> bool:
    """Replacing a lone Identity that feeds a graph output by its input needs a new Identity to keep
    the output's name: no progress, and rules would rewrite it again every round."""
    if builder.nodes or not target.is_graph_output or len(match.nodes) != 1:
        return False
    if node.op_type != "Identity" or node.domain:
        return False
    can_take_name = new.producer is not None and new.graph is target.graph and not new.is_graph_output
    return not can_take_name


def _blocked(match: Match, target: Value, graph: Graph) -> str | None:
    """Intermediate results of the match must not be used outside it (else removing them would
    change other computations): the rewrite would duplicate work, so it is skipped."""
    matched = {id(n) for n in match.nodes.values()}
    for node in match.nodes.values():
        if node.graph is not graph:
            return "part of the match lies in another graph"
        for out in node.outputs:
            if out is target:
                continue
            if out.is_graph_output:
                return f"intermediate %{out.name} is a graph output"
            if any(id(user) not in matched for user, _ in out.uses):
                return f"intermediate %{out.name} is also used outside the pattern"
    return None


def _remove_matched(graph: Graph, match: Match) -> None:
    pending = list(match.nodes.values())
    progress = True
    while progress:
        progress = False
        for node in list(pending):
            if node.graph is graph and not any(o.uses or o.is_graph_output for o in node.outputs):
                graph.remove(node)
                pending.remove(node)
                progress = True


class RewritePass(Pass):
    """A pass made of rules; subclasses only list their rules."""

    rules: Sequence[Rule] = ()

    def run(self, model: Model, ctx: PassContext) -> None:
        apply_rules(model, self.rules, ctx)
