"""Setup functions for the harness tests; a plain module (no pytest import) so fresh workers load it fast."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.harness import SkipConfig


def logged_matmul(threads: int, name: str, log: str, n: int = 16) -> tuple[Callable[[], object], dict]:
    """A tiny matmul that appends 'setup NAME' / 'call NAME' to `log`, so tests can check the real order."""
    path = Path(log)
    with path.open("a") as f:
        f.write(f"setup {name}\n")
    a = np.ones((n, n), np.float32)

    def call() -> object:
        with path.open("a") as f:
            f.write(f"call {name}\n")
        return a @ a

    return call, {"n": n, "threads": threads}


def failing_setup(threads: int) -> Callable[[], None]:
    raise RuntimeError("boom: setup exploded")


def skipping_setup(threads: int) -> Callable[[], None]:
    raise SkipConfig("optional dependency missing")


def crashing_setup(threads: int) -> Callable[[], None]:
    os._exit(3)  # simulates a segfault in a native runtime: no result, no traceback


def metered_call(threads: int, rate: float, prefill: float) -> Callable[[], object]:
    """A call that reports figures of its own (CallMetrics), as the decode case's generations do."""
    from benchmarks.harness import CallMetrics

    return lambda: CallMetrics(decode_tok_per_s=rate, prefill_s=prefill, new_tokens=4)
