"""Where the time goes, on either runtime: per-op-type and per-layer tables and a Chrome trace.

Both runtimes are measured by their own clocks, inside the run: the generated C with the per-step
timers of a ``-DICC_PROFILE`` build (codegen/templates/model.c.j2), ONNX Runtime with its own
profiler (``SessionOptions.enable_profiling``), whose JSON is parsed into the same ``Profile``.
A ``Recorder`` wraps the backend behind the usual doors (``run``, ``run_bound``), so the model
runner drives it unchanged; runs made while ``recording`` is on are kept, each under the
``label`` set at the time ("prefill", "decode 3"). Timings come from inside the runtime, not
around the Python call, so the tables show kernel time only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..codegen.profile import NO_LAYER, layer_in, layer_table, op_name
from ..errors import InputError
from ..ir import Model
from .c_backend import CBackend, CUnavailable
from .ort_backend import OrtBackend
from .providers import choose_providers


@dataclasses.dataclass
class Event:
    """One executed step (a C step or an ONNX Runtime node): times in microseconds, ``start_us``
    from the start of its run."""
    name: str
    op: str
    layer: str
    start_us: float
    dur_us: float


@dataclasses.dataclass
class RunProfile:
    """One run of the model: ``start_us`` from the start of the first recorded run."""
    label: str
    start_us: float
    dur_us: float
    events: list[Event]


@dataclasses.dataclass
class Row:
    key: str
    ms: float
    percent: float
    calls: int


@dataclasses.dataclass
class Profile:
    runtime: str  # "c" or "ort"
    runs: list[RunProfile]

    @property
    def total_ms(self) -> float:
        """Time inside the steps of every recorded run."""
        return sum(e.dur_us for run in self.runs for e in run.events) / 1000

    def rows(self, by: str) -> list[Row]:
        """Time per op type (``by="op"``, slowest first) or per layer (``by="layer"``, in layer
        order, steps outside the layers last)."""
        if by not in ("op", "layer"):
            raise ValueError(f"rows(by=...) takes 'op' or 'layer', not {by!r}")
        time: dict[str, float] = {}
        calls: dict[str, int] = {}
        for run in self.runs:
            for e in run.events:
                key = e.op if by == "op" else e.layer
                time[key] = time.get(key, 0.0) + e.dur_us
                calls[key] = calls.get(key, 0) + 1
        total = sum(time.values()) or 1.0
        if by == "op":
            order = sorted(time, key=lambda k: (-time[k], k))
        else:
            order = sorted(time, key=lambda k: (k == NO_LAYER, layer_in(k) or 0, k))
        return [Row(k, time[k] / 1000, 100 * time[k] / total, calls[k]) for k in order]

    def table(self, by: str, limit: int | None = None) -> str:
        """``rows(by)`` as aligned text (the ``limit`` slowest op types; the rest summed)."""
        rows = self.rows(by)
        if limit is not None and len(rows) > limit:
            rest = rows[limit:]
            rows = rows[:limit] + [Row(f"({len(rest)} more)", sum(r.ms for r in rest), sum(r.percent for r in rest),
                                       sum(r.calls for r in rest))]
        head = "op type" if by == "op" else "layer"
        width = max([len(head)] + [len(r.key) for r in rows])
        lines = [f"  {head:<{width}}  {'ms':>10}  {'%':>6}  {'calls':>7}"]
        lines += [f"  {r.key:<{width}}  {r.ms:>10.3f}  {r.percent:>6.1f}  {r.calls:>7}" for r in rows]
        return "\n".join(lines)

    def trace(self) -> dict[str, Any]:
        """Chrome trace (Perfetto, chrome://tracing): one track per run, one "X" event per step,
        ``ts``/``dur`` in microseconds."""
        title = "infercc generated C" if self.runtime == "c" else "infercc ONNX Runtime"
        events: list[dict[str, Any]] = [{"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": title}}]
        for track, run in enumerate(self.runs, start=1):
            events.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": track, "args": {"name": run.label}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": 1, "tid": track, "args": {"sort_index": track}})
            for e in run.events:
                events.append({"ph": "X", "name": e.op, "cat": e.layer, "pid": 1, "tid": track,
                               "ts": round(run.start_us + e.start_us, 3), "dur": round(e.dur_us, 3),
                               "args": {"node": e.name, "layer": e.layer, "run": run.label}})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def write_trace(self, path: str | os.PathLike) -> Path:
        """Write ``trace()`` as JSON; an unwritable path is an InputError naming it."""
        path = Path(path)
        try:
            path.write_text(json.dumps(self.trace()))
        except OSError as exc:
            raise InputError(f"cannot write the trace to {path} ({exc.strerror or exc}); pass --trace with a path "
                             "in a folder you can write to") from None
        return path


class Recorder:
    """A backend with the same doors (``run``, ``run_bound``, ``output_names``) that records the
    runs made while ``recording`` is true, each under the current ``label``."""

    runtime = ""

    def __init__(self, backend: CBackend | OrtBackend) -> None:
        self.backend = backend
        self.label = "run"
        self.recording = False
        self.runs: list[RunProfile] = []

    def __getattr__(self, name: str) -> Any:  # output_names, providers, model, defaults ...
        return getattr(self.__dict__["backend"], name)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.backend.run(feeds)
        self._ran()
        return out

    def run_bound(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray | None]) -> dict[str, np.ndarray]:
        out = self.backend.run_bound(feeds, outputs)
        self._ran()
        return out

    def _ran(self) -> None:
        raise NotImplementedError

    def profile(self) -> Profile:
        raise NotImplementedError


class CRecorder(Recorder):
    """Reads the library's timers after every recorded run (a CBackend built with profile=True)."""

    runtime = "c"

    def _ran(self) -> None:
        times = self.backend.library.last_times
        if not self.recording or times is None:
            return
        self._append(times)

    def record_loop_run(self, label: str) -> None:
        """Record the model run the library's decode loop just made (called from its token
        callback: the timers hold the loop's last forward, with the cache appended in place)."""
        self._append(self.backend.library.read_times(), label)

    def _append(self, times: Any, label: str | None = None) -> None:
        steps = self.backend.program.steps
        events = [Event(steps[i]["name"], steps[i]["op"], steps[i]["layer"], float(start) / 1000, float(ns) / 1000)
                  for i, (start, ns) in enumerate(zip(times.step_start_ns, times.step_ns))]
        self.runs.append(RunProfile(label or self.label, times.start_ns / 1000, times.total_ns / 1000, events))

    def profile(self) -> Profile:
        first = self.runs[0].start_us if self.runs else 0.0
        return Profile("c", [dataclasses.replace(r, start_us=r.start_us - first) for r in self.runs])


class ProfilingOrtBackend(OrtBackend):
    """OrtBackend whose session runs with ONNX Runtime's profiler on, writing into a private
    temporary folder (removed when the backend is)."""

    def __init__(self, model: Model, providers: list[str], **options: int) -> None:
        self._profile_dir = tempfile.TemporaryDirectory(prefix="infercc-profile-")
        super().__init__(model, providers, **options)

    def _create(self, model: Model, options: Any, providers: list[str]) -> None:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(self._profile_dir.name, "ort")
        super()._create(model, options, providers)

    def end_profiling(self) -> list[dict[str, Any]]:
        """Stop the profiler and return its events (ONNX Runtime's JSON list)."""
        path = self.session.end_profiling()
        return json.loads(Path(path).read_text())


class OrtRecorder(Recorder):
    """Counts the session's runs and remembers which were recorded; ``profile()`` ends ONNX
    Runtime's profiler and matches its ``model_run`` spans to those runs, in order."""

    runtime = "ort"

    def __init__(self, backend: ProfilingOrtBackend) -> None:
        super().__init__(backend)
        self._count = 0
        self._labels: dict[int, str] = {}
        self._profile: Profile | None = None

    def _ran(self) -> None:
        if self.recording:
            self._labels[self._count] = self.label
        self._count += 1

    def profile(self) -> Profile:
        if self._profile is None:
            self._profile = parse_ort_profile(self.backend.end_profiling(), self.backend.model, self._labels)
        return self._profile


def parse_ort_profile(events: list[dict[str, Any]], model: Model, labels: Mapping[int, str]) -> Profile:
    """ONNX Runtime's profile as a Profile: run ``i`` is its ``i``-th ``model_run`` span (kept
    when ``i`` is in ``labels``); node ``_kernel_time`` events inside a span are that run's steps.
    Op types and layers come from ``model``'s nodes by name; a node ONNX Runtime made itself
    (its own fusions) keeps the op type it reports and a layer from its name."""
    nodes = list(model.graph.walk())
    known = {n.name: (op_name(n), layer) for n, layer in zip(nodes, layer_table(nodes))}
    spans = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                   key=lambda e: e["ts"])
    kernels = sorted((e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")),
                     key=lambda e: e["ts"])
    runs: list[RunProfile] = []
    first: float | None = None
    for i, span in enumerate(spans):
        if i not in labels:
            continue
        begin, end = float(span["ts"]), float(span["ts"]) + float(span["dur"])
        first = begin if first is None else first
        steps = []
        for e in kernels:
            if begin <= e["ts"] <= end:
                name = e["name"][: -len("_kernel_time")]
                op, layer = known.get(name) or (str(e.get("args", {}).get("op_name", "?")),
                                                 f"layers.{layer_in(name)}" if layer_in(name) is not None else NO_LAYER)
                steps.append(Event(name, op, layer, float(e["ts"]) - begin, float(e["dur"])))
        runs.append(RunProfile(labels[i], begin - first, end - begin, steps))
    return Profile("ort", runs)


def open_recorder(compiled: Any) -> tuple[Recorder, str]:
    """A profiling backend for ``compiled`` (a CompiledModel) and why it runs where it runs: the
    generated C (profiling build) when its config wants C and every op has a kernel, else ONNX
    Runtime with its profiler, on the graph lowered for it (as ``CompiledModel.backend`` does)."""
    from ..passes.lowering import lower_for_ort, wants_c

    config, model = compiled.config, compiled.model
    if wants_c(config):
        try:
            return CRecorder(CBackend(model, intra_op_threads=config.intra_op_threads, profile=True)), \
                "generated C: every op has a C kernel"
        except CUnavailable as exc:
            reason = f"ONNX Runtime: the generated-C runtime cannot run this model ({exc})"
            model = lower_for_ort(model, config)
    else:
        reason = f"ONNX Runtime: Config.backend={config.backend!r}"
    providers, _ = choose_providers(config.provider)
    backend = ProfilingOrtBackend(model, providers, intra_op_threads=config.intra_op_threads,
                                  inter_op_threads=config.inter_op_threads)
    return OrtRecorder(backend), reason
