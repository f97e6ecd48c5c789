"""Build a kernel header into a shared object with the real gcc and load it with ctypes.

The kernels are ``static`` functions (the generated model includes them); the driver wraps each
in an exported ``t_<name>`` taking pointers, which is all the tests need."""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

KERNELS = Path(__file__).resolve().parents[2] / "infercc" / "codegen" / "kernels"
#: -march -> the code path it selects: AVX-512 (+VNNI here), AVX2+FMA (no VNNI), AVX2 with
#: AVX-VNNI (run only where the CPU has it), plain C.
MARCHES = ("native", "haswell", "haswell -mavxvnni", "x86-64")
FLAGS = ("-O3", "-fopenmp", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-std=c11")

_built: dict[tuple[str, str], ctypes.CDLL] = {}


def build(source: str, march: str, out_dir: Path) -> ctypes.CDLL:
    """Compile ``source`` (a C driver that includes kernel headers) for ``-march=<march>``; cached
    per process by (source, march), and in ``out_dir`` by (source, headers, march) for the other
    test processes of the run (an -O3 build of every matmul tile takes 10-40 s: the first process
    to need it builds it under a lock, the others wait and load it)."""
    key = (hashlib.sha256(source.encode()).hexdigest()[:16], march)
    if key in _built:
        return _built[key]
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    cpu = set(Path("/proc/cpuinfo").read_text().split())
    if "avxvnni" in march and "avx_vnni" not in cpu:
        pytest.skip("this CPU has no AVX-VNNI")
    if march == "native" and {"avx2", "fma", "f16c"} <= cpu and not {"avx512f", "avx_vnni"} & cpu:
        pytest.skip("-march=native compiles the kernels' AVX2 + FMA + F16C path on this CPU (no AVX-512, no "
                    "AVX-VNNI): the haswell build tests it")
    headers = b"".join(path.read_bytes() for path in sorted(KERNELS.glob("*.h")))
    digest = hashlib.sha256(source.encode() + headers + march.encode()).hexdigest()[:16]
    c_file = out_dir / f"drv_{digest}_{march.replace(' ', '').replace('-', '')}.c"
    so_file = c_file.with_suffix(".so")
    with open(c_file.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not so_file.exists():
            c_file.write_text(source)
            partial = c_file.with_suffix(f".{os.getpid()}.so")
            cmd = ["gcc", *FLAGS, *f"-march={march}".split(), f"-I{KERNELS}", str(c_file), "-o", str(partial), "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise AssertionError(f"gcc failed ({' '.join(cmd)}):\n{done.stderr}")
            os.replace(partial, so_file)
    lib = ctypes.CDLL(str(so_file))
    _built[key] = lib
    return lib


def ptr(a: np.ndarray | None) -> ctypes.c_void_p:
    """A pointer to ``a``'s data (None -> NULL); ``a`` must be contiguous and kept alive."""
    if a is None:
        return ctypes.c_void_p()
    assert a.flags.c_contiguous
    return ctypes.c_void_p(a.ctypes.data)


def aligned(a: np.ndarray) -> np.ndarray:
    """A 64-byte aligned copy of ``a``, as the weight blob holds every packed weight."""
    raw = np.empty(a.nbytes + 64, np.uint8)
    start = (-raw.ctypes.data) % 64
    out = raw[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out
