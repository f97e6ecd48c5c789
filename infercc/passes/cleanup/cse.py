"""Common-subexpression elimination: identical computations on identical inputs run once.

Exporters repeat shape computations per layer (and dynamo repeats constants); merging them is
what lets later pattern matches see one shared value instead of many copies.
"""

from __future__ import annotations

import hashlib

from ...ir import Graph, Model, Node, Tensor
from ..base import Pass, PassContext
from .constant_folding import _NEVER

#: Constants up to this size are deduplicated by content.
_DEDUP_CONST_BYTES = 1 << 20


class CommonSubexpressionElimination(Pass):
    name = "common_subexpression_elimination"

    def run(self, model: Model, ctx: PassContext) -> None:
        ctx.record.count("constants_merged", _merge_constants(model.graph))
        ctx.record.count("nodes_merged", _merge_nodes(model.graph))


class PostLoweringCSE(CommonSubexpressionElimination):
    """The same merge once canonical ops are lowered: each lowering builds its own copy of what
    every layer shares (the attention bias widened for grouped heads, the rotary cos/sin views),
    which would otherwise run once per layer on every decoding step."""

    name = "post_lowering_cse"


def _merge_constants(graph: Graph) -> int:
    seen: dict[tuple, object] = {}
    merged = 0
    for name, value in list(graph.initializers.items()):
        t = value.const
        if value.is_graph_input or t.nbytes > _DEDUP_CONST_BYTES:
            continue
        key = (int(t.dtype), t.shape, hashlib.sha1(t.raw_bytes()).hexdigest())
        keeper = seen.setdefault(key, value)
        if keeper is not value and not value.is_graph_output:
            value.replace_all_uses_with(keeper)
            del graph.initializers[name]
            merged += 1
    return merged


def _key(node: Node) -> tuple | None:
    if node.op_type in _NEVER or any(True for _ in node.subgraphs()):
        return None
    attrs = tuple(sorted((k, _attr_key(a.value)) for k, a in node.attrs.items()))
    return (node.domain, node.op_type, tuple(id(v) for v in node.inputs), attrs, len(node.outputs))


def _attr_key(value: object) -> object:
    """Attribute values compared by content: a Tensor's repr shows only its name, dtype and shape,
    so ConstantOfShape(value=0) and ConstantOfShape(value=1) would look the same."""
    if isinstance(value, Tensor):
        return ("tensor", int(value.dtype), value.shape, hashlib.sha1(value.raw_bytes()).hexdigest())
    if isinstance(value, list):
        return tuple(_attr_key(v) for v in value)
    return repr(value)


def _merge_nodes(graph: Graph) -> int:
    seen: dict[tuple, Node] = {}
    merged = 0
    for node in list(graph.nodes):
        key = _key(node)
        if key is None:
            continue
        keeper = seen.setdefault(key, node)
        if keeper is node:
            continue
        if any(o.is_graph_output for o in node.outputs):
            continue
        for old, new in zip(node.outputs, keeper.outputs):
            old.replace_all_uses_with(new)
        graph.remove(node)
        merged += 1
    return merged
