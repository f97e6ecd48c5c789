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
    """The weight blob being assembled: each array once (by key), at a 64-byte-aligned offset.

    ``pack=False`` plans the layout only (offsets and size, no data kept): loading a saved
    artifact regenerates the source this way and memory-maps its weights.bin instead. A caller
    that knows a part's size without making it passes ``nbytes`` and ``make`` is then not called
    when planning; otherwise ``make`` runs and its data is dropped right away."""

    def __init__(self, *, pack: bool = True) -> None:
        self.parts: list[np.ndarray] = []
        self.offsets: dict[Hashable, int] = {}
        self.size = 0
        self.pack = pack

    def add(self, key: Hashable, make: Callable[[], np.ndarray], nbytes: int | None = None) -> int:
        if key not in self.offsets:
            if self.pack or nbytes is None:
                data = np.ascontiguousarray(make()).reshape(-1).view(np.uint8)
                nbytes = len(data)
                if self.pack:
                    self.parts.append(data)
            self.offsets[key] = self.size
            pad = -nbytes % ALIGN
            if pad and self.pack:
                self.parts.append(np.zeros(pad, np.uint8))
            self.size += nbytes + pad
        return self.offsets[key]

    def array(self) -> np.ndarray:
        """One buffer whose data starts 64-byte aligned (offsets are relative to it)."""
        if not self.pack:
            raise ValueError("a planned Blob (pack=False) holds no data")
        raw = np.empty(self.size + ALIGN, np.uint8)
        start = -raw.ctypes.data % ALIGN
        out = raw[start:start + self.size]
        at = 0
        for part in self.parts:
            out[at:at + len(part)] = part
            at += len(part)
        return out
