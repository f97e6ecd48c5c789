"""``infercc serve``: an OpenAI-compatible HTTP server over the continuous-batching engine.

Routes (app.py): POST /v1/completions and /v1/chat/completions (streamed as server-sent events
or not), GET /v1/models, /health and /metrics (Prometheus). Requests and responses follow
OpenAI's shapes (protocol.py, responses.py), so the official ``openai`` clients work unchanged.
The engine (runtime/engine.py) runs in a thread of its own; each HTTP request is an asyncio
stream of its outputs (async_engine.py).

Why FastAPI on uvicorn: both are well kept and widely deployed (vLLM's OpenAI server uses the
same pair, so its users meet familiar behaviour); Starlette's ``StreamingResponse`` streams an
async generator as SSE and cancels it when the client goes away; pydantic (already how FastAPI
validates) checks the request bodies; uvicorn shuts down gracefully on SIGTERM (stop accepting,
let in-flight responses finish) which, with the engine thread draining, is the drain we want.
Hand-rolled HTTP on asyncio would have to re-implement all of that, and aiohttp offers no
request validation.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from .app import build_app

if TYPE_CHECKING:
    from ..compiled import CompiledModel
    from ..config import Config

__all__ = ["build_app", "model_name_for", "serve"]


def model_name_for(model: str) -> str:
    """The served model id for a model path: its file or folder name."""
    return Path(model).name or str(model)


def serve(compiled: CompiledModel, *, host: str = "127.0.0.1", port: int = 8000, model_name: str = "model",
          api_key: str | None = None, config: Config | None = None, log_level: str = "info",
          on_ready: Callable[[str], None] | None = None) -> None:
    """Serve ``compiled`` until SIGTERM or Ctrl-C, then drain: stop accepting connections, finish
    the requests in flight, stop the engine thread, return. ``on_ready(url)`` is called once the
    socket listens (``port=0`` picks a free port; the URL has the real one)."""
    app = build_app(compiled, model_name=model_name, api_key=api_key, config=config)
    settings = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                              timeout_graceful_shutdown=None)
    Server(settings, on_ready).run()


class Server(uvicorn.Server):
    """uvicorn's server, telling ``on_ready`` the URL once it listens, and returning normally
    after a drain on SIGTERM/SIGINT (uvicorn raises the signal again at the end, which would make
    a clean drain look like a crash)."""

    def __init__(self, settings: uvicorn.Config, on_ready: Callable[[str], None] | None = None) -> None:
        super().__init__(settings)
        self.on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_ready is not None:
            self.on_ready(self.url)

    @property
    def url(self) -> str:
        """http://host:port of the listening socket (the real port when 0 was asked)."""
        listening = [s for server in self.servers for s in server.sockets]
        port = listening[0].getsockname()[1] if listening else self.config.port
        host = self.config.host
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            if hasattr(self, "_captured_signals"):
                self._captured_signals.clear()
