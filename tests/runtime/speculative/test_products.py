"""The proposers' small products: the same numbers as the plain definitions, and BLAS on one
thread only while a proposer runs."""

import numpy as np
import pytest

from infercc.runtime.speculative.products import attend, linear, one_blas_thread


@pytest.mark.parametrize("rows", [0, 1, 2, 4, 5, 9])
def test_linear_is_x_times_weight_transposed(rows):
    rng = np.random.default_rng(rows)
    x, w = rng.standard_normal((rows, 40), np.float32), rng.standard_normal((24, 40), np.float32)
    expected = x.astype(np.float64) @ w.T.astype(np.float64)
    got = linear(x, w)
    assert got.shape == (rows, 24)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    if rows:
        np.testing.assert_allclose(linear(x[0], w), expected[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,past", [(1, 0), (1, 6), (3, 5)])
def test_attend_is_causal_softmax_attention(n, past):
    rng = np.random.default_rng(n + past)
    q = rng.standard_normal((n, 2, 8), np.float32)
    keys, values = (rng.standard_normal((past + n, 2, 8), np.float32) for _ in range(2))
    expected = np.zeros((n, 2, 8))
    for i in range(n):
        for h in range(2):
            s = keys[:past + i + 1, h] @ q[i, h] * 0.5
            p = np.exp(s - s.max())
            expected[i, h] = (p / p.sum()) @ values[:past + i + 1, h]
    np.testing.assert_allclose(attend(q, keys, values, 0.5, past), expected.reshape(n, -1), rtol=1e-5, atol=1e-5)


def test_one_blas_thread_limits_and_restores():
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before = blas_threads()
    if not before:
        pytest.skip("no BLAS library that threadpoolctl can see is loaded (NumPy without BLAS)")
    with one_blas_thread():
        assert blas_threads() == [1] * len(before)
    assert blas_threads() == before
