"""GPTQ (Frantar et al., 2022): quantize a weight column by column along the reduction axis K and
push each column's rounding error onto the columns not yet quantized, weighted by the inverse
Hessian of the layer's squared *output* error, H = sum over calibration inputs of x x^T.

Why: RTN and ``mse`` minimize each weight's own error, but what a model feels is the error of
X @ W. Where inputs are correlated (every projection after a norm), a rounding error in one column
can be largely cancelled by nudging the columns that see correlated inputs; GPTQ does exactly that
(optimal brain surgeon updates, one column at a time).

Kept compatible with MatMulNBits: the codes, scales and integer zero points form the same blocks of
``block_size`` along K that RTN produces. Two column orders, both with that layout:

* natural order: each block's (scale, zero point) is chosen when GPTQ reaches the block's first
  column, from the weights as the earlier error feedback has left them (the paper's groups), by the
  ``rtn`` or ``mse`` rule;
* ``act_order``: columns by decreasing curvature (diag H) first, the inputs that matter most
  quantized while the most columns are left to absorb their error; block parameters are then fixed
  beforehand from the unmodified weights ("static groups"), since a block's columns are no longer
  quantized together.

``plan.py`` runs both and keeps, per weight, the one with the lower output error on the calibration
inputs. Measured (int4, block 32): SmolLM2-135M re-rounded from its Q4_1 values, perplexity +30.7%
natural order, +19.0% act-order, +13.5% per-weight choice (RTN +31.9%); all-MiniLM-L6-v2 embedding
cosine 0.9850 / 0.9840 / 0.9841; stories260K KL divergence to float 0.054 / 0.056 / 0.057 (its
spread over calibration seeds, 0.045-0.058, is wider than the differences).

Numerics: H is accumulated and inverted in float64, dampened by ``damp`` times its mean diagonal
(the paper's 1%); a Cholesky factor that fails gets ten times the dampening, deterministically.
Inputs that never fire on the calibration set (zero diagonal) keep their weights (the paper zeroes
them, which is only safe when calibration covers every input the model will see) and their rounding
is not propagated. Columns are processed in lazy batches of 128 (the error of a batch reaches the
columns after it in one matrix product). Everything is sequential numpy: byte-identical results
for the same inputs on the same machine.
"""

from __future__ import annotations

import numpy as np

from .methods import Quantized, block_params

#: Columns per lazy batch (the paper's 128): one matrix product per batch for the columns after it.
LAZY_BATCH = 128
DAMP = 0.01


def gptq_rows(
    rows: np.ndarray, hessian: np.ndarray, bits: int, block_size: int, *, symmetric: bool = False,
    method: str = "mse", damp: float = DAMP, act_order: bool = False,
) -> Quantized:
    """Quantize ``rows`` [N, K] (output channel n in row n) given ``hessian`` [K, K] (x x^T summed
    over calibration inputs; any positive multiple gives the same result). ``act_order``: columns
    by decreasing curvature, each block's parameters fixed beforehand from the unmodified weights."""
    n, k = rows.shape
    block = block_size
    blocks = -(-k // block)
    width = blocks * block
    # Work on W^T [K, N]: a column of W is then a contiguous row.
    wt = np.zeros((width, n), np.float32)
    wt[:k] = rows.T
    h = np.zeros((width, width), np.float64)
    h[:k, :k] = hessian
    qmax = (1 << bits) - 1
    scales = np.empty((blocks, n), np.float32)
    zeros = np.empty((blocks, n), np.float32)
    order = np.arange(width)
    if act_order:
        for g in range(blocks):
            s, z = block_params(np.ascontiguousarray(wt[g * block:(g + 1) * block].T), qmax, symmetric, method)
            scales[g], zeros[g] = s[:, 0], z[:, 0]
        order = np.argsort(-np.diag(h), kind="stable")
        wt, h = wt[order], h[order][:, order]
    u = _inverse_factor(h, damp)  # upper Cholesky factor of H^-1
    codes = np.empty((width, n), np.uint8)
    live = np.diag(h) > 0
    for start in range(0, width, LAZY_BATCH):
        stop = min(start + LAZY_BATCH, width)
        w1 = wt[start:stop]  # a view: updated in place
        u1 = u[start:stop, start:stop].astype(np.float32)
        errors = np.zeros((stop - start, n), np.float32)
        for i in range(stop - start):
            col = start + i
            g = order[col] // block
            if not act_order and col % block == 0:
                s, z = block_params(np.ascontiguousarray(wt[col:col + block].T), qmax, symmetric, method)
                scales[g], zeros[g] = s[:, 0], z[:, 0]
            w = w1[i]
            q = np.clip(np.rint(w / scales[g]) + zeros[g], 0, qmax)
            codes[order[col]] = q
            if not live[col]:
                continue
            err = (w - (q - zeros[g]) * scales[g]) / u1[i, i]
            w1[i + 1:] -= np.outer(u1[i, i + 1:], err)
            errors[i] = err
        if stop < width:
            wt[stop:] -= u[start:stop, stop:].T.astype(np.float32) @ errors
    return Quantized(
        np.ascontiguousarray(codes.T).reshape(n, blocks, block), np.ascontiguousarray(scales.T),
        np.ascontiguousarray(zeros.T).astype(np.uint8), bits, block, k,
    )


def _inverse_factor(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper triangular U with (H + lambda I)^-1 = U^T U, lambda = damp * mean(diag H).

    One Cholesky factorization of H with its rows and columns reversed: J H J = L L^T gives
    H = (J L J)(J L J)^T with J L J upper triangular, so U = (J L J)^-1 = J L^-1 J."""
    diag = np.diag(h)
    mean = float(diag[diag > 0].mean()) if np.any(diag > 0) else 1.0
    h = h.copy()
    dead = np.flatnonzero(diag <= 0)
    h[dead, dead] = mean  # never-firing inputs: a neutral curvature, their errors are not propagated
    flipped = h[::-1, ::-1]
    for attempt in range(6):
        lam = damp * mean * 10.0**attempt
        try:
            lower = np.linalg.cholesky(flipped + lam * np.eye(len(h)))
        except np.linalg.LinAlgError:
            continue
        return np.ascontiguousarray(_lower_inverse(lower)[::-1, ::-1])
    raise np.linalg.LinAlgError("the calibration Hessian is not positive definite even with 10^5 x dampening")


def _lower_inverse(lower: np.ndarray) -> np.ndarray:
    """Inverse of a lower triangular matrix by halves ([[A, 0], [B, C]]^-1 = [[A^-1, 0],
    [-C^-1 B A^-1, C^-1]]): matrix products only, a quarter of a general inverse's work."""
    n = len(lower)
    if n <= 128:
        return np.tril(np.linalg.inv(lower))
    h = n // 2
    a, c = _lower_inverse(lower[:h, :h]), _lower_inverse(lower[h:, h:])
    out = np.zeros_like(lower)
    out[:h, :h], out[h:, h:] = a, c
    out[h:, :h] = -(c @ lower[h:, :h]) @ a
    return out


def output_error(rows: np.ndarray, dequantized: np.ndarray, hessian: np.ndarray, max_rows: int | None = None) -> float:
    """||X (W - Q(W))^T|| / ||X W^T|| over the calibration inputs, from H alone: the layer's relative
    output error, the figure GPTQ minimizes (and the one to compare methods by). ``max_rows``
    estimates it on evenly spaced output channels (the report's figure: N K^2 for every weight
    would cost as much as GPTQ itself)."""
    step = max(1, -(-rows.shape[0] // max_rows)) if max_rows else 1
    h = np.asarray(hessian, np.float64)
    diff = (dequantized[::step] - rows[::step]).astype(np.float64)
    ref = rows[::step].astype(np.float64)
    num = float(np.sum((diff @ h) * diff))
    den = float(np.sum((ref @ h) * ref))
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0
