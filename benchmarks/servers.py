"""HTTP servers of the serve case as child processes: start on a free loopback port, wait until
ready, measure, always stop.

Why a process group per server: vLLM and uvicorn start children of their own (vLLM's engine core
and worker), and a server left running would load the machine for every later measurement. Each
server therefore starts a new session (its own process group), is stopped by signalling the whole
group (SIGTERM, then SIGKILL after a grace period), and asks the kernel to send it SIGTERM if the
process that started it dies first (``PR_SET_PDEATHSIG``: a benchmark worker killed by the
harness's timeout runs no ``finally``).

The group is also what is measured: its CPU seconds and resident memory, read from /proc, so a
load's figures can say what the server itself spent, and what other processes on the machine took
(``machine_busy_s``: all CPU time the kernel counted, to compare with the server's and the load
generator's own).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class ServerStartError(RuntimeError):
    """The server exited or did not answer in time; the message ends with its log's last lines."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's choice); another process may take it before
    the server binds it, which shows up as a failed start, not a wrong measurement."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, lines: int = 6, width: int = 300) -> str:
    """The last non-empty lines of a log, joined with ' | ' (the harness keeps errors on one line)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    kept = [line.strip()[:width] for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept) or "(empty log)"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class ServerSpec:
    """How to start one server: ``cmd`` must bind 127.0.0.1:``port`` (the caller put it in)."""

    name: str
    cmd: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)  # the whole environment of the child
    ready_paths: Sequence[str] = ("/health", "/v1/models")  # any answering 200 means ready
    start_timeout_s: float = 600.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class ServerProcess:
    """A running server (a context manager: stopped on exit, whatever happened)."""

    def __init__(self, spec: ServerSpec, log_path: Path) -> None:
        self.spec, self.log_path = spec, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s: float | None = None  # seconds from start to the first ready answer

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start and wait until ready; on failure the process group is stopped before raising."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # the command beside the log, not in it: a failed start's message quotes the log's last lines
        self.log_path.with_suffix(".cmd").write_text(" ".join(self.spec.cmd) + "\n")
        with self.log_path.open("wb") as log:
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(self.spec.cmd, env=self.spec.env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent)  # noqa: PLW1509 - single-threaded here
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, t0: float) -> None:
        assert self.proc is not None
        deadline = t0 + self.spec.start_timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ServerStartError(f"failed to start: {self.spec.name} exited with code {code}: "
                                       f"{log_tail(self.log_path)}")
            for path in self.spec.ready_paths:
                if self._answers(path):
                    self.ready_s = time.perf_counter() - t0
                    return
            if time.perf_counter() > deadline:
                raise ServerStartError(f"failed to start: {self.spec.name} did not answer "
                                       f"{' or '.join(self.spec.ready_paths)} within {self.spec.start_timeout_s:g} s: "
                                       f"{log_tail(self.log_path)}")
            time.sleep(0.25)

    def _answers(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.spec.base_url + path, timeout=2.0) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def get(self, path: str, timeout_s: float = 5.0) -> str | None:
        """The body of GET ``path`` as text, or None when the server does not answer it with 200."""
        try:
            with urllib.request.urlopen(self.spec.base_url + path, timeout=timeout_s) as response:
                return response.read().decode(errors="replace") if response.status == 200 else None
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def group_pids(self) -> list[int]:
        """Live processes of the server's process group (its pid is the group id)."""
        if self.proc is None:
            return []
        return [pid for pid, pgid in _process_groups() if pgid == self.proc.pid]

    def usage(self) -> tuple[float, float]:
        """(CPU seconds, resident MiB) summed over the group's live processes."""
        cpu = rss = 0.0
        for pid in self.group_pids():
            fields = _stat_fields(pid)
            if fields is not None:
                cpu += (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime
                rss += int(fields[21]) * _PAGE / 2**20
        return cpu, rss

    def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM the group, SIGKILL whatever is left after ``grace_s``; the exit code, if any."""
        if self.proc is None:
            return None
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + grace_s
        while any(pgid == g for _, g in _process_groups()) and time.monotonic() < deadline:
            time.sleep(0.1)  # the children (an engine core) may outlive the leader by a moment
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        return self.proc.returncode


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces): field 0 is the state."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


def _process_groups() -> list[tuple[int, int]]:
    """(pid, process group id) of every live process (zombies left out: they hold no CPU or memory,
    and a container's init may never reap them)."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None and fields[0] != "Z":
            out.append((int(entry.name), int(fields[2])))
    return out


def machine_busy_s() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat: every state but idle/iowait)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return 0.0
    ticks = [int(v) for v in first[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    guest = sum(ticks[8:10]) if len(ticks) > 9 else 0  # guest time is already counted in user/nice
    return (sum(ticks) - idle - guest) / _CLK_TCK


def self_cpu_s() -> float:
    """CPU seconds of this process (the load generator) so far."""
    t = os.times()
    return t.user + t.system
