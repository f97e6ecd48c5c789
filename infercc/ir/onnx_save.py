"""Saving models to disk, with external data streamed tensor by tensor (models over 2 GB)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import onnx

from ..errors import ModelLoadError
from .dtypes import DType
from .graph import Graph
from .model import Model
from .onnx_export import to_proto
from .tensor import Tensor
from .value import Value

#: Initializers at least this large go to the external data file when saving with external data.
EXTERNAL_THRESHOLD = 1024
#: Above this many bytes of weights a model cannot be one protobuf message (hard 2 GiB limit).
PROTO_LIMIT = 2_000_000_000


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
