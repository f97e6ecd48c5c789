"""The default test run spreads test files over one worker process per core (pytest-xdist, see
pyproject's addopts). A worker then owns one core: its OpenMP and BLAS pools start with one thread
unless the user set a count, because two workers each running two spinning kernel threads on two
cores stall every parallel region on a descheduled thread. The parallel paths themselves are tested
with explicit thread counts (tests/codegen/test_threads.py and the kernel tests)."""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, "1")
