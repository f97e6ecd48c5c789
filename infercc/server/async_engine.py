"""The engine loop in its own thread, and asyncio streams of its outputs per HTTP request.

``Engine`` (runtime/engine.py) is single-threaded and not thread-safe, and a step runs the model
for tens of milliseconds; the event loop must never wait on it. So one thread owns the engine:
it alone calls ``add_request``, ``abort``, ``step`` and ``stats``. The event loop talks to it
through a command queue (add, abort, call) and gets results back through
``loop.call_soon_threadsafe``: each HTTP request's ``Job`` has an ``asyncio.Queue`` that the
thread fills with ``(choice index, RequestOutput)``. ONNX Runtime and NumPy release the GIL
while they compute, so the event loop keeps serving while a step runs.

Lifecycle: ``start()`` starts the thread; ``close()`` stops taking requests, lets the engine
finish what it holds (the drain on SIGTERM) and joins the thread; after ``drain_seconds`` it
aborts what is left. An exception from ``Engine.step`` fails the requests of that step (their
streams get ``EngineFailure``: a 500 for those requests) and the loop goes on for new ones.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import InferccError
from .protocol import RequestError

if TYPE_CHECKING:
    from ..runtime.engine import Engine, RequestOutput
    from ..runtime.sampling import SamplingParams
    from .metrics import Metrics

log = logging.getLogger("infercc.server")

#: Put in a job's queue by ``Job.abort`` so that an iteration waiting on it ends.
_ABORTED = object()
#: Seconds between two snapshots of the engine's stats while it is busy (for /metrics).
STATS_EVERY = 0.25


class EngineFailure(InferccError):
    """The engine raised while running a request: the server's fault, a 500 for that request."""


@dataclass
class _Live:
    """An engine request as the engine thread sees it (touched by that thread only)."""

    job: Job
    index: int
    arrival: float
    last_token: float | None = None


@dataclass
class Job:
    """The engine requests (one per choice) of one HTTP request. Iterate for
    ``(choice index, RequestOutput)`` until every choice finished; ``abort()`` ends the
    unfinished ones (client gone). Used from the event loop only."""

    engine: AsyncEngine
    request_ids: list[str]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    unfinished: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.unfinished = set(range(len(self.request_ids)))

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while self.unfinished:
            item = await self.queue.get()
            if item is _ABORTED:
                return
            if isinstance(item, BaseException):
                self.unfinished.clear()
                raise item
            index, output = item
            if output.finished:
                self.unfinished.discard(index)
            yield index, output

    def abort(self) -> None:
        """Abort the choices that have not finished (idempotent; safe after the end); an
        iteration waiting for outputs ends."""
        if not self.unfinished:
            return
        for index in sorted(self.unfinished):
            self.engine.abort(self.request_ids[index])
        self.unfinished.clear()
        self.queue.put_nowait(_ABORTED)

    def put(self, item: Any) -> None:
        """From the engine thread: hand ``item`` to the event loop (False when it is gone)."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    """Owns an ``Engine`` and the thread that runs it. Thread-safe: every method but
    ``snapshot`` enqueues a command; ``snapshot`` reads the last stats the thread recorded."""

    def __init__(self, engine: Engine, metrics: Metrics | None = None, *, drain_seconds: float = 600.0) -> None:
        self.engine = engine
        self.metrics = metrics
        self.drain_seconds = drain_seconds
        self._commands: collections.deque[tuple[Any, ...]] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self._abort_all = False
        self._live: dict[Hashable, _Live] = {}
        self._stats: Any = None
        self._stats_at = 0.0
        self._thread = threading.Thread(target=self._run, name="infercc-engine", daemon=True)

    # -- the event loop's side --------------------------------------------------------------------
    def start(self) -> None:
        self._stats = self.engine.stats()
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing

    @property
    def live_requests(self) -> int:
        """Engine requests added and neither finished nor aborted yet."""
        return len(self._live)

    def snapshot(self) -> Any:
        """The engine's last ``EngineStats`` (taken by the engine thread after steps and when idle)."""
        return self._stats

    async def submit(self, prompt: list[int], params: list[SamplingParams], request_id: str,
                     logprobs: int | None = None, speculation: dict[str, Any] | None = None,
                     adapter: str | None = None) -> Job:
        """Add one engine request per entry of ``params`` (ids ``{request_id}-{i}``; each with the
        ``speculation`` keywords of ``Engine.add_request``). Raises RequestError (400) when the engine
        refuses the prompt, 503 once the server is closing."""
        if self._closing:
            raise RequestError("the server is shutting down and takes no new requests; retry on another server",
                               status=503, type="server_error", code="server_shutting_down")
        loop = asyncio.get_running_loop()
        job = Job(self, [f"{request_id}-{i}" for i in range(len(params))], loop)
        added = loop.create_future()
        self._send(("add", job, prompt, params, logprobs, speculation, adapter, added))
        try:
            await added
        except asyncio.CancelledError:  # the client left while waiting: undo the add
            job.abort()
            raise
        return job

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """``fn(engine)`` run on the engine thread between steps (the engine is not thread-safe)."""
        future = asyncio.get_running_loop().create_future()
        self._send(("call", fn, future))
        return await future

    def close(self, timeout: float | None = None) -> None:
        """Take no new requests, finish the running ones (at most ``timeout``, default
        ``drain_seconds``; then abort them), and stop the thread."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if not self._thread.is_alive():
            return
        self._thread.join(self.drain_seconds if timeout is None else timeout)
        if self._thread.is_alive():
            log.warning("engine: requests still running after the drain time; aborting them")
            with self._wake:
                self._abort_all = True
                self._wake.notify()
            self._thread.join(10.0)

    def _send(self, command: tuple[Any, ...]) -> None:
        with self._wake:
            self._commands.append(command)
            self._wake.notify()

    # -- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                if self._cycle():
                    return
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any failure
                log.exception("engine: the loop failed; failing the %d running request(s)", len(self._live))
                self._fail_live(exc)

    def _cycle(self) -> bool:
        """Wait for work, apply the commands, run a step; True once closed and drained."""
        engine = self.engine
        with self._wake:
            while not self._commands and not engine.has_unfinished() and not self._closing:
                self._record_stats(force=True)
                self._wake.wait()
            commands = list(self._commands)
            self._commands.clear()
            closing, abort_all = self._closing, self._abort_all
        for command in commands:
            self._apply(command)
        if abort_all:
            for request_id in list(self._live):
                self._abort(request_id)
        if engine.has_unfinished():
            self._step()
        elif closing and not self._commands:
            self._record_stats(force=True)
            return True
        return False

    def _fail_live(self, exc: BaseException) -> None:
        """Abort every live request and end its stream with EngineFailure (a 500 for it)."""
        failure = EngineFailure(f"the engine failed while generating ({type(exc).__name__}: {exc}); the request "
                                "was dropped, retry it")
        for request_id, live in list(self._live.items()):
            self._abort(request_id, count=False)
            if self.metrics is not None:
                self.metrics.finished(live.arrival, "error")
            _put(live.job, failure)

    def _apply(self, command: tuple[Any, ...]) -> None:
        kind = command[0]
        if kind == "add":
            self._add(*command[1:])
        elif kind == "abort":
            self._abort(command[1])
        elif kind == "call":
            fn, future = command[1:]
            try:
                result, error = fn(self.engine), None
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                result, error = None, exc
            _resolve(future, result, error)

    def _add(self, job: Job, prompt: list[int], params: list[SamplingParams], logprobs: int | None,
             speculation: dict[str, Any] | None, adapter: str | None, added: asyncio.Future) -> None:
        now = time.monotonic()
        done: list[str] = []
        try:
            for index, (request_id, p) in enumerate(zip(job.request_ids, params)):
                self.engine.add_request(request_id, list(prompt), p, logprobs=logprobs, adapter=adapter,
                                        **(speculation or {}))
                self._live[request_id] = _Live(job, index, now)
                done.append(request_id)
        except Exception as exc:  # noqa: BLE001 - the request's error, not the loop's
            for request_id in done:
                self._abort(request_id, count=False)
            if not isinstance(exc, InferccError):
                log.exception("engine: add_request failed")
                exc = EngineFailure(f"the engine failed to accept the request ({type(exc).__name__}: {exc})")
            elif not isinstance(exc, RequestError):
                exc = RequestError(str(exc), param="prompt")
            _resolve(added, None, exc)
            return
        _resolve(added, None, None)

    def _abort(self, request_id: str, count: bool = True) -> None:
        live = self._live.pop(request_id, None)
        if live is None:  # finished meanwhile
            return
        try:
            self.engine.abort(request_id)
        except Exception:  # noqa: BLE001 - the request is gone either way
            log.exception("engine: abort(%s) failed", request_id)
        if count and self.metrics is not None:
            self.metrics.finished(live.arrival, "abort")

    def _step(self) -> None:
        outputs = self.engine.step()  # an exception fails the live requests (_run)
        now = time.monotonic()
        for output in outputs:
            live = self._live.get(output.request_id)
            if live is None:  # aborted after the step began
                continue
            if self.metrics is not None and output.new_token_ids:
                self.metrics.tokens(live.arrival, live.last_token, now, len(output.new_token_ids))
                live.last_token = now
            if output.finished:
                del self._live[output.request_id]
                if self.metrics is not None:
                    self.metrics.finished(live.arrival, output.finish_reason or "stop", now)
            if not _put(live.job, (live.index, output)) and not output.finished:
                self._abort(output.request_id)  # its event loop is gone
        self._record_stats()

    def _record_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._stats_at >= STATS_EVERY:
            try:
                self._stats = self.engine.stats()
            except Exception:  # noqa: BLE001 - metrics must not stop generation
                log.exception("engine: stats() failed")
            self._stats_at = now


def _put(job: Job, item: Any) -> bool:
    try:
        job.put(item)
        return True
    except RuntimeError:  # the event loop is closed
        return False


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    def settle() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        future.get_loop().call_soon_threadsafe(settle)
    except RuntimeError:
        pass  # the event loop is closed: nobody waits
