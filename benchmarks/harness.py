"""Side-by-side benchmark harness.

Why this design: on a small, noisy machine timings drift by tens of percent between processes
and over minutes, so numbers measured in separate runs cannot be compared.  Every configuration
of a *case* is therefore measured in the same run, interleaved round by round (A B C A B C ...),
and we report the median over rounds plus ratios against a baseline: the ratio of medians and
the median of per-round (paired) ratios, which cancels slow drift common to adjacent runs.

A configuration is a picklable `ConfigSpec` naming a setup function ``"module:function"``.
The function is called as ``fn(threads=N, **kwargs)`` in the measuring process, does all
untimed work (load/compile a model, build inputs) and returns a zero-argument callable to time,
or ``(callable, metadata_dict)``.  It may raise `SkipConfig` when it cannot run here.

A timed callable may also return `CallMetrics`: figures it measured inside the call (a generation
reports its decode tokens/s beside the wall time of the whole call). Each round keeps their median
over its timed calls, and the summary compares them with the baseline like the wall times.
"""

from __future__ import annotations

import gc
import importlib
import json
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from benchmarks.machine import machine_info, worker_env

RATIO_DIRECTION = "ratio = baseline time / config time: >1 means faster than the baseline, <1 slower"

Mode = Literal["fresh", "inprocess"]


class CallMetrics(dict):
    """Figures measured inside one timed call, name -> number; returned by the callable.

    Naming says how a figure compares with the baseline: ``*_per_s`` is a rate (higher is better,
    ratio = config / baseline), any other ``*_s`` a time and ``*_mib`` a memory size (ratio = baseline /
    config), so that every ratio reads ">1 = better" as the wall-time ratios do; other figures
    (counts) get no ratio.
    """


def metric_ratio(name: str, baseline: float, value: float) -> float | None:
    """The '>1 = better' ratio of one figure (see `CallMetrics`), None where it has none."""
    if name.endswith("_per_s"):
        return value / baseline if baseline else None
    if name.endswith(("_s", "_mib")):
        return baseline / value if value else None
    return None


def paired_metric_ratio(name: str, baseline: list[float | None], values: list[float | None]) -> float | None:
    """Median over rounds of the per-round `metric_ratio`: cancels drift common to adjacent runs."""
    ratios = [r for b, v in zip(baseline, values) if b is not None and v is not None
              and (r := metric_ratio(name, b, v)) is not None]
    return statistics.median(ratios) if ratios else None


class SkipConfig(Exception):
    """Raised by a setup function whose configuration cannot run here; reported as skipped, not failed."""


@dataclass(frozen=True)
class ConfigSpec:
    """One configuration of a case; must pickle because fresh mode ships it to a worker process."""

    name: str
    target: str  # "package.module:function"
    kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""


@dataclass
class Case:
    """A named set of configurations of the same workload, plus configurations known up front not to run."""

    name: str
    description: str
    configs: list[ConfigSpec]
    baseline: str | None = None  # default: first configuration
    skipped: dict[str, str] = field(default_factory=dict)  # name -> reason, never started
    notes: dict[str, Any] = field(default_factory=dict)  # recorded verbatim in the results
    #: Called with the finished run (parent process only); its lines (targets met or missed, say)
    #: are kept in the results and printed under the table. A failure becomes a line, not a crash.
    checks: Callable[[RunResult], list[str]] | None = None


@dataclass
class BenchOptions:
    """How to measure; a round is `warmup` untimed calls then `repeat` timed calls, summarized by their median."""

    mode: Mode = "fresh"
    rounds: int = 5
    warmup: int = 3
    repeat: int = 10
    threads: int = 1
    timeout_s: float = 600.0
    baseline: str | None = None


@dataclass
class ConfigResult:
    """Outcome of one configuration; times in seconds, `rounds_s[i]` is None when round i did not run."""

    name: str
    description: str = ""
    status: str = "ok"  # ok | failed | skipped
    error: str | None = None
    traceback: str | None = None  # full traceback of `error`, for the JSON file
    rounds_s: list[float | None] = field(default_factory=list)
    median_s: float | None = None
    min_s: float | None = None
    q1_s: float | None = None
    q3_s: float | None = None
    iqr_s: float | None = None
    setup_s: float | None = None  # median untimed setup time
    ratio: float | None = None  # baseline median / this median
    paired_ratio: float | None = None  # median over rounds of baseline_round / this_round
    metadata: dict[str, Any] = field(default_factory=dict)
    metric_rounds: dict[str, list[float | None]] = field(default_factory=dict)  # CallMetrics, per round
    metrics: dict[str, float] = field(default_factory=dict)  # median over rounds
    metric_ratios: dict[str, float] = field(default_factory=dict)  # '>1 = better' vs the baseline
    metric_paired: dict[str, float] = field(default_factory=dict)  # median of per-round ratios


@dataclass
class RunResult:
    """Everything a report needs, JSON-serializable through `to_dict`."""

    case: str
    description: str
    options: dict[str, Any]
    baseline: str | None
    machine: dict[str, Any]
    configs: list[ConfigResult]
    schedule: list[tuple[int, str]] = field(default_factory=list)  # (round, config) in execution order
    notes: dict[str, Any] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)  # lines from Case.checks
    ratio_direction: str = RATIO_DIRECTION
    started_at: str = ""
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def config(self, name: str) -> ConfigResult:
        return next(c for c in self.configs if c.name == name)


# ---------------------------------------------------------------- measuring (shared by both modes)


def resolve_target(target: str) -> Callable[..., Any]:
    module, _, attr = target.partition(":")
    if not attr:
        raise ValueError(f"target {target!r} is not of the form 'module:function'")
    return getattr(importlib.import_module(module), attr)


def prepare(spec: ConfigSpec, threads: int) -> tuple[Callable[[], Any], dict[str, Any]]:
    """Run the untimed setup and normalize its return value to (callable, metadata)."""
    out = resolve_target(spec.target)(threads=threads, **spec.kwargs)
    call, meta = out if isinstance(out, tuple) else (out, {})
    if not callable(call):
        raise TypeError(f"setup of {spec.name!r} returned {type(call).__name__}, expected a callable")
    return call, jsonable(meta or {})


def time_round(call: Callable[[], Any], warmup: int, repeat: int) -> float:
    """Median seconds per call; gc is off while timing so a collection lands in no single sample."""
    return measure_round(call, warmup, repeat)[0]


def measure_round(call: Callable[[], Any], warmup: int, repeat: int) -> tuple[float, dict[str, float]]:
    """`time_round` plus the median of each `CallMetrics` figure the timed calls returned."""
    for _ in range(warmup):
        call()
    samples: list[float] = []
    figures: dict[str, list[float]] = {}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(max(1, repeat)):
            t0 = time.perf_counter()
            out = call()
            samples.append(time.perf_counter() - t0)
            if isinstance(out, CallMetrics):
                for name, value in out.items():
                    figures.setdefault(name, []).append(float(value))
    finally:
        if gc_was_enabled:
            gc.enable()
    return statistics.median(samples), {name: statistics.median(v) for name, v in figures.items()}


def run_job(spec: ConfigSpec, threads: int, warmup: int, repeat: int) -> dict[str, Any]:
    """One fresh-mode round: setup, warmup, timed calls; never raises (errors become the result)."""
    try:
        t0 = time.perf_counter()
        call, meta = prepare(spec, threads)
        setup_s = time.perf_counter() - t0
        median, metrics = measure_round(call, warmup, repeat)
        metrics["peak_rss_mib"] = peak_rss_mib()
    except SkipConfig as exc:
        return {"status": "skipped", "error": str(exc)}
    except BaseException as exc:  # anything, even SystemExit from a library, is a failed config
        return _failure(exc)
    return {"status": "ok", "median_s": median, "setup_s": setup_s, "metadata": meta, "metrics": metrics}


def peak_rss_mib() -> float:
    """This process's peak resident set (MiB) so far: in a fresh worker, what loading the model and
    running it cost in memory, comparable across contenders since each round is its own process."""
    # VmHWM, not getrusage's ru_maxrss: Linux carries the parent's peak across fork + exec into
    # ru_maxrss, so every worker of one harness would report the harness's own peak.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB elsewhere (an upper bound)


def _failure(exc: BaseException) -> dict[str, Any]:
    """Call inside the `except` block: the traceback comes from sys.exc_info."""
    return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# ---------------------------------------------------------------- running a case


def _run_fresh(spec: ConfigSpec, opts: BenchOptions) -> dict[str, Any]:
    """One round in a brand-new interpreter so allocator, caches and JITs start cold for everyone."""
    with tempfile.TemporaryDirectory(prefix="infercc_bench_") as tmp:
        job, result = Path(tmp) / "job.pkl", Path(tmp) / "result.json"
        job.write_bytes(
            pickle.dumps(
                {"spec": spec, "threads": opts.threads, "warmup": opts.warmup, "repeat": opts.repeat}
            )
        )
        cmd = [sys.executable, "-m", "benchmarks.worker", str(job), str(result)]
        try:
            proc = subprocess.run(
                cmd, env=worker_env(opts.threads), capture_output=True, text=True, timeout=opts.timeout_s
            )
        except subprocess.TimeoutExpired:
            return {"status": "failed", "error": f"worker timed out after {opts.timeout_s:g} s"}
        if result.exists():
            return json.loads(result.read_text())
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        return {
            "status": "failed",
            "error": f"worker exited with code {proc.returncode} and no result: " + " | ".join(tail),
        }


def run_case(case: Case, opts: BenchOptions, progress: Callable[[str], None] | None = None) -> RunResult:
    """Measure all configurations of `case` interleaved; failures are recorded, never raised."""
    say = progress or (lambda _msg: None)
    names = [c.name for c in case.configs] + list(case.skipped)
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate configuration names in case {case.name!r}: {names}")
    baseline = opts.baseline or case.baseline or (names[0] if names else None)
    if baseline is not None and baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not a configuration of {case.name!r} (have {names})")
    started, t_start = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    results = {
        c.name: ConfigResult(c.name, c.description, rounds_s=[None] * opts.rounds) for c in case.configs
    }
    setups: dict[str, list[float]] = {name: [] for name in results}
    schedule: list[tuple[int, str]] = []

    def record(spec: ConfigSpec, rnd: int, out: dict[str, Any]) -> None:
        res = results[spec.name]
        if out["status"] != "ok":
            res.status, res.error, res.traceback = out["status"], out.get("error"), out.get("traceback")
            say(f"  {spec.name}: {res.status}: {res.error}")
            return
        res.rounds_s[rnd] = out["median_s"]
        for name, value in (out.get("metrics") or {}).items():
            res.metric_rounds.setdefault(name, [None] * opts.rounds)[rnd] = value
        if out.get("setup_s") is not None:
            setups[spec.name].append(out["setup_s"])
        res.metadata = res.metadata or out.get("metadata") or {}
        say(f"  [round {rnd + 1}/{opts.rounds}] {spec.name}: {out['median_s'] * 1e3:.3f} ms")

    calls: dict[str, Callable[[], Any]] = {}
    if opts.mode == "inprocess":
        for spec in case.configs:
            t0 = time.perf_counter()
            try:
                calls[spec.name], results[spec.name].metadata = prepare(spec, opts.threads)
                setups[spec.name].append(time.perf_counter() - t0)
            except SkipConfig as exc:
                record(spec, 0, {"status": "skipped", "error": str(exc)})
            except Exception as exc:  # recorded as a failed configuration
                record(spec, 0, _failure(exc))
    elif opts.mode != "fresh":
        raise ValueError(f"unknown mode {opts.mode!r}")

    for rnd in range(opts.rounds):
        for spec in case.configs:
            if results[spec.name].status != "ok":
                continue  # a configuration that failed once is not retried
            schedule.append((rnd, spec.name))
            if opts.mode == "fresh":
                record(spec, rnd, _run_fresh(spec, opts))
                continue
            try:
                median, metrics = measure_round(calls[spec.name], opts.warmup, opts.repeat)
                record(spec, rnd, {"status": "ok", "median_s": median, "metrics": metrics})
            except Exception as exc:  # recorded as a failed configuration
                record(spec, rnd, _failure(exc))

    for name, reason in case.skipped.items():
        results[name] = ConfigResult(name, status="skipped", error=reason, rounds_s=[None] * opts.rounds)
    configs = [results[n] for n in names]
    for res in configs:
        summarize(res)
        res.setup_s = statistics.median(setups[res.name]) if setups.get(res.name) else None
    compute_ratios(configs, baseline)
    result = RunResult(
        case=case.name,
        description=case.description,
        options=asdict(opts),
        baseline=baseline,
        machine=machine_info(),
        configs=configs,
        schedule=schedule,
        notes=jsonable(case.notes),
        started_at=started,
        duration_s=time.perf_counter() - t_start,
    )
    if case.checks is not None:
        try:
            result.checks = list(case.checks(result))
        except Exception as exc:  # a broken check must not lose the measurements
            result.checks = [f"checks failed: {type(exc).__name__}: {exc}"]
    return result


def summarize(res: ConfigResult) -> None:
    """Median/min/IQR over the rounds that ran; a failure after some rounds keeps those rounds visible."""
    res.metrics = {
        name: statistics.median(ran) for name, rounds in res.metric_rounds.items()
        if (ran := [v for v in rounds if v is not None])
    }
    values = [v for v in res.rounds_s if v is not None]
    if not values:
        return
    res.median_s, res.min_s = statistics.median(values), min(values)
    res.q1_s, _, res.q3_s = (
        statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    )
    res.iqr_s = res.q3_s - res.q1_s


def compute_ratios(configs: list[ConfigResult], baseline: str | None) -> None:
    """ratio = baseline / config, so >1 reads as 'faster than baseline' (see RATIO_DIRECTION)."""
    base = next((c for c in configs if c.name == baseline), None)
    if base is None or not base.median_s:
        return
    for res in configs:
        res.metric_ratios = {
            name: ratio for name, value in res.metrics.items()
            if name in base.metrics and (ratio := metric_ratio(name, base.metrics[name], value)) is not None
        }
        res.metric_paired = {
            name: paired for name in res.metric_ratios
            if (paired := paired_metric_ratio(name, base.metric_rounds[name], res.metric_rounds[name])) is not None
        }
        if not res.median_s:
            continue
        res.ratio = base.median_s / res.median_s
        paired = [b / v for b, v in zip(base.rounds_s, res.rounds_s) if b is not None and v]
        res.paired_ratio = statistics.median(paired) if paired else None
