"""Run numpy's BLAS on one thread while GPTQ works.

Why: GPTQ is a long chain of small and medium linear-algebra calls (a Cholesky factorization and a
triangular inverse per Hessian, a rank-1 update per column). OpenBLAS's threads spin-wait between
calls, and on a machine whose cores are busy (the usual case for a compile next to other work) that
costs 5-7x: all-MiniLM-L6-v2's GPTQ took 30-44 s with two threads on two loaded cores, 5.5 s with
one. One thread also makes the result independent of the machine's core count (OpenBLAS splits
some reductions by thread, which changes their rounding).

This is what ``threadpoolctl`` does, reduced to numpy's bundled OpenBLAS (found among the loaded
libraries on Linux); elsewhere, or if the library exposes no thread control, nothing changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator

_PREFIXES = ("scipy_openblas", "openblas")
_SUFFIXES = ("64_", "")


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    controls = _controls()
    if controls is None:
        yield
        return
    get, set_ = controls
    before = get()
    set_(1)
    try:
        yield
    finally:
        set_(before)


def _openblas(path: str) -> bool:
    name = path.rsplit("/", 1)[-1].lower()
    return "openblas" in name and ".so" in name


@functools.lru_cache(maxsize=1)
def _controls():
    import numpy  # noqa: F401 - loads its BLAS, so it is among the mapped libraries

    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({fields[-1] for fields in map(str.split, maps) if fields and _openblas(fields[-1])})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in _PREFIXES:
            for suffix in _SUFFIXES:
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                    return get, set_
    return None
