"""Weights laid out for the C kernels, in one 64-byte-aligned blob.

* ``pack_f32``: a float weight [K, N] as panels of ``PANEL`` output channels, each [K, PANEL]
  contiguous (the last zero-padded), so a GEMV streams each panel once and a GEMM keeps one in
  cache for several rows (kernels/transformer.h, ``icc_gemm_f32``).
* ``pack_quant``: a MatMulNBits-layout weight (passes/quantize/pack.py) as per-block scales, per-block
  offsets (w = scale * code + offset: the zero point, and a GGUF Q4_1 rest, folded in, exactly in
  float64 then rounded once) and the codes as they are (``icc_matmul_q`` / ``icc_gather_q``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import numpy as np

from ..passes.quantize.pack import unpack_zero_points

PANEL = 64
ALIGN = 64


def pack_f32(w: np.ndarray) -> np.ndarray:
    k, n = w.shape
    panels = -(-n // PANEL)
    padded = np.zeros((k, panels * PANEL), np.float32)
    padded[:, :n] = w
    return np.ascontiguousarray(padded.reshape(k, panels, PANEL).transpose(1, 0, 2))


def pack_quant(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, rests: np.ndarray | None,
               k: int, n: int, bits: int, block: int) -> np.ndarray:
    blocks = -(-k // block)
    s = scales.astype(np.float64).reshape(n, blocks)
    if zero_points is None:
        zp = np.full((n, blocks), 2 ** (bits - 1), np.float64)
    else:
        zp = unpack_zero_points(zero_points.reshape(n, -1), bits, blocks).astype(np.float64)
    offsets = -s * zp + (0.0 if rests is None else rests.astype(np.float64).reshape(n, blocks))
    body = np.ascontiguousarray(codes, np.uint8).reshape(-1)
    return np.concatenate([s.astype(np.float32).reshape(-1).view(np.uint8),
                           offsets.astype(np.float32).reshape(-1).view(np.uint8), body])


class Blob:
    """The weight blob being assembled: each array once (by key), at a 64-byte-aligned offset."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.offsets: dict[Hashable, int] = {}
        self.size = 0

    def add(self, key: Hashable, make: Callable[[], np.ndarray]) -> int:
        if key not in self.offsets:
            data = np.ascontiguousarray(make()).reshape(-1).view(np.uint8)
            self.offsets[key] = self.size
            self.parts.append(data)
            pad = -len(data) % ALIGN
            if pad:
                self.parts.append(np.zeros(pad, np.uint8))
            self.size += len(data) + pad
        return self.offsets[key]

    def array(self) -> np.ndarray:
        """One buffer whose data starts 64-byte aligned (offsets are relative to it)."""
        raw = np.empty(self.size + ALIGN, np.uint8)
        start = -raw.ctypes.data % ALIGN
        out = raw[start:start + self.size]
        at = 0
        for part in self.parts:
            out[at:at + len(part)] = part
            at += len(part)
        return out
