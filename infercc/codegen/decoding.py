"""A generation inside the built library: prefill, the per-token loop and the sampler run in C
(templates/generate.c.j2, kernels/sample.h); Python only sees each token through a callback."""

from __future__ import annotations

import ctypes

import numpy as np

from .library import _NUMPY, Library, RunError

#: Per-token callback of the decode loop: (token) -> 0 go on, 1 stop, 2 pause.
TOKEN_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.c_void_p)
GO_ON, STOP, PAUSE = 0, 1, 2
#: numpy dtype -> the C element type code.
_CODES = {np.dtype(t): code for code, t in _NUMPY.items()}


def declare(lib: ctypes.CDLL) -> None:
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
    lib.icc_gen_set_past.restype = ctypes.c_int
    lib.icc_gen_set_past.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int64]


class Decoding:
    """One generation inside the library (its prefill, per-token loop and sampler in C).

    ``next(callback)`` runs until the generation ends (True) or ``callback(token)`` returns PAUSE
    (False); the callback sees every sampled token, stop tokens included, and may return STOP.
    The state (KV cache included) lives in the library's heap between calls, so a paused
    generation survives other runs; ``close()`` frees it (also on garbage collection).
    An exception raised by the callback stops the loop and is raised again by ``next``."""

    def __init__(self, library: Library, prompt: list[int], *, max_new_tokens: int, stop_ids: list[int],
                 temperature: float, top_k: int, top_p: float, min_p: float, seed: int,
                 max_context: int | None = None, past: list[np.ndarray] | None = None,
                 repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0) -> None:
        """``past``: the keys and values of the first ``n`` tokens of ``prompt`` already computed
        elsewhere (a sequence handed over by the serving engine), one dense [1, heads, n, width]
        array per cache in the graph's cache order (``CacheSpec.entries``), 1 <= n < len(prompt):
        the loop starts by feeding the tokens after them."""
        if not library.program.has_decode:
            raise RunError(f"this library has no decode loop: {library.program.decode_reason}")
        self.library = library
        ids = np.ascontiguousarray(prompt, np.int64)
        distinct = sorted(set(stop_ids))
        stops = np.ascontiguousarray(distinct or [0], np.int64)
        params = (ctypes.c_double * 7)(float(temperature), float(top_k), float(top_p), float(min_p),
                                       float(repetition_penalty), float(frequency_penalty), float(presence_penalty))
        p64 = ctypes.POINTER(ctypes.c_int64)
        self.handle = library.lib.icc_gen_new(ids.ctypes.data_as(p64), ids.size, min(int(max_new_tokens), 2**62),
                                              min(int(max_context or 0), 2**62), stops.ctypes.data_as(p64),
                                              len(distinct), params, ctypes.c_uint64(seed % 2**64))
        if not self.handle:
            raise RunError("the decode loop could not start (out of memory, or an empty prompt)")
        self.done = False
        if past is not None:
            self._set_past(past, len(ids))

    def _set_past(self, past: list[np.ndarray], n_tokens: int) -> None:
        caches = self.library.program.decode.caches
        if len(past) != len(caches) or not past:
            self.close()
            raise RunError(f"the decode loop has {len(caches)} caches; {len(past)} past arrays were given")
        n = past[0].shape[2] if past[0].ndim == 4 else -1
        for array, cache in zip(past, caches):
            if (array.ndim != 4 or array.shape != (1, cache["heads"], n, cache["width"]) or not array.flags.c_contiguous
                    or _CODES.get(array.dtype) != cache["dt"]):
                self.close()
                raise RunError(f"a past array must be a dense [1, {cache['heads']}, {n}, {cache['width']}] array of "
                               f"the cache's element type (code {cache['dt']}), got {array.dtype} {array.shape}")
        pointers = (ctypes.c_void_p * len(past))(*(a.ctypes.data for a in past))
        with self.library.lock:
            status = self.library.lib.icc_gen_set_past(self.handle, pointers, n)
            message = self.library.lib.icc_error().decode(errors="replace") if status else ""
        if status:
            self.close()
            raise RunError(f"the decode loop could not take the past of {n} of {n_tokens} tokens: {message}")

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
            self.library.bind()
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
