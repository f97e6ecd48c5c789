"""The serving engine: continuous batching over a KV-cache pool (issue 12; vLLM v1's three rooms).

* The scheduler (runtime/scheduler.py) decides who computes how many tokens each step, within
  ``Config.max_batch_tokens`` and ``Config.max_num_seqs``, preempting when blocks run out.
* The block manager (runtime/block_manager.py; the contiguous layout's ``ReservedBlocks``) books
  the pool's blocks: tables, prefix cache, copy-on-write.
* The model runner (runtime/paged_runner.py ``PagedRunner``; ``ContiguousRunner``) runs one
  forward step over the scheduled rows and returns each row's last-token logits.

The engine joins them and keeps each request's generation state (runtime/generate.py's ``_Row``:
its seeded sampler, stop ids and strings, incremental text), so a request gives the tokens it would
give alone: greedy equals ``compiled.generate(prompt)`` token for token, and a seeded sampler draws
the same sequence whatever else runs (one generator per request, advanced only by its own draws,
kept across preemptions).

A step: (speculation: propose drafts) -> schedule -> release preempted sequences in the runner ->
copy-on-write copies -> run the rows -> record the computed tokens (full blocks enter the prefix
cache) -> sample every request whose known tokens are all computed (a speculative row: verify and
emit 1..k+1 tokens, keep only the accepted tokens' K/V) -> finished requests give their blocks
back at once.

Speculative decoding (``Config.speculation`` or a request's ``speculation``) lives in
runtime/spec_engine.py; it is made on first use, so an engine without it pays nothing.

Pool size: ``Config.kv_cache_memory`` bytes (0 = auto: a quarter of the memory available now, at
most 4 GiB) over the runner's bytes per block, and never less than one sequence of the model's
whole context (else a ConfigError naming the field): any request the model accepts can run.

Single-threaded and not thread-safe: one thread calls ``add_request``/``abort``/``step`` (the
server's engine thread does).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, InferccError, InputError
from .block_manager import BlockManager, BlockReport
from .contiguous_runner import ContiguousRunner, ReservedBlocks
from .generate import _Row, _tokenizer_or_none, stop_ids_for
from .model_runner import ModelRunner
from .paged_runner import PagedRow, PagedRunner
from .sampling import SamplingParams
from .scheduler import Request, Scheduled, Scheduler, SchedulerOutput

if TYPE_CHECKING:
    from ..compiled import CompiledModel
    from ..config import Config
    from .spec_engine import EngineSpeculation
    from .speculative.policy import SpeculationStats

#: Auto pool size: this share of MemAvailable, at most AUTO_POOL_CAP bytes.
AUTO_POOL_SHARE = 4
AUTO_POOL_CAP = 4 << 30
#: When /proc/meminfo cannot be read (not Linux).
AUTO_POOL_FALLBACK = 1 << 30


@dataclasses.dataclass
class RequestOutput:
    """What one step did for one request."""

    request_id: str
    #: Ids this step added (empty for a stop token, which is never part of the output).
    new_token_ids: list[int]
    #: Text safe to show now (a possible start of a stop string is held back; see ``_Row.piece``).
    new_text: str
    #: Every output id so far.
    token_ids: list[int]
    finished: bool
    #: "stop" (a stop id or string), "length" (max_new_tokens or the context) or "abort".
    finish_reason: str | None
    prompt_tokens: int
    #: Prompt tokens served from the prefix cache at admission (not computed).
    cached_tokens: int
    #: Log-probabilities of ``new_token_ids`` under the model (log-softmax of the raw logits, before
    #: penalties and temperature: the model's distribution, as OpenAI reports), when asked.
    logprobs: list[float] | None = None
    #: For each new token, the ``logprobs`` most likely ids and their log-probabilities (k > 0).
    top_logprobs: list[dict[int, float]] | None = None
    #: Which stop id or string ended the request ("stop" only).
    stop_reason: int | str | None = None
    #: The request's speculation counts so far (a copy; None when it decodes plainly).
    speculation: SpeculationStats | None = None


@dataclasses.dataclass(frozen=True)
class EngineStats:
    #: The runner's form: "c-paged", "ort-gather" or "contiguous", and why that one.
    runner: str
    runner_reason: str
    running: int
    waiting: int
    #: Requests preempted so far (each preemption recomputes that request's tokens later).
    preemptions: int
    #: Prompt tokens of the requests admitted so far, and how many of them the prefix cache served.
    prompt_tokens: int
    cached_tokens: int
    #: Tokens generated so far.
    generation_tokens: int
    #: Tokens run through the model so far (prompts, decodes and recomputation).
    computed_tokens: int
    steps: int
    blocks: BlockReport
    #: Speculative decoding, all requests: proposed and accepted tokens, verify steps (None: no
    #: request asked for it yet); and why a method decodes plainly here, by method.
    speculation: SpeculationStats | None = None
    speculation_notes: dict[str, str] = dataclasses.field(default_factory=dict)
    #: LoRA adapters (``AdapterRegistry.stats()``: loaded names, merged-weight cache counts); None
    #: when the model never had one.
    lora: dict | None = None

    @property
    def prefix_hit_rate(self) -> float:
        """Share of admitted prompt tokens the prefix cache served."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclasses.dataclass(eq=False)
class _Live:
    request: Request
    row: _Row
    logprobs: int | None
    admitted: bool = False


class Engine:
    """Continuous batching: ``add_request`` any time, ``step`` until ``has_unfinished`` is False."""

    def __init__(self, compiled: CompiledModel, config: Config | None = None, *,
                 max_context: int | None = None, fit: Sequence[int] | None = None) -> None:
        """``config`` (default ``compiled.config``) gives the engine's knobs; ``max_context``
        overrides the model's context length; ``fit`` sizes the pool to hold sequences of these
        lengths at once instead of from ``Config.kv_cache_memory`` (``generate`` of a batch: every
        prompt runs at once, none waits, and no more memory is booked than the batch needs)."""
        self.config = config = config if config is not None else compiled.config
        self.compiled = compiled
        probe = ModelRunner(compiled.backend, compiled.model, max_context)
        self.max_context: int | None = probe.max_context
        self.vocab_size = probe.vocab_size
        self.metadata = probe.metadata
        runner_class, self.runner_reason = _choose_runner(config, probe)
        block_size = config.kv_block_size
        bytes_per_block = runner_class.bytes_per_token(compiled) * block_size
        contiguous = runner_class is ContiguousRunner
        # A contiguous sequence reserves its whole context (unknown: the longest it may get).
        reserve = self.max_context or (max(fit) if fit else None)
        self._fitted = bool(fit)
        if fit:
            num_blocks = len(fit) * _blocks(reserve, block_size) if contiguous else \
                sum(_blocks(n, block_size) for n in fit)
        else:
            num_blocks = pool_blocks(config.kv_cache_memory, bytes_per_block, block_size, self.max_context)
        if contiguous:
            self.runner = ContiguousRunner(compiled, num_blocks, block_size, self.max_context)
            self.blocks = ReservedBlocks(num_blocks, block_size, reserve or num_blocks * block_size)
        else:
            self.runner = runner_class(compiled, num_blocks, block_size)
            self.runner.max_context = self.max_context  # (max_context overrides the model's, as in sessions)
            self.blocks = BlockManager(num_blocks, block_size, prefix_caching=True)
            why = getattr(self.runner, "reason", None)
            if why:
                self.runner_reason += f"; {why}"
        self.scheduler = Scheduler(self.blocks, config.max_batch_tokens, config.max_num_seqs)
        self.tokenizer = _tokenizer_or_none(compiled)
        self._live: dict[str, _Live] = {}
        self._pending: list[RequestOutput] = []  # aborted requests, reported by the next step
        self._counts = dict(preemptions=0, prompt_tokens=0, cached_tokens=0, generation_tokens=0,
                            computed_tokens=0, steps=0)
        self.speculation: EngineSpeculation | None = None  # made by the first request that speculates

    @property
    def form(self) -> str:
        return self.runner.form

    # -- requests -----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams, *,
                    logprobs: int | None = None, speculation: str | None = None, adapter: Any = None,
                    adapter_weights: Sequence[float] | None = None, speculation_policy: str | None = None,
                    max_speculation_compute_fraction: float | None = None) -> None:
        """Queue a request. InputError when the id is taken, a token id is outside the vocabulary,
        the prompt is longer than the context, or the request could never fit the pool.
        ``max_new_tokens`` is clipped at the context (the request then ends with "length").
        ``speculation``: a method of ``Config.speculation`` for this request, "off", or None (the
        config's); a method that cannot run here decodes plainly (``stats().speculation_notes``).
        ``speculation_policy`` / ``max_speculation_compute_fraction``: this request's own (None:
        the config's; see Config). ``adapter``: a loaded LoRA adapter's name, or a list of names with ``adapter_weights`` (a
        composition, ``Config.lora_composition``); InputError for an unknown one. Its rows run with
        that adapter's deltas, its KV blocks are shared only with requests of the same adapter."""
        if not isinstance(request_id, str) or not request_id:
            raise InputError(f"a request id must be a non-empty string, got {request_id!r}")
        if adapter is not None and not isinstance(self.runner, PagedRunner):
            raise InputError(f"request {request_id!r}: LoRA adapters run on the paged KV layout with a cached graph; "
                             f"this engine runs {self.runner.form} ({self.runner_reason})")
        if request_id in self._live or any(o.request_id == request_id for o in self._pending):
            raise InputError(f"request id {request_id!r} is already in use; give each request its own id")
        if not isinstance(params, SamplingParams):
            raise InputError(f"request {request_id!r}: params must be a SamplingParams, got {type(params).__name__}")
        prompt = self._check_prompt(request_id, prompt)
        if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool) or logprobs < 0
                                     or (self.vocab_size is not None and logprobs > self.vocab_size)):
            raise InputError(f"request {request_id!r}: logprobs must be None or an integer in 0..{self.vocab_size} "
                             f"(0 = the chosen token's only), got {logprobs!r}")
        method, own = None, None
        if speculation is not None or self.config.speculation is not None or speculation_policy is not None \
                or max_speculation_compute_fraction is not None:
            from .spec_engine import check_method, request_config

            method = check_method(self.config, speculation, f"request {request_id!r}")
            own = request_config(self.config, f"request {request_id!r}", speculation_policy=speculation_policy,
                                 max_speculation_compute_fraction=max_speculation_compute_fraction)
        stop_ids = stop_ids_for(params, self.tokenizer, self.metadata)
        decoder = self.tokenizer.stream(prompt) if self.tokenizer is not None else None
        row = _Row(prompt, params, stop_ids, decoder)
        max_len = len(prompt) + params.max_new_tokens - 1
        if self.max_context is not None:
            max_len = max(min(max_len, self.max_context), len(prompt))
        ref = self.compiled.lora.resolve(adapter, adapter_weights) if adapter is not None else None
        request = Request(request_id, prompt, max_len, output=row.output, adapter=ref)
        try:
            self.scheduler.add(request)
        except BaseException:
            self._release_adapter(request)
            raise
        self._live[request_id] = _Live(request, row, logprobs)
        if method is not None:
            self._speculation().start(request.seq_id, method, own)

    def _speculation(self) -> EngineSpeculation:
        if self.speculation is None:
            from .spec_engine import EngineSpeculation, spec_budget

            self.speculation = EngineSpeculation(self.compiled, self.config)
            self.speculation.uniform = isinstance(self.runner, PagedRunner) and self.runner.padding is None
            self.speculation.kv_pressure = not self._fitted
            self.speculation.tree_check = getattr(self.runner, "tree_reason", self.speculation.tree_check)
            self.scheduler.spec_budget = spec_budget(self.config)
        return self.speculation

    def _check_prompt(self, request_id: str, prompt: list[int]) -> list[int]:
        ids = [int(t) for t in prompt] if all(isinstance(t, (int, np.integer)) and not isinstance(t, bool)
                                              for t in prompt) else None
        if not ids:
            raise InputError(f"request {request_id!r}: the prompt must be a non-empty list of token ids, "
                             f"got {prompt!r:.80}")
        bad = [t for t in ids if t < 0 or (self.vocab_size is not None and t >= self.vocab_size)]
        if bad:
            raise InputError(f"request {request_id!r}: token id {bad[0]} is outside the vocabulary "
                             f"(0..{(self.vocab_size or 0) - 1})")
        if self.max_context is not None and len(ids) > self.max_context:
            raise InputError(f"request {request_id!r}: the prompt has {len(ids)} tokens but the model's context is "
                             f"{self.max_context}; shorten the prompt")
        return ids

    def abort(self, request_id: str) -> None:
        """End a request now: its blocks come back at once, and the next ``step`` reports it
        finished with "abort". An unknown or already finished id is ignored (a client may go away
        just as its request ends)."""
        live = self._live.pop(request_id, None)
        if live is None:
            return
        live.row.finish("abort")
        self._pending.append(self._output(live, [], None))
        self._end(live)

    def detach(self, request_id: str) -> _Live:
        """Take a request out of the engine without ending it (runtime/hand_back.py moves it to
        the C decode loop): its blocks come back at once, no output reports it, and its row (the
        generation state) goes on elsewhere. Copy what is needed out of the pool first."""
        live = self._live.pop(request_id)
        self._end(live)
        return live

    def _release_adapter(self, request: Request) -> None:
        if request.adapter is not None:
            self.compiled.lora.release(request.adapter)
            request.adapter = None

    def _end(self, live: _Live) -> None:
        self.scheduler.finish(live.request)
        self.runner.release(live.request.seq_id)
        self._release_adapter(live.request)
        if self.speculation is not None:
            self.speculation.release(live.request.seq_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    # -- a step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduler step; an output for every request that got tokens or finished."""
        outputs, self._pending = self._pending, []
        spec = self.speculation if self.speculation is not None and self.speculation.active else None
        if spec is not None:
            spec.propose(self.scheduler, lambda request_id: self._live[request_id].row, self.max_context)
        try:
            self._step(self.scheduler.schedule(), outputs)
        finally:
            if spec is not None:
                spec.clear()
        return outputs

    def _step(self, plan: SchedulerOutput, outputs: list[RequestOutput]) -> None:
        for request in plan.preempted:
            self.runner.release(request.seq_id)
        self._counts["preemptions"] += len(plan.preempted)
        if not plan.scheduled:
            # Only a request that preempted itself leaves a step empty (the next one readmits it);
            # anything else would wait forever, which add_request's checks rule out.
            if self.scheduler.has_unfinished() and not plan.preempted:
                raise InferccError(f"internal error: {len(self.scheduler.waiting)} waiting requests but nothing "
                                   f"could be scheduled ({self.blocks.report()})")
            return
        rows = [PagedRow(s.request.seq_id, s.tokens(), s.start, self.blocks.block_table(s.request.seq_id),
                         num_logits=len(s.draft) + 1, adapter=s.request.adapter,
                         tree=self.speculation.tree(s) if s.draft else None) for s in plan.scheduled]
        try:
            if plan.copies:
                self.runner.copy_blocks(plan.copies)
            start = time.perf_counter()
            chosen = self.runner.step_greedy(rows) if self._greedy_only(plan) else None
            logits = self.runner.step(rows) if chosen is None else None
            if self.speculation is not None and self.speculation.active:
                self.speculation.timed(plan, time.perf_counter() - start)
        except BaseException:
            # The rows' caches are in an unknown state: their requests end (reported as aborted by
            # the next step) so that the engine stays usable for the others.
            for item in plan.scheduled:
                live = self._live.pop(item.request.request_id)
                self._end(live)
                live.row.finish("abort")
                self._pending.append(self._output(live, [], None))
            raise
        self.scheduler.computed(plan)
        self._counts["steps"] += 1
        self._counts["computed_tokens"] += plan.num_tokens
        at = 0
        for item in plan.scheduled:
            request, live = item.request, self._live[item.request.request_id]
            width = len(item.draft) + 1
            if not live.admitted:
                live.admitted = True
                self._counts["prompt_tokens"] += len(request.prompt)
                self._counts["cached_tokens"] += request.cached_tokens or 0
            if request.prefilled:
                outputs.append(self._sample(live, logits[at:at + width] if chosen is None else int(chosen[at]), item, at))
            at += width

    def _greedy_only(self, plan: SchedulerOutput) -> bool:
        """Whether every row of the step picks its token by the raw logits' argmax (greedy, no
        penalties, no logprobs, no draft to verify): the runner may then return ids, not logits."""
        if not hasattr(self.runner, "step_greedy"):
            return False
        for item in plan.scheduled:
            live = self._live[item.request.request_id]
            params = live.row.params
            if item.draft or live.logprobs is not None or not params.greedy or params.penalized:
                return False
        return True

    def _sample(self, live: _Live, logits: np.ndarray | int, item: Scheduled, at: int = 0) -> RequestOutput:
        """Emit the next token(s) from ``logits`` [1 + len(draft), vocab]: one sampled token, or
        a speculative row's verified tokens (each through ``take``, so a stop lands exactly); an
        int is the token already chosen (``PagedRunner.step_greedy``)."""
        row, spec = live.row, self.speculation
        before = len(row.output)
        if isinstance(logits, int):
            emitted, picked = [logits], [0]
        elif item.draft:
            assert spec is not None
            emitted, picked = spec.verify(item, logits, row)  # picked: the logits rows that chose them
        else:
            emitted, picked = [row.sampler(logits[0], row.prompt, row.output)], [0]
        row.take_all(emitted, self.max_context)
        new = row.output[before:]
        if spec is not None:  # a heads proposer reads the hidden states that chose the emitted tokens
            spec.observe(item.request.seq_id, len(row.prompt) + len(row.output), self.runner,
                         [at + r for r in picked[:len(new)]])
        if item.draft:
            spec.keep_path(item, picked, self.runner, self.blocks)  # a tree's accepted path, brought together
            self.scheduler.accepted(item, len(emitted) - 1)
        self._counts["generation_tokens"] += len(new)
        output = self._output(live, new, logits[picked[:len(new)]] if live.logprobs is not None and new else None)
        if row.finish_reason is not None:
            self._live.pop(live.request.request_id)
            self._end(live)
        return output

    def _output(self, live: _Live, new: list[int], logits: np.ndarray | None) -> RequestOutput:
        row, request = live.row, live.request
        logprobs = top = None
        if live.logprobs is not None:
            logprobs, top = [], ([] if live.logprobs > 0 else None)
            for token, row_logits in zip(new, logits if logits is not None else ()):
                values = log_softmax(row_logits)  # each new token's own position
                logprobs.append(float(values[token]))
                if top is not None:
                    best = np.argsort(-values, kind="stable")[:live.logprobs]
                    top.append({int(i): float(values[i]) for i in best})
        return RequestOutput(
            request_id=request.request_id, new_token_ids=list(new), new_text=row.piece(),
            token_ids=list(row.output), finished=row.finish_reason is not None, finish_reason=row.finish_reason,
            prompt_tokens=len(request.prompt), cached_tokens=request.cached_tokens or 0,
            logprobs=logprobs, top_logprobs=top, stop_reason=row.stop_reason,
            speculation=self.speculation.copy(request.seq_id) if self.speculation is not None else None)

    def stats(self) -> EngineStats:
        spec = self.speculation
        return EngineStats(runner=self.runner.form, runner_reason=self.runner_reason,
                           running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                           blocks=self.blocks.report(), **self._counts,
                           speculation=dataclasses.replace(spec.totals) if spec is not None else None,
                           speculation_notes=dict(spec.notes) if spec is not None else {},
                           lora=lora.stats() if (lora := getattr(self.compiled, "_lora", None)) is not None else None)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of a row of raw logits."""
    x = np.asarray(logits, np.float64).reshape(-1)
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


# -- choices made once per engine ---------------------------------------------------------------
def _choose_runner(config: Config, probe: ModelRunner) -> tuple[type, str]:
    """The runner class and why: paged when asked and the graph allows it, else contiguous."""
    if config.kv_cache_layout == "contiguous":
        return ContiguousRunner, "Config.kv_cache_layout='contiguous'"
    if not probe.cached:
        return ContiguousRunner, ("the graph has no KV cache (compiled with kv_cache=False, or the pass could not "
                                  "insert one): each sequence is recomputed step by step on its own")
    return PagedRunner, "Config.kv_cache_layout='paged'"


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def auto_pool_bytes() -> int:
    """A quarter of MemAvailable (at most 4 GiB): room for the caches without crowding out the
    weights and everything else on the machine."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return min(int(line.split()[1]) * 1024 // AUTO_POOL_SHARE, AUTO_POOL_CAP)
    except (OSError, ValueError, IndexError):
        pass
    return AUTO_POOL_FALLBACK


def pool_blocks(memory: int, bytes_per_block: int, block_size: int, max_context: int | None) -> int:
    """Blocks the pool gets from ``memory`` bytes (0 = auto); ConfigError when that cannot hold
    one sequence of the model's whole context."""
    auto = memory == 0
    memory = auto_pool_bytes() if auto else memory
    num_blocks = memory // bytes_per_block
    need = _blocks(max_context or 1, block_size)
    if num_blocks < need:
        what = f"auto (a quarter of available memory: {memory} bytes)" if auto else f"{memory} bytes"
        raise ConfigError(
            f"Config.kv_cache_memory={what} holds {num_blocks} KV blocks of {block_size} tokens ({bytes_per_block} "
            f"bytes each), but one sequence of the model's full context ({max_context} tokens) needs {need}; set "
            f"kv_cache_memory to at least {need * bytes_per_block} bytes")
    return num_blocks
