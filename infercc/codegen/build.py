"""Compiling generated C: the compiler, its flags, and a build cache in the user cache directory.

The cache key is (source, flags, compiler version): the same model on the same machine builds once.
``-march=native`` for libraries built where they run; ``PORTABLE`` flags for artifacts that move.
Writes are atomic (build in a temporary file, rename), so concurrent builds of one model are safe.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

NATIVE = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-Wall", "-Wextra", "-std=gnu11")
PORTABLE = ("-O3", "-march=x86-64-v2", "-fopenmp", "-fPIC", "-shared", "-Wall", "-Wextra", "-std=gnu11")
#: Added to the flags for a profiling build (per-step timers, ``icc_profile``): being part of the
#: flags, it gives the profiled library its own cache entry beside the plain one.
PROFILE = "-DICC_PROFILE"
#: Environment variable naming an optimization level that replaces ``-O3`` in every build, e.g.
#: ``-O1`` builds in about a third of the time (the test suite builds dozens of small models).
#: No level enables value-changing math (no -ffast-math); only the contraction of a * b + c into
#: one fused multiply-add, which gcc does from -O2, can move results by a rounding.
OPT_ENV = "INFERCC_C_OPT"
OPT_LEVELS = ("-O0", "-O1", "-O2", "-O3", "-Os", "-Og")
#: The system headers the kernels include (kernels/common.h, under the same conditions). gcc
#: spends ~0.6 s of a build parsing them (immintrin.h alone is 1.4 MB of inline functions), more
#: than it spends compiling a small model, so they are precompiled once per (flags, compiler) and
#: force-included: the source's own #includes then find their include guards set. A header gcc
#: cannot use (other flags, another version) is silently read as text: same library, no speedup.
SYSTEM_HEADERS = """#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
"""


class BuildError(Exception):
    """The C compiler is missing or rejected the source (the message holds its first errors)."""


def cache_dir() -> Path:
    root = os.environ.get("INFERCC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "infercc")
    path = Path(root) / "c"
    path.mkdir(parents=True, exist_ok=True)
    return path


def compiler() -> str:
    """$CC, else gcc, else clang; BuildError when none is installed."""
    for candidate in (os.environ.get("CC"), "gcc", "clang", "cc"):
        if candidate and shutil.which(candidate):
            return candidate
    raise BuildError("no C compiler found (install gcc, or set CC); the model runs on ONNX Runtime instead")


@functools.cache
def compiler_version(cc: str) -> str:
    return subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout.splitlines()[0]


def with_opt_level(flags: tuple[str, ...]) -> tuple[str, ...]:
    """``flags`` with ``-O3`` replaced by $INFERCC_C_OPT when set (BuildError naming the accepted
    levels when it is anything else)."""
    level = os.environ.get(OPT_ENV)
    if not level:
        return flags
    if level not in OPT_LEVELS:
        raise BuildError(f"{OPT_ENV}={level!r} is not an optimization level: use one of {', '.join(OPT_LEVELS)} "
                         "or unset it")
    return tuple(level if f == "-O3" else f for f in flags)


def build(source: str, flags: tuple[str, ...] = NATIVE) -> Path:
    """The shared library for ``source`` (from the cache when built before), with the
    optimization level of $INFERCC_C_OPT when set."""
    flags = with_opt_level(flags)
    cc = compiler()
    key = hashlib.sha256("\0".join([source, " ".join(flags), compiler_version(cc)]).encode()).hexdigest()[:32]
    target = cache_dir() / f"model-{key}.so"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(prefix="infercc-c-") as tmp:
        src = Path(tmp) / "model.c"
        src.write_text(source)
        out = Path(tmp) / "model.so"
        code, stderr = _compile([cc, *flags, *precompiled(cc, flags), str(src), "-o", str(out), "-lm"])
        if code != 0:
            errors = [line for line in stderr.splitlines() if "error" in line][:3]
            raise BuildError(f"{cc} could not build the generated C: {' | '.join(errors) or stderr[:300]}")
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(out, partial)
        os.replace(partial, target)
    return target


def precompiled(cc: str, flags: tuple[str, ...]) -> list[str]:
    """The arguments that force-include the precompiled SYSTEM_HEADERS built with exactly these
    flags (built on first use, cached beside the libraries), or none where that is not possible
    (clang, whose precompiled headers work otherwise; a compiler that refused to build one)."""
    version = compiler_version(cc)
    if "clang" in version.lower():
        return []
    key = hashlib.sha256("\0".join([SYSTEM_HEADERS, " ".join(flags), version]).encode()).hexdigest()[:32]
    folder = cache_dir() / f"headers-{key}"
    header = folder / "icc_system.h"
    if (folder / "icc_system.h.gch").exists():
        return ["-include", str(header)]
    if (folder / "failed").exists():
        return []
    folder.mkdir(exist_ok=True)
    if not header.exists():
        partial = header.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(SYSTEM_HEADERS)
        os.replace(partial, header)
    partial = folder / f"icc_system.{os.getpid()}.gch.tmp"
    done = subprocess.run([cc, *flags, "-x", "c-header", str(header), "-o", str(partial)], capture_output=True,
                          check=False)
    if done.returncode:
        (folder / "failed").write_bytes(done.stderr[:2000])
        partial.unlink(missing_ok=True)
        return []
    os.replace(partial, folder / "icc_system.h.gch")
    return ["-include", str(header)]


def _compile(command: list[str]) -> tuple[int, str]:
    """Run the compiler (exit code, stderr), showing the time it has taken on a terminal: a first
    build of a model's library takes gcc 10-30 s at -O3, which would otherwise look like a hang."""
    from tqdm import tqdm

    level = next((f for f in command if f.startswith("-O")), "")
    name = f"building the model's C library ({Path(command[0]).name} {level})"
    with tqdm(total=None, desc=name, bar_format="{desc}: {elapsed}", file=sys.stderr, leave=False,
              disable=None) as bar, subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                                     text=True) as proc:
        while True:
            try:
                _, stderr = proc.communicate(timeout=0.25)
                return proc.returncode, stderr
            except subprocess.TimeoutExpired:
                bar.refresh()


def warnings_of(source: str, flags: tuple[str, ...] = NATIVE) -> list[str]:
    """The compiler's warnings for ``source`` (for tests: generated C must compile cleanly): a
    whole compile at the flags' optimization level ($INFERCC_C_OPT applies), since a syntax-only
    pass misses what the compiler finds only once it has the whole unit (an unused function) or
    optimizes it (a maybe-uninitialized value)."""
    with tempfile.TemporaryDirectory(prefix="infercc-c-") as tmp:
        src = Path(tmp) / "model.c"
        src.write_text(source)
        cc, flags = compiler(), with_opt_level(flags)
        done = subprocess.run([cc, *flags, *precompiled(cc, flags), str(src), "-o", str(Path(tmp) / "model.so"), "-lm"],
                              capture_output=True, text=True, check=False)
    return [line for line in done.stderr.splitlines() if "warning" in line or "error" in line]
