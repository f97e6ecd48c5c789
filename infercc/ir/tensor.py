"""Constant tensors (initializers and tensor attributes).

A tensor keeps the TensorProto it was imported from until someone asks for its numbers, so that a
model round-trips byte for byte and a multi-gigabyte external-data model is never read whole into
memory just to be re-exported: external data is memory-mapped on first use.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ModelLoadError
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
        # math.prod, not np.prod: shape analyses ask for it thousands of times per compile, and
        # numpy's reduction machinery costs ~100x more per call on a short tuple.
        return math.prod(self._shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the data as ONNX stores it (4-bit types pack two to a byte, rounding up)."""
        return math.ceil(self.size * self._dtype.itemsize)

    @property
    def is_external(self) -> bool:
        return self._proto is not None and self._proto.data_location == onnx.TensorProto.EXTERNAL

    @property
    def external_location(self) -> tuple[str, int, int | None] | None:
        """(real path of the file, offset, length) of external data, or None for inline data.
        Checked on every call (see ``external_file``), because the files can change between import
        and the moment they are read or copied."""
        if not self.is_external:
            return None
        return external_file(self._proto, self._base_dir or os.getcwd())

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
        path, offset, length = loc
        np_dtype = self._dtype.numpy
        if self._dtype.itemsize < 1 or self._dtype == DType.STRING:
            # Packed 4-bit and string data have no direct memmap layout: read the checked bytes
            # ourselves (onnx's loader would resolve the location again, unchecked).
            proto = onnx.TensorProto()
            proto.CopyFrom(self._proto)
            del proto.external_data[:]
            proto.data_location = onnx.TensorProto.DEFAULT
            with open(path, "rb") as f:
                f.seek(offset)
                proto.raw_data = f.read() if length is None else f.read(length)
            return numpy_helper.to_array(proto)
        if self.size == 0:
            return np.zeros(self._shape, np_dtype)
        return np.memmap(path, dtype=np_dtype, mode="r", offset=offset, shape=self._shape)

    @property
    def loaded(self) -> np.ndarray | None:
        """The array ``numpy()`` made so far, or None when the data was never asked for."""
        return self._array

    def remap(self, array: np.ndarray) -> None:
        """Hold ``array`` (a read-only memory map of a copy of this tensor's values, ir/offload.py)
        in place of the data held now, which is then freed (the imported proto's bytes included).
        The values must be equal: this is a move, not an edit (passes still make new Tensors)."""
        if array.shape != self._shape or DType.from_numpy(array.dtype) != self._dtype or self.is_external:
            raise ValueError(f"remap of {self!r} needs an array of shape {list(self._shape)} and type {self._dtype}")
        array.flags.writeable = False
        self._array, self._proto = array, None

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


_WHOLE_NUMBER = re.compile(r"[0-9]+")


def external_file(proto: onnx.TensorProto, base_dir: str) -> tuple[str, int, int | None]:
    """The (real path, offset, length) of a tensor's external data, or a ModelLoadError.

    Files from users are hostile: the location must stay inside ``base_dir`` once symbolic links
    are resolved (onnxruntime's rule; a link to /etc/passwd must not end up in a compiled model),
    and offset and length must be whole numbers that fit the file, checked before anything is
    read or memory-mapped. ``length`` is None only for string tensors stored without one."""
    name = proto.name
    info = {e.key: e.value for e in proto.external_data}
    location = info.get("location", "")

    def bad(problem: str, fix: str = "the model is malformed; re-export it") -> ModelLoadError:
        return ModelLoadError(f"initializer {name!r} {problem}: {fix}.")

    if not location:
        raise bad("is marked as external data but names no file (no 'location' entry)")
    if "\0" in location:
        raise bad(f"keeps its data at {location!r}, a path containing a NUL byte", "the file is corrupt; re-export it")
    norm = os.path.normpath(location)
    if os.path.isabs(location) or norm == ".." or norm.startswith(".." + os.sep):
        raise bad(
            f"keeps its data at {location!r}, outside the model's folder (onnx and onnxruntime refuse such paths)",
            "move the data file next to the .onnx file and make its location relative",
        )
    root = os.path.realpath(base_dir)
    path = os.path.realpath(os.path.join(root, location))
    if os.path.commonpath([root, path]) != root:
        link, target = _first_link(root, location)
        raise bad(
            f"keeps its data at {location!r}, but {link!r} is a symbolic link to {target!r}, which leads outside "
            f"the model's folder {root} (onnxruntime refuses such data too)",
            "copy the data file itself into the model's folder in place of the link",
        )
    if not os.path.isfile(path):
        raise bad(
            f"keeps its data in external file {location!r}, which is missing from {root} (or is not a regular file)",
            "put the data file next to the .onnx file (same relative path)",
        )
    offset = _whole_number(info, "offset", 0, bad)
    expected = None
    if proto.data_type != onnx.TensorProto.STRING:
        expected = math.ceil(math.prod(proto.dims) * DType(proto.data_type).itemsize)
    length = _whole_number(info, "length", expected, bad)
    if expected is not None and length != expected:
        raise bad(
            f"has dims {list(proto.dims)} of {DType(proto.data_type)} ({expected} bytes) but its external data "
            f"length is {length}"
        )
    size = os.path.getsize(path)
    end = offset + (length or 0)
    if size < end:
        raise ModelLoadError(
            f"external data file {path} is {size} bytes but initializer {name!r} needs bytes up to {end} "
            f"(offset {offset} + length {length or 0}): the data file is truncated; copy it again."
        )
    return path, offset, length


def _whole_number(
    info: dict[str, str], key: str, default: int | None, bad: Callable[[str], ModelLoadError]
) -> int | None:
    """A strict decimal (no sign, no '1_000', no '0x10'): anything else is a malformed file."""
    raw = info.get(key)
    if raw is None:
        return default
    if not _WHOLE_NUMBER.fullmatch(raw):
        raise bad(f"has external data {key} {raw!r}, which is not a non-negative whole number of bytes")
    return int(raw)


def _first_link(root: str, location: str) -> tuple[str, str]:
    """The first symbolic link along ``location`` whose target leaves ``root``, and that target."""
    parts = os.path.normpath(location).split(os.sep)
    for i in range(1, len(parts) + 1):
        candidate = os.path.join(root, *parts[:i])
        target = os.path.realpath(candidate)
        if os.path.islink(candidate) and os.path.commonpath([root, target]) != root:
            return os.path.join(*parts[:i]), target
    return location, os.path.realpath(os.path.join(root, location))


def _contiguous(array: np.ndarray) -> np.ndarray:
    """np.ascontiguousarray turns 0-d arrays into 1-d ones; this does not."""
    return array if array.flags.c_contiguous else np.array(array, order="C")


def const(values: np.ndarray | Sequence | int | float, dtype: np.dtype | type | None = None) -> Tensor:
    """Shorthand for passes that create small constants."""
    return Tensor(np.asarray(values, dtype=dtype))
