"""The AVX2 tiles of the quantized matmul (kernels/qgemm_avx2.h): the 4-bit row tile that keeps a
block's unpacked codes in registers across 3..8 rows (icc_q_tile4_rows) against the tile every
row count used before it (icc_q_dot's, still the one for 1-2 rows and 8-bit codes), selected by
ICC_Q_ROWS_MIN. Both compute the same integer block sums and the same float epilogue in the same
order, so their outputs must be equal bit for bit -- on random data, where every float step
rounds, not only on the exact grids of test_qgemm (which also check both against float64)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from ._drivers import kernels
from .test_qgemm import bound, make_grid, run_q, tied

#: (kind, N, K, block): Q4_1 minimums (zero points derived in the kernel), float32 rests with zero
#: points, zero points, symmetric, float16 steps; blocks 16 / 32 / 64 / 128; partial last panels and
#: K not a multiple of the block.
CASES = [("q4_1", 40, 96, 32), ("q4_1_f32_min", 24, 96, 32), ("int4_zp", 37, 96, 16), ("int4_zp", 33, 300, 128),
         ("int4_sym", 40, 100, 32), ("int4_f16", 21, 200, 64)]


@pytest.fixture(scope="module")
def tiles(build_dir: Path) -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """(today's AVX2 build, the same with the row tile switched off) -- both without VNNI."""
    return kernels("haswell", build_dir), kernels("haswell -DICC_Q_ROWS_MIN=99", build_dir)


@pytest.mark.parametrize(("kind", "n", "k", "block"), CASES)
def test_row_tile_equals_the_dot_tile_bit_for_bit(tiles, kind: str, n: int, k: int, block: int) -> None:
    new, old = tiles
    g = make_grid(kind, n, k, block, seed=n + k)
    packed = g.packed()
    rng = np.random.default_rng(k)
    for m in range(1, 18):  # whole 8-row tiles, the 6 / 7-row rests split 4 + 2 / 5 + 2, and rests 1..5
        x = np.concatenate([rng.standard_normal((m - m // 2, k)), tied(rng, m // 2, k)]).astype(np.float32)
        got = run_q(new, x, g, packed)
        np.testing.assert_array_equal(got, run_q(old, x, g, packed), err_msg=f"{m} rows")
        err = np.abs(got - x.astype(np.float64) @ g.rows.T)
        assert np.all(err <= bound(x, g)), f"{m} rows"
