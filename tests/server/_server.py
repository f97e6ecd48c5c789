"""A real server for the tests: the app on uvicorn in a thread, on a free port of 127.0.0.1,
with bounded start and stop; and helpers to wait for the engine to go idle and to read SSE."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI

from infercc.server import Server, build_app
from infercc.server.app import ServerState

START_SECONDS = 30.0
STOP_SECONDS = 30.0


@dataclass
class Running:
    url: str
    state: ServerState
    server: Server

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


@contextlib.contextmanager
def running(compiled: Any, setup: Callable[[FastAPI], None] | None = None, **options: Any) -> Iterator[Running]:
    """Serve ``compiled`` (``build_app`` options; ``setup(app)`` before it starts) until the block
    ends; the engine drains on exit."""
    options.setdefault("model_name", "stories")
    app = build_app(compiled, **options)
    if setup is not None:
        setup(app)
    server = Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_SECONDS
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield Running(server.url, app.state.server, server)
    finally:
        server.should_exit = True
        thread.join(STOP_SECONDS)
        assert not thread.is_alive(), "the test server did not stop"


def wait_idle(state: ServerState, seconds: float = 20.0) -> Any:
    """The engine's stats once it runs and queues nothing (and holds no live request)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        stats = state.engine.snapshot()
        if stats is not None and stats.running == 0 and stats.waiting == 0 and not state.engine.live_requests:
            time.sleep(0.05)  # one more snapshot after the last abort
            return state.engine.snapshot()
        time.sleep(0.02)
    raise AssertionError(f"the engine did not go idle in {seconds} s: {state.engine.snapshot()}")


@contextlib.asynccontextmanager
async def engine_held(state: ServerState, requests: int, seconds: float = 30.0):
    """Hold the engine thread (between two steps) while the block runs and until ``requests`` new
    requests are queued behind it, so that they are admitted together however slowly the clients
    send them: on a loaded machine a tiny model can finish the first requests before the last
    arrive, and a test of what happens when many run at once would then test nothing."""
    entered, gate = threading.Event(), threading.Event()

    def hold(engine: Any) -> None:
        entered.set()
        gate.wait(seconds)

    held = asyncio.ensure_future(state.engine.call(hold))
    try:
        while not entered.is_set():
            await asyncio.sleep(0.01)
        yield
        deadline = time.monotonic() + seconds
        while sum(1 for c in list(state.engine._commands) if c[0] == "add") < requests:
            if time.monotonic() > deadline:
                raise AssertionError(f"{requests} requests did not reach the engine in {seconds} s")
            await asyncio.sleep(0.01)
    finally:
        gate.set()
        await held


def sse_events(lines: Iterator[str]) -> list[str]:
    """The ``data:`` payloads of a server-sent-event stream, checking the framing: every event
    is one ``data: ...`` line followed by a blank line."""
    events, pending = [], None
    for line in lines:
        if pending is None:
            assert line.startswith("data: "), f"an SSE event starts with 'data: ', got {line!r}"
            pending = line[len("data: "):]
        else:
            assert line == "", f"an SSE event ends with a blank line, got {line!r}"
            events.append(pending)
            pending = None
    assert pending is None, "the stream ended inside an event"
    return events
