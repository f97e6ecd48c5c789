"""The model: the main graph plus everything ONNX keeps beside it (opsets, metadata, functions)."""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx

from .graph import Graph
from .node import ATTR_GRAPH, ATTR_GRAPHS, Attr, Node
from .value import Value


@dataclasses.dataclass
class Model:
    graph: Graph
    opset_imports: dict[str, int]
    ir_version: int = onnx.IR_VERSION
    producer_name: str = ""
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    doc_string: str = ""
    metadata_props: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Model-local functions and training info: carried verbatim, not optimized.
    functions: list[onnx.FunctionProto] = dataclasses.field(default_factory=list)
    extras: dict[str, list[Any]] = dataclasses.field(default_factory=dict)

    def opset(self, domain: str = "") -> int | None:
        return self.opset_imports.get("" if domain == "ai.onnx" else domain)

    def require_opset(self, domain: str, version: int) -> None:
        """Declare a domain used by nodes a pass created (e.g. com.microsoft, infercc)."""
        self.opset_imports.setdefault(domain, version)

    def clone(self) -> Model:
        """A structural copy sharing the (immutable) tensors: cheap enough to snapshot before
        every pass, so a failing pass can be rolled back."""
        copy = dataclasses.replace(
            self,
            graph=_clone_graph(self.graph, None, {}),
            opset_imports=dict(self.opset_imports),
            metadata_props=dict(self.metadata_props),
            functions=[_copy_proto(f) for f in self.functions],
            extras={k: list(v) for k, v in self.extras.items()},
        )
        copy.graph.names.used = set(self.graph.names.used)
        return copy


def _copy_proto(proto):
    copy = type(proto)()
    copy.CopyFrom(proto)
    return copy


def _clone_value(v: Value, graph: Graph) -> Value:
    c = Value(v.name, v.dtype, v.shape, const=v.const, type_proto=v.type_proto)
    c.dtype, c.shape = v.dtype, v.shape  # keep declared type even for initializers
    c.doc_string, c.metadata_props, c.graph = v.doc_string, dict(v.metadata_props), graph
    c._src_type = v._src_type
    return c


def _clone_graph(g: Graph, parent: Graph | None, vmap: dict[int, Value]) -> Graph:
    out = Graph(g.name, parent=parent)
    out.doc_string, out.metadata_props = g.doc_string, dict(g.metadata_props)
    out.extras = {k: list(v) for k, v in g.extras.items()}
    for v in g.inputs:
        vmap[id(v)] = c = _clone_value(v, out)
        out.inputs.append(c)
    for name, v in g.initializers.items():
        vmap[id(v)] = c = vmap.get(id(v)) or _clone_value(v, out)
        out.initializers[name] = c
    for name, v in g.sparse_initializers.items():
        vmap[id(v)] = c = vmap.get(id(v)) or _clone_value(v, out)
        out.sparse_initializers[name] = c
    for node in g.nodes:
        outputs = [_clone_value(v, out) for v in node.outputs]
        for old, new in zip(node.outputs, outputs):
            vmap[id(old)] = new
        attrs = {k: _clone_attr(a, out, vmap) for k, a in node.attrs.items()}
        inputs = [None if v is None else vmap[id(v)] for v in node.inputs]
        copy = Node(node.op_type, inputs, outputs, domain=node.domain, name=node.name, overload=node.overload)
        copy.attrs = attrs
        copy.doc_string, copy.metadata_props = node.doc_string, dict(node.metadata_props)
        copy.graph = out
        out.nodes.append(copy)
    out.outputs = [vmap[id(v)] for v in g.outputs]
    out.value_info = [vmap[id(v)] for v in g.value_info if id(v) in vmap]
    return out


def _clone_attr(a: Attr, parent: Graph, vmap: dict[int, Value]) -> Attr:
    if a.type == ATTR_GRAPH:
        return dataclasses.replace(a, value=_clone_graph(a.value, parent, vmap))
    if a.type == ATTR_GRAPHS:
        return dataclasses.replace(a, value=[_clone_graph(s, parent, vmap) for s in a.value])
    if isinstance(a.value, list):
        return Attr(a.name, a.type, list(a.value), a.doc_string, a.ref_attr_name)
    return Attr(a.name, a.type, a.value, a.doc_string, a.ref_attr_name)
