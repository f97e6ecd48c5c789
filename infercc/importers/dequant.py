"""GGUF tensor data to float32 NumPy arrays, vectorised over blocks.

ggml block formats (32 weights per block, along the innermost dimension):
  Q8_0: f16 scale d, 32 x int8 q            -> d * q
  Q4_0: f16 scale d, 16 bytes of nibbles    -> d * (q - 8)
  Q4_1: f16 scale d, f16 min m, 16 bytes    -> d * q + m
A nibble byte k holds weight k in its low half and weight k + 16 in its high half. The arithmetic
is the same float32 expression ggml's reference dequantizer uses, so results are bit-identical
(checked against ``gguf.quants.dequantize`` in the tests).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q

SUPPORTED = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1)
#: bytes per 32-weight block
_BLOCK_BYTES = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}


def dequantize(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    """``raw`` as GGUFReader maps it -> float32 array of ``shape`` (NumPy order, innermost last).
    F32 data is returned as a view of the (memory-mapped) file: no copy."""
    if qtype == Q.F32:
        return raw.view(np.float32).reshape(shape)
    if qtype == Q.F16:
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    if qtype == Q.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if qtype not in _BLOCK_BYTES:
        raise ValueError(f"unsupported GGUF tensor type {qtype.name}")
    blocks = raw.reshape(-1, _BLOCK_BYTES[qtype])
    scale = blocks[:, :2].view(np.float16).astype(np.float32)  # [blocks, 1]
    if qtype == Q.Q8_0:
        values = blocks[:, 2:].view(np.int8).astype(np.float32) * scale
    elif qtype == Q.Q4_0:
        values = (_nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)).astype(np.float32) * scale
    else:
        minimum = blocks[:, 2:4].view(np.float16).astype(np.float32)
        values = _nibbles(blocks[:, 4:]).astype(np.float32) * scale + minimum
    return values.reshape(shape)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[blocks, 16] bytes -> [blocks, 32] 4-bit values (low halves first, then high halves)."""
    return np.concatenate([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=1)
