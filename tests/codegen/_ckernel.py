"""Build a kernel header of the generated-C runtime into a tiny shared library with real gcc and
load it with ctypes: one driver per (header, -march), so each vector path (AVX-512, AVX2+F16C,
plain C) is compiled and tested on this machine as the code generator would compile it."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[2] / "infercc" / "codegen" / "kernels"
#: -march values: the host's best, AVX2+FMA+F16C without AVX-512, and baseline x86-64 (plain C).
MARCHES = ("native", "haswell", "x86-64")
FLAGS = ("-O3", "-fopenmp", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC")

DRIVER = """\
/* api.h declares every kernel `static`; a driver including one header leaves the others undefined */
#pragma GCC diagnostic ignored "-Wunused-function"
#include "{header}"
#include <omp.h>
{exports}
void icc_test_threads(int n) {{ omp_set_num_threads(n); }}
"""


def build(folder: Path, header: str, exports: str, march: str) -> ctypes.CDLL:
    """Compile ``header`` with the C ``exports`` (wrappers with external linkage) for ``march``;
    skips when gcc is absent, fails the test on any warning."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    folder.mkdir(parents=True, exist_ok=True)
    name = march.replace(" ", "").replace("-", "_")  # march may carry more flags: "haswell -mno-f16c"
    source = folder / f"driver_{name}.c"
    source.write_text(DRIVER.format(header=header, exports=exports))
    target = folder / f"driver_{name}.so"
    cmd = [gcc, *FLAGS, *f"-march={march}".split(), f"-I{KERNELS}", str(source), "-o", str(target), "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"gcc -march={march} failed:\n{done.stderr}")
    return ctypes.CDLL(str(target))


def cpu_has(*flags: str) -> bool:
    """Whether /proc/cpuinfo lists every flag (a -march=native build of a feature needs it)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    words = set(text.split())
    return all(f in words for f in flags)
