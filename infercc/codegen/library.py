"""A built model library loaded with ctypes: inputs in as pointers to numpy data (no copy),
outputs read back as numpy arrays."""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import threading
import weakref
from pathlib import Path

import numpy as np

from .emit import Program

_NUMPY = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64, 9: np.bool_, 10: np.float16}


_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()
#: Per loaded library path: the token of the Library whose weights and threads it points at now.
_BOUND: dict[str, object] = {}

#: libgomp's spin before a waiting worker sleeps, unless the user set one: its default (300,000
#: spins, ~0.5 ms) makes an idle worker hold a core between the hundreds of short parallel regions
#: of a decode step, which starves the calling thread whenever the machine has other work (measured
#: on 2 busy cores, LLaMA-100M: 6 tok/s at the default, 56-66 tok/s at 2,000-10,000). Read once,
#: when the first library loads libgomp.
SPIN = "10000"


def _tame_openmp() -> None:
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPIN


class RunError(Exception):
    """A kernel reported a problem (shape mismatch, index out of range): node and message."""


@dataclasses.dataclass
class StepTimes:
    """The timers of one run of a profiling build: ns since the first profiled run, the run's
    length, and each executed step's start (ns into the run) and elapsed ns (program step order)."""
    start_ns: int
    total_ns: int
    step_start_ns: np.ndarray
    step_ns: np.ndarray


class Library:
    def __init__(self, path: Path, program: Program, threads: int = 0, weights: np.ndarray | None = None,
                 profile: bool = False) -> None:
        """``weights``: the blob's bytes when they come from elsewhere (a read-only memory map of a
        saved weights.bin, ``artifact.open_weights``), else ``program.blob`` is packed here."""
        _tame_openmp()
        self.lib = ctypes.CDLL(str(path))
        #: With ``profile`` (a library built with build.PROFILE): the timers of the last run.
        self.profile = profile
        self.last_times: StepTimes | None = None
        if profile:
            self.lib.icc_profile.restype = ctypes.c_int
            self.lib.icc_profile.argtypes = [ctypes.POINTER(ctypes.c_int64)] * 3
        self.program = program
        if weights is not None and (weights.dtype != np.uint8 or weights.ndim != 1 or len(weights) != program.blob.size
                                    or weights.ctypes.data % 64):
            raise ValueError(f"weights must be {program.blob.size} bytes, 64-byte aligned (the blob's layout)")
        # kept alive: the library points into it (the kernels only read it, so a read-only map does)
        self.weights = program.blob.array() if weights is None else weights
        self.lib.icc_run.restype = ctypes.c_int
        self.lib.icc_run.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64),
                                     ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int64)]
        self.lib.icc_output_room.restype = ctypes.c_int64
        self.lib.icc_output_room.argtypes = [ctypes.c_int]
        self.lib.icc_output.restype = ctypes.c_int
        self.lib.icc_output.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64),
                                        ctypes.POINTER(ctypes.c_int)]
        self.lib.icc_error.restype = ctypes.c_char_p
        # (a library built from a source saved before the entry existed has none: numpy's argmax then)
        self._argmax = getattr(self.lib, "icc_output_argmax", None)
        if self._argmax is not None:
            self._argmax.restype = ctypes.c_int64
            self._argmax.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_int64]
        self.threads = threads
        # One run at a time per loaded library: its value slots and weight pointer are globals, and
        # two Library objects of the same source (the same model compiled twice, or compiled and
        # loaded) share one library (dlopen returns the same handle), so the lock is per path and
        # each run points the library at its own weights first.
        self._key, self._token = str(Path(path).resolve()), object()
        with _LOCKS_LOCK:
            self.lock = _LOCKS.setdefault(self._key, threading.Lock())
        if program.has_decode:
            from .decoding import declare

            declare(self.lib)
        n = len(program.inputs)
        self._ptrs = (ctypes.c_void_p * max(n, 1))()
        self._dims = (ctypes.c_int64 * (8 * max(n, 1)))()
        self._ranks = (ctypes.c_int * max(n, 1))()
        self._rooms = (ctypes.c_int64 * max(n, 1))()
        #: Per input: (weak reference, shape) of the array whose pointer and dims are in
        #: _ptrs/_dims now, when it was taken as it was (``run``).
        self._held: list[tuple[weakref.ref, tuple[int, ...]] | None] = [None] * n
        self._out_ptr, self._out_dims, self._out_rank = ctypes.c_void_p(), (ctypes.c_int64 * 8)(), ctypes.c_int()

    def run(self, arrays: list[np.ndarray], outputs: dict[int, np.ndarray] | None = None,
            argmax: frozenset[int] = frozenset()) -> list[np.ndarray | None]:
        """Outputs in graph order; those given in ``outputs`` (by position) are written there;
        those in ``argmax`` come back as the int64 argmax over their last axis (numpy's: first
        maximum, first NaN), computed in C without copying them out (greedy decoding).

        An input that is the very array the previous run took as it was (no conversion), still
        alive, with the same shape and dtype, is not converted or described again: its pointer
        and dims are still in the argument arrays (the serving engine feeds the same KV pools
        every step -- 60 of SmolLM2's 65 inputs -- and describing each one cost ~5 us a step).
        Only a weak reference is kept (a pool dropped by its engine is freed at once); the same
        live object keeps its data pointer (numpy refuses to resize in place an array that has a
        weak reference), its shape is compared (``a.shape = ...`` needs no reallocation), and its
        contents may change freely."""
        with self.lock:
            held, keep = self._held, []
            for i, (array, (name, dtype)) in enumerate(zip(arrays, self.program.inputs)):
                ref = held[i]
                if ref is not None and ref[0]() is array and array.shape == ref[1] and array.dtype == dtype:
                    continue
                room = i in self.program.rooms and rows_of_room(array, dtype)
                a = array if room else np.ascontiguousarray(array, dtype=dtype)
                self._rooms[i] = room
                if a.ndim > 8:
                    raise RunError(f"input {name!r} has rank {a.ndim} (at most 8)")
                if a is array and isinstance(a, np.ndarray):
                    held[i] = (weakref.ref(a), a.shape)
                else:  # a converted copy: alive for this run only
                    held[i] = None
                    keep.append(a)
                self._ptrs[i] = a.ctypes.data
                self._ranks[i] = a.ndim
                for j, d in enumerate(a.shape):
                    self._dims[8 * i + j] = d
            self.bind()
            status = self.lib.icc_run(self._ptrs, self._dims, self._ranks, self._rooms)
            if status != 0:
                message = self.lib.icc_error().decode(errors="replace")
                raise RunError(f"generated C failed at step {status}: {message}")
            if self.profile:
                self.last_times = self.read_times()
            results: list[np.ndarray | None] = []
            ptr, dims, rank = self._out_ptr, self._out_dims, self._out_rank
            for k in range(len(self.program.outputs)):
                code = self.lib.icc_output(k, ctypes.byref(ptr), dims, ctypes.byref(rank))
                shape = tuple(dims[j] for j in range(rank.value))
                if k in argmax and self._argmax is not None:
                    ids = np.empty(shape[:-1], np.int64)
                    got = self._argmax(k, ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)), ids.size)
                    if got != ids.size:
                        raise RunError(f"output {self.program.outputs[k]!r} {shape} has no argmax (a float tensor "
                                       "with a non-empty last axis is needed)")
                    results.append(ids)
                    continue
                dtype = np.dtype(_NUMPY[code])
                bound = outputs.get(k) if outputs is not None else None
                if bound is not None and bound.size and bound.ctypes.data == ptr.value and bound.shape == shape:
                    results.append(bound)  # a cache the attention grew in place: already there
                    continue
                view = _view(ptr.value, shape, dtype, self.lib.icc_output_room(k))
                if k in argmax:
                    results.append(np.argmax(view, axis=-1))
                elif outputs is not None and k in outputs:
                    np.copyto(outputs[k], view)
                    results.append(outputs[k])
                else:
                    results.append(view.copy())
            del keep
            return results

    def free_buffers(self) -> int:
        """Give back the buffers the memory plan's slots keep between runs (the next run allocates
        them again); the bytes freed. Every Library of the same source shares them."""
        with self.lock:
            self.lib.icc_free_buffers.restype = ctypes.c_int64
            return int(self.lib.icc_free_buffers())

    def read_times(self) -> StepTimes:
        """Copy the last model run's timers out of the library (a profiling build's ``icc_profile``):
        ``run``'s, or the decode loop's last forward when called from its token callback."""
        n = max(len(self.program.steps), 1)
        starts, ns, run = (ctypes.c_int64 * n)(), (ctypes.c_int64 * n)(), (ctypes.c_int64 * 2)()
        done = self.lib.icc_profile(starts, ns, run)
        return StepTimes(int(run[0]), int(run[1]), np.array(starts[:done], np.int64), np.array(ns[:done], np.int64))

    def bind(self) -> None:
        """Point the (possibly shared) library at this model's weights and thread count, unless
        this Library was the last to do so (the per-step hot path); call under ``lock``."""
        if _BOUND.get(self._key) is self._token:
            return
        self.lib.icc_set_weights(ctypes.c_void_p(self.weights.ctypes.data))
        self.lib.icc_set_threads(ctypes.c_int(self.threads))
        _BOUND[self._key] = self._token


def rows_of_room(array: object, dtype: np.dtype) -> int:
    """The rows per head of the buffer ``array`` is the first rows of, when it is a [batch, heads,
    rows, width] view ``buffer[:, :, :rows]`` of a C-contiguous [batch, heads, room, width] buffer
    with room > rows (a cache grown in place: KVCache's shared buffers); else 0 (the run takes a
    dense copy)."""
    if not isinstance(array, np.ndarray) or array.ndim != 4 or array.dtype != dtype:
        return 0
    b, h, rows, w = array.shape
    e = dtype.itemsize
    s0, s1, s2, s3 = array.strides
    if s3 != e or s2 != w * e or s1 % (w * e):
        return 0
    room = s1 // (w * e)
    return room if room > rows and (b == 1 or s0 == h * room * w * e) else 0


def _view(address: int, shape: tuple[int, ...], dtype: np.dtype, room: int) -> np.ndarray:
    """The run's output at ``address`` as an array; ``room``: a [batch, heads, rows, width] cache
    whose heads are ``room`` rows apart (icc_output_room), read through strides."""
    if not math.prod(shape):
        return np.empty(shape, dtype)
    full = (shape[0], shape[1], room, shape[3]) if room else shape
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * (math.prod(full) * dtype.itemsize)).from_address(address))
    array = raw.view(dtype).reshape(full)
    return array[:, :, :shape[2]] if room else array
