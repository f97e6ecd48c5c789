"""fp32 GEMM/GEMV (kernels/gemm.h) on packing.pack_f32's panels, built with real gcc for each code
path, against numpy in float64."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from infercc.codegen.packing import PANEL, pack_f32

from ._cbuild import aligned, ptr


def run_gemm(lib: ctypes.CDLL, x: np.ndarray, w: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    m, k = x.shape
    n = w.shape[1]
    packed = aligned(pack_f32(w))
    y = np.full((m, n), np.nan, np.float32)
    lib.t_gemm_f32(m, n, k, ptr(x), ptr(packed), ptr(bias), ptr(y))
    return y


def test_pack_f32_layout() -> None:
    w = np.arange(5 * 20, dtype=np.float32).reshape(5, 20)
    p = pack_f32(w)
    assert p.shape == (2, 5, PANEL)
    assert p[0, 3, 7] == w[3, 7] and p[1, 4, 3] == w[4, 19]
    assert not p[1, :, 4:].any()  # padded columns are zero


@pytest.mark.parametrize("m", [1, 3, 17, 128])
@pytest.mark.parametrize(("n", "k"), [(40, 33), (16, 7), (97, 130)])
def test_gemm_f32_matches_numpy(lib: ctypes.CDLL, m: int, n: int, k: int) -> None:
    rng = np.random.default_rng(m * 1000 + n + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if m != 3 else None
    got = run_gemm(lib, x, w, bias)
    ref = x.astype(np.float64) @ w + (0 if bias is None else bias)
    scale = np.abs(x).astype(np.float64) @ np.abs(w) + (0 if bias is None else np.abs(bias))
    assert np.all(np.abs(got - ref) <= 1e-5 * scale + 1e-30), np.max(np.abs(got - ref) / scale)


@pytest.mark.parametrize(("m", "n", "k"), [(8, 40, 600), (30, 77, 517), (128, 48, 300)])
def test_gemm_f32_packed_rows_k_blocks(lib: ctypes.CDLL, m: int, n: int, k: int) -> None:
    """M at or above the packed-rows threshold with K over one block (ICC_F32_KC = 256): partial
    sums carried in y between K-blocks, bias added once, ragged row tiles and column panels."""
    rng = np.random.default_rng(m + n + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    got = run_gemm(lib, x, w, bias)
    ref = x.astype(np.float64) @ w + bias
    scale = np.abs(x).astype(np.float64) @ np.abs(w) + np.abs(bias)
    assert np.all(np.abs(got - ref) <= 1e-5 * scale), np.max(np.abs(got - ref) / scale)


def test_gemm_f32_empty_and_k0(lib: ctypes.CDLL) -> None:
    y = np.full((2, 3), np.nan, np.float32)
    bias = np.array([1, 2, 3], np.float32)
    w = aligned(np.zeros(PANEL, np.float32))
    lib.t_gemm_f32(0, 3, 4, ptr(np.zeros(1, np.float32)), ptr(w), ptr(bias), ptr(y))
    assert np.isnan(y).all()  # M = 0: nothing written
    lib.t_gemm_f32(2, 3, 0, ptr(np.zeros(1, np.float32)), ptr(w), ptr(bias), ptr(y))
    assert np.array_equal(y, np.broadcast_to(bias, (2, 3)))
