"""IR -> ONNX ModelProto, reproducing the imported file exactly when nothing changed."""

from __future__ import annotations

import onnx

from .graph import Graph
from .model import Model
from .node import ATTR_GRAPH, ATTR_GRAPHS, Attr, Node
from .tensor import Tensor
from .value import Value


def to_proto(model: Model, *, with_data: bool = True, inline_external: bool = False) -> onnx.ModelProto:
    """Export to a ModelProto. ``with_data=False`` leaves initializer data out (for analyses like
    shape inference that only need types); external tensors keep their external references unless
    ``inline_external`` (for handing a < 2 GB model to a runtime as bytes)."""
    proto = _make(
        onnx.ModelProto,
        ir_version=model.ir_version,
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        domain=model.domain,
        model_version=model.model_version,
        doc_string=model.doc_string,
    )
    proto.opset_import.extend(_opset_import(model))
    for k, v in model.metadata_props.items():
        proto.metadata_props.add(key=k, value=v)
    proto.graph.CopyFrom(_export_graph(model.graph, "inline" if inline_external else with_data))
    proto.functions.extend(model.functions)
    proto.training_info.extend(model.extras.get("training_info", []))
    return proto


def _opset_import(model: Model) -> list[onnx.OperatorSetIdProto]:
    imported = model.extras.get("opset_import", [])
    out = []
    for imp in imported:
        domain = "" if imp.domain == "ai.onnx" else imp.domain
        if model.opset_imports.get(domain) == imp.version:
            out.append(imp)
    done = {"" if imp.domain == "ai.onnx" else imp.domain for imp in out}
    for domain, version in model.opset_imports.items():
        if domain not in done:
            out.append(onnx.OperatorSetIdProto(domain=domain, version=version) if domain else
                       onnx.OperatorSetIdProto(version=version))
    return out


def _make(cls, **fields):
    """Build a proto setting only non-empty fields: proto2 records an explicitly set empty string as
    present, which would make exported files differ from their source."""
    return cls(**{k: v for k, v in fields.items() if v or (k == "op_type")})


def _value_info(value: Value) -> onnx.ValueInfoProto:
    """The value's ValueInfoProto, made again only when what it is made from changed: shape
    inference exports the whole graph several times per pass (ir/shapes.py)."""
    key = (value.name, value.dtype, value.shape, value.type_proto, value._src_type, value.doc_string,
           tuple(value.metadata_props.items()))
    cached = value._info
    if cached is not None and cached[0] == key:
        return cached[1]
    info = _make_value_info(value)
    value._info = (key, info)
    return info


def sent_type(value: Value) -> onnx.TypeProto | None:
    """The type the value's last export gave, while its dtype and shape are still the ones it was
    made from (shape inference: what onnx returns unchanged has nothing new); else None."""
    cached = value._info
    if cached is None or cached[0][1] != value.dtype or cached[0][2] != value.shape:
        return None
    return cached[1].type


def _make_value_info(value: Value) -> onnx.ValueInfoProto:
    info = _make(onnx.ValueInfoProto, name=value.name, doc_string=value.doc_string)
    src = value._src_type
    if value.type_proto is not None:
        info.type.CopyFrom(value.type_proto)
    elif src is not None and src[0] == value.dtype and src[1] == value.shape:
        info.type.CopyFrom(src[2])
    elif value.dtype is not None or value.shape is not None:
        tt = info.type.tensor_type
        tt.elem_type = int(value.dtype or 0)
        if value.shape is not None:
            shape = tt.shape
            shape.SetInParent()
            for d in value.shape:
                dim = shape.dim.add()
                if isinstance(d, int):
                    dim.dim_value = d
                elif isinstance(d, str):
                    dim.dim_param = d
    for k, v in value.metadata_props.items():
        if not k.startswith("infercc."):
            info.metadata_props.add(key=k, value=v)
    return info


def export_tensor(t: Tensor, name: str, with_data: bool | str) -> onnx.TensorProto:
    if t.is_external and with_data == "inline":
        return t.to_proto(name)
    if t.is_external:
        proto = onnx.TensorProto()
        proto.CopyFrom(t._proto)  # keep the external reference; save() rewrites it when moving data
        proto.name = name
        return proto
    if with_data:
        return t.to_proto(name)
    proto = onnx.TensorProto(name=name, data_type=int(t.dtype), dims=list(t.shape))
    if t.doc_string:
        proto.doc_string = t.doc_string
    if t.nbytes <= 64:  # tiny constants (shapes, axes) help shape inference; keep them
        return t.to_proto(name)
    return proto


def _export_graph(graph: Graph, with_data: bool) -> onnx.GraphProto:
    gp = _make(onnx.GraphProto, name=graph.name, doc_string=graph.doc_string)
    for k, v in graph.metadata_props.items():
        gp.metadata_props.add(key=k, value=v)
    gp.input.extend(_value_info(v) for v in graph.inputs)
    gp.initializer.extend(export_tensor(v.const, v.name, with_data) for v in graph.initializers.values())
    declared = {id(v) for v in graph.inputs} | {id(v) for v in graph.outputs}
    if graph.value_info:
        defined = {id(v) for v in graph.values()}
        for v in graph.value_info:
            if id(v) in defined:
                gp.value_info.append(_value_info(v))
                declared.add(id(v))
    for node in graph.nodes:
        gp.node.append(export_node(node, with_data))
        for v in node.outputs:
            if id(v) not in declared and (v.dtype is not None or v.type_proto is not None):
                if not v.metadata_props.get("infercc.absent"):
                    gp.value_info.append(_value_info(v))
    gp.output.extend(_value_info(v) for v in graph.outputs)
    for field, items in graph.extras.items():
        getattr(gp, field).extend(items)
    return gp


def export_node(node: Node, with_data: bool) -> onnx.NodeProto:
    """The node's NodeProto. For analyses (``with_data=False``) the proto is kept on the node and
    made again only when the node changed; nodes holding subgraphs are always made afresh (their
    inner nodes can change without the node noticing)."""
    if with_data or any(a.type in (ATTR_GRAPH, ATTR_GRAPHS) for a in node.attrs.values()):
        return _make_node(node, with_data)
    key = (
        node.op_type, node.domain, node.name, node.overload, node.doc_string,
        tuple(None if v is None else v.name for v in node.inputs),
        tuple((v.name, bool(v.metadata_props.get("infercc.absent")), not v.uses) for v in node.outputs),
        tuple(node.metadata_props.items()),
        tuple(node.attrs.values()),  # Attr equality: fields by value, tensors by identity
    )
    cached = node._analysis_proto
    if cached is not None and cached[0] == key:
        return cached[1]
    proto = _make_node(node, with_data)
    node._analysis_proto = (key, proto)
    return proto


def _make_node(node: Node, with_data: bool) -> onnx.NodeProto:
    np_ = _make(
        onnx.NodeProto,
        op_type=node.op_type,
        domain=node.domain,
        name=node.name,
        doc_string=node.doc_string,
        input=["" if v is None else v.name for v in node.inputs],
        output=["" if v.metadata_props.get("infercc.absent") and not v.uses else v.name for v in node.outputs],
    )
    if node.overload:
        np_.overload = node.overload
    for k, v in node.metadata_props.items():
        np_.metadata_props.add(key=k, value=v)
    np_.attribute.extend(export_attr(a, with_data) for a in node.attrs.values())
    return np_


def export_attr(a: Attr, with_data: bool) -> onnx.AttributeProto:
    T = onnx.AttributeProto
    ap = _make(onnx.AttributeProto, name=a.name, type=a.type, doc_string=a.doc_string, ref_attr_name=a.ref_attr_name)
    if a.ref_attr_name:
        return ap
    v = a.value
    if a.type == T.FLOAT:
        ap.f = v
    elif a.type == T.INT:
        ap.i = v
    elif a.type == T.STRING:
        ap.s = v.encode() if isinstance(v, str) else v
    elif a.type == T.TENSOR:
        ap.t.CopyFrom(v.to_proto(v.name))
    elif a.type == T.GRAPH:
        ap.g.CopyFrom(_export_graph(v, with_data))
    elif a.type == T.SPARSE_TENSOR:
        ap.sparse_tensor.CopyFrom(v)
    elif a.type == T.TYPE_PROTO:
        ap.tp.CopyFrom(v)
    elif a.type == T.FLOATS:
        ap.floats.extend(v)
    elif a.type == T.INTS:
        ap.ints.extend(v)
    elif a.type == T.STRINGS:
        ap.strings.extend(s.encode() if isinstance(s, str) else s for s in v)
    elif a.type == T.TENSORS:
        ap.tensors.extend(t.to_proto(t.name) for t in v)
    elif a.type == T.GRAPHS:
        ap.graphs.extend(_export_graph(g, with_data) for g in v)
    elif a.type == T.SPARSE_TENSORS:
        ap.sparse_tensors.extend(v)
    elif a.type == T.TYPE_PROTOS:
        ap.type_protos.extend(v)
    return ap
