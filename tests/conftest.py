"""The default test run spreads test files over one worker process per core (pytest-xdist, see
pyproject's addopts). A worker then owns one core: its OpenMP and BLAS pools start with one thread
unless the user set a count, because two workers each running two spinning kernel threads on two
cores stall every parallel region on a descheduled thread. The parallel paths themselves are tested
with explicit thread counts (tests/codegen/test_threads.py and the kernel tests).

The generated C of the models the tests compile is built at -Og unless INFERCC_C_OPT is set: the
suite builds about 75 small models, -O3 takes about three times as long as -O1 for the same values
(within a rounding where gcc fuses a * b + c), and -Og another ~30% less than -O1 (2.5 vs 3.6 s for
a 2-layer int4 llama; the C decode-loop and backend tests ran 64 s instead of 84). The kernel drivers (tests/codegen/_ckernel.py) and
test_threads.py build at -O3, the level users get.

Config.backend defaults to "auto" (the generated-C runtime on a CPU). The suite pins ONNX Runtime
as its default instead (INFERCC_BACKEND=ort, unless set): most tests check a pass's graph against
ONNX Runtime's execution of the unoptimized model, and the C runtime would add a gcc build to each
of their ~250 compiles. The C runtime's tests ask for it (backend="c" or "auto"), and
tests/test_config.py checks the default itself with the variable unset."""

from __future__ import annotations

import os

os.environ.setdefault("INFERCC_C_OPT", "-Og")
os.environ.setdefault("INFERCC_BACKEND", "ort")
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, "1")
