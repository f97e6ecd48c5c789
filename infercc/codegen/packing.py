"""Weights re-laid at compile time into the layouts the C kernels read (kernels/gemm.h, qgemm.h).

Both layouts are the same on every machine (the blob does not depend on ``-march``); only the
kernels reading them change with the instruction set.

fp32 (:func:`pack_f32`): W [K, N] becomes ceil(N / 16) *panels* of 16 output columns, each [K, 16]
contiguous, the last one padded with zero columns. A GEMV then streams every panel once from
start to end (one sequential stream per thread, what hardware prefetchers follow best) and keeps
16 outputs in one AVX-512 register (two AVX2 ones); a GEMM reuses one panel from cache against a
tile of rows. 16 columns is the narrowest panel that fills a 512-bit register, so the padding of a
small N stays small.

Quantized (:func:`pack_quant`): a 64-byte header (int32 little-endian: magic, version, bits, block,
K, N, flags, panel stride in bytes), then ceil(N / 16) panels of 16 output columns, each
``panel_stride`` bytes (a multiple of 64) holding, for its ``blocks = ceil(K / block)`` blocks:

* codes, ``block * 16 * bits / 8`` bytes per block, as integer dot products want them: the block's
  k = 4g .. 4g+3 of column c sit at byte ``64 g + 4 c + (k - 4g)`` (``_mm512_dpbusd_epi32`` /
  ``_mm256_maddubs_epi16`` then sum four consecutive k of one column into its int32 lane, so 16
  columns come out in one register and no horizontal sum is needed). 4-bit: groups 2h and 2h+1
  share 64 bytes, the even group in the low nibbles. Codes are unsigned (0 .. 2^bits - 1); K is
  padded with the block's zero point, so padding adds nothing;
* scales float32 [blocks, 16], or float16 (flag 4) when every scale is exactly a float16 (GGUF
  steps are): 32 instead of 64 bytes per block, ~10% less to stream for 4-bit blocks of 32;
* zero points uint8 [blocks, 16] (flag 1; absent = 2^(bits-1) everywhere);
* rests float32 [blocks, 16] (flag 2: w = scale * (code - zero point) + rest, exact GGUF Q4_1),
  or, when the kernel can recompute both from them, the block minimums as float16 (flags 8 and 16,
  no zero-point array): w = scale * code + min, GGUF Q4_1's own form (d * q + m, m a float16),
  352 -> 320 bytes per 4-bit block of 16 columns, ~10% less to stream. The kernel takes each
  block's zero point back as clamp(rint(-min / scale), 0, 2^bits - 1) (float32, ties to even) and
  its rest as fma(zero, scale, min): this form is chosen only when those give exactly the zero
  points and float32 rests it was handed (:func:`_half_mins`), so the kernel subtracts the same
  integer zero point against the int8 activations as ONNX Runtime's MatMulNBits does for the same
  weight (passes/quantize/native.py picks it) and adds the same rest: both runtimes then round the
  activations into the same error, and differ by float summation order alone.

The kernels find every part from (N, K, bits, block) and the header's flags and stride.

:class:`Blob` assembles every packed array and constant of one model into the 64-byte-aligned
weight blob the generated code points into.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import numpy as np

from ..passes.quantize.pack import unpack_codes, unpack_zero_points

#: Output columns per panel, both layouts (ICC_PANEL in kernels/common.h).
PANEL = 16
#: Bytes before the first quantized panel (ICC_QHEADER).
HEADER = 64
MAGIC = 0x31434349  # "ICC1"
VERSION = 1
FLAG_ZERO_POINTS = 1
FLAG_RESTS = 2
FLAG_F16_SCALES = 4
FLAG_F16_RESTS = 8
FLAG_MINS = 16
#: Alignment of every array in the weight blob (a cache line; AVX-512 loads).
ALIGN = 64


def pack_f32(w: np.ndarray) -> np.ndarray:
    """W [K, N] -> float32 [ceil(N / 16), K, 16] (see the module docstring)."""
    if w.ndim != 2:
        raise ValueError(f"pack_f32 expects a [K, N] matrix, got shape {w.shape}")
    k, n = w.shape
    panels = -(-n // PANEL)
    padded = np.zeros((k, panels * PANEL), np.float32)
    padded[:, :n] = w
    return np.ascontiguousarray(padded.reshape(k, panels, PANEL).transpose(1, 0, 2))


def quant_panel_stride(k: int, bits: int, block: int, flags: int) -> int:
    """Bytes of one quantized panel (``icc_q_panel_stride`` in qgemm.h computes the same)."""
    blocks = -(-k // block)
    size = blocks * (block * PANEL * bits // 8 + (2 if flags & FLAG_F16_SCALES else 4) * PANEL)
    size += blocks * PANEL if flags & FLAG_ZERO_POINTS else 0
    size += blocks * (2 if flags & FLAG_F16_RESTS else 4) * PANEL if flags & FLAG_RESTS else 0
    return -(-size // 64) * 64


def pack_quant(
    B: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, rests: np.ndarray | None,
    K: int, N: int, bits: int, block: int,
) -> np.ndarray:
    """MatMulNBits layout (``passes/quantize/pack.py``: B uint8 [N, blocks, block * bits / 8],
    scales [N, blocks], zero points packed or None = symmetric, rests [N, blocks] or None) ->
    the uint8 array qgemm.h reads (header + panels, see the module docstring)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    blocks = -(-K // block)
    if B.shape != (N, blocks, block * bits // 8):
        raise ValueError(f"B has shape {B.shape}, expected {(N, blocks, block * bits // 8)} for K={K}, N={N}")
    if scales.shape != (N, blocks) or (rests is not None and rests.shape != (N, blocks)):
        raise ValueError(f"scales/rests must be [{N}, {blocks}]")
    codes = unpack_codes(np.asarray(B, np.uint8), bits)  # [N, blocks, block]
    zeros = _zeros(zero_points, N, blocks, bits)
    # K padded to whole blocks by the quantizer: make the padding the zero point so it adds nothing
    # whatever the padded activations hold (ours are zero; this is belt and braces).
    if blocks * block > K:
        flat = codes.reshape(N, blocks * block).copy()
        flat[:, K:] = zeros[:, -1:]
        codes = flat.reshape(N, blocks, block)
    scales = np.asarray(scales, np.float32)
    flags, half, mins = _quant_flags(scales, zeros, zero_points is not None, rests, bits)
    exact_half = bool(flags & FLAG_F16_SCALES)
    if mins is not None:
        rests = mins
    panels = -(-N // PANEL)
    pad_n = panels * PANEL - N

    def columns(a: np.ndarray, fill) -> np.ndarray:
        """[N, ...] -> [panels, 16, ...] with padded columns ``fill``."""
        if pad_n:
            a = np.concatenate([a, np.full((pad_n, *a.shape[1:]), fill, a.dtype)])
        return a.reshape(panels, PANEL, *a.shape[1:])

    # codes: [panels, 16 cols, blocks, groups, 4] -> [panels, blocks, groups, 16 cols, 4]
    c = columns(codes, 0).reshape(panels, PANEL, blocks, block // 4, 4).transpose(0, 2, 3, 1, 4)
    if bits == 4:  # pair groups: even group in the low nibble
        c = c.reshape(panels, blocks, block // 8, 2, PANEL, 4)
        c = c[:, :, :, 0] | (c[:, :, :, 1] << 4)
    parts = [np.ascontiguousarray(c).reshape(panels, -1)]
    as_bytes = lambda a: np.ascontiguousarray(a.transpose(0, 2, 1)).reshape(panels, -1).view(np.uint8)  # noqa: E731
    parts.append(as_bytes(columns(half if exact_half else scales, 0.0)))
    if flags & FLAG_ZERO_POINTS:
        parts.append(as_bytes(columns(zeros, 0)))
    if flags & FLAG_RESTS:
        parts.append(as_bytes(columns(np.asarray(rests, np.float16 if flags & FLAG_F16_RESTS else np.float32), 0.0)))
    stride = quant_panel_stride(K, bits, block, flags)
    body = np.zeros((panels, stride), np.uint8)
    used = np.concatenate(parts, axis=1)
    body[:, : used.shape[1]] = used
    header = np.zeros(HEADER // 4, np.int32)
    header[:8] = [MAGIC, VERSION, bits, block, K, N, flags, stride]
    return np.concatenate([header.view(np.uint8), body.reshape(-1)])


def quant_nbytes(
    scales: np.ndarray, zero_points: np.ndarray | None, rests: np.ndarray | None, K: int, N: int, bits: int, block: int,
) -> int:
    """Bytes :func:`pack_quant` gives for these arguments (the codes are not read): planning a
    blob's layout reads the scales, zero points and rests (a few percent of a weight) only."""
    blocks = -(-K // block)
    scales = np.asarray(scales, np.float32).reshape(N, blocks)
    flags = _quant_flags(scales, _zeros(zero_points, N, blocks, bits), zero_points is not None, rests, bits)[0]
    return HEADER + -(-N // PANEL) * quant_panel_stride(K, bits, block, flags)


def _zeros(zero_points: np.ndarray | None, N: int, blocks: int, bits: int) -> np.ndarray:
    """Zero points uint8 [N, blocks]: unpacked, or 2^(bits-1) everywhere (symmetric) when None."""
    if zero_points is None:
        return np.full((N, blocks), 1 << (bits - 1), np.uint8)
    return unpack_zero_points(np.asarray(zero_points, np.uint8), bits, blocks)


def _quant_flags(scales: np.ndarray, zeros: np.ndarray, has_zero_points: bool, rests: np.ndarray | None,
                 bits: int) -> tuple[int, np.ndarray, np.ndarray | None]:
    """The header's flags, the scales as float16 (meant when FLAG_F16_SCALES is set) and the half
    block minimums that replace zero points and rests (FLAG_MINS), or None."""
    with np.errstate(over="ignore"):
        half = scales.astype(np.float16)
    exact_half = bool(np.array_equal(half.astype(np.float32), scales))  # NaN never compares equal: stays float32
    flags = (FLAG_ZERO_POINTS if has_zero_points else 0) | (FLAG_RESTS if rests is not None else 0)
    flags |= FLAG_F16_SCALES if exact_half else 0
    mins = _half_mins(scales, zeros, rests, bits) if rests is not None and exact_half else None
    if mins is not None:  # scale * (code - z) + rest == scale * code + min, min a float16
        flags = (flags & ~FLAG_ZERO_POINTS) | FLAG_F16_RESTS | FLAG_MINS
    return flags, half, mins


def _half_mins(scales: np.ndarray, zeros: np.ndarray, rests: np.ndarray, bits: int) -> np.ndarray | None:
    """The block minimums rest - scale * zero as float16 [N, blocks] (a GGUF Q4_1 minimum that the
    importer moved to an integer zero point), or None unless, for every block, the kernel's
    recomputation from the half minimum m and the scale s gives back exactly what it was handed:
    the zero point as clamp(rint(-m / s), 0, 2^bits - 1) in float32 (qgemm.h icc_q_min_zero) and
    the float32 rest as fma(zero, s, m), one rounding of the exact value. Anything else (another
    zero-point choice, a minimum that is no float16) keeps zero points and float32 rests."""
    r = np.asarray(rests, np.float32)
    s = np.asarray(scales, np.float32)
    z = zeros.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        half = (r.astype(np.float64) - s.astype(np.float64) * z).astype(np.float16)
        m = half.astype(np.float32)
        again = np.clip(np.rint(-(m / s)), 0, (1 << bits) - 1)
        # fma(z, s, m): z * s is exact in float64 (<= 8 + 24 bits); the sum is exact when its
        # rounding error (TwoSum) is zero, and then one rounding to float32 is the fma's
        p, m64 = z * s.astype(np.float64), m.astype(np.float64)
        total = p + m64
        back = total - p
        exact = ((p - (total - back)) + (m64 - back)) == 0
        ok = np.isfinite(half) & (again == z) & exact & (total.astype(np.float32) == r)
    return half if bool(ok.all()) else None


class Blob:
    """The weight blob being assembled: each array once (by key), at a 64-byte-aligned offset.

    ``pack=False`` plans the layout only (offsets and size, no data kept): loading a saved
    artifact regenerates the source this way and memory-maps its weights.bin instead. A caller
    that knows a part's size without making it passes ``nbytes`` and ``make`` is then not called
    until :meth:`array` writes the part into the blob (when packing) or at all (when planning), so
    the packed weights are never held twice: no list of packed parts beside the blob they are
    copied into. Without ``nbytes``, ``make`` runs at once (to learn the size) and its data is
    kept for :meth:`array` (packing) or dropped (planning).

    Keys name the IR tensors a part is made from (the Tensor objects themselves: a model's clone
    shares them), so a second program of the same model -- the paged serving graph, its tree
    variant -- can plan against ``base``, the blob of a library already loaded: a part the base
    holds keeps the base's offset, and when every part is there (:attr:`within_base`) the second
    library points at the first one's bytes instead of packing the weights a second time."""

    def __init__(self, *, pack: bool = True, base: Blob | None = None) -> None:
        #: (offset, bytes, data or the function that makes it), in offset order.
        self.parts: list[tuple[int, int, np.ndarray | Callable[[], np.ndarray]]] = []
        self.offsets: dict[Hashable, int] = {}
        self.sizes: dict[Hashable, int] = {}
        self.base = base
        self.size = base.size if base is not None else 0
        self.pack = pack

    @property
    def within_base(self) -> bool:
        """Every part this blob was asked for sits in ``base`` (the base's bytes serve it as they are)."""
        return self.base is not None and self.size == self.base.size

    def add(self, key: Hashable, make: Callable[[], np.ndarray], nbytes: int | None = None) -> int:
        if key not in self.offsets:
            part: np.ndarray | Callable[[], np.ndarray] = make
            if nbytes is None:
                part = _bytes(make())
                nbytes = len(part)
            if self.base is not None and self.base.sizes.get(key) == nbytes:
                self.offsets[key], self.sizes[key] = self.base.offsets[key], nbytes
                return self.offsets[key]
            if self.pack:
                self.parts.append((self.size, nbytes, part))
            self.offsets[key], self.sizes[key] = self.size, nbytes
            self.size += nbytes + -nbytes % ALIGN
        return self.offsets[key]

    def array(self) -> np.ndarray:
        """One buffer whose data starts 64-byte aligned (offsets are relative to it), each part
        made (or taken) and written in place, then released: the weights are held once (peak
        RSS), not twice; a second call is an error."""
        if not self.pack or self.base is not None:
            raise ValueError("a planned Blob (pack=False) or one laid out against a base holds no data of its own")
        if self.size and not self.parts:
            raise ValueError("the blob's parts were released by an earlier array() call")
        raw = np.empty(self.size + ALIGN, np.uint8)
        start = -raw.ctypes.data % ALIGN
        out = raw[start:start + self.size]
        parts, self.parts = self.parts, []
        ends = [offset for offset, _, _ in parts[1:]] + [self.size]
        for (offset, nbytes, part), end in zip(parts, ends):
            data = _bytes(part() if callable(part) else part)
            if len(data) != nbytes:  # the planned size was wrong: the source's offsets would be too
                raise ValueError(f"a blob part made {len(data)} bytes where {nbytes} were planned")
            out[offset:offset + nbytes] = data
            out[offset + nbytes:end] = 0
            del data
        return out


def _bytes(a: np.ndarray) -> np.ndarray:
    """The array's bytes, flat (a C-contiguous copy only when it is not one already)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)
