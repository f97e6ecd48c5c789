from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from ._cbuild import MARCHES
from ._drivers import kernels


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the kernel builds of the whole run, shared by pytest-xdist's workers (their
    temporary folders sit side by side in the run's own)."""
    root = tmp_path_factory.getbasetemp()
    folder = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "kernel-builds"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session", params=MARCHES)
def lib(request: pytest.FixtureRequest, build_dir: Path) -> ctypes.CDLL:
    """The kernels built for each code path: -march=native (AVX-512 VNNI where the CPU has it),
    haswell (AVX2 + FMA, no VNNI) and x86-64 (plain C)."""
    return kernels(request.param, build_dir)
