"""ONNX -> IR, without loss, with one clear error per way a file can be bad.

Everything a pass does not understand (functions, sparse initializers, quantization annotations,
non-tensor types, training info) is carried through verbatim, so a round trip through infercc never
costs a user part of their model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import defs

from ..errors import ModelLoadError
from .dtypes import DType
from .graph import Graph
from .model import Model
from .node import Attr, Node
from .onnx_validate import check_acyclic, check_sparse, check_tensors, check_text, check_value_types
from .tensor import Tensor, external_file
from .value import Dim, Value


def load_model(source: str | os.PathLike | onnx.ModelProto, *, base_dir: str | None = None) -> Model:
    """Read an ONNX file or ModelProto into the IR, with one clear error per way it can be bad.

    A ModelProto is not copied: the IR's tensors keep referring to its TensorProtos (that is what
    makes import cheap), so do not edit the proto after handing it over. External data of a
    ModelProto is looked up relative to ``base_dir`` (default: the working directory)."""
    if isinstance(source, onnx.ModelProto):
        proto, base, where = source, base_dir or os.getcwd(), None
    else:
        path = Path(source)
        proto, base, where = _read_proto(path), str(path.resolve().parent), str(path)
    try:
        check_text(proto)
        _check_opsets(proto)
        check_tensors(proto)
        check_value_types(proto.graph)
        check_sparse(proto.graph)
        _check_external_data(proto, base)
        model = from_proto(proto, base)
        check_acyclic(model.graph)
    except ModelLoadError as exc:
        if where is None:
            raise
        raise ModelLoadError(f"{where}: {exc}") from None  # name the file: the CLI prints one line
    return model


def _read_proto(path: Path) -> onnx.ModelProto:
    if "\0" in str(path):
        raise ModelLoadError(f"{str(path)!r}: a path cannot contain a NUL byte; check the path.")
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file. Check the path, or export the model to ONNX first.")
    if path.is_dir():
        found = sorted(p.name for pattern in ("*.onnx", "*.gguf") for p in path.glob(pattern))[:5]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise ModelLoadError(f"{path} is a folder, not an .onnx file: pass the model file inside it{hint}.")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path} is empty (0 bytes): the export or download did not finish; produce it again.")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, or text/JSON ParseError when the suffix picks those formats
        raise ModelLoadError(
            f"{path} is not a readable ONNX model (protobuf parse failed: {' '.join(str(exc).split())[:300]}); "
            "the file is truncated or not ONNX: re-export or re-download it."
        ) from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise ModelLoadError(
            f"{path} parsed but holds no ONNX graph (no nodes, no outputs); it is probably not an ONNX "
            "model: check the file."
        )
    return proto


def _check_opsets(proto: onnx.ModelProto) -> None:
    newest = defs.onnx_opset_version()
    declared = {("" if imp.domain == "ai.onnx" else imp.domain): imp.version for imp in proto.opset_import}
    default = declared.get("")
    if default is not None and not 1 <= default <= newest:
        raise ModelLoadError(
            f"model uses opset ai.onnx v{default}, but this installation supports up to v{newest}: "
            f"upgrade the onnx and onnxruntime packages, or re-export with opset <= {newest}."
        )
    used = {("" if n.domain == "ai.onnx" else n.domain) for n in _all_nodes(proto.graph)} | {""}
    local = {f.domain for f in proto.functions}
    missing = sorted(d for d in used - set(declared) - local if d != "" or proto.graph.node)
    if missing:
        names = ", ".join(repr(d) if d else "'' (ai.onnx, the default domain)" for d in missing)
        raise ModelLoadError(
            f"model uses operator domain(s) {names} without an opset import for them: the file is "
            "malformed; re-export it with a current exporter (or add the missing opset_import entries)."
        )


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)


def _check_external_data(proto: onnx.ModelProto, base: str) -> None:
    """Every external-data reference resolves, after symbolic links, to a file inside the model's
    folder, with an offset and length that fit it (``tensor.external_file``): checked before the
    IR exists, so nothing downstream ever opens a path a hostile file chose."""
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            external_file(tensor, base)


def from_proto(proto: onnx.ModelProto, base_dir: str) -> Model:
    graph = _import_graph(proto.graph, None, [], base_dir)
    model = Model(
        graph=graph,
        opset_imports={("" if i.domain == "ai.onnx" else i.domain): i.version for i in proto.opset_import},
        ir_version=proto.ir_version,
        producer_name=proto.producer_name,
        producer_version=proto.producer_version,
        domain=proto.domain,
        model_version=proto.model_version,
        doc_string=proto.doc_string,
        metadata_props={p.key: p.value for p in proto.metadata_props},
        functions=list(proto.functions),
    )
    if proto.training_info:
        model.extras["training_info"] = list(proto.training_info)
    # How the file spelled its imports ("" set or absent, "ai.onnx"): reused on export while the
    # imports are unchanged.
    model.extras["opset_import"] = list(proto.opset_import)
    return model


def _dims(type_proto: onnx.TypeProto) -> tuple[Dim, ...] | None:
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return None
    return tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else None)
        for d in tt.shape.dim
    )


def _apply_type(value: Value, info: onnx.ValueInfoProto) -> None:
    t = onnx.TypeProto()
    t.CopyFrom(info.type)  # a copy: the caller may go on editing the proto it handed us
    if t.HasField("tensor_type"):
        if t.tensor_type.elem_type:
            value.dtype = DType(t.tensor_type.elem_type)
        value.shape = _dims(t)
        value._src_type = (value.dtype, value.shape, t)
    elif t.WhichOneof("value") is not None:
        value.type_proto = t
    value.doc_string = info.doc_string
    value.metadata_props = {p.key: p.value for p in info.metadata_props}


def _import_graph(gp: onnx.GraphProto, parent: Graph | None, scopes: list[dict[str, Value]], base: str) -> Graph:
    graph = Graph(gp.name, parent=parent)
    graph.doc_string = gp.doc_string
    graph.metadata_props = {p.key: p.value for p in gp.metadata_props}
    for field in ("sparse_initializer", "quantization_annotation"):
        if getattr(gp, field):
            graph.extras[field] = list(getattr(gp, field))
    scope: dict[str, Value] = {}
    for tp in gp.initializer:
        value = Value(graph.names.claim(tp.name), const=Tensor(proto=tp, base_dir=base))
        value.graph = graph
        graph.initializers[tp.name] = scope[tp.name] = value
    for sp in gp.sparse_initializer:
        name = sp.values.name
        value = Value(graph.names.claim(name), sp.values.data_type or None, tuple(sp.dims))
        value.graph = graph
        graph.sparse_initializers[name] = scope[name] = value
    for info in gp.input:
        value = scope.get(info.name) or Value(graph.names.claim(info.name))
        value.graph = graph
        _apply_type(value, info)
        graph.inputs.append(value)
        scope[info.name] = value
    for np_ in gp.node:
        for name in np_.output:
            if name:
                if name in scope:
                    raise ModelLoadError(
                        f"value {name!r} in graph {gp.name!r} is defined twice (node {np_.name or np_.op_type!r} "
                        "writes a name already taken by an input, initializer or another node): ONNX requires "
                        "each name to be assigned once; the model is malformed, re-export it."
                    )
                scope[name] = Value(graph.names.claim(name))
    chain = [scope, *scopes]

    def lookup(name: str) -> Value:
        for s in chain:
            if name in s:
                return s[name]
        raise ModelLoadError(
            f"node input {name!r} in graph {gp.name!r} is produced by no node, input or initializer: "
            "the model is malformed; re-export it."
        )

    for np_ in gp.node:
        outputs = []
        for name in np_.output:
            outputs.append(scope[name] if name else Value(graph.names.fresh("unused_output")))
        node = Node(
            np_.op_type, [lookup(n) if n else None for n in np_.input], outputs,
            domain=np_.domain, name=np_.name, overload=np_.overload,
        )
        # Trailing empty outputs are meaningful as "absent"; mark them so export restores "".
        for v, name in zip(outputs, np_.output):
            if not name:
                v.metadata_props["infercc.absent"] = "1"
        node.doc_string = np_.doc_string
        node.metadata_props = {p.key: p.value for p in np_.metadata_props}
        node.attrs = {a.name: _import_attr(a, graph, chain, base) for a in np_.attribute}
        node.graph = graph
        for v in outputs:
            v.graph = graph
        graph.nodes.append(node)
    for info in gp.value_info:
        if info.name in scope:
            _apply_type(scope[info.name], info)
            graph.value_info.append(scope[info.name])
    for info in gp.output:
        value = lookup(info.name)
        if value.graph is graph:
            _apply_type(value, info)
        graph.outputs.append(value)
    return graph


def _import_attr(a: onnx.AttributeProto, graph: Graph, scopes: list[dict[str, Value]], base: str) -> Attr:
    T = onnx.AttributeProto
    value: object
    if a.type == T.FLOAT:
        value = a.f
    elif a.type == T.INT:
        value = a.i
    elif a.type == T.STRING:
        value = _decode(a.s)
    elif a.type == T.TENSOR:
        value = Tensor(proto=a.t, base_dir=base)
    elif a.type == T.GRAPH:
        value = _import_graph(a.g, graph, scopes, base)
    elif a.type == T.SPARSE_TENSOR:
        value = a.sparse_tensor
    elif a.type == T.TYPE_PROTO:
        value = a.tp
    elif a.type == T.FLOATS:
        value = list(a.floats)
    elif a.type == T.INTS:
        value = list(a.ints)
    elif a.type == T.STRINGS:
        value = [_decode(s) for s in a.strings]
    elif a.type == T.TENSORS:
        value = [Tensor(proto=t, base_dir=base) for t in a.tensors]
    elif a.type == T.GRAPHS:
        value = [_import_graph(g, graph, scopes, base) for g in a.graphs]
    elif a.type == T.SPARSE_TENSORS:
        value = list(a.sparse_tensors)
    elif a.type == T.TYPE_PROTOS:
        value = list(a.type_protos)
    else:
        value = None
    return Attr(a.name, a.type, value, a.doc_string, a.ref_attr_name)


def _decode(s: bytes) -> str | bytes:
    try:
        return s.decode("utf-8")
    except UnicodeDecodeError:
        return s
