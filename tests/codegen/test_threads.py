"""The generated C with 2 threads against 1 thread on the same build: every parallel region (the
matmuls' row and column splits, attention's heads, elementwise loops) must give what the serial
code gives. The default run's other tests may run with one thread per test worker, so this is
where the parallel paths of a whole model are exercised on purpose."""

from __future__ import annotations

import numpy as np
import pytest

import infercc
from infercc.codegen.build import OPT_ENV
from tests.fixtures import catalog


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_two_threads_equal_one(quantize: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The int4 model is built at -O3, the level users get (the suite's other models build at -O1:
    conftest.py; the float matmul's -O3 code is tested by test_gemm's kernel builds). Splits are by
    output rows/columns/heads, so each value is computed by one thread in the same order as
    serially: equal within float32 rounding of a reordered reduction at most (1e-5)."""
    if quantize:
        monkeypatch.setenv(OPT_ENV, "-O3")
    source = str(catalog.fixture_path("llama_dynamo"))
    options = {"backend": "c", "kv_cache_dtype": "fp32", "quantize": quantize}
    one = infercc.compile(source, intra_op_threads=1, **options)
    two = infercc.compile(source, intra_op_threads=2, **options)
    assert one.runtime == two.runtime == "c", one.runtime_reason
    feeds = catalog.random_feeds("llama_dynamo", 3, 40, padding=True, seed=5)
    got, expected = two.run(feeds), one.run(feeds)
    mask = feeds["attention_mask"].astype(bool)
    for name, value in expected.items():
        a, b = got[name], value
        if b.ndim == 3 and b.shape[:2] == mask.shape:  # padded positions are unspecified: real ones only
            a, b = a[mask], b[mask]
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=name)
    prompt = [int(t) for t in feeds["input_ids"][0, :12]]
    assert one.generate(prompt, max_new_tokens=16).token_ids == two.generate(prompt, max_new_tokens=16).token_ids
