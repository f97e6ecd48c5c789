"""Engine outputs -> OpenAI's response and stream-chunk JSON, for /v1/completions and
/v1/chat/completions.

A ``Completion`` / ``Chat`` formatter follows one HTTP request: ``chunks(index, output)`` gives
the stream chunks an engine output becomes (OpenAI's exact shapes: a chat stream opens each
choice with a ``role`` delta, sends ``content`` deltas, closes the choice with an empty delta
and its ``finish_reason``), ``add(index, output)`` collects for the non-streamed answer, and
``response()`` / ``usage_chunk()`` finish. Usage counts the prompt once (OpenAI's rule for n > 1)
and every choice's tokens; ``cached_tokens`` is what the prefix cache served of the first choice's
prompt.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .protocol import envelope, finite, usage

if TYPE_CHECKING:
    from ..runtime.engine import RequestOutput
    from ..runtime.tokenizer import Tokenizer

#: Ids of context a token's text is decoded after (see ``_Formatter.texts``).
CONTEXT = 4


@dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    offset: int = 0  # characters of token text so far (completions' text_offset)
    started: bool = False


class _Formatter:
    kind = ""

    def __init__(self, request_id: str, model: str, n: int, tokenizer: Tokenizer | None, logprobs: int | None,
                 include_usage: bool, prompt: list[int]) -> None:
        self.id = request_id
        self.model = model
        self.choices = [_Choice() for _ in range(n)]
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.prompt_tail = list(prompt[-CONTEXT:])
        self.prompt_tokens = self.cached_tokens = 0
        self._envelope = envelope(self.kind, request_id, model)
        self._text_after = functools.lru_cache(maxsize=8192)(self._decode_after)

    def _decode_after(self, context: tuple[int, ...], token: int) -> str:
        if self.tokenizer is None:
            return ""
        done = self.tokenizer.decode(context, skip_special=False)
        text = self.tokenizer.decode(context + (token,), skip_special=False)
        return text[len(done):] if text.startswith(done) else self.tokenizer.decode([token], skip_special=False)

    def texts(self, context: list[int], ids: list[int]) -> list[str]:
        """The text each of ``ids`` adds after ``context`` (decoded in context, so a SentencePiece
        token's leading space shows, as in OpenAI's logprobs)."""
        out, window = [], tuple(context[-CONTEXT:])
        for token in ids:
            out.append(self._text_after(window, token))
            window = (window + (token,))[-CONTEXT:]
        return out

    def context(self, choice: _Choice) -> list[int]:
        """The last ids before a choice's next token: its output's tail, then the prompt's."""
        tail = choice.token_ids[-CONTEXT:]
        return (self.prompt_tail + tail)[-CONTEXT:]

    def add(self, index: int, output: RequestOutput) -> _Choice:
        """Record ``output`` for choice ``index``."""
        choice = self.choices[index]
        if index == 0 or not self.prompt_tokens:
            self.prompt_tokens, self.cached_tokens = output.prompt_tokens, output.cached_tokens
        choice.text += output.new_text
        choice.token_ids.extend(output.new_token_ids)
        if output.logprobs is not None:
            choice.logprobs.extend(output.logprobs)
        if output.top_logprobs is not None:
            choice.top_logprobs.extend(output.top_logprobs)
        if output.finished:
            choice.finish_reason = output.finish_reason
        return choice

    def usage(self) -> dict[str, Any]:
        return usage(self.prompt_tokens, sum(len(c.token_ids) for c in self.choices), self.cached_tokens)

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out = {**self._envelope, "choices": choices}
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
        return {**self._envelope, "choices": [], "usage": self.usage()}


class Completion(_Formatter):
    kind = "text_completion"

    def chunks(self, index: int, output: RequestOutput) -> list[dict[str, Any]]:
        choice = self.choices[index]
        context, offset = self.context(choice), choice.offset
        self.add(index, output)
        logprobs = self._logprobs(context, output.new_token_ids, output.logprobs, output.top_logprobs, offset)
        if logprobs is not None:
            choice.offset = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1]) if logprobs["tokens"] else offset
        if not output.new_text and not output.finished and logprobs is None:
            return []
        return [self.chunk([{"index": index, "text": output.new_text, "logprobs": logprobs,
                             "finish_reason": output.finish_reason if output.finished else None}])]

    def _logprobs(self, context: list[int], ids: list[int], logprobs: list[float] | None,
                  tops: list[dict[int, float]] | None, offset: int) -> dict[str, Any] | None:
        """OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset
        (None when not asked, or when there is no new token to describe)."""
        if self.logprobs is None or not ids:
            return None
        texts = self.texts(context, ids)
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        top_texts = None
        if self.logprobs > 0 and tops is not None:
            top_texts, window = [], list(context)
            for token, top in zip(ids, tops):
                top_texts.append({self.texts(window, [t])[0]: finite(x) for t, x in top.items()})
                window = (window + [token])[-CONTEXT:]
        return {"tokens": texts, "token_logprobs": [finite(x) for x in (logprobs or [])],
                "top_logprobs": top_texts, "text_offset": offsets}

    def response(self) -> dict[str, Any]:
        choices = [{"index": index, "text": choice.text,
                    "logprobs": self._logprobs(self.prompt_tail, choice.token_ids, choice.logprobs,
                                               choice.top_logprobs, 0),
                    "finish_reason": choice.finish_reason}
                   for index, choice in enumerate(self.choices)]
        return {**self._envelope, "choices": choices, "usage": self.usage()}


class Chat(_Formatter):
    kind = "chat.completion.chunk"

    def chunks(self, index: int, output: RequestOutput) -> list[dict[str, Any]]:
        choice = self.choices[index]
        context = self.context(choice)
        self.add(index, output)
        out = []
        if not choice.started:
            choice.started = True
            out.append(self.chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}]))
        logprobs = self._logprobs(context, output.new_token_ids, output.logprobs, output.top_logprobs)
        if output.new_text or logprobs is not None:
            out.append(self.chunk([{"index": index, "delta": {"content": output.new_text}, "logprobs": logprobs,
                                    "finish_reason": None}]))
        if output.finished:
            out.append(self.chunk([{"index": index, "delta": {}, "logprobs": None,
                                    "finish_reason": output.finish_reason}]))
        return out

    def _logprobs(self, context: list[int], ids: list[int], logprobs: list[float] | None,
                  tops: list[dict[int, float]] | None) -> dict[str, Any] | None:
        """OpenAI's chat logprobs: {"content": [{token, logprob, bytes, top_logprobs}], "refusal"}."""
        if self.logprobs is None or not ids:
            return None
        content, window = [], list(context)
        for i, token in enumerate(ids):
            top = tops[i] if tops is not None and i < len(tops) else {}
            chosen = logprobs[i] if logprobs is not None and i < len(logprobs) else 0.0
            content.append({**self._entry(window, token, chosen),
                            "top_logprobs": [self._entry(window, t, x) for t, x in top.items()]})
            window = (window + [token])[-CONTEXT:]
        return {"content": content, "refusal": None}

    def _entry(self, context: list[int], token: int, logprob: float) -> dict[str, Any]:
        text = self.texts(context, [token])[0]
        return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode("utf-8"))}

    def response(self) -> dict[str, Any]:
        choices = [{"index": index,
                    "message": {"role": "assistant", "content": choice.text, "refusal": None},
                    "logprobs": self._logprobs(self.prompt_tail, choice.token_ids, choice.logprobs,
                                               choice.top_logprobs),
                    "finish_reason": choice.finish_reason}
                   for index, choice in enumerate(self.choices)]
        return {**self._envelope, "object": "chat.completion", "choices": choices, "usage": self.usage()}
