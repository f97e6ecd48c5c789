"""The HTTP routes: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

Every handler runs inside ``_guard``: a ``RequestError`` becomes its status and OpenAI's error
JSON, another infercc error a 400 (the user's input) or 500 (the model's or the engine's fault),
anything unexpected a 500 for that request alone, logged with its traceback; the server goes on.
A stream that fails after its headers were sent ends with an ``error`` event, then ``[DONE]``.

Client disconnects: while a request generates, a task waits on the ASGI ``receive`` channel;
``http.disconnect`` aborts the request's engine requests at once (their KV blocks come back),
streamed or not. A stream's end, however it ends, aborts whatever is unfinished as well.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..errors import InferccError, ModelLoadError
from ..runtime.generate import encode_prompt
from ..runtime.model_runner import ModelRunner
from .async_engine import AsyncEngine, EngineFailure, Job
from .metrics import Metrics
from .protocol import (
    DEFAULT_CHAT_TOKENS,
    DEFAULT_COMPLETION_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    check_context,
    check_token_ids,
    error_body,
    parse,
    sampling_params,
)
from .responses import Chat, Completion

if TYPE_CHECKING:
    from ..compiled import CompiledModel
    from ..config import Config
    from ..runtime.engine import Engine

log = logging.getLogger("infercc.server")

#: Largest request body read (bytes): a prompt of the largest context fits many times over.
MAX_BODY_BYTES = 32 << 20
#: A text longer than context x this many characters cannot fit the context (no token is that
#: long), so it is refused before the tokenizer spends seconds on it.
MAX_CHARS_PER_TOKEN = 128


class ServerState:
    """What the routes share: the model, its engine thread, metrics, the served name and key."""

    def __init__(self, compiled: CompiledModel, engine: Engine, model_name: str, api_key: str | None,
                 drain_seconds: float) -> None:
        runner = ModelRunner(compiled.backend, compiled.model)
        self.compiled = compiled
        self.model_name = model_name
        self.api_key = api_key
        self.context: int | None = runner.max_context
        self.vocab_size: int | None = runner.vocab_size
        self.created = int(time.time())
        self.engine = AsyncEngine(engine, drain_seconds=drain_seconds)
        self.metrics = Metrics(self.engine.snapshot)
        self.engine.metrics = self.metrics
        try:
            self.tokenizer = compiled.tokenizer
        except ModelLoadError:
            self.tokenizer = None  # token-id prompts still work; text prompts are a 400

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            what = "no API key was given" if not header else "the API key is not the server's"
            raise RequestError(f"{what}; send the key given to `infercc serve --api-key` as the header "
                               "'Authorization: Bearer KEY' (openai clients: api_key=KEY)", status=401,
                               code="invalid_api_key")

    def check_model(self, model: str) -> str | None:
        """None for the base model, the adapter's name for a LoRA adapter the request's ``model``
        names (as vLLM's --lora-modules); 404 for anything else."""
        if model == self.model_name:
            return None
        if model in self.compiled.adapters:
            return model
        served = [self.model_name, *self.compiled.adapters]
        raise RequestError(f"the model {model!r} does not exist; this server serves {served} (the base model and "
                           "its LoRA adapters; GET /v1/models lists them)", status=404, param="model",
                           code="model_not_found")

    def model_card(self, adapter: str | None = None) -> dict[str, Any]:
        card = {"id": adapter or self.model_name, "object": "model", "created": self.created, "owned_by": "infercc",
                "max_model_len": self.context}
        if adapter is not None:
            card.update(root=adapter, parent=self.model_name)
        return card

    def encode(self, prompt: Any, field: str) -> list[int]:
        """Token ids of text or chat messages (the model's tokenizer and chat template)."""
        if self.tokenizer is None:
            raise RequestError(f"this model has no tokenizer, so '{field}' cannot be text; send token ids "
                               "(/v1/completions with a list of ints as prompt)", param=field)
        chars = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
        if self.context is not None and chars > self.context * MAX_CHARS_PER_TOKEN:
            raise RequestError(f"the {field} has {chars:,} characters, more than this model's maximum context "
                               f"length of {self.context} tokens can hold; shorten the {field}", param=field,
                               code="context_length_exceeded")
        return encode_prompt(self.compiled, prompt)


def build_app(compiled: CompiledModel, *, model_name: str = "model", api_key: str | None = None,
              engine: Engine | None = None, config: Config | None = None, drain_seconds: float = 600.0) -> FastAPI:
    """The FastAPI app serving ``compiled``. ``engine``: an Engine already made (else one is made
    with ``config``, default ``compiled.config``). The engine thread starts with the app's
    lifespan and drains when it ends; ``app.state.server`` holds the shared state."""
    if engine is None:
        from ..runtime.engine import Engine

        engine = Engine(compiled, config)
    server = ServerState(compiled, engine, model_name, api_key, drain_seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.engine.close)

    app = FastAPI(title="infercc", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        """The router's own 404 and 405, in OpenAI's error JSON."""
        status = getattr(exc, "status_code", 500)
        server.metrics.error(status)
        message = f"{request.method} {request.url.path}: {getattr(exc, 'detail', exc)}"
        if status == 404:
            message += "; the routes are /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics"
        return JSONResponse(error_body(message, "invalid_request_error"), status_code=status)

    app.add_exception_handler(404, http_error)
    app.add_exception_handler(405, http_error)

    guard = functools.partial(guarded, server)

    @app.get("/health")
    async def health() -> Response:
        if not server.engine.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    @guard
    async def models(request: Request) -> Response:
        server.check_auth(request)
        cards = [server.model_card()] + [server.model_card(name) for name in server.compiled.adapters]
        return JSONResponse({"object": "list", "data": cards})

    @app.get("/v1/models/{model:path}")
    @guard
    async def model(request: Request) -> Response:
        server.check_auth(request)
        return JSONResponse(server.model_card(server.check_model(request.path_params["model"])))

    @app.post("/v1/completions")
    @guard
    async def completions(request: Request) -> Response:
        server.check_auth(request)
        body = parse(CompletionRequest, await _read_json(request))
        adapter = server.check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise RequestError(f"prompt is a list of {len(prompt)} prompts; this server takes one prompt per "
                                   "request: send one request each (or use n for several completions)",
                                   param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = await run_in_threadpool(server.encode, prompt, "prompt")
        else:
            ids = check_token_ids(prompt, server.vocab_size, "prompt")
        max_tokens = body.max_tokens or DEFAULT_COMPLETION_TOKENS
        check_context(len(ids), max_tokens, server.context, "prompt")
        formatter = Completion(f"cmpl-{uuid.uuid4().hex}", body.model, body.n, server.tokenizer,
                               body.logprobs, body.include_usage, ids)
        return await _generate(server, request, body, ids, max_tokens, formatter, body.logprobs, adapter)

    @app.post("/v1/chat/completions")
    @guard
    async def chat(request: Request) -> Response:
        server.check_auth(request)
        body = parse(ChatCompletionRequest, await _read_json(request))
        adapter = server.check_model(body.model)
        ids = await run_in_threadpool(server.encode, body.chat_messages(), "messages")
        requested = body.max_completion_tokens or body.max_tokens
        default = server.context - len(ids) if server.context is not None else DEFAULT_CHAT_TOKENS
        max_tokens = requested or max(default, 1)
        check_context(len(ids), max_tokens, server.context, "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        formatter = Chat(f"chatcmpl-{uuid.uuid4().hex}", body.model, body.n, server.tokenizer, logprobs,
                         body.include_usage, ids)
        return await _generate(server, request, body, ids, max_tokens, formatter, logprobs, adapter)

    return app


Handler = Callable[[Request], Awaitable[Response]]


def guarded(server: ServerState, fn: Handler) -> Handler:
    """``fn`` answering every failure itself: OpenAI's error JSON with the status ``_describe``
    gives (a bug in one request is a 500 for that request, never a dead server)."""
    @functools.wraps(fn)
    async def handler(request: Request) -> Response:
        try:
            return await fn(request)
        except Exception as exc:  # noqa: BLE001 - every failure is this request's answer
            return _error_response(server, exc)
    return handler


async def _generate(server: ServerState, request: Request, body: Any, ids: list[int], max_tokens: int,
                    formatter: Completion | Chat, logprobs: int | None, adapter: str | None = None) -> Response:
    """Submit the request's n choices and answer: a stream of chunks or one JSON response.
    ``adapter``: the LoRA adapter the request's ``model`` named (None: the base model)."""
    params = [sampling_params(body, max_tokens, i) for i in range(body.n)]
    job = await server.engine.submit(ids, params, formatter.id, logprobs, body.speculation_fields, adapter)
    watcher = asyncio.create_task(_abort_on_disconnect(request, job))
    if body.stream:
        return StreamingResponse(_sse(server, job, watcher, formatter), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        async for index, output in job:
            formatter.add(index, output)
    finally:
        watcher.cancel()
        job.abort()
    return JSONResponse(formatter.response())


async def _sse(server: ServerState, job: Job, watcher: asyncio.Task,
               formatter: Completion | Chat) -> AsyncIterator[str]:
    """Server-sent events: ``data: {json}`` per chunk, the usage chunk when asked, ``data: [DONE]``."""
    try:
        async for index, output in job:
            for chunk in formatter.chunks(index, output):
                yield _event(chunk)
        if formatter.include_usage:
            yield _event(formatter.usage_chunk())
    except Exception as exc:  # noqa: BLE001 - headers are sent: the error goes in the stream
        status, body = _describe(exc)
        server.metrics.error(status)
        yield _event(body)
    finally:
        watcher.cancel()
        job.abort()
    yield "data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _abort_on_disconnect(request: Request, job: Job) -> None:
    """Wait for the client to go away, then abort the job (the body is already read, so the
    next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.abort()
            return


async def _read_json(request: Request) -> Any:
    """The body as JSON, read up to MAX_BODY_BYTES (a 413 beyond), or a 400 saying what is wrong."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(f"the request body has {int(declared):,} bytes, more than the {MAX_BODY_BYTES:,} this "
                           "server reads; shorten the prompt", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RequestError(f"the request body exceeds the {MAX_BODY_BYTES:,} bytes this server reads; shorten "
                               "the prompt", status=413)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise RequestError("the request body is empty; send a JSON object (Content-Type: application/json)",
                           code="invalid_json")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"the request body is not valid JSON ({exc}); send a JSON object "
                           "(Content-Type: application/json)", code="invalid_json") from None


def _describe(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error JSON) for an exception raised while answering a request."""
    if isinstance(exc, RequestError):
        return exc.status, exc.body()
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    if isinstance(exc, EngineFailure):
        return 500, error_body(text, "server_error", code="engine_failure")
    if isinstance(exc, ModelLoadError):  # the model's own files (a broken chat template): not the user's fault
        return 500, error_body(text, "server_error", code="model_error")
    if isinstance(exc, InferccError):
        return 400, error_body(text, "invalid_request_error")
    log.error("internal error while answering a request", exc_info=exc)
    return 500, error_body(f"internal server error ({type(exc).__name__}: {text}); this is a bug in infercc, the "
                           "server log has the traceback", "server_error", code="internal_error")


def _error_response(server: ServerState, exc: BaseException) -> JSONResponse:
    status, body = _describe(exc)
    server.metrics.error(status)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)
