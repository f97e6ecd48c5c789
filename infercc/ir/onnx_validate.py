"""Checks of a parsed ONNX file that must pass before the IR is built from it.

Files from users are hostile or broken: a name that is not UTF-8, an initializer of a data type
that does not exist, data shorter than its dims, a graph that feeds a node its own output. Each
would otherwise surface as a TypeError, ValueError or KeyError deep inside the importer, a pass or
onnxruntime; here each becomes one ModelLoadError naming the element and the fix.
"""

from __future__ import annotations

import math

import onnx

from ..errors import ModelLoadError
from .dtypes import DType
from .graph import Graph
from .node import Node

_REEXPORT = "the file is corrupt or its exporter is broken; re-export it"


# ----------------------------------------------------------------------------- text fields
#: Per message type: its string fields and its message fields, each as (name, repeated).
_LAYOUT: dict[object, tuple[list[tuple[str, bool]], list[tuple[str, bool]]]] = {}


def _layout(desc) -> tuple[list[tuple[str, bool]], list[tuple[str, bool]]]:
    found = _LAYOUT.get(desc)
    if found is None:
        strings, messages = [], []
        for f in desc.fields:
            # (protobuf's descriptor constants, read off the field: protobuf is onnx's dependency, not ours)
            repeated = f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED
            if f.type == f.TYPE_STRING:
                strings.append((f.name, repeated))
            elif f.type == f.TYPE_MESSAGE:
                messages.append((f.name, repeated))
        found = _LAYOUT[desc] = (strings, messages)
    return found


def check_text(proto: onnx.ModelProto) -> None:
    """Every string field (names, op types, domains, attribute names, doc strings, external data
    locations) must be UTF-8. The upb protobuf runtime hands invalid ones back as bytes, other
    runtimes raise on access; either way the importer would crash on them later.

    Bytes fields (raw tensor data, string attributes) are not touched: reading them copies them.
    Paths are only spelled out on error: this walk visits every message of the model."""
    _check_message(proto, None)


def _check_message(msg, trail: tuple | None) -> None:
    """``trail`` is (parent trail, parent message, field step): a linked list, cheap to extend."""
    strings, messages = _layout(msg.DESCRIPTOR)
    for name, repeated in strings:
        try:
            values = getattr(msg, name) if repeated else (getattr(msg, name),)
            bad = next(((i, v) for i, v in enumerate(values) if not isinstance(v, str)), None)
        except UnicodeDecodeError:  # the C++ and pure-Python runtimes raise on access
            bad = (0, b"?")
        if bad is not None:
            _text_error((trail, msg, f"{name}[{bad[0]}]" if repeated else name), bad[1])
    for name, repeated in messages:
        if repeated:
            for i, sub in enumerate(getattr(msg, name)):
                _check_message(sub, (trail, msg, f"{name}[{i}]"))
        elif msg.HasField(name):
            _check_message(getattr(msg, name), (trail, msg, name))


def _text_error(link: tuple, value: bytes) -> None:
    trail: list[tuple[object, str]] = []
    while link is not None:
        link, msg, step = link
        trail.insert(0, (msg, step))
    field = "model." + ".".join(step for _, step in trail)
    context = "the model"
    for i, (msg, _) in enumerate(trail):
        described = _describe(msg, "model." + ".".join(step for _, step in trail[:i]))
        context = described or context
    raise ModelLoadError(
        f"{field} (in {context}) is not valid UTF-8 text ({bytes(value)[:40]!r}): ONNX names and strings "
        f"must be UTF-8; {_REEXPORT}."
    )


def _describe(msg, field: str) -> str | None:
    """How a message is named in an error: 'node 'attn' (Attention)', 'initializer 'w''..."""
    kind = msg.DESCRIPTOR.name
    try:
        if kind == "NodeProto":
            name, op = msg.name, msg.op_type
            label = f"node {name!r}" if isinstance(name, str) and name else f"the node at {field}"
            return f"{label} ({op})" if isinstance(op, str) else label
        if kind in ("TensorProto", "ValueInfoProto", "GraphProto", "FunctionProto"):
            label = {"TensorProto": "tensor", "ValueInfoProto": "value", "GraphProto": "graph",
                     "FunctionProto": "function"}[kind]
            name = msg.name
            return f"{label} {name!r}" if isinstance(name, str) else f"the {label} at {field}"
    except UnicodeDecodeError:
        return f"the element at {field}"
    return None


# ----------------------------------------------------------------------------- tensors and types
#: Data types ONNX defines that the IR cannot hold yet (2- and 6-bit packings, e8m0 scales).
_UNSUPPORTED = {t for t in onnx.TensorProto.DataType.values() if t not in DType._value2member_map_}
_PACKED4 = {DType.INT4, DType.UINT4, DType.FLOAT4E2M1}
_COMPLEX = {DType.COMPLEX64, DType.COMPLEX128}


def check_dtype(code: int, what: str) -> DType:
    """``code`` as a DType, or a ModelLoadError saying why it is not one."""
    if code == onnx.TensorProto.UNDEFINED:
        raise ModelLoadError(f"{what} has no data type (0, UNDEFINED): {_REEXPORT}.")
    if code in _UNSUPPORTED:
        raise ModelLoadError(
            f"{what} has data type {onnx.TensorProto.DataType.Name(code)} ({code}), which infercc does not "
            "support yet: convert it to a supported type (float, float16, bfloat16, int8, int4, ...) before compiling."
        )
    if code not in DType._value2member_map_:
        raise ModelLoadError(f"{what} has data type {code}, which is not an ONNX data type: {_REEXPORT}.")
    return DType(code)


def check_tensors(proto: onnx.ModelProto) -> None:
    """Initializers and tensor attributes: a known data type, dims >= 0, and inline data exactly as
    long as the dims say (onnxruntime refuses short data at session creation; numpy fails on it
    with a reshape error). External data is checked by ``tensor.external_file``."""
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        what = f"initializer {tensor.name!r}" if tensor.name else "a tensor attribute"
        dtype = check_dtype(tensor.data_type, what)
        dims = list(tensor.dims)
        if any(d < 0 for d in dims):
            raise ModelLoadError(f"{what} has negative dims {dims}: {_REEXPORT}.")
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        count = math.prod(dims)
        if tensor.HasField("raw_data"):
            if dtype == DType.STRING:
                raise ModelLoadError(f"{what} is a string tensor stored as raw bytes, which ONNX forbids: {_REEXPORT}.")
            got, want, unit = len(tensor.raw_data), math.ceil(count * dtype.itemsize), "bytes"
        else:
            field = onnx.helper.tensor_dtype_to_field(int(dtype))
            got, unit = len(getattr(tensor, field)), f"entries in {field}"
            want = math.ceil(count / 2) if dtype in _PACKED4 else 2 * count if dtype in _COMPLEX else count
        if got != want:
            raise ModelLoadError(
                f"{what} has dims {dims} of {dtype}, which need {want} {unit}, but it holds {got}: the data "
                f"is {'short' if got < want else 'too long'}; {_REEXPORT}."
            )


def check_sparse(graph: onnx.GraphProto) -> None:
    """Sparse tensors are carried through verbatim, so their external data would be resolved by
    whoever reads the exported model, relative to wherever that is: refuse it instead."""
    sparse = list(graph.sparse_initializer)
    for node in graph.node:
        for attr in node.attribute:
            sparse += ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                check_sparse(sub)
    for sp in sparse:
        for part in (sp.values, sp.indices):
            if part.data_location == onnx.TensorProto.EXTERNAL:
                raise ModelLoadError(
                    f"sparse tensor {sp.values.name!r} in graph {graph.name!r} keeps its data in an external file, "
                    "which infercc does not support: store sparse tensors inline (or as dense initializers)."
                )


#: The largest fixed size a graph input may declare for one axis. A transformer's inputs never come
#: near it; a file that declares more is corrupt or hostile, and onnx's shape inference, which
#: materializes shape computations (a Range over that length), would hang or exhaust memory on it.
MAX_INPUT_DIM = 1 << 30


def check_value_types(graph: onnx.GraphProto) -> None:
    """Declared tensor types of inputs, outputs and value_info must name real data types; a graph
    input's fixed dims must be >= 0 and at most MAX_INPUT_DIM."""
    for info in (*graph.input, *graph.output, *graph.value_info):
        tt = info.type.tensor_type if info.type.HasField("tensor_type") else None
        if tt is not None and tt.elem_type:
            check_dtype(tt.elem_type, f"value {info.name!r} in graph {graph.name!r}")
    for info in graph.input:
        tt = info.type.tensor_type if info.type.HasField("tensor_type") else None
        dims = [d.dim_value for d in tt.shape.dim if d.HasField("dim_value")] if tt is not None and tt.HasField("shape") else []
        bad = next((d for d in dims if not 0 <= d <= MAX_INPUT_DIM), None)
        if bad is not None:
            raise ModelLoadError(
                f"input {info.name!r} of graph {graph.name!r} declares an axis of {bad} entries; fixed input "
                f"dims must be between 0 and {MAX_INPUT_DIM:,} (give a variable size a symbolic name, "
                f"dim_param): {_REEXPORT}."
            )
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                check_value_types(sub)


# ----------------------------------------------------------------------------- cycles
def check_acyclic(graph: Graph) -> None:
    """Nodes may come in any order (onnxruntime sorts them), but a node that depends on its own
    output, directly or through others, can never run. Nothing is reordered: files round-trip as
    written."""
    for sub in (s for node in graph.nodes for s in node.subgraphs()):
        check_acyclic(sub)
    producers = {id(n): {id(p) for p in graph._local_producers(n)} for n in graph.nodes}
    by_id = {id(n): n for n in graph.nodes}
    users: dict[int, list[int]] = {k: [] for k in producers}
    pending = {k: len(v) for k, v in producers.items()}
    for k, deps in producers.items():
        for d in deps:
            users[d].append(k)
    ready = [k for k, n in pending.items() if n == 0]
    while ready:
        for user in users[ready.pop()]:
            pending[user] -= 1
            if pending[user] == 0:
                ready.append(user)
    stuck = [k for k, n in pending.items() if n > 0]
    if not stuck:
        return
    cycle = _cycle(stuck[0], producers, set(stuck))
    names = " -> ".join(_label(by_id[k]) for k in cycle)
    what = "reads its own output" if len(cycle) == 2 else f"is part of a cycle: {names}"
    raise ModelLoadError(
        f"graph {graph.name!r}: node {_label(by_id[cycle[0]])} {what}; a graph with a cycle can never "
        f"run (ONNX graphs must be acyclic); {_REEXPORT}."
    )


def _cycle(start: int, producers: dict[int, set[int]], stuck: set[int]) -> list[int]:
    """A closed path through ``start``'s stuck ancestors, as node ids (first == last)."""
    path, seen, node = [], {}, start
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = next(p for p in producers[node] if p in stuck)
    loop = path[seen[node]:] + [node]
    return list(reversed(loop))


def _label(node: Node) -> str:
    return f"{node.name!r} ({node.op_type})" if node.name else f"<unnamed {node.op_type}>"

