"""Initializer data moved out of the process's anonymous memory once a runtime holds its own copy.

Why: the generated-C runtime packs every weight into its weight blob (codegen/packing.py), and the
IR's arrays are then a second copy of the model that no kernel reads, yet save(), the speculation
heads (EAGLE, Medusa and self-draft read the LM head and the embeddings), LoRA and the ONNX Runtime
fallback still need them. :func:`offload` writes each large in-memory initializer once into an
unlinked temporary file and holds a read-only memory map of it instead: the same values for every
reader, paged in when read (and reclaimable), no longer resident. Initializers that are maps
already (the external data of a loaded model) only get their read pages dropped (clean file pages
come back from the file when read again).
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import tempfile
from collections.abc import Iterator

import numpy as np

from .dtypes import DType
from .graph import Graph
from .model import Model
from .onnx_save import _graphs
from .tensor import Tensor

#: Initializers smaller than this stay as they are (norm weights, shapes: not worth a mapping).
MIN_BYTES = 1 << 16
_ALIGN = 64


def offload(model: Model, directory: str | None = None, min_bytes: int = MIN_BYTES) -> int:
    """Move ``model``'s initializers of at least ``min_bytes`` out of anonymous memory (into a
    temporary file in ``directory``, default the system's temporary folder); the bytes moved."""
    gc.collect()  # the passes' dead snapshots (reference cycles) may still hold views of the imported weights
    moved: list[Tensor] = []
    mappings: dict[int, mmap.mmap] = {}
    for tensor in _tensors(model.graph):
        array = tensor.loaded
        if tensor.nbytes < min_bytes or (array is None and tensor.is_external):
            continue  # small, or external data never read: nothing of it is resident
        if isinstance(array, np.memmap):
            mapping = getattr(array, "_mmap", None)
            if isinstance(mapping, mmap.mmap):
                mappings[id(mapping)] = mapping
        elif tensor.dtype.itemsize >= 1 and tensor.dtype != DType.STRING and not tensor.is_external:
            moved.append(tensor)
    for mapping in mappings.values():
        _drop_pages(mapping)
    if moved:
        _spill(moved, directory)
    _trim()
    return sum(t.nbytes for t in moved)


def _tensors(graph: Graph) -> Iterator[Tensor]:
    seen: set[int] = set()
    for g in _graphs(graph):
        for value in g.initializers.values():
            if value.const is not None and id(value.const) not in seen:
                seen.add(id(value.const))
                yield value.const


def _spill(tensors: list[Tensor], directory: str | None) -> None:
    """Write the tensors into one unlinked file (it lives as long as its mapping) and remap each."""
    places = []
    with tempfile.TemporaryFile(prefix="infercc-weights-", dir=directory) as f:
        at = 0
        for tensor in tensors:
            data = np.ascontiguousarray(tensor.numpy())
            if DType.from_numpy(data.dtype) != tensor.dtype:
                continue  # a type numpy spells otherwise (bfloat16 as float32?): left as it is
            f.write(b"\0" * (-at % _ALIGN))
            at += -at % _ALIGN
            f.write(memoryview(data.reshape(-1)).cast("B"))
            places.append((tensor, at, data.dtype))
            at += data.nbytes
        if not places:
            return
        f.flush()
        whole = np.memmap(f, dtype=np.uint8, mode="r", shape=(at,))
    for tensor, offset, dtype in places:
        size = tensor.size * dtype.itemsize
        tensor.remap(whole[offset:offset + size].view(dtype).reshape(tensor.shape))


def _drop_pages(mapping: mmap.mmap) -> None:
    """Give back the resident pages of a read-only file mapping (read again from the file when used)."""
    if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mapping.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # a closed or unusual mapping: its pages stay (harmless)
            pass


def _trim() -> None:
    """Return freed heap memory to the system (glibc keeps freed chunks below its mmap threshold)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
