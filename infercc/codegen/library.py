"""A built model library loaded with ctypes: inputs in as pointers to numpy data (no copy),
outputs read back as numpy arrays."""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import numpy as np

from .emit import Program

_NUMPY = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64, 9: np.bool_, 10: np.float16}


class RunError(Exception):
    """A kernel reported a problem (shape mismatch, index out of range): node and message."""


class Library:
    def __init__(self, path: Path, program: Program, threads: int = 0) -> None:
        self.lib = ctypes.CDLL(str(path))
        self.program = program
        self.weights = program.blob.array()  # kept alive: the library points into it
        self.lib.icc_run.restype = ctypes.c_int
        self.lib.icc_run.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int)]
        self.lib.icc_output.restype = ctypes.c_int
        self.lib.icc_output.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64),
                                        ctypes.POINTER(ctypes.c_int)]
        self.lib.icc_error.restype = ctypes.c_char_p
        self.lib.icc_set_weights(ctypes.c_void_p(self.weights.ctypes.data))
        self.lib.icc_set_threads(ctypes.c_int(threads))
        self.lock = threading.Lock()  # one run at a time: the library's value slots are global
        if program.has_decode:
            _declare_decode(self.lib)
        n = len(program.inputs)
        self._ptrs = (ctypes.c_void_p * max(n, 1))()
        self._dims = (ctypes.c_int64 * (8 * max(n, 1)))()
        self._ranks = (ctypes.c_int * max(n, 1))()

    def run(self, arrays: list[np.ndarray], outputs: dict[int, np.ndarray] | None = None) -> list[np.ndarray | None]:
        """Outputs in graph order; those given in ``outputs`` (by position) are written there."""
        with self.lock:
            keep = []
            for i, (array, (name, dtype)) in enumerate(zip(arrays, self.program.inputs)):
                a = np.ascontiguousarray(array, dtype=dtype)
                if a.ndim > 8:
                    raise RunError(f"input {name!r} has rank {a.ndim} (at most 8)")
                keep.append(a)
                self._ptrs[i] = a.ctypes.data
                self._ranks[i] = a.ndim
                for j, d in enumerate(a.shape):
                    self._dims[8 * i + j] = d
            status = self.lib.icc_run(self._ptrs, self._dims, self._ranks)
            if status != 0:
                message = self.lib.icc_error().decode(errors="replace")
                raise RunError(f"generated C failed at step {status}: {message}")
            results: list[np.ndarray | None] = []
            ptr, dims, rank = ctypes.c_void_p(), (ctypes.c_int64 * 8)(), ctypes.c_int()
            for k in range(len(self.program.outputs)):
                code = self.lib.icc_output(k, ctypes.byref(ptr), dims, ctypes.byref(rank))
                shape = tuple(dims[j] for j in range(rank.value))
                dtype = np.dtype(_NUMPY[code])
                size = int(np.prod(shape, dtype=np.int64)) if shape else 1
                view = (np.ctypeslib.as_array((ctypes.c_uint8 * (size * dtype.itemsize)).from_address(ptr.value))
                        .view(dtype).reshape(shape) if size else np.empty(shape, dtype))
                if outputs is not None and k in outputs:
                    np.copyto(outputs[k], view)
                    results.append(outputs[k])
                else:
                    results.append(view.copy())
            del keep
            return results


#: Per-token callback of the decode loop: (token) -> 0 go on, 1 stop, 2 pause.
TOKEN_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.c_void_p)
GO_ON, STOP, PAUSE = 0, 1, 2


def _declare_decode(lib: ctypes.CDLL) -> None:
    lib.icc_gen_new.restype = ctypes.c_void_p
    lib.icc_gen_new.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                ctypes.POINTER(ctypes.c_int64), ctypes.c_int, ctypes.POINTER(ctypes.c_double),
                                ctypes.c_uint64]
    lib.icc_gen_next.restype = ctypes.c_int
    lib.icc_gen_next.argtypes = [ctypes.c_void_p, TOKEN_CALLBACK, ctypes.c_void_p]
    lib.icc_gen_output.restype = ctypes.c_int64
    lib.icc_gen_output.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_int64]
    lib.icc_gen_free.restype = None
    lib.icc_gen_free.argtypes = [ctypes.c_void_p]


class Decoding:
    """One generation inside the library (its prefill, per-token loop and sampler in C).

    ``next(callback)`` runs until the generation ends (True) or ``callback(token)`` returns PAUSE
    (False); the callback sees every sampled token, stop tokens included, and may return STOP.
    The state (KV cache included) lives in the library's heap between calls, so a paused
    generation survives other runs; ``close()`` frees it (also on garbage collection).
    An exception raised by the callback stops the loop and is raised again by ``next``."""

    def __init__(self, library: Library, prompt: list[int], *, max_new_tokens: int, stop_ids: list[int],
                 temperature: float, top_k: int, top_p: float, min_p: float, seed: int,
                 max_context: int | None = None) -> None:
        if not library.program.has_decode:
            raise RunError(f"this library has no decode loop: {library.program.decode_reason}")
        self.library = library
        ids = np.ascontiguousarray(prompt, np.int64)
        stops = np.ascontiguousarray(sorted(set(stop_ids)) or [0], np.int64)
        params = (ctypes.c_double * 4)(float(temperature), float(top_k), float(top_p), float(min_p))
        p64 = ctypes.POINTER(ctypes.c_int64)
        self.handle = library.lib.icc_gen_new(ids.ctypes.data_as(p64), ids.size, min(int(max_new_tokens), 2**62),
                                              min(int(max_context or 0), 2**62), stops.ctypes.data_as(p64),
                                              len(set(stop_ids)),
                                              params, ctypes.c_uint64(seed % 2**64))
        if not self.handle:
            raise RunError("the decode loop could not start (out of memory, or an empty prompt)")
        self.done = False

    def next(self, callback=None) -> bool:
        """Run on; True once the generation has ended."""
        if self.done:
            return True
        error: list[BaseException] = []

        def call(token: int, _user) -> int:
            if callback is None:
                return GO_ON
            try:
                answer = callback(int(token))
                return GO_ON if answer is None else int(answer)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, outside the C frame
                error.append(exc)
                return STOP

        with self.library.lock:
            status = self.library.lib.icc_gen_next(self.handle, TOKEN_CALLBACK(call), None)
            message = self.library.lib.icc_error().decode(errors="replace") if status < 0 else ""
        if error:
            self.done = True
            raise error[0]
        if status < 0:
            self.done = True
            raise RunError(f"generated C decode loop failed: {message}")
        self.done = status == 0
        return self.done

    def tokens(self) -> list[int]:
        """The generated tokens so far (stop tokens excluded)."""
        n = self.library.lib.icc_gen_output(self.handle, None, 0)
        out = np.empty(max(n, 1), np.int64)
        self.library.lib.icc_gen_output(self.handle, out.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)), n)
        return out[:n].tolist()

    def close(self) -> None:
        if getattr(self, "handle", None):
            self.library.lib.icc_gen_free(self.handle)
            self.handle = None

    def __del__(self) -> None:
        self.close()
