"""ONNX Runtime's MatMulNBits packed layout, the one form quantized weights are stored in.

For a weight with K inputs and N outputs, quantized in blocks of ``block_size`` along K:

* ``B`` uint8 [N, blocks, block_size * bits / 8]: row n holds output channel n; 4-bit codes go two
  to a byte, the even element in the low nibble;
* ``scales`` [N, blocks] in the activation's float type;
* ``zero_points`` uint8 [N, ceil(blocks * bits / 8)]: 8-bit as they are, 4-bit two to a byte (low
  nibble first), each row padded to whole bytes; absent means 2^(bits-1) (symmetric).

Checked against onnxruntime (``tests/passes/quantize/test_pack.py``). The same bytes serve
``GatherBlockQuantized`` for an embedding table, since a table [V, H] is exactly the N = V rows of
the transposed weight of a tied LM head: one packed tensor can feed both.

ONNX Runtime only takes power-of-two blocks >= 16, so per-channel int8 (one scale per output
channel) is stored as blocks of :func:`channel_block` that all repeat the channel's scale.
"""

from __future__ import annotations

import numpy as np

from .methods import Quantized


def channel_block(k: int, cap: int = 256) -> int:
    """The block that stores a per-channel row of length ``k``: the largest power of two <= ``cap``
    dividing ``k`` (no padding), else the next power of two >= ``k`` (one padded block)."""
    block = cap
    while block >= 16:
        if k % block == 0:
            return block
        block //= 2
    return max(16, 1 << (k - 1).bit_length())


def reblock(q: Quantized, block: int) -> Quantized:
    """Split one-block-per-row codes into ``block``-sized blocks repeating the row's scale and zero
    point (no change in value), padding with the zero point to whole blocks."""
    n, k = q.codes.shape[0], q.k
    if q.codes.shape[1] != 1:
        raise ValueError("reblock expects one block per row")
    blocks = -(-k // block)
    codes = np.empty((n, blocks * block), np.uint8)
    codes[:, :k] = q.codes[:, 0, :k]
    codes[:, k:] = q.zero_points[:, :1]
    repeat = np.ones((1, blocks), np.float32)
    return Quantized(
        codes.reshape(n, blocks, block), q.scales[:, :1] * repeat,
        np.repeat(q.zero_points[:, :1], blocks, axis=1), q.bits, block, k,
    )


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., block] -> packed bytes [..., block * bits / 8]."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`."""
    if bits == 8:
        return packed
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def pack_zero_points(zero_points: np.ndarray, bits: int) -> np.ndarray:
    """[N, blocks] -> [N, ceil(blocks * bits / 8)], each row padded to whole bytes."""
    if bits == 8:
        return np.ascontiguousarray(zero_points, dtype=np.uint8)
    n, blocks = zero_points.shape
    padded = np.zeros((n, blocks + (blocks & 1)), np.uint8)
    padded[:, :blocks] = zero_points
    return pack_codes(padded, 4)


def unpack_zero_points(packed: np.ndarray, bits: int, blocks: int) -> np.ndarray:
    return unpack_codes(packed, bits)[:, :blocks]


def to_nbits(q: Quantized, symmetric: bool, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B, scales, zero_points or None) in MatMulNBits layout; scales in the activation ``dtype``."""
    zero_points = None if symmetric else pack_zero_points(q.zero_points, q.bits)
    return pack_codes(q.codes, q.bits), q.scales.astype(dtype), zero_points
