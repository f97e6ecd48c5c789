"""Data-free weight quantization methods: round-to-nearest (``rtn``) and a squared-error minimizing
search (``mse``), both affine: w ~= scale * (code - zero_point) with integer codes in [0, 2^bits - 1]
and an integer zero point per block (fixed at 2^(bits-1) when symmetric), the form ONNX Runtime's
MatMulNBits and ONNX's DequantizeLinear execute. GPTQ (``gptq.py``) uses these rules for each
block's (scale, zero point) and adds error feedback driven by calibration activations; weights
without activations (embedding tables) always take a data-free method.

Why ``mse`` and not HQQ: HQQ (half-quadratic zero-point refinement) gets most of its gain from a
*float* zero point, which DequantizeLinear cannot store and which makes MatMulNBits' CPU kernel
dequantize the whole weight on every call (see native.py), and it minimizes an lp (p < 1) proxy over
20+ iterations. Without activation statistics the best target is the squared reconstruction error
of each block: for inputs with roughly isotropic statistics the expected output error is
proportional to it. ``mse`` minimizes exactly that under the kernels' constraints, by coordinate
descent from two starts:

1. start from the min/max range (RTN) and from the range shrunk to 80% (clipping the extremes
   buys finer steps for the other values of a block);
2. alternate: round every weight to its nearest code for the current (scale, zero point) -- the best
   codes for them -- then refit scale and offset by least squares for those codes and round the zero
   point to an integer. Each step can only lower the error, up to the zero point's rounding;
3. keep the start with the lower error, try its zero point +-1 (refitting the scale), re-round.

Every reduction is over one block, so the search is vectorised over all blocks of a tensor at once and
split into chunks run on a thread pool (numpy releases the GIL): deterministic (no reduction order
depends on threads). Measured (2 cores): the kernel costs ~2.5x RTN, ~2 s (~20%) more to compile
a 100M-parameter model. What it buys: relative reconstruction error -4% at int4/block 32 on
all-MiniLM-L6-v2 (-8% squared error), -5% at block 128, -10 to -14% symmetric; end to end,
stories260K's int4 perplexity penalty halves (+5.4% -> +2.6%) and MiniLM's int4 embedding cosine
rises 0.9760 -> 0.9772 (GPTQ: 0.985). At int8 the gain (<1%) is below the noise of int8 activation
rounding in MatMulNBits. Small-block min/max quantization is already close to optimal for
Gaussian-like blocks; the gain grows with block size, with symmetric quantization and with outliers.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

METHODS = ("rtn", "mse")
#: Blocks per work item: ~1M weights, small enough to stay in cache-sized pieces per thread.
_CHUNK_WEIGHTS = 1 << 20


@dataclasses.dataclass
class Quantized:
    """Codes [N, blocks, block_size] (uint8), scales and zero points [N, blocks]: row n holds output
    channel n, split into blocks along the reduction axis K (zero-padded to whole blocks)."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int
    block_size: int
    k: int

    def dequantize(self) -> np.ndarray:
        """The [N, K] float32 matrix these codes stand for."""
        values = (self.codes.astype(np.float32) - self.zero_points[..., None]) * self.scales[..., None]
        return values.reshape(self.codes.shape[0], -1)[:, : self.k]


def quantize_rows(
    rows: np.ndarray, bits: int, block_size: int, *, symmetric: bool = False, method: str = "mse",
    threads: int | None = None,
) -> Quantized:
    """Quantize ``rows`` [N, K] (one row per output channel) blockwise along K.

    ``block_size`` = K gives one block per row (per-channel); K is zero-padded to whole blocks.
    ``threads`` defaults to the CPU count.
    """
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; known: {list(METHODS)}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    solve = _rtn if method == "rtn" else _mse
    return _blockwise(rows, bits, block_size, lambda w, qmax, _: solve(w, qmax, symmetric), threads)


def refine_rows(
    rows: np.ndarray, start: Quantized, *, scale_dtype: np.dtype | type = np.float32, threads: int | None = None,
) -> Quantized:
    """``rows`` [N, K] on the bits and blocks of ``start``, every block at most as far from
    ``rows`` (squared error) as ``start``'s (scale, zero point) with their nearest codes.

    Candidates per block: ``start``'s zero point z and z +- 1, each with its least-squares scale
    alternated three times with the nearest codes (each round can only lower the error; a fourth
    gains < 0.3%); the block keeps whichever of them and ``start`` has the lowest error, measured
    exactly (float64, scales as ``scale_dtype`` stores them). ``start`` itself, its scales as
    ``scale_dtype`` stores them, stays a candidate, so nothing here can make a block worse than the
    grid it is given. Measured on SmolLM2's Q4_1 blocks (one thread): ~40 ns per weight; adding the
    ``mse`` search from scratch as a candidate lowers the relative error 0.0725 -> 0.0711 for
    ~60 ns more per weight (~6 s per 100M weights), so it is not tried.
    """
    qmax = (1 << start.bits) - 1
    block = start.block_size
    if rows.shape != (start.codes.shape[0], start.k):
        raise ValueError(f"rows {rows.shape} do not match the grid's [{start.codes.shape[0]}, {start.k}]")
    stored = np.dtype(scale_dtype)
    # the start as it would be stored: the grid each block must not end farther from than
    scales = _nonzero(start.scales.reshape(-1, 1).astype(stored).astype(np.float32))
    zeros = start.zero_points.reshape(-1, 1).astype(np.float32)

    def solve(w: np.ndarray, _: int, at: slice) -> tuple[np.ndarray, np.ndarray]:
        buf = np.empty_like(w)
        s0, z0 = scales[at], zeros[at]
        best_s, best_z = s0, z0
        best = _block_error(w, s0, z0, qmax, buf)
        candidates = []
        for dz in (0, -1, 1):
            z = np.clip(z0 + dz, 0, qmax)
            s = s0
            for _ in range(3):
                s = _fit_scale(w, s, z, qmax, buf)[0]
            candidates.append((s, z))
        for s, z in candidates:
            s = _nonzero(s.astype(stored).astype(np.float32))
            err = _block_error(w, s, z, qmax, buf)
            better = err < best
            best = np.where(better, err, best)
            best_s, best_z = np.where(better[:, None], s, best_s), np.where(better[:, None], z, best_z)
        return best_s, best_z

    return _blockwise(rows, start.bits, block, solve, threads)


def _blockwise(rows: np.ndarray, bits: int, block: int, solve, threads: int | None) -> Quantized:
    """Quantize ``rows`` [N, K] in blocks of ``block`` along K (zero-padded to whole blocks) with
    ``solve(w, qmax, where)`` -> (scale, zero point) per block, where ``where`` is the slice of
    the flattened blocks ``w`` holds; chunks of blocks run on a thread pool."""
    n, k = rows.shape
    blocks = -(-k // block)
    padded = np.zeros((n, blocks * block), np.float32)
    padded[:, :k] = rows
    flat = padded.reshape(n * blocks, block)
    qmax = (1 << bits) - 1
    codes = np.empty(flat.shape, np.uint8)
    scales = np.empty(n * blocks, np.float32)
    zeros = np.empty(n * blocks, np.uint8)
    step = max(1, _CHUNK_WEIGHTS // block)

    def work(start: int) -> None:
        at = slice(start, start + step)
        w = flat[at]
        s, z = solve(w, qmax, at)
        codes[at] = _codes(w, s, z, qmax)
        scales[at] = s[:, 0]
        zeros[at] = z[:, 0]

    starts = range(0, flat.shape[0], step)
    workers = min(len(starts), threads or os.cpu_count() or 1)
    if workers <= 1:
        for start in starts:
            work(start)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, starts))
    return Quantized(codes.reshape(n, blocks, block), scales.reshape(n, blocks), zeros.reshape(n, blocks), bits, block, k)


def relative_error(rows: np.ndarray, quantized: Quantized) -> float:
    """||W - Q(W)||_F / ||W||_F: the per-layer figure the diagnostics report and quant_max_error bounds."""
    ref = np.asarray(rows, np.float32)
    diff = quantized.dequantize() - ref
    norm = float(np.sqrt(np.einsum("ij,ij->", ref, ref, dtype=np.float64)))
    return float(np.sqrt(np.einsum("ij,ij->", diff, diff, dtype=np.float64))) / norm if norm else 0.0


def block_params(w: np.ndarray, qmax: int, symmetric: bool, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) [blocks, 1] float32 for the blocks ``w`` [blocks, size] by ``method``'s
    rule: what GPTQ uses for each block when it reaches it."""
    return (_rtn if method == "rtn" else _mse)(np.asarray(w, np.float32), qmax, symmetric)


# -- the two methods: each returns (scale, zero point) per block, as [blocks, 1] float32 -----------

def _range(w: np.ndarray, qmax: int, symmetric: bool, shrink: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Min/max scale and zero point; the range always holds 0, so 0 stays exactly representable."""
    if symmetric:
        half = (qmax + 1) // 2
        scale = np.abs(w).max(axis=1, keepdims=True) * np.float32(shrink / (half - 1))
        return _nonzero(scale), np.full_like(scale, half)
    lo = np.minimum(w.min(axis=1, keepdims=True), 0) * np.float32(shrink)
    hi = np.maximum(w.max(axis=1, keepdims=True), 0) * np.float32(shrink)
    scale = _nonzero((hi - lo) / np.float32(qmax))
    return scale, np.clip(np.rint(-lo / scale), 0, qmax)


def _rtn(w: np.ndarray, qmax: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    return _range(w, qmax, symmetric)


def _mse(w: np.ndarray, qmax: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    buf = np.empty_like(w)
    sw = w.sum(axis=1, keepdims=True, dtype=np.float64)
    best = None
    # At 255 levels clipping never pays off: one start is enough for int8.
    for shrink in (1.0, 0.8) if qmax < 255 else (1.0,):
        scale, zero = _range(w, qmax, symmetric, shrink)
        for _ in range(3):
            scale, zero = (_fit_scale(w, scale, zero, qmax, buf)[0], zero) if symmetric else _refit(w, scale, zero, qmax, buf, sw)
        scale, err = _fit_scale(w, scale, zero, qmax, buf)
        if best is None:
            best = [err, scale, zero]
        else:
            better = err < best[0]
            best = [np.where(better, err, best[0]), np.where(better, scale, best[1]), np.where(better, zero, best[2])]
    err, scale, zero = best
    if not symmetric:
        for dz in (-1, 1):
            z2 = np.clip(zero + dz, 0, qmax)
            s2, e2 = _fit_scale(w, scale, z2, qmax, buf)
            better = e2 < err
            err, scale, zero = np.where(better, e2, err), np.where(better, s2, scale), np.where(better, z2, zero)
    return _fit_scale(w, scale, zero, qmax, buf)[0], zero


def _nearest(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmax: int, out: np.ndarray) -> np.ndarray:
    """The nearest codes (as floats, in ``out``) for (scale, zero): the best codes for them."""
    np.multiply(w, np.float32(1) / scale, out=out)
    np.rint(out, out=out)
    out += zero
    return np.clip(out, 0, qmax, out=out)


def _refit(
    w: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmax: int, buf: np.ndarray, sw: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest codes for (scale, zero), then the least-squares (scale, offset) for those codes, the
    offset rounded to an integer zero point."""
    q = _nearest(w, scale, zero, qmax, buf)
    # Per-block sums in float64: n * sum(q^2) - sum(q)^2 cancels badly in float32 for long blocks.
    n = float(w.shape[1])
    sq = q.sum(axis=1, keepdims=True, dtype=np.float64)
    sqq, swq = _dot(q, q).astype(np.float64), _dot(w, q).astype(np.float64)
    den = n * sqq - sq * sq
    ok = den > 0
    fitted = np.where(ok, (n * swq - sq * sw) / np.where(ok, den, 1), scale)
    fitted = np.where(fitted > 0, fitted, scale)
    offset = np.where(ok, (sw - fitted * sq) / n, 0)  # w ~= fitted * q + offset, offset = -scale * zero
    return fitted.astype(np.float32), np.clip(np.rint(-offset / fitted), 0, qmax).astype(np.float32)


def _fit_scale(
    w: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmax: int, buf: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares scale for the nearest codes at (scale, zero), and the error it leaves minus
    ||w||^2 (the same constant for every candidate of a block, so it compares them)."""
    m = _nearest(w, scale, zero, qmax, buf)
    m -= zero
    wm, mm = _dot(w, m), _dot(m, m)
    good = (mm > 0) & (wm > 0)
    fitted = np.where(good, wm / np.where(good, mm, 1), scale)
    return fitted, -(wm * wm) / np.maximum(mm, np.float32(1e-30))


def _block_error(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmax: int, buf: np.ndarray) -> np.ndarray:
    """Each block's squared error with its nearest codes, in float64, from the float32 values
    :meth:`Quantized.dequantize` computes: the figure :func:`refine_rows` compares candidates by."""
    values = _nearest(w, scale, zero, qmax, buf)
    values -= zero
    values *= scale
    values -= w
    return np.einsum("ij,ij->i", values, values, dtype=np.float64)


def _codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmax: int) -> np.ndarray:
    return _nearest(w, scale, zero, qmax, np.empty_like(w)).astype(np.uint8)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b)[:, None]


def _nonzero(scale: np.ndarray) -> np.ndarray:
    """An all-zero (or denormal) block gets scale 1: its codes are the zero point either way, and
    1 / scale stays finite."""
    return np.where(scale > 1e-30, scale, np.float32(1)).astype(np.float32)
