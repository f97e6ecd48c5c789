"""Graph invariants, checked after every pass so a broken rewrite is caught where it happened."""

from __future__ import annotations

from .graph import Graph
from .model import Model
from .node import AttrType

_TENSOR = int(AttrType.TENSOR)  # a plain int: the enum wrapper's lookup runs per attribute


class VerifyError(ValueError):
    """The graph breaks an IR invariant; the message names the first offending node or value."""


def verify(model: Model) -> None:
    """Raise VerifyError unless: every value is assigned once (across all scopes), every use refers
    to a value visible at that point, use lists match node inputs, the node order is topological
    (no cycles), types are consistent and every operator domain has an opset import."""
    domains = set(model.opset_imports) | {"ai.onnx"} | {f.domain for f in model.functions}
    live = {id(n) for n in model.graph.walk()}
    _verify_graph(model.graph, {}, visible=set(), domains=domains, live=live)
    for v in model.graph.inputs + model.graph.outputs:
        if v.dtype is None and v.type_proto is None:
            raise VerifyError(f"graph input/output %{v.name} has no type")


def _verify_graph(
    graph: Graph, outer: dict[str, object], visible: set[int], domains: set[str], live: set[int]
) -> None:
    # Names must be unique along each scope chain (a subgraph may not shadow an outer name); sibling
    # subgraphs (If branches, say) may reuse each other's names, as ONNX allows.
    assigned = dict(outer)
    scope = set(visible)

    def define(value, where: str) -> None:
        owner = assigned.get(value.name)
        if owner is not None and owner is not value:
            raise VerifyError(f"value name {value.name!r} is assigned twice ({where} in graph {graph.name!r})")
        assigned[value.name] = value
        scope.add(id(value))

    for v in graph.inputs:
        define(v, "graph input")
    for name, v in graph.initializers.items():
        if v.name != name:
            raise VerifyError(f"initializer key {name!r} differs from its value's name {v.name!r}")
        if v.const is None:
            raise VerifyError(f"initializer %{name} has no data")
        if v.dtype is not None and v.dtype != v.const.dtype:
            raise VerifyError(f"initializer %{name} is declared {v.dtype} but holds {v.const.dtype} data")
        define(v, "initializer")
    for v in graph.sparse_initializers.values():
        define(v, "sparse initializer")
    for node in graph.nodes:
        if node.graph is not graph:
            raise VerifyError(f"{node!r} is listed in graph {graph.name!r} but linked to another graph")
        if node.domain not in domains:
            raise VerifyError(f"{node!r} uses domain {node.domain!r}, which has no opset import")
        for i, value in enumerate(node.inputs):
            if value is None:
                continue
            if id(value) not in scope:
                where = "later in the graph (cycle or bad order)" if value.producer is not None else "nowhere"
                raise VerifyError(f"{node!r} reads %{value.name}, which is defined {where}")
            if not any(n is node and j == i for n, j in value.uses):
                raise VerifyError(f"use list of %{value.name} misses {node!r} input {i}")
        for sub in node.subgraphs():
            if sub.parent is not graph:
                raise VerifyError(f"subgraph {sub.name!r} of {node!r} has the wrong parent")
            _verify_graph(sub, assigned, scope, domains, live)
        for value in node.outputs:
            if value.graph is not graph:
                raise VerifyError(f"%{value.name} is an output of {node!r} in graph {graph.name!r} but links to another graph")
            if value.producer is not node:
                raise VerifyError(f"%{value.name} is an output of {node!r} but names another producer")
            define(value, f"output of {node.op_type}")
        for attr in node.attrs.values():
            if attr.type == _TENSOR and attr.value is None:
                raise VerifyError(f"{node!r} attribute {attr.name} holds no tensor")
    for value in graph.outputs:
        if id(value) not in scope:
            raise VerifyError(f"graph {graph.name!r} output %{value.name} is not defined")
        if graph.parent is not None and value.graph is not graph:
            # onnx and onnxruntime reject this; Value.replace_all_uses_with inserts an Identity instead.
            raise VerifyError(
                f"subgraph {graph.name!r} returns outer-scope value %{value.name} directly (needs an Identity)"
            )
    for value in graph.values():
        if len({(id(user), i) for user, i in value.uses}) != len(value.uses):
            raise VerifyError(f"use list of %{value.name} lists a use twice")
        for user, i in value.uses:
            if id(user) not in live or i >= len(user.inputs) or user.inputs[i] is not value:
                raise VerifyError(f"%{value.name} lists a stale use by {user!r} (a removed node, or an input since changed)")
