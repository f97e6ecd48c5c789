"""Numeric equivalence checks: the optimized graph against the model it came from."""

from __future__ import annotations

import numpy as np

from ..errors import InferccError
from ..ir import Model
from .feeds import random_feeds, with_empty_cache
from .ort_backend import OrtBackend


class NumericMismatch(InferccError):
    pass


def max_difference(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> tuple[float, str]:
    """Largest |a - b| / max(1, |b|) over all outputs, and which output it was in."""
    worst, where = 0.0, ""
    for name, ref in expected.items():
        got = actual[name]
        if ref.shape != got.shape:
            return float("inf"), f"{name} (shape {got.shape} vs {ref.shape})"
        if ref.dtype != got.dtype:
            return float("inf"), f"{name} (dtype {got.dtype} vs {ref.dtype})"
        if ref.dtype.kind in "fc":
            wide = np.complex128 if ref.dtype.kind == "c" else np.float64
            ref64, got64 = ref.astype(wide), got.astype(wide)
            nan = np.isnan(ref64)
            if not np.array_equal(nan, np.isnan(got64)):
                d = float("inf")  # NaN where there was none, or a number where NaN was
            else:
                same = (ref64 == got64) | nan  # equal infinities too (inf - inf would be NaN)
                with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                    diff = np.where(same, 0.0, np.abs(got64 - ref64) / np.maximum(1.0, np.abs(ref64)))
                d = float(np.max(diff)) if diff.size else 0.0
                if np.isnan(d):
                    d = float("inf")
        else:
            d = 0.0 if np.array_equal(ref, got) else float("inf")
        if d > worst:
            worst, where = d, name
    return worst, where


class NumericCheck:
    """Reference outputs of the unoptimized model, computed once, compared after every pass."""

    def __init__(self, reference: Model, tolerance: float, *, seed: int = 0) -> None:
        self.tolerance = tolerance
        self.seed = seed
        self.rebaseline(reference)

    def rebaseline(self, reference: Model) -> None:
        """Make ``reference`` the model later passes are compared with (after a pass that changes
        numbers or inputs on purpose); feeds are remade in case the inputs changed."""
        self.feeds = random_feeds(reference.graph, np.random.default_rng(self.seed))
        self.expected = OrtBackend(reference, ["CPUExecutionProvider"]).run(self.feeds)

    def compare(self, model: Model) -> float:
        actual = OrtBackend(model, ["CPUExecutionProvider"]).run(dict(with_empty_cache(model.graph, self.feeds)))
        diff, where = max_difference(self.expected, actual)
        if diff > self.tolerance:
            raise NumericMismatch(f"outputs changed: max relative difference {diff:.3g} in {where} > tolerance {self.tolerance}")
        return diff
