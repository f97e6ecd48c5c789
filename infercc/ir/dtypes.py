"""Element types. We reuse ONNX's numbering so that import/export never has to translate."""

from __future__ import annotations

import enum

import numpy as np
import onnx
from onnx import helper


class DType(enum.IntEnum):
    UNDEFINED = 0
    FLOAT = 1
    UINT8 = 2
    INT8 = 3
    UINT16 = 4
    INT16 = 5
    INT32 = 6
    INT64 = 7
    STRING = 8
    BOOL = 9
    FLOAT16 = 10
    DOUBLE = 11
    UINT32 = 12
    UINT64 = 13
    COMPLEX64 = 14
    COMPLEX128 = 15
    BFLOAT16 = 16
    FLOAT8E4M3FN = 17
    FLOAT8E4M3FNUZ = 18
    FLOAT8E5M2 = 19
    FLOAT8E5M2FNUZ = 20
    UINT4 = 21
    INT4 = 22
    FLOAT4E2M1 = 23

    @classmethod
    def from_numpy(cls, dtype: np.dtype | type) -> DType:
        return cls(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))

    @property
    def numpy(self) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(int(self)))

    @property
    def itemsize(self) -> float:
        """Bytes per element; fractional for the 4-bit types, which ONNX packs two to a byte."""
        if self in (DType.UINT4, DType.INT4, DType.FLOAT4E2M1):
            return 0.5
        if self == DType.STRING:
            return 0.0
        return float(self.numpy.itemsize)

    @property
    def is_float(self) -> bool:
        return self in _FLOATS

    @property
    def is_integer(self) -> bool:
        return self in _INTEGERS

    def __str__(self) -> str:
        return onnx.TensorProto.DataType.Name(int(self)).lower()


_FLOATS = {
    DType.FLOAT, DType.FLOAT16, DType.DOUBLE, DType.BFLOAT16, DType.FLOAT8E4M3FN,
    DType.FLOAT8E4M3FNUZ, DType.FLOAT8E5M2, DType.FLOAT8E5M2FNUZ, DType.FLOAT4E2M1,
}
_INTEGERS = {
    DType.UINT8, DType.INT8, DType.UINT16, DType.INT16, DType.INT32, DType.INT64,
    DType.UINT32, DType.UINT64, DType.UINT4, DType.INT4,
}
