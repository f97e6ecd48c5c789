"""Machine and thread facts for benchmark runs.

Why: results from a noisy machine are only comparable with the same CPU, core count, load,
thread pinning and library versions, so all of that is recorded next to every result.
"""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
RECORDED_PACKAGES = ("onnxruntime", "onnx", "numpy", "infercc")


def pin_threads(threads: int) -> dict[str, Any]:
    """Pin BLAS/OpenMP thread pools through the environment (inherited by fresh workers).

    In-process it only takes effect if numpy was not imported yet, so that fact is recorded.
    Setup functions receive `threads` and must pin their own runtime (e.g. ORT intra-op threads).
    """
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(threads)
    return {
        "threads": threads,
        "env": list(THREAD_ENV_VARS),
        "numpy_imported_before_pin": "numpy" in sys.modules,
    }


def worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({var: str(threads) for var in THREAD_ENV_VARS})
    paths = [str(REPO_ROOT)] + [p or os.getcwd() for p in sys.path]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def machine_info() -> dict[str, Any]:
    """Facts needed to judge whether two result files are comparable at all."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: _package_version(name) for name in RECORDED_PACKAGES},
    }
    info.update(_git_state())
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _package_version(name: str) -> str | None:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        pass
    try:  # e.g. infercc used from a source checkout without being installed
        module = importlib.import_module(name)
    except Exception:  # a broken package just has no version
        return None
    return str(getattr(module, "__version__", "source checkout (no version)"))


def _git_state() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(status) if status is not None else None}
