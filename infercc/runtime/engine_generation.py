"""``generate`` of prompts on the serving engine: several prompts batch together however their
lengths differ, and a single speculating prompt on the generated-C runtime verifies its guesses in
the paged runner -- until its policy keeps speculation off, when it moves to the C decode loop
(runtime/hand_back.py)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .c_generate import drive
from .engine import Engine
from .generate import Generation, GenerationResult
from .hand_back import hand_back, hand_back_problem
from .kv_cache import check_context
from .model_runner import ModelRunner
from .sampling import SamplingParams

if TYPE_CHECKING:
    from ..compiled import CompiledModel
    from .speculative.policy import SpeculationStats


class EngineGeneration(Generation):
    """``generate([...])`` on a cached model: the prompts run through an Engine, so they batch
    together however their lengths differ (the paged runner runs rows of several lengths in one
    step; finished rows leave at once). Results are the ``Generation``'s: same fields, same tokens."""

    loop_reason = "a batch of prompts runs on the serving engine (continuous batching)"

    def __init__(self, compiled: CompiledModel, runner: ModelRunner, tokenizer, prompts: list[list[int]],
                 params: SamplingParams, speculation: str | None = None, adapter: Any = None,
                 adapter_weights: Sequence[float] | None = None,
                 speculation_fields: dict[str, Any] | None = None) -> None:
        """``speculation``: every prompt's ``Engine.add_request(speculation=...)`` (None: the
        model's ``Config.speculation``; "off": none), ``speculation_fields`` its other speculation
        keywords (speculation_policy, ...); ``adapter`` / ``adapter_weights``: every prompt's LoRA
        adapter selection."""
        super().__init__(runner, tokenizer, prompts, params)
        self.adapter, self.adapter_weights = adapter, adapter_weights
        self.compiled = compiled
        self.speculation = speculation
        self.speculation_fields = dict(speculation_fields or {})
        self._spec_stats: dict[int, SpeculationStats | None] = {}
        self._spec_notes: dict[str, str] = {}
        #: Output tokens the single prompt had when it moved to the C decode loop (None: it did not).
        self.handed_back: int | None = None
        #: Whether text is wanted piece by piece (iteration: a stream); ``run`` wants only the
        #: results, so the C loop then runs to its end without returning to Python per token.
        self._pieces = True

    def run(self) -> list[GenerationResult]:
        self._pieces = False
        return super().run()

    def __iter__(self) -> Iterator[tuple[int, str]]:
        max_context, params = self.runner.max_context, self.params
        for row in self.rows:
            check_context(len(row.prompt), max_context)
        lengths = [len(r.prompt) + params.max_new_tokens - 1 for r in self.rows]
        if max_context is not None:
            lengths = [max(min(n, max_context), len(r.prompt)) for n, r in zip(lengths, self.rows)]
        engine = Engine(self.compiled, max_context=max_context, fit=lengths)
        for i, row in enumerate(self.rows):
            engine.add_request(str(i), row.prompt, params, speculation=self.speculation, adapter=self.adapter,
                               adapter_weights=self.adapter_weights, **self.speculation_fields)
        self.rows = [engine._live[str(i)].row for i in range(len(self.rows))]
        after = self.compiled.config.speculation_hand_back if len(self.rows) == 1 else 0
        waiting = set(range(len(self.rows)))  # rows without a first token yet
        start = first = time.perf_counter()
        while engine.has_unfinished():
            for out in engine.step():
                index = int(out.request_id)
                waiting.discard(index)
                self._spec_stats[index] = out.speculation
                if out.new_text:
                    yield index, out.new_text
            now = time.perf_counter()
            if not self.prompt_seconds:  # until every row has its first token
                if not waiting:
                    self.prompt_seconds, first = now - start, now
            else:
                self.decode_seconds = now - first
            spec = engine.speculation
            if after and spec is not None and spec.off_steps("0") >= after and hand_back_problem(engine, "0") is None:
                yield from self._in_c(engine, first)
        self._spec_notes = engine.stats().speculation_notes

    def _in_c(self, engine: Engine, first: float) -> Iterator[tuple[int, str]]:
        """The single prompt's rest on the C decode loop (runtime/hand_back.py); its result's
        ``decode_loop`` says "engine+c"."""
        row = self.rows[0]
        self.handed_back = len(row.output)
        self.loop = "engine+c"

        def tick() -> None:
            self.decode_seconds = time.perf_counter() - first

        for piece in drive(hand_back(engine, "0"), row, engine.max_context, pause=self._pieces, tick=tick):
            yield 0, piece

    @property
    def results(self) -> list[GenerationResult]:
        """The ``Generation``'s, with each prompt's speculation counts (and why a method that was
        asked for decoded plainly)."""
        why = "; ".join(self._spec_notes.values()) or self.speculation_reason
        return [dataclasses.replace(r, speculation=self._spec_stats.get(i), speculation_reason=why)
                for i, r in enumerate(super().results)]
