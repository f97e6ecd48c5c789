"""The generated-C backend: a compiled model's graph (canonical ops kept) as C, built and loaded.

Same doors as ``OrtBackend``: ``run(feeds)`` and ``run_bound(feeds, outputs)`` (outputs written
into the caller's arrays). Creating it raises ``CUnavailable`` with the reason (an op without a C
kernel, no compiler, a failed build); the caller then runs the model on ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from ..codegen.build import NATIVE, PROFILE, BuildError, build
from ..codegen.decoding import Decoding
from ..codegen.emit import Program, emit
from ..codegen.library import Library, RunError
from ..codegen.ops import Unsupported
from ..errors import InferccError
from ..ir import Model


class CUnavailable(Exception):
    """Why this model cannot run on the generated-C runtime."""


class CRunError(InferccError):
    """A generated kernel stopped the run (shape mismatch, index out of range)."""


class CBackend:
    def __init__(self, model: Model, *, intra_op_threads: int = 0, kernels: Mapping | None = None,
                 weights_from: Callable[[Program], np.ndarray | None] | None = None, profile: bool = False,
                 share: CBackend | None = None) -> None:
        """``kernels``: the user kernels to use (None: the registry now). ``weights_from``: given a
        program whose blob was only planned, the blob's bytes from elsewhere (a saved weights.bin)
        or None to pack them here. ``profile``: build with per-step timers (build.PROFILE);
        ``library.last_times`` then holds the last run's (runtime/profiler.py reads them).
        ``share``: a loaded backend of the same model's weights (the paged serving graph shares
        the plain graph's): when every weight this program needs is in its blob, this library
        reads those bytes, so the weights are resident once (else they are packed here)."""
        weights = None
        try:
            if share is not None:
                planned = emit(model, kernels, pack=False, base=share.program.blob)
                if planned.blob.within_base:
                    self.program, weights = planned, share.library.weights
            if weights is None and weights_from is not None:
                self.program = emit(model, kernels, pack=False)
                weights = weights_from(self.program)
            if weights is None:
                self.program = emit(model, kernels)
        except Unsupported as exc:
            raise CUnavailable(str(exc)) from None
        try:
            path = build(self.program.source, NATIVE + (PROFILE,) if profile else NATIVE)
        except BuildError as exc:
            raise CUnavailable(str(exc)) from None
        try:
            self.library = Library(path, self.program, intra_op_threads, weights, profile)
        except OSError as exc:  # e.g. a user kernel calling a function nothing defines
            raise CUnavailable(f"the built library does not load: {exc}") from None
        self.model = model
        self.defaults = {v.name: v.const.numpy() for v in model.graph.inputs if v.const is not None}
        self.output_names = list(self.program.outputs)
        self.providers = ["generated C"]

    @property
    def grows_in_place(self) -> frozenset[str]:
        """The past caches a run takes as the first rows of a bigger buffer and appends to in place
        (``Library.run``): a KV cache of shared buffers (kv_cache.CacheSpec.rows_only) needs no
        copy of the past per step."""
        return frozenset(self.program.inputs[i][0] for i in self.program.rooms)

    @property
    def source(self) -> str:
        return self.program.source

    def _arrays(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        arrays = []
        for name, _ in self.program.inputs:
            if name in feeds:
                arrays.append(feeds[name])
            elif name in self.defaults:
                arrays.append(self.defaults[name])
            else:
                raise CRunError(f"missing input {name!r}: feed it (inputs: {[n for n, _ in self.program.inputs]})")
        return arrays

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = self.library.run(self._arrays(feeds))
        except RunError as exc:
            raise CRunError(str(exc)) from None
        return dict(zip(self.output_names, results))

    def run_bound(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray | None],
                  argmax: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """Outputs named in ``outputs`` (arrays of the right shape, or None to allocate) only;
        those named in ``argmax`` (also in ``outputs``) as int64 argmax ids over their last axis
        (``Library.run``)."""
        index = {name: i for i, name in enumerate(self.output_names)}
        bound = {index[name]: array for name, array in outputs.items() if array is not None and name not in argmax}
        try:
            results = self.library.run(self._arrays(feeds), bound, frozenset(index[name] for name in argmax))
        except RunError as exc:
            raise CRunError(str(exc)) from None
        return {name: results[index[name]] for name in outputs}

    def decoding(self, prompt: list[int], **options) -> Decoding:
        """A generation of ``prompt`` in the library's decode loop (options: see ``Decoding``);
        RunError when the library has none (``program.decode_reason`` says why)."""
        return Decoding(self.library, prompt, **options)
