"""Weights that are already quantized: store their blocks as they are instead of rounding them again.

A GGUF checkpoint arrives dequantized to float (importers/dequant.py), but its values still sit on
the source's grid: every block of 32 along K holds at most 2^bits equally spaced levels (Q4_0:
d * (q - 8); Q4_1: d * q + m; Q8_0: d * q). Rounding such a block again onto a grid of our own
compounds two roundings (SmolLM2's Q4_1 file: +31% perplexity at int4). Recovering the source grid
instead loses nothing where a fast kernel holds it, and for Q4_1 offers the choice:

* a block whose grid holds 0 at an integer level (Q4_0, Q8_0, and Q4_1 blocks whose minimum is a
  multiple of the step) is exactly ``scale * (code - zero_point)`` with an integer zero point:
  MatMulNBits' own form;
* a Q4_1 block's minimum m is in general *not* a multiple of its step d, so no integer zero point
  reproduces it. MatMulNBits also takes float zero points (zp = -m / d; a block with d == 0, all
  values m, as scale m, codes 0, zero point -1). onnxruntime 1.32's CPU kernel accepts them at
  every accuracy_level (0-4) and is exact with them (max relative error 2e-7 against float64 on
  SmolLM2's shapes, at every level: level 4's int8 activations are not used), but it then
  dequantizes the whole weight on every call: 0.8-1.6 ms per token for a 576x1536 or 1536x576
  weight against ~0.05-0.2 ms with integer zero points (2 threads, minimum of 30 calls), 10-30x
  slower. An 8-bit grid of step d / 16 or d / 17 (codes 16q + a, every weight within d / 32 of
  the source's; one MatMulNBits) was measured too: its decode step is 0.92x the exact form's
  (twice the weight bytes) and its prefill 0.79x (the 8-bit kernel's int8 path for many rows is
  1.7x slower than float32 SGEMM on AVX2). So no single ONNX Runtime kernel is both exact and
  fast, and ``Config.quant_native_exact`` chooses:

  - False (:func:`fit_integer_grid`, CLI ``--fast-grids``): the nearest grid MatMulNBits runs fast, an
    integer zero point per block of 32 with codes and scales re-fitted by least squares from
    (d, rint(-m / d), q) (methods.refine_rows: no block ends farther from the source values than
    rounding the zero point). One MatMulNBits per projection. Not exact: on SmolLM2-135M's Q4_1
    file the relative error ||W - W'|| / ||W|| is 0.071 median, 0.081 max (rounding the zero point
    alone: 0.082), which is a second 4-bit rounding's cost: perplexity on a 100-token article
    17.85 vs 14.03 exact vs 13.98 float (+27% over exact, mean KL to float 0.27 vs 0.003), 66%
    greedy agreement with float over 32 tokens (exact: >= 95%). What it buys: 330 graph nodes
    instead of 720 (GroupQueryAttention, packed projections) and a decode step 1.34x faster.
  - True (the default): exact. The weight becomes d * (q - z), z the integer zero point nearest -m / d, plus
    the per-block rest r = m + z * d (|r| <= d / 2) applied to the activations: x @ W^T =
    MatMulNBits(x) + blocksum(x) @ R^T, where blocksum(x) sums x over each block of 32 inputs and
    R [N, K/32] holds the rests. The second product is 1/32 of the first, and the sum equals
    x @ W^T up to float32 rounding of r (exact codes and steps); it costs a MatMul and an Add per
    projection, plus the block sums once per activation (a MatMul with a 0/1 matrix, or Reshape +
    ReduceSum for a down projection: ops.py). SmolLM2-135M: 690-720 graph nodes against 330 for
    the fast grid; a decode step 1.34x slower than the fast grid's (paired, shared machine).

  The default is exact: +27% perplexity is a second rounding's cost outside the tolerances the
  quantization tests hold int4 to (stories260K int4 within 10% of float, a kept grid within 2%); the fast grid is one option away, its error reported per weight.
  (The generated-C runtime's quantized kernel takes the rests natively: exact in one op there.)

Detection is by value, not by file type: any weight all of whose blocks verify (every value equal
to grid level within float rounding: 1e-6 of the block's range) is carried, whatever wrote it.
Only the block size of the grid (32: every GGUF block format here) is tried.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .methods import Quantized, refine_rows

#: The block length of every GGUF format the importer reads (Q4_0, Q4_1, Q8_0).
NATIVE_BLOCK = 32
_TOLERANCE = 1e-6
_SAMPLE = 256


@dataclasses.dataclass
class Native:
    """A weight's source grid: ``quantized`` (integer zero points; zero point 0 where ``offsets``
    is set) and, for Q4_1-like grids, the per-block ``offsets`` [N, blocks] added back to it."""

    quantized: Quantized
    offsets: np.ndarray | None
    #: "zero_point" (exact as MatMulNBits' own form), "offset" (exact with ``offsets``) or "fitted"
    #: (an offset grid moved to integer zero points by :func:`fit_integer_grid`: not exact)
    kind: str

    def dequantize(self) -> np.ndarray:
        values = self.quantized.dequantize()
        if self.offsets is None:
            return values
        return values + np.repeat(self.offsets, self.quantized.block_size, axis=1)[:, : values.shape[1]]


def find_native(rows: np.ndarray, bits: int) -> Native | None:
    """The grid of at most 2^``bits`` levels per block of 32 that ``rows`` [N, K] already sits on,
    or None when some block does not (K not a multiple of 32 included)."""
    n, k = rows.shape
    if k % NATIVE_BLOCK or not rows.size:
        return None
    blocks = rows.reshape(-1, NATIVE_BLOCK)
    # A float weight fails on its first blocks: decide on a sample before checking them all.
    sample = blocks[:_SAMPLE]
    if len(blocks) > _SAMPLE and _steps(sample, bits) is None:
        return None
    step = _steps(blocks, bits)
    if step is None:
        return None
    lo, qmax = blocks.min(axis=1), (1 << bits) - 1
    levels = np.rint((blocks - lo[:, None]) / step[:, None])  # 0 .. qmax from each block's minimum
    nblocks = k // NATIVE_BLOCK
    scales = step.astype(np.float32).reshape(n, nblocks)
    first = lo / step  # the minimum in steps: an integer when 0 is on the block's grid
    if np.all(np.abs(first - np.rint(first)) <= 1e-4):
        first = np.rint(first)
        # Any zero point z with 0 <= first + z and first + levels + z <= qmax works; prefer the middle.
        zero = np.clip(1 << (bits - 1), -first, qmax - first - levels.max(axis=1))
        codes = (levels + (first + zero)[:, None]).astype(np.uint8).reshape(n, nblocks, NATIVE_BLOCK)
        return Native(Quantized(codes, scales, zero.astype(np.uint8).reshape(n, nblocks), bits, NATIVE_BLOCK, k), None, "zero_point")
    # d * q + m = d * (q - z) + (m + z * d): with z the integer nearest -m / d the codes are
    # centred as MatMulNBits' own (its int8 activation rounding then costs what it costs any int4
    # weight) and the offset left is at most d / 2. The generated-C kernel recomputes this very z
    # (float32 -m / d, rint, clip: codegen/packing.py _half_mins checks it block by block) to
    # store GGUF's compact d * q + m form and still subtract ORT's zero point against its int8
    # activations; another choice here would only make it store zero points and float32 rests.
    zero = np.clip(np.rint(-first), 0, qmax)
    codes = levels.astype(np.uint8).reshape(n, nblocks, NATIVE_BLOCK)
    q = Quantized(codes, scales, zero.astype(np.uint8).reshape(n, nblocks), bits, NATIVE_BLOCK, k)
    offsets = lo.astype(np.float64) + zero * step.astype(np.float32).astype(np.float64)
    return Native(q, offsets.astype(np.float32).reshape(n, nblocks), "offset")


def _steps(blocks: np.ndarray, bits: int) -> np.ndarray | None:
    """Each block's grid step, or None when some block is on none of the candidate grids:
    (max - min) / (2^bits - 1) (Q4_1), max|w| / 2^(bits-1) (Q4_0) and max|w| / (2^(bits-1) - 1)
    (Q8_0), each as float16 holds it first (GGUF stores steps in float16)."""
    qmax = (1 << bits) - 1
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)
    amax = np.maximum(np.abs(lo), np.abs(hi))
    span = np.maximum(hi - lo, amax) + np.float32(1e-30)
    flat = hi == lo  # constant blocks: one level, any step
    step = np.where(flat, np.where(lo != 0, amax, 1), 0).astype(np.float32)
    todo = np.flatnonzero(~flat)
    for candidate in ((hi - lo) / qmax, amax / (1 << (bits - 1)), amax / ((1 << (bits - 1)) - 1)):
        for snapped in (_float16(candidate), candidate):
            if not len(todo):
                return step
            ok = _on_grid(blocks[todo], lo[todo], snapped[todo], span[todo], qmax)
            step[todo[ok]] = snapped[todo[ok]]
            todo = todo[~ok]
    return None if len(todo) else step


def _on_grid(blocks: np.ndarray, lo: np.ndarray, step: np.ndarray, span: np.ndarray, qmax: int) -> np.ndarray:
    """Per block: every value is lo + j * step for an integer j in [0, qmax], within tolerance."""
    safe = np.where(step > 0, step, 1).astype(np.float32)
    codes = np.rint((blocks - lo[:, None]) / safe[:, None])
    err = np.abs(codes * safe[:, None] + lo[:, None] - blocks).max(axis=1)
    return (step > 0) & (codes.max(axis=1) <= qmax) & (err <= _TOLERANCE * span)


def _float16(values: np.ndarray) -> np.ndarray:
    """Steps as float16 holds them (GGUF stores d in float16): the exact source step when the
    float32 recomputation is within rounding of it."""
    with np.errstate(over="ignore"):
        return values.astype(np.float16).astype(np.float32)


def fit_integer_grid(rows: np.ndarray, native: Native, *, scale_dtype=np.float32, threads: int | None = None) -> Native:
    """An offset grid (``native.kind == "offset"``) moved to the nearest grid MatMulNBits runs
    fast: the same bits and blocks of 32 with an integer zero point each, codes and scales re-fitted
    to ``rows`` by least squares from the source's own (d, rint(-m / d), q) (see
    :func:`methods.refine_rows`: no block ends farther from ``rows`` than that start)."""
    if native.offsets is None:
        return native
    return Native(refine_rows(rows, native.quantized, scale_dtype=scale_dtype, threads=threads), None, "fitted")
