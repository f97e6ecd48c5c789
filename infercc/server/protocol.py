"""The OpenAI wire format: request models (pydantic), their validation into token ids and
``SamplingParams``, and the response and stream-chunk shapes.

Requests are hostile input. Unknown fields that change nothing (``user``, ``metadata``,
``store``...) are accepted and ignored, as OpenAI's own server does; fields that would change the
output and that we cannot honour (``echo``, ``suffix``, ``logit_bias``, ``tools``, a JSON
``response_format``) are a 400 naming the field, never silently dropped. Every problem becomes a
``RequestError``: an HTTP status, OpenAI's ``type``/``param``/``code``, and a one-line message
naming the field, the problem and the fix.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import SPECULATIONS, Config
from ..errors import ConfigError, InputError
from ..runtime.sampling import SamplingParams
from ..runtime.spec_engine import OFF as SPECULATION_OFF
from ..runtime.spec_engine import REQUEST_FIELDS as SPECULATION_REQUEST_FIELDS

#: Largest ``n`` (choices per request): each choice is a request in the engine.
MAX_N = 16
#: Largest top-k of log-probabilities returned per token (OpenAI allows 20 for chat).
MAX_LOGPROBS = 20
#: Most stop strings per request.
MAX_STOP = 16
#: OpenAI's default ``max_tokens`` for /v1/completions; chat defaults to the rest of the context.
DEFAULT_COMPLETION_TOKENS = 16
#: Chat's default ``max_tokens`` when the model does not state its context length.
DEFAULT_CHAT_TOKENS = 1024
#: A log-probability JSON can carry in place of -inf (JSON has no infinities; vLLM uses the same).
MIN_LOGPROB = -9999.0
#: Values of the request field ``speculation`` (null or absent: the server's ``--speculation``).
SPECULATION_VALUES = (*(m for m in SPECULATIONS if m is not None), SPECULATION_OFF)


class RequestError(InputError):
    """A request the server refuses: ``status`` and OpenAI's error ``type``/``param``/``code``
    travel with the message so the handler can write OpenAI's error JSON."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:  # noqa: A002 - OpenAI's field name
        super().__init__(message)
        self.status, self.param, self.code, self.type = status, param, code, type

    def body(self) -> dict[str, Any]:
        return error_body(str(self), self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None,  # noqa: A002 - OpenAI's field name
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- requests -------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both endpoints share. ``extra="allow"``: unknown fields are ignored (see module doc)."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # Beyond OpenAI, as vLLM accepts them (the openai client sends them through extra_body).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    logit_bias: dict[str, float] | None = None
    #: infercc's: speculative decoding for this request (a method, "off", or null: the server's).
    #: The output is the same either way (greedy identical, sampling the same distribution).
    speculation: str | None = None
    #: ... and its depth policy and compute share (null: the server's; see Config).
    speculation_policy: str | None = None
    max_speculation_compute_fraction: float | None = None

    def _unsupported(self) -> None:
        if self.logit_bias:
            raise RequestError("logit_bias is not supported by this server; remove it", param="logit_bias")
        if self.speculation is not None and self.speculation not in SPECULATION_VALUES:
            raise RequestError(f"speculation {self.speculation!r} is not a speculation method; use one of "
                               f"{list(SPECULATION_VALUES)} or leave it out for the server's default",
                               param="speculation")
        for name in SPECULATION_REQUEST_FIELDS:  # Config's own rules, answered as a 400 naming the field
            value = getattr(self, name)
            try:
                if value is not None:
                    Config().replace(**{name: value})
            except ConfigError as exc:
                raise RequestError(f"{exc}; or leave {name} out for the server's default", param=name) from None
        if self.stop is not None and not isinstance(self.stop, str) and len(self.stop) > MAX_STOP:
            raise RequestError(f"stop has {len(self.stop)} strings; at most {MAX_STOP} are allowed", param="stop")

    @property
    def speculation_fields(self) -> dict[str, Any]:
        """The request's speculation keywords for ``Engine.add_request`` (unset ones left out)."""
        fields = ("speculation", *SPECULATION_REQUEST_FIELDS)
        return {name: getattr(self, name) for name in fields if getattr(self, name) is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        self._unsupported()
        if self.echo:
            raise RequestError("echo is not supported by this server; set it to false", param="echo")
        if self.suffix:
            raise RequestError("suffix (insertion) is not supported by this server; remove it", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError(f"best_of={self.best_of} is not supported (only best_of equal to n={self.n}); "
                               "remove best_of", param="best_of")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check(self) -> None:
        self._unsupported()
        if self.tools:
            raise RequestError("tools (function calling) are not supported by this server; remove them", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise RequestError(f"response_format {self.response_format.get('type')!r} is not supported (only "
                               "'text'); remove response_format", param="response_format")
        if self.top_logprobs and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs: true; set both", param="top_logprobs")

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages as {"role", "content"} with text content: a list of parts is joined ("text"
        parts only; an image or audio part is refused, the model reads text)."""
        out = []
        for i, message in enumerate(self.messages):
            content = message.content
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise RequestError(f"messages[{i}].content[{j}] is a {part.get('type')!r} part; this model "
                                           "reads text only: send {'type': 'text', 'text': ...} parts or a string",
                                           param=f"messages[{i}].content")
                    texts.append(part["text"])
                content = "".join(texts)
            out.append({"role": message.role, "content": content if content is not None else ""})
        return out


def parse(model: type[_Sampling], body: Any) -> Any:
    """``body`` (decoded JSON) as ``model``, or a RequestError naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got a JSON {_json_kind(body)}")
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]["loc"]
        raise RequestError(describe_validation(exc), param=_union_field(first) or _loc(first)) from None
    request.check()
    return request


#: What a field of several accepted types must be (pydantic reports one error per union branch).
UNION_KINDS = {
    "prompt": "a string, a list of token ids (integers), or a list of one string or of one list of token ids",
    "stop": "a string or a list of strings",
    "content": "a string, a list of {'type': 'text', 'text': ...} parts, or null",
}


def describe_validation(exc: ValidationError) -> str:
    """pydantic's errors as one line: the first error per field, ``field: problem (got value)``;
    a field of several accepted types says what it accepts instead of each branch's complaint."""
    seen: dict[str, str] = {}
    for error in exc.errors():
        loc, branch = _loc(error["loc"]), _union_field(error["loc"])
        got = f" (got {error.get('input')!r:.60})"
        if branch is not None:
            loc = branch
            if loc not in seen:
                kind = UNION_KINDS.get(loc.rsplit(".", 1)[-1], "of another type")
                seen[loc] = f"'{loc}' must be {kind}{got}"
        elif loc not in seen:
            seen[loc] = f"'{loc}' is required" if error["type"] == "missing" else \
                f"'{loc}': {error['msg'][0].lower() + error['msg'][1:]}{got}"
    fields = list(seen.values())
    more = f" and {len(fields) - 3} more" if len(fields) > 3 else ""
    return "invalid request: " + "; ".join(fields[:3]) + more


def _union_field(loc: Sequence[Any]) -> str | None:
    """The field a union-branch error belongs to (its location up to the branch), else None."""
    for i, part in enumerate(loc):
        if _is_branch(part):
            return _loc(loc[:i])
    return None


def _is_branch(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


def _loc(loc: Sequence[Any]) -> str:
    """pydantic's location (('messages', 0, 'content')) as ``messages[0].content``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_branch(part):
            out += f".{part}" if out else str(part)
    return out or "body"


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")


# -- into the engine ------------------------------------------------------------------------------
def sampling_params(request: _Sampling, max_tokens: int, choice: int) -> SamplingParams:
    """The engine's params for choice ``choice`` of ``request``. OpenAI defaults (temperature 1,
    top_p 1); with a seed, choice i draws with seed + i so the n choices differ yet repeat.
    SamplingParams' own message names a bad value (e.g. temperature < 0)."""
    options: dict[str, Any] = {
        "max_new_tokens": max_tokens,
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "stop": (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ()),
        "ignore_eos": request.ignore_eos,
        "stop_token_ids": tuple(request.stop_token_ids or ()),
    }
    for name in ("presence_penalty", "frequency_penalty", "top_k", "min_p", "repetition_penalty"):
        if getattr(request, name) is not None:
            options[name] = getattr(request, name)
    if request.seed is not None:
        options["seed"] = request.seed + choice if request.seed >= 0 else request.seed
    try:
        return SamplingParams(**options)
    except ConfigError as exc:
        field = str(exc).split(" ", 1)[0].removeprefix("SamplingParams.")
        raise RequestError(str(exc), param={"max_new_tokens": "max_tokens"}.get(field, field)) from None


def check_context(prompt_tokens: int, max_tokens: int, context: int | None, prompt_field: str) -> None:
    """400 when prompt + max_tokens exceed the model's context, saying both lengths (OpenAI's
    code ``context_length_exceeded``)."""
    if context is None or prompt_tokens + max_tokens <= context:
        return
    if prompt_tokens >= context:
        raise RequestError(f"the prompt has {prompt_tokens} tokens but this model's maximum context length is "
                           f"{context} tokens (room for the prompt and at least one new token); shorten the "
                           f"{prompt_field}", param=prompt_field, code="context_length_exceeded")
    raise RequestError(f"this model's maximum context length is {context} tokens, but the request asks for "
                       f"{prompt_tokens + max_tokens} ({prompt_tokens} in the {prompt_field} + max_tokens "
                       f"{max_tokens}); lower max_tokens to at most {context - prompt_tokens} or shorten the "
                       f"{prompt_field}", param="max_tokens", code="context_length_exceeded")


def check_token_ids(ids: Sequence[Any], vocab_size: int | None, field: str) -> list[int]:
    """Prompt token ids as ints within the vocabulary, or a 400 naming the first bad one."""
    if not ids:
        raise RequestError(f"{field} is empty: send text or at least one token id", param=field)
    for i, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, int) or token < 0 or \
                (vocab_size is not None and token >= vocab_size):
            limit = f" [0, {vocab_size})" if vocab_size is not None else " >= 0"
            raise RequestError(f"{field}[{i}] = {token!r} is not a token id of this model (ids are integers in"
                               f"{limit})", param=field)
    return [int(t) for t in ids]


# -- responses ------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def finite(logprob: float) -> float:
    """A log-probability JSON can hold (-inf becomes MIN_LOGPROB)."""
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


def envelope(kind: Literal["text_completion", "chat.completion", "chat.completion.chunk"], request_id: str,
             model: str, created: int | None = None) -> dict[str, Any]:
    return {"id": request_id, "object": kind, "created": created or int(time.time()), "model": model}
