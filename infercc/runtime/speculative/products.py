"""The small matrix products of the NumPy proposers (Medusa heads, the EAGLE draft layer), fast and
out of the model's way.

Two things make a draft's product slow on a small CPU, and both were measured on SmolLM2-135M's
EAGLE draft (one 576-wide layer, 2 cores): ``np.einsum`` runs its own loops, not BLAS (150 us for
a 1152 x 576 product against 45 us for BLAS's), which made one draft forward cost 2 ms, a third
of a target step; and a multi-threaded BLAS leaves its threads spinning on the cores the
generated-C model's OpenMP threads need next, which halved the speed of the verify steps. So the
proposers run BLAS with one thread (``one_blas_thread``, around each ``propose``), and a product
over 2..4 rows is that many matrix-vector products (OpenBLAS's small-M matrix product costs 5x
its matrix-vector one there).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import numpy as np

#: Most rows computed as separate matrix-vector products (see the module docstring).
GEMV_ROWS = 4


@functools.cache
def _controller():
    """threadpoolctl's view of the BLAS libraries loaded in this process (scanned once)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS runs on one thread inside (process-wide while it lasts: the engine and the loops call
    proposers from their one stepping thread, between model runs)."""
    with _controller().limit(limits=1, user_api="blas"):
        yield


def linear(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``x`` [n, in] (or [in]) times ``weight`` [out, in] transposed: [n, out] (or [out])."""
    if x.ndim == 1:
        return weight @ x
    if 1 < len(x) <= GEMV_ROWS:
        return np.stack([weight @ row for row in x])
    return x @ weight.T


def attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float, past: int) -> np.ndarray:
    """Causal softmax attention of ``q`` [n, heads, d] over ``keys``/``values`` [T, heads, d], the
    last n keys being the queries' own (row i sees keys 0 .. past + i): [n, heads * d]."""
    n = len(q)
    scores = np.matmul(q.transpose(1, 0, 2), keys.transpose(1, 2, 0)) * np.float32(scale)  # [heads, n, T]
    if n > 1:
        rows, cols = np.triu_indices(n, 1)
        scores[:, rows, past + cols] = -np.inf
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    scores /= scores.sum(-1, keepdims=True)
    return np.matmul(scores, values.transpose(1, 0, 2)).transpose(1, 0, 2).reshape(n, -1)  # [n, heads * d]
