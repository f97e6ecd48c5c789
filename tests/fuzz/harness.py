"""The parent side of the fuzzer: runs variants in child processes and turns what they report into outcomes.

One child runs a batch of seeds and reports each (``child.py``); every variant gets its own
deadline, measured from the child's ``start`` line. A child that dies (segfault, abort, killed)
or overruns a deadline is charged to the variant in flight, and a fresh child goes on with the
rest of the batch; a crash is then run again alone, to tell a reproducible crash from one that
earlier variants caused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: seconds a variant may take (compile + short run); the child's import and base parse get more
VARIANT_TIMEOUT = 30.0
STARTUP_TIMEOUT = 90.0
#: address-space limit of a child: a hostile size must become an error, not a swapping machine
MEMORY_GIB = 6.0
#: variants per child: a fresh process now and then keeps leaks of one variant from failing another
BATCH = 100
#: outcomes that pass: a clean run, or an InferccError
PASSING = ("ok", "error")


@dataclasses.dataclass
class Outcome:
    seed: int
    mutation: str
    #: ok | error (an InferccError) | bad (another exception) | crash | timeout | harness (the fuzzer
    #: itself failed) | accepted (ran although it must fail: weights from outside the model's folder)
    status: str
    stage: str | None = None
    type: str | None = None
    message: str = ""
    where: str | None = None
    frames: list[str] = dataclasses.field(default_factory=list)
    multiline: bool = False
    note: str | None = None
    seconds: float | None = None  # compile + run, as the child measured it

    @property
    def failed(self) -> bool:
        return self.status not in PASSING


def run_fuzz(fmt: str, base: Path, seeds: Iterable[int], workdir: Path, *, timeout: float = VARIANT_TIMEOUT,
             memory_gib: float = MEMORY_GIB, batch: int = BATCH, confirm: bool = True) -> list[Outcome]:
    """Outcomes of variants ``seeds`` of ``base`` (``fmt`` "gguf" or "onnx"), in seed order."""
    seeds = list(seeds)
    done: dict[int, Outcome] = {}
    launches = 0
    for start in range(0, len(seeds), batch):
        pending = seeds[start:start + batch]
        while pending:
            launches += 1
            done.update(_run_child(fmt, base, pending, workdir, timeout, memory_gib, launches))
            pending = [s for s in pending if s not in done]
    if confirm:
        for seed, outcome in done.items():
            if outcome.status == "crash":
                again = run_fuzz(fmt, base, [seed], workdir / "confirm", timeout=timeout, memory_gib=memory_gib,
                                 confirm=False)[0]
                outcome.note = f"{outcome.note or ''}; alone: {again.status}".strip("; ")
    return [done[s] for s in seeds]


def _command(fmt: str, base: Path, seeds: Sequence[int], workdir: Path, memory_gib: float) -> list[str]:
    return [sys.executable, "-m", "tests.fuzz.child", fmt, str(base), str(workdir), *map(str, seeds),
            "--mem-gib", str(memory_gib)]


def _run_child(fmt: str, base: Path, seeds: Sequence[int], workdir: Path, timeout: float, memory_gib: float,
               launch: int) -> dict[int, Outcome]:
    """Run one child over ``seeds`` until it finishes, dies or overruns; the outcomes it produced
    (at least one: the variant it died on, or the first one when it never got that far)."""
    workdir.mkdir(parents=True, exist_ok=True)
    err_path = workdir / f"child-{launch}.stderr"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(_command(fmt, base, seeds, workdir / f"c{launch}", memory_gib), cwd=REPO,
                                stdout=subprocess.PIPE, stderr=err, env=env, start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line.decode(errors="replace"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    out: dict[int, Outcome] = {}
    current: tuple[int, str] | None = None
    deadline = time.monotonic() + STARTUP_TIMEOUT
    try:
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                if current is None:  # between variants: making the next variant hung
                    seed = next(s for s in seeds if s not in out)
                    out[seed] = Outcome(seed, "<not made>", "harness", message="the child stopped answering")
                else:
                    out[current[0]] = Outcome(current[0], current[1], "timeout",
                                              message=f"no result after {timeout:.0f} s (hang, or far too slow)")
                return out
            if line is None:
                code = proc.wait()
                if current is not None or len(out) < len(seeds):
                    seed, mutation = current or (next(s for s in seeds if s not in out), "<not made>")
                    out[seed] = Outcome(seed, mutation, "crash", message=_exit_text(code, err_path))
                return out
            record = json.loads(line)
            if record["event"] == "start":
                current = (record["seed"], record["mutation"])
            else:
                fields = {k: v for k, v in record.items() if k in Outcome.__dataclass_fields__}
                out[record["seed"]] = Outcome(mutation=current[1] if current else "", **fields)
                current = None
            deadline = time.monotonic() + timeout
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # our own child's session: nothing else is in it
            proc.wait()


def _exit_text(code: int, err_path: Path) -> str:
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    tail = err_path.read_text(errors="replace")[-1200:].strip()
    return f"child died ({how}); stderr tail: {' | '.join(tail.splitlines()[-12:])}"


def group(outcomes: Iterable[Outcome]) -> dict[tuple[str, str, str], list[Outcome]]:
    """Failures by (status, exception type, innermost infercc frame without its line number)."""
    groups: dict[tuple[str, str, str], list[Outcome]] = defaultdict(list)
    for o in outcomes:
        if o.failed:
            groups[(o.status, o.type or "-", _site(o.where))].append(o)
    return dict(sorted(groups.items(), key=lambda kv: -len(kv[1])))


def _site(where: str | None) -> str:
    """``infercc/x.py:12 f`` -> ``infercc/x.py f``: a class of failure should not split on line numbers."""
    if not where:
        return "-"
    location, _, function = where.partition(" ")
    return f"{location.rsplit(':', 1)[0]} {function}"


def report(fmt: str, base: Path, outcomes: Sequence[Outcome], workdir: Path, examples: int = 3) -> str:
    """A readable account of the failures: one block per class, each with reproducers."""
    failures = [o for o in outcomes if o.failed]
    groups = group(outcomes)
    lines = [f"{len(failures)} of {len(outcomes)} {fmt} variants of {base.name} failed, in {len(groups)} classes:"]
    for (status, exc_type, where), members in groups.items():
        seeds = ", ".join(str(o.seed) for o in members[:12]) + (" ..." if len(members) > 12 else "")
        lines.append(f"[{status}] {exc_type} at {where}: {len(members)} variant(s), seeds {seeds}")
        for o in members[:examples]:
            lines.append(f"    seed {o.seed}: {o.mutation}")
            lines.append(f"      -> {o.type or o.status}: {o.message[:300]}" + (f" ({o.note})" if o.note else ""))
            if o.frames:
                lines.append(f"      frames: {' > '.join(o.frames)}")
    if failures:
        lines.append(f"reproduce one: python -m tests.fuzz.child {fmt} {base} {workdir / 'repro'} SEED --keep")
    return "\n".join(lines)


def save_outcomes(fmt: str, base: Path, outcomes: Sequence[Outcome], path: Path) -> None:
    """Every outcome as a JSON line (INFERCC_FUZZ_REPORT): the raw material of a bug report."""
    with open(path, "a") as f:
        for o in outcomes:
            f.write(json.dumps({"format": fmt, "base": str(base), **dataclasses.asdict(o)}) + "\n")


#: variants per base file in the default run (two bases per format: 30 variants per format)
DEFAULT_COUNT = 15


def default_seeds() -> range:
    return range(DEFAULT_COUNT)


def slow_seeds() -> range:
    """The slow run's seeds: INFERCC_FUZZ_COUNT of them (default 2000) from INFERCC_FUZZ_SEED (default 0)."""
    start = int(os.environ.get("INFERCC_FUZZ_SEED", "0"))
    return range(start, start + int(os.environ.get("INFERCC_FUZZ_COUNT", "2000")))


def check_variants(fmt: str, base: Path, seeds: Iterable[int], workdir: Path) -> list[Outcome]:
    """Run the variants and fail, with the grouped report, unless each ended in a run or an InferccError.
    With INFERCC_FUZZ_REPORT set, every outcome is appended to that file as a JSON line."""
    outcomes = run_fuzz(fmt, base, seeds, workdir)
    if os.environ.get("INFERCC_FUZZ_REPORT"):
        save_outcomes(fmt, base, outcomes, Path(os.environ["INFERCC_FUZZ_REPORT"]))
    assert not any(o.failed for o in outcomes), report(fmt, base, outcomes, workdir)
    return outcomes
