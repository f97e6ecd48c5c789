"""numpy matmul at two sizes: a sanity check of the harness itself.

Why: the expected answer is known (n=256 does 8x the flops of n=128), so a run whose ratio
is far from that, or whose IQR is huge, says the machine is too noisy to trust other cases.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.harness import Case, ConfigSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument_group("matmul case").add_argument(
        "--sizes", type=int, nargs="+", default=[256, 128], help="square sizes; the first is the baseline"
    )


def build_case(args: argparse.Namespace) -> Case:
    configs = [
        ConfigSpec(f"n{n}", f"{__name__}:setup_matmul", {"n": n}, f"float32 {n}x{n} @ {n}x{n}")
        for n in args.sizes
    ]
    return Case("matmul", "numpy float32 square matmul (harness sanity check)", configs)


def setup_matmul(threads: int, n: int) -> tuple[Callable[[], Any], dict[str, Any]]:
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    return (lambda: a @ b), {"gflop": 2 * n**3 / 1e9}
