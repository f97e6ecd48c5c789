"""Text generation: prompt(s) in, text out, through the model runner and the sampler.

One loop serves ``generate`` (one prompt or a batch) and ``stream`` (text pieces as they come).
A batch of prompts runs as one batch: prompts are left-padded into one prefill step, then every
unfinished row gets one token per decode step; a finished row sits steps out (mask 0) until the
last row ends. Each row has its own sampler seeded with ``seed``, so a prompt gives the same
tokens alone or in a batch.

Text: each row decodes incrementally (the tokenizer's StreamDecoder); a piece is held back while
it could be the start of a stop string, so streamed text never shows a stop string.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from .kv_cache import check_context
from .model_runner import ModelRunner
from .sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from ..compiled import CompiledModel
    from .speculative.policy import SpeculationStats
    from .tokenizer import StreamDecoder, Tokenizer


@dataclasses.dataclass
class GenerationResult:
    """What one prompt produced. ``finish_reason``: "stop" (a stop token or string; which one is in
    ``stop_reason``) or "length" (max_new_tokens, or the model's context was full)."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    stop_reason: int | str | None = None
    #: Time to the first new token: the prefill step (shared by a batch) and the first draw.
    prompt_seconds: float = 0.0
    #: Time for the remaining tokens (one forward step each).
    decode_seconds: float = 0.0
    #: Where the per-token loop ran: "c" (inside the generated library, c_generate.py), "python",
    #: "speculative" (speculative/loop.py), or "engine+c" (a speculating prompt that moved from the
    #: serving engine to the C loop once speculation stayed off, runtime/hand_back.py).
    decode_loop: str = "python"
    #: Speculative decoding's proposed/accepted tokens (None: it was off for this request).
    speculation: SpeculationStats | None = None
    #: Why speculation asked for did not run (no draft, a batch, ...); None when it ran or was off.
    speculation_reason: str | None = None

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first per second of decoding (0 when only one)."""
        steps = max(len(self.token_ids) - 1, 0)
        return steps / self.decode_seconds if steps and self.decode_seconds > 0 else 0.0

    @property
    def prompt_tokens_per_second(self) -> float:
        return len(self.prompt_token_ids) / self.prompt_seconds if self.prompt_seconds > 0 else 0.0


def stop_ids_for(params: SamplingParams, tokenizer: Tokenizer | None, metadata: Mapping[str, Any]) -> set[int]:
    """The ids that end a row: ``params.stop_token_ids`` and, unless ``ignore_eos``, the model's EOS
    ids (the tokenizer's, else the metadata's). InputError for stop strings without a tokenizer
    (text is what they are searched in)."""
    stop_ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        eos = tokenizer.eos_ids if tokenizer is not None else metadata.get("eos_token_ids", [])
        stop_ids.update(int(e) for e in eos)
    if params.stop and tokenizer is None:
        raise InputError("stop strings need the model's tokenizer; set compiled.tokenizer or use stop_token_ids")
    return stop_ids


class _Row:
    """One prompt's progress: ids, sampler, text so far, how much of it was handed out."""

    def __init__(self, prompt: list[int], params: SamplingParams, stop_ids: set[int],
                 decoder: StreamDecoder | None) -> None:
        self.prompt = prompt
        self.params = params
        self.sampler = Sampler(params)
        self.stop_ids = stop_ids
        self.decoder = decoder
        self.output: list[int] = []
        self.text = ""
        self.emitted = 0
        self._searched = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    def take(self, token: int) -> None:
        """Add a sampled token; finish the row on a stop token, a stop string or the length limit."""
        if token in self.stop_ids:
            self.finish("stop", token)
            return
        self.output.append(token)
        if self.decoder is not None:
            self.text += self.decoder.push(token)
            self._check_stop_strings()
        if self.finish_reason is None and len(self.output) >= self.params.max_new_tokens:
            self.finish("length")

    def take_all(self, tokens: list[int], max_context: int | None) -> None:
        """Take several tokens (verified speculation) one at a time, as single steps would: the row
        also ends with "length" once prompt + output fill ``max_context``; tokens after the end
        are dropped."""
        for token in tokens:
            self.take(token)
            if self.finish_reason is None and max_context is not None \
                    and len(self.prompt) + len(self.output) >= max_context:
                self.finish("length")
            if self.finish_reason is not None:
                return

    def _check_stop_strings(self) -> None:
        """Look for stop strings in the text added since the last look (and the overlap a stop
        string could straddle), so long outputs are not rescanned every token."""
        if not self.params.stop:
            return
        since = max(0, self._searched - max(len(s) for s in self.params.stop) + 1)
        self._searched = len(self.text)
        found = [(self.text.find(s, since), s) for s in self.params.stop if s in self.text[since:]]
        if found:
            at, which = min(found)
            self.text = self.text[:at]
            self.finish("stop", which)

    def finish(self, reason: str, stop: int | str | None = None) -> None:
        self.finish_reason, self.stop_reason = reason, stop
        if self.decoder is not None and not isinstance(stop, str):
            # Text held back for an incomplete character comes out now; it may hold a stop string.
            decoder, self.decoder = self.decoder, None
            self.text += decoder.flush()
            self._check_stop_strings()

    def piece(self) -> str:
        """New text safe to show: all of it once finished, else all but a possible stop-string start."""
        end = len(self.text)
        if self.finish_reason is None:
            for stop in self.params.stop:
                for k in range(min(len(stop) - 1, end), 0, -1):
                    if self.text.endswith(stop[:k]):
                        end = min(end, len(self.text) - k)
                        break
        out = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out


class Generation:
    """A run over one or more prompts. Iterating yields (row, text piece); ``results`` after."""

    #: Where the per-token loop runs (CGeneration: "c"), and why not in C when it could have.
    loop = "python"
    loop_reason: str | None = None
    #: Why speculative decoding was asked for but is not used (GenerationResult.speculation_reason).
    speculation_reason: str | None = None

    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer | None, prompts: list[list[int]],
                 params: SamplingParams) -> None:
        self.runner = runner
        self.params = params
        stop_ids = stop_ids_for(params, tokenizer, runner.metadata)
        self.rows = [_Row(p, params, stop_ids, tokenizer.stream(p) if tokenizer else None) for p in prompts]
        self.prompt_seconds = self.decode_seconds = 0.0

    def __iter__(self) -> Iterator[tuple[int, str]]:
        rows, runner = self.rows, self.runner
        for row in rows:
            check_context(len(row.prompt), runner.max_context)
        cache = runner.new_cache(len(rows))
        live = list(range(len(rows)))  # the request row of each cache row
        start = time.perf_counter()
        try:
            logits = runner.step(cache, [r.prompt for r in rows])
            while True:
                for j, i in enumerate(live):
                    row = rows[i]
                    row.take(row.sampler(logits[j], row.prompt, row.output))
                    if row.finish_reason is None and runner.max_context is not None \
                            and len(row.prompt) + len(row.output) >= runner.max_context:
                        row.finish("length")
                now = time.perf_counter()
                if not self.prompt_seconds:
                    self.prompt_seconds, decode_start = now - start, now
                else:
                    self.decode_seconds = now - decode_start
                for i in live:
                    piece = rows[i].piece()
                    if piece:
                        yield i, piece
                still = [j for j, i in enumerate(live) if rows[i].finish_reason is None]
                if not still:
                    break
                if len(still) < len(live):  # finished rows leave the batch
                    cache.keep(still)
                    live = [live[j] for j in still]
                logits = runner.step(cache, [[rows[i].output[-1]] for i in live])
        finally:
            cache.free()

    def run(self) -> list[GenerationResult]:
        for _ in self:
            pass
        return self.results

    @property
    def results(self) -> list[GenerationResult]:
        return [
            GenerationResult(
                text=r.text, token_ids=list(r.output), prompt_token_ids=list(r.prompt),
                finish_reason=r.finish_reason or "length", stop_reason=r.stop_reason,
                prompt_seconds=self.prompt_seconds, decode_seconds=self.decode_seconds, decode_loop=self.loop,
                speculation_reason=self.speculation_reason,
            )
            for r in self.rows
        ]


class TextStream:
    """Iterate for text pieces of one prompt as they are generated; ``result`` once done."""

    def __init__(self, generation: Generation) -> None:
        self._generation = generation
        self._done = False

    def __iter__(self) -> Iterator[str]:
        for _, piece in self._generation:
            yield piece
        self._done = True

    @property
    def result(self) -> GenerationResult:
        if not self._done:
            raise InputError("the stream has not finished: iterate over it first")
        return self._generation.results[0]


# -- entry points used by CompiledModel ---------------------------------------------------------
def generate(compiled: CompiledModel, prompt: Any, **options: Any) -> GenerationResult | list[GenerationResult]:
    """One prompt -> GenerationResult; a list of prompts -> list of results (run as one batch)."""
    prompts, single = _prompts(compiled, prompt)
    results = _generation(compiled, prompts, options).run()
    return results[0] if single else results


def stream(compiled: CompiledModel, prompt: Any, **options: Any) -> TextStream:
    prompts, single = _prompts(compiled, prompt)
    if not single:
        raise InputError("stream() takes one prompt; use generate() for a list of prompts")
    return TextStream(_generation(compiled, prompts, options))


def _generation(compiled: CompiledModel, prompts: list[list[int]], options: dict[str, Any]) -> Generation:
    max_context = options.pop("max_context", None)
    adapter, adapter_weights = options.pop("adapter", None), options.pop("adapter_weights", None)
    from .spec_engine import REQUEST_FIELDS, request_config  # (its proposers import this module)

    speculation = options.pop("speculation", compiled.config.speculation)
    fields = {name: value for name in REQUEST_FIELDS if (value := options.pop(name, None)) is not None}
    own = request_config(compiled.config, "generate", **fields)
    params = options.pop("params", None) or SamplingParams()
    params = params.replace(**options) if options else params
    runner = ModelRunner(compiled.backend, compiled.model, max_context)
    if adapter is not None or adapter_weights is not None:
        return _adapter_generation(compiled, runner, prompts, params, adapter, adapter_weights, speculation)
    # Several prompts batch on the serving engine. So does one speculative prompt on the generated-C
    # runtime: its paged kernel writes the verified K/V into the pool in place, where the runner
    # loop would copy the whole cache every step (ONNX Runtime keeps the loop: its in-place GQA
    # buffer copies nothing, and the engine's portable form gathers the past every step). Once its
    # policy keeps speculation off, a greedy one moves on to the C decode loop (runtime/hand_back.py).
    on_engine = len(prompts) > 1 or (speculation not in (None, "off") and compiled.runtime == "c")
    if on_engine and runner.cached:
        from .engine_generation import EngineGeneration  # (imports this module)

        return EngineGeneration(compiled, runner, _tokenizer_or_none(compiled), prompts, params,
                                speculation=speculation or "off", speculation_fields=fields)
    reason = None
    if speculation not in (None, "off"):  # ("off": this call decodes plainly whatever the config says)
        from .speculative.loop import speculative_generation  # (imports this module)

        generation, reason = speculative_generation(compiled, runner, _tokenizer_or_none(compiled), prompts,
                                                    params, speculation, own)
        if generation is not None:
            return generation
    from .c_generate import make_generation  # (imports this module)

    generation = make_generation(runner, _tokenizer_or_none(compiled), prompts, params)
    generation.speculation_reason = reason
    return generation


def _adapter_generation(compiled: CompiledModel, runner: ModelRunner, prompts: list[list[int]], params: SamplingParams,
                        adapter: Any, weights: Any, speculation: str | None) -> Generation:
    """Generation with a LoRA adapter (infercc/lora/): a batch on the engine (each request holds
    the adapter until it ends), one prompt on the Python loop over the LoRA graph variant (the
    generated-C loop and speculation run the base graph only)."""
    reason = f"speculative decoding runs the base graph only; adapter {adapter!r} decodes plainly" \
        if speculation not in (None, "off") else None
    if len(prompts) > 1 and runner.cached and compiled.config.kv_cache_layout == "paged":
        from .engine_generation import EngineGeneration  # (imports this module)

        generation: Generation = EngineGeneration(compiled, runner, _tokenizer_or_none(compiled), prompts, params,
                                                  speculation="off", adapter=adapter, adapter_weights=weights)
    else:
        import weakref

        registry = compiled.lora
        ref = registry.resolve(adapter, weights)
        view = registry.view(ref) if ref is not None else compiled.backend
        generation = Generation(ModelRunner(view, compiled.model, runner.max_context), _tokenizer_or_none(compiled),
                                prompts, params)
        weakref.finalize(generation, registry.release, ref)  # held while the generation (a stream) lives
    generation.speculation_reason = reason
    return generation


def _tokenizer_or_none(compiled: CompiledModel) -> Tokenizer | None:
    from ..errors import ModelLoadError

    try:
        return compiled.tokenizer
    except ModelLoadError:
        return None


def _prompts(compiled: CompiledModel, prompt: Any) -> tuple[list[list[int]], bool]:
    """(token id lists, whether one prompt was given). A prompt is text, token ids, or chat
    messages (a list of {"role", "content"} dicts, rendered with the tokenizer's chat template)."""
    if _is_single(prompt):
        return [_encode(compiled, prompt)], True
    if isinstance(prompt, (list, tuple)) and prompt:
        return [_encode(compiled, p) for p in prompt], False
    raise InputError(f"prompt must be text, token ids, chat messages or a non-empty list of those, got {prompt!r:.80}")


def _is_single(prompt: Any) -> bool:
    if isinstance(prompt, (str, np.ndarray)):
        return not isinstance(prompt, np.ndarray) or prompt.ndim == 1
    return isinstance(prompt, (list, tuple)) and bool(prompt) and (
        all(isinstance(t, (int, np.integer)) for t in prompt) or all(isinstance(m, Mapping) for m in prompt)
    )


def _encode(compiled: CompiledModel, prompt: Any) -> list[int]:
    if isinstance(prompt, str):
        ids = compiled.tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, Mapping) for m in prompt):
        tokenizer = compiled.tokenizer
        ids = tokenizer.encode(tokenizer.apply_chat_template(list(prompt)), add_bos=False)
    elif isinstance(prompt, (list, tuple, np.ndarray)) and all(isinstance(t, (int, np.integer)) for t in prompt):
        ids = [int(t) for t in prompt]
    else:
        raise InputError(f"a prompt must be text, a list of token ids or a list of chat messages, got {prompt!r:.80}")
    if not ids:
        raise InputError("the prompt is empty: it has no tokens")
    return ids


def encode_prompt(compiled: CompiledModel, prompt: str | Seq[int] | Seq[Mapping[str, str]]) -> list[int]:
    """The token ids generation would feed for ``prompt``."""
    return _encode(compiled, prompt)
