"""Import from and export to ONNX without loss.

Everything a pass does not understand (functions, sparse initializers, quantization annotations,
non-tensor types, training info) is carried through verbatim, so a round trip through infercc never
costs a user part of their model.
"""

from __future__ import annotations

import math
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
from .tensor import Tensor
from .value import Dim, Value

#: Initializers at least this large go to the external data file when saving with external data.
EXTERNAL_THRESHOLD = 1024
#: Above this many bytes of weights a model cannot be one protobuf message (hard 2 GiB limit).
PROTO_LIMIT = 2_000_000_000


# ---------------------------------------------------------------------------------------- import
def load_model(source: str | os.PathLike | onnx.ModelProto, *, base_dir: str | None = None) -> Model:
    """Read an ONNX file or ModelProto into the IR, with one clear error per way it can be bad.

    A ModelProto is not copied: the IR's tensors keep referring to its TensorProtos (that is what
    makes import cheap), so do not edit the proto after handing it over. External data of a
    ModelProto is looked up relative to ``base_dir`` (default: the working directory)."""
    if isinstance(source, onnx.ModelProto):
        proto, base = source, base_dir or os.getcwd()
    else:
        path = Path(source)
        proto, base = _read_proto(path), str(path.resolve().parent)
    _check_opsets(proto)
    _check_external_data(proto, base)
    return from_proto(proto, base)


def _read_proto(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file. Check the path, or export the model to ONNX first.")
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.onnx"))[:5]
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
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        norm = os.path.normpath(location) if location else ""
        if os.path.isabs(location) or norm == ".." or norm.startswith(".." + os.sep):
            raise ModelLoadError(
                f"initializer {tensor.name!r} keeps its data at {location!r}, outside the model's folder: onnx "
                "and onnxruntime refuse such paths; move the data file next to the .onnx file and make its "
                "location relative."
            )
        path = os.path.join(base, location)
        if not location or not os.path.isfile(path):
            raise ModelLoadError(
                f"initializer {tensor.name!r} keeps its data in external file {location!r}, which is missing "
                f"from {base}: put the data file next to the .onnx file (same relative path)."
            )
        length = info.get("length")
        if length is None and tensor.data_type not in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            size = 1
            for d in tensor.dims:
                size *= d
            length = math.ceil(size * DType(tensor.data_type).itemsize)
        end = int(info.get("offset", 0)) + int(length or 0)
        if os.path.getsize(path) < end:
            raise ModelLoadError(
                f"external data file {path} is {os.path.getsize(path)} bytes but initializer {tensor.name!r} "
                f"needs bytes up to {end}: the data file is truncated; copy it again."
            )


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


# ---------------------------------------------------------------------------------------- export
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


def _export_tensor(t: Tensor, name: str, with_data: bool | str) -> onnx.TensorProto:
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
    gp.initializer.extend(_export_tensor(v.const, v.name, with_data) for v in graph.initializers.values())
    declared = {id(v) for v in graph.inputs} | {id(v) for v in graph.outputs}
    if graph.value_info:
        defined = {id(v) for v in graph.values()}
        for v in graph.value_info:
            if id(v) in defined:
                gp.value_info.append(_value_info(v))
                declared.add(id(v))
    for node in graph.nodes:
        gp.node.append(_export_node(node, with_data))
        for v in node.outputs:
            if id(v) not in declared and (v.dtype is not None or v.type_proto is not None):
                if not v.metadata_props.get("infercc.absent"):
                    gp.value_info.append(_value_info(v))
    gp.output.extend(_value_info(v) for v in graph.outputs)
    for field, items in graph.extras.items():
        getattr(gp, field).extend(items)
    return gp


def _export_node(node: Node, with_data: bool) -> onnx.NodeProto:
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
    np_.attribute.extend(_export_attr(a, with_data) for a in node.attrs.values())
    return np_


def _export_attr(a: Attr, with_data: bool) -> onnx.AttributeProto:
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


def weight_bytes(model: Model) -> int:
    return sum(v.const.nbytes for g in _graphs(model.graph) for v in g.initializers.values())


def _graphs(graph: Graph) -> Iterator[Graph]:
    yield graph
    for node in graph.nodes:
        for sub in node.subgraphs():
            yield from _graphs(sub)


def save_model(model: Model, path: str | os.PathLike, *, external_data: bool | None = None) -> list[str]:
    """Write ``model`` to ``path``. With external data (the default above 2 GB, or when asked),
    every initializer of at least EXTERNAL_THRESHOLD bytes is streamed into ``<name>.data`` beside
    it, one tensor at a time, so saving never needs the whole model in memory. Returns the files.

    Saving over the files the model was loaded from is safe: the new data goes to a temporary file
    that replaces the old one only once complete, and the model's tensors that lived in the old file
    are re-pointed at their new place in the new one (the few that were inlined are read first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    initializers = [v for g in _graphs(model.graph) for v in g.initializers.values()]
    if external_data is None:
        external_data = weight_bytes(model) > PROTO_LIMIT or any(v.const.is_external for v in initializers)
    if not external_data:
        proto = to_proto(model, inline_external=True)
        _write_atomic(path, proto.SerializeToString())
        return [str(path)]
    data_name = path.name + ".data"
    data_path = path.parent / data_name
    proto = to_proto(model, with_data=False)
    by_name = {v.name: v.const for v in initializers}
    offset = 0
    written: list[tuple[Tensor, int, int]] = []
    tmp = path.parent / (data_name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for tp in onnx.external_data_helper._get_initializer_tensors(proto):
                tensor = by_name.get(tp.name)
                if tensor is None:
                    continue
                if tensor.nbytes < EXTERNAL_THRESHOLD or tensor.dtype == DType.STRING:
                    tp.CopyFrom(tensor.to_proto(tp.name))
                    continue
                pad = (-offset) % 64  # aligned so the file can be memory-mapped efficiently
                f.write(b"\0" * pad)
                offset += pad
                length = _write_tensor_data(f, tensor)
                del tp.external_data[:]
                tp.ClearField("raw_data")
                tp.data_location = onnx.TensorProto.EXTERNAL
                for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                    tp.external_data.add(key=k, value=v)
                written.append((tensor, offset, length))
                offset += length
        _repoint_sources(initializers, data_path, written)
        os.replace(tmp, data_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _write_atomic(path, proto.SerializeToString())
    return [str(path), str(data_path)]


def _write_tensor_data(f, tensor: Tensor, chunk: int = 64 << 20) -> int:
    """Append the tensor's raw little-endian bytes to ``f``; external data is copied from its file in
    chunks (never whole in memory). Returns the number of bytes written."""
    loc = tensor.external_location
    if loc is not None and loc[2] is not None and tensor._array is None:
        src, start, length = loc
        with open(src, "rb") as s:
            s.seek(start)
            left = length
            while left:
                block = s.read(min(chunk, left))
                if not block:
                    raise ModelLoadError(f"external data file {src} ended early while copying {tensor.name!r}")
                f.write(block)
                left -= len(block)
        return length
    raw = tensor.raw_bytes()
    f.write(raw)
    return len(raw)


def _repoint_sources(initializers: list[Value], data_path: Path, written: list[tuple[Tensor, int, int]]) -> None:
    """Called just before ``data_path`` is replaced: tensors whose data lives in it would read the new
    file at their old offsets afterwards. Those written to the new file are re-pointed at their new
    offset (same bytes, still lazy); the others (inlined small ones) are read now."""
    if not data_path.exists():
        return

    def in_old_file(t: Tensor) -> bool:
        loc = t.external_location
        return loc is not None and os.path.exists(loc[0]) and os.path.samefile(loc[0], data_path)

    moved = set()
    for tensor, offset, length in written:
        if id(tensor) in moved or not in_old_file(tensor):
            continue
        moved.add(id(tensor))
        proto = onnx.TensorProto()
        proto.CopyFrom(tensor._proto)
        del proto.external_data[:]
        for k, v in (("location", data_path.name), ("offset", str(offset)), ("length", str(length))):
            proto.external_data.add(key=k, value=v)
        tensor._proto, tensor._base_dir = proto, str(data_path.parent.resolve())
    for v in initializers:
        if id(v.const) not in moved and in_old_file(v.const):
            v.const.numpy()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
