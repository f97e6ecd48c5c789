"""Generation with the decode loop inside the generated-C library (templates/generate.c.j2).

When the model runs on the generated-C runtime and its library has a decode loop, one prompt's
prefill, per-token forward steps and sampling all run in C; Python is called once per token (a
ctypes callback) only to turn the token into text, check stop strings and stream the piece. The
result is the same ``GenerationResult`` the Python loop (generate.py) gives:

* Greedy tokens are identical to the Python loop's (argmax with ties to the lowest id).
* Seeded sampling is reproducible (same seed -> same tokens), but the C sampler draws from its own
  generator (xoshiro256**), so its tokens differ from the NumPy sampler's for the same seed.
* Penalties (repetition, frequency, presence) are applied in C with the Python sampler's float64
  arithmetic, so greedy tokens with penalties are identical too.
* The rest stays on the Python loop, with the reason in ``Generation.loop_reason``: a batch of
  prompts, a graph whose inputs the loop does not build (codegen/decode.py), or a model on ONNX
  Runtime.

Sessions keep the Python loop: a ``Sequence`` exposes its logits and cache after every step
(``prefill``/``append``/``decode`` are single steps), which is what the C loop hides.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from ..codegen.decoding import GO_ON, PAUSE, STOP, Decoding
from ..codegen.library import RunError
from .c_backend import CBackend, CRunError
from .generate import Generation, _Row
from .kv_cache import check_context
from .model_runner import _ids
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .model_runner import ModelRunner

log = logging.getLogger(__name__)


def c_loop_reason(runner: ModelRunner, prompts: list[list[int]]) -> str | None:
    """None when this request runs on the C decode loop, else why it stays on the Python loop."""
    if len(prompts) != 1 and isinstance(runner.backend, CBackend) and runner.backend.program.has_decode:
        return "a batch of prompts (the C loop runs one sequence)"
    return c_loop_missing(runner.backend)


def c_loop_missing(backend: object) -> str | None:
    """None when ``backend``'s library has a decode loop (its sampler implements every sampling
    field), else why not (also asked by runtime/hand_back.py for a sequence leaving the engine)."""
    if not isinstance(backend, CBackend):
        return "the model runs on ONNX Runtime"
    if not backend.program.has_decode:
        return f"the generated library has no decode loop: {backend.program.decode_reason}"
    return None


class CGeneration(Generation):
    """``Generation`` for one prompt whose steps and sampling run in the C library."""

    loop = "c"

    def __iter__(self) -> Iterator[tuple[int, str]]:
        yield from self._run(pause=True)

    def run(self):
        for _ in self._run(pause=False):
            pass
        return self.results

    def _run(self, pause: bool) -> Iterator[tuple[int, str]]:
        """Drive the C loop; with ``pause`` it returns to Python after each token that adds text,
        so the piece is yielded as soon as it exists (a stream)."""
        row, runner, params = self.rows[0], self.runner, self.params
        check_context(len(row.prompt), runner.max_context)
        prompt = _ids(row.prompt, runner.vocab_size).tolist()
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        try:
            decoding = runner.backend.decoding(
                prompt, max_new_tokens=params.max_new_tokens, stop_ids=sorted(row.stop_ids),
                temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
                seed=seed, max_context=runner.max_context, repetition_penalty=params.repetition_penalty,
                frequency_penalty=params.frequency_penalty, presence_penalty=params.presence_penalty)
        except RunError as exc:
            raise CRunError(str(exc)) from None
        clock = {"start": time.perf_counter(), "first": 0.0}

        def tick() -> None:
            now = time.perf_counter()
            if not clock["first"]:
                clock["first"] = now
                self.prompt_seconds = now - clock["start"]
            self.decode_seconds = now - clock["first"]

        for piece in drive(decoding, row, runner.max_context, pause=pause, tick=tick):
            yield 0, piece


def drive(decoding: Decoding, row: _Row, max_context: int | None, *, pause: bool,
          tick: Callable[[], None] = lambda: None) -> Iterator[str]:
    """Run ``decoding`` to its end, its tokens taken by ``row`` (stop ids and strings, max tokens,
    the context: the same rules C applies), yielding the text pieces; ``tick`` is called on each
    token (clocks). With ``pause`` the loop returns to Python after each token that adds text, so
    each piece is yielded as soon as it exists (a stream). Closes ``decoding``."""
    pieces: list[str] = []
    # Without a stream or stop strings nothing needs the text per token: the callback only
    # keeps the clock, and the tokens go through the row's rules (the same ones C applied:
    # stop ids, max tokens, context) once the loop is done.
    seen: list[int] | None = [] if not pause and not row.params.stop else None

    def on_token_rules(token: int) -> None:
        row.take(token)
        if row.finish_reason is None and max_context is not None \
                and len(row.prompt) + len(row.output) >= max_context:
            row.finish("length")

    def on_token(token: int) -> int:
        tick()
        if seen is not None:
            seen.append(token)
            return GO_ON
        on_token_rules(token)
        if row.finish_reason is not None:
            return STOP
        if pause:
            piece = row.piece()
            if piece:
                pieces.append(piece)
                return PAUSE
        return GO_ON

    try:
        done = False
        while not done:
            try:
                done = decoding.next(on_token)
            except RunError as exc:
                raise CRunError(str(exc)) from None
            yield from pieces
            pieces.clear()
        for token in seen or ():
            if row.finish_reason is None:
                on_token_rules(token)
        if row.finish_reason is None:  # the C loop ended on its own rule (max tokens): same as take's
            row.finish("length")
        piece = row.piece()
        if piece:
            yield piece
    finally:
        decoding.close()


def make_generation(runner: ModelRunner, tokenizer, prompts: list[list[int]], params: SamplingParams) -> Generation:
    """The C-loop generation when the request fits it, else the Python loop's (reason logged and
    kept in ``loop_reason``)."""
    reason = c_loop_reason(runner, prompts)
    if reason is None:
        return CGeneration(runner, tokenizer, prompts, params)
    generation = Generation(runner, tokenizer, prompts, params)
    generation.loop_reason = reason
    if isinstance(runner.backend, CBackend):
        log.debug("generation runs on the Python loop: %s", reason)
    return generation
