"""Constant tensors (initializers and tensor attributes).

A tensor keeps the TensorProto it was imported from until someone asks for its numbers, so that a
model round-trips byte for byte and a multi-gigabyte external-data model is never read whole into
memory just to be re-exported: external data is memory-mapped on first use.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .dtypes import DType


class Tensor:
    """Immutable constant data; passes create a new Tensor rather than editing one in place."""

    __slots__ = ("_array", "_proto", "_base_dir", "_dtype", "_shape", "name", "doc_string")

    def __init__(
        self,
        array: np.ndarray | None = None,
        *,
        proto: onnx.TensorProto | None = None,
        base_dir: str | None = None,
        name: str = "",
    ) -> None:
        if (array is None) == (proto is None):
            raise ValueError("Tensor needs exactly one of array or proto")
        self._array = None if array is None else np.asarray(array)
        self._proto = proto
        self._base_dir = base_dir
        self.name = name or (proto.name if proto is not None else "")
        self.doc_string = proto.doc_string if proto is not None else ""
        if proto is not None:
            self._dtype = DType(proto.data_type)
            self._shape = tuple(int(d) for d in proto.dims)
        else:
            self._dtype = DType.from_numpy(self._array.dtype)
            self._shape = tuple(self._array.shape)

    @property
    def dtype(self) -> DType:
        return self._dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def size(self) -> int:
        return int(np.prod(self._shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes of the data as ONNX stores it (4-bit types pack two to a byte, rounding up)."""
        return math.ceil(self.size * self._dtype.itemsize)

    @property
    def is_external(self) -> bool:
        return self._proto is not None and self._proto.data_location == onnx.TensorProto.EXTERNAL

    @property
    def external_location(self) -> tuple[str, int, int | None] | None:
        """(absolute file, offset, length) of external data, or None for inline data."""
        if not self.is_external:
            return None
        info = {e.key: e.value for e in self._proto.external_data}
        path = os.path.join(self._base_dir or "", info["location"])
        length = int(info["length"]) if "length" in info else None
        return path, int(info.get("offset", 0)), length

    def numpy(self) -> np.ndarray:
        """The data as a read-only array (memory-mapped for external data)."""
        if self._array is None:
            self._array = self._load()
            self._array.flags.writeable = False
        return self._array

    def _load(self) -> np.ndarray:
        loc = self.external_location
        if loc is None:
            return numpy_helper.to_array(self._proto)
        path, offset, _ = loc
        np_dtype = self._dtype.numpy
        if self._dtype.itemsize < 1 or self._dtype == DType.STRING:
            # Packed 4-bit and string data have no direct memmap layout: go through onnx.
            proto = onnx.TensorProto()
            proto.CopyFrom(self._proto)
            onnx.external_data_helper.load_external_data_for_tensor(proto, self._base_dir or "")
            return numpy_helper.to_array(proto)
        if self.size == 0:
            return np.zeros(self._shape, np_dtype)
        return np.memmap(path, dtype=np_dtype, mode="r", offset=offset, shape=self._shape)

    def to_proto(self, name: str) -> onnx.TensorProto:
        """A TensorProto with the data inline; the imported proto is reused when nothing changed."""
        if self._proto is not None and not self.is_external:
            if self._proto.name == name:
                return self._proto
            proto = onnx.TensorProto()
            proto.CopyFrom(self._proto)
            proto.name = name
            return proto
        array = self.numpy()
        proto = numpy_helper.from_array(_contiguous(array), name)  # keeps 0-d arrays 0-d
        if self._dtype != DType.from_numpy(array.dtype):  # e.g. bfloat16 stored via ml_dtypes
            proto.data_type = int(self._dtype)
        if self.doc_string:
            proto.doc_string = self.doc_string
        return proto

    def raw_bytes(self) -> bytes:
        """Little-endian raw bytes as ONNX stores them (used for external data files)."""
        if self._proto is not None and not self.is_external and self._proto.HasField("raw_data"):
            return self._proto.raw_data
        if self._dtype.itemsize < 1:
            # Packed 4-bit: the imported proto may hold int32_data, so pack from the values.
            return numpy_helper.from_array(np.asarray(self.numpy())).raw_data
        return _contiguous(self.numpy()).astype(self._dtype.numpy.newbyteorder("<")).tobytes()

    def __repr__(self) -> str:
        where = "external" if self.is_external else "inline"
        return f"Tensor({self.name!r}, {self._dtype}, {list(self._shape)}, {where})"


def _contiguous(array: np.ndarray) -> np.ndarray:
    """np.ascontiguousarray turns 0-d arrays into 1-d ones; this does not."""
    return array if array.flags.c_contiguous else np.array(array, order="C")


def const(values: np.ndarray | Sequence | int | float, dtype: np.dtype | type | None = None) -> Tensor:
    """Shorthand for passes that create small constants."""
    return Tensor(np.asarray(values, dtype=dtype))
