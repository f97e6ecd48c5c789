"""The scheduler: which requests compute how many tokens in the next engine step (vLLM v1's design).

There is no separate prefill or decode phase. Each request knows its tokens (prompt + output so far)
and how many of them already have K/V in the cache (``num_computed``); a step gives each request some
of the difference. The step's token budget (``Config.max_batch_tokens``) is spent in this order:

1. Running requests, oldest first: each gets its next decode token, or the next chunk of a prompt it
   has not finished (chunked prefill: a long prompt spreads over steps and never holds decodes back).
   A decode token needs a cache slot: ``blocks.append``. When no block is left, the NEWEST running
   request is preempted (its blocks freed, its progress reset so that prompt + output so far are
   recomputed later) and put at the FRONT of the waiting queue; then the slot is asked for again.
   The newest loses because it has the least work to redo and the oldest requests should finish
   first. A request that must preempt itself waits with the others.
2. Waiting requests, first come first served, unless a preemption happened this step (admitting
   then would only take the blocks back from the request just preempted): each admission allocates
   blocks for all of its known tokens (``blocks.allocate``: cached prefix blocks are reused and
   their tokens skipped) and computes a chunk of min(tokens left, budget left). Admission stops at
   the first request the pool cannot hold (FCFS: a small request does not overtake), at
   ``max_num_seqs`` running requests, or when the budget is spent.
3. Speculated tokens, last (speculative decoding, runtime/spec_engine.py): a decode request the
   engine gave a ``draft`` (k proposed tokens) computes its decode token and as many of them as
   the budget left over (at most ``spec_budget`` in all per step) and the free blocks allow: k
   shrinks, down to 0, and a draft never preempts anyone nor takes a block or a budget token
   from a decode or a prompt (they were booked first). The step reports what a speculative row
   computed through ``accepted`` once verified: only the accepted tokens count as computed (the
   prefix cache must never key a block on a rejected token's K/V) and the rest are dropped.

The scheduler only books: the engine runs the model on its ``SchedulerOutput``, then reports the
computed tokens back (``computed``), samples, and ends requests (``finish``). The block manager is
anything with the block manager's door (runtime/block_manager.py's ``BlockManager``; the contiguous
layout's ``ReservedBlocks``). Not thread-safe: the engine calls it from one thread.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Hashable, Sequence
from typing import Any, Protocol

from ..errors import InputError

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


class Blocks(Protocol):
    """The part of the block manager's door the scheduler uses."""

    num_blocks: int
    block_size: int

    def can_allocate(self, prompt: Sequence[int], salt: bytes = b"") -> bool: ...
    def allocate(self, seq_id: Hashable, prompt: Sequence[int], salt: bytes = b"") -> int: ...
    def can_append(self, seq_id: Hashable, n: int = 1) -> bool: ...
    def append(self, seq_id: Hashable, tokens: Sequence[int]) -> list[tuple[int, int]]: ...
    def computed(self, seq_id: Hashable, num_tokens: int) -> None: ...
    def truncate(self, seq_id: Hashable, num_tokens: int) -> None: ...
    def free(self, seq_id: Hashable) -> None: ...
    def block_table(self, seq_id: Hashable) -> list[int]: ...
    def num_tokens(self, seq_id: Hashable) -> int: ...


@dataclasses.dataclass(eq=False)
class Request:
    """One request as the scheduler sees it. ``output`` is the engine's list of generated ids (the
    engine appends to it); the scheduler reads it to know what to compute next."""

    request_id: str
    prompt: list[int]
    #: Most tokens the request can ever hold in the cache (prompt + max new tokens - 1, capped at
    #: the model's context): what ``add`` checks against the pool.
    max_len: int
    output: list[int] = dataclasses.field(default_factory=list)
    #: Leading tokens whose K/V are in the cache.
    num_computed: int = 0
    #: Prompt tokens the prefix cache served at the first admission (None until admitted).
    cached_tokens: int | None = None
    preemptions: int = 0
    status: str = WAITING
    #: Tokens proposed to follow the last one, set by the engine before ``schedule`` (speculative
    #: decoding); the scheduler books as many as fit and the engine clears it after the step.
    draft: list[int] = dataclasses.field(default_factory=list)
    #: Its LoRA adapter (an ``infercc.lora.AdapterRef``; None = the base model): the runner's
    #: rows carry it, and its identity salts the prefix-cache keys of its blocks.
    adapter: Any = None

    @property
    def salt(self) -> bytes:
        return self.adapter.identity if self.adapter is not None else b""

    @property
    def seq_id(self) -> Hashable:
        return self.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def tokens(self, start: int = 0, end: int | None = None) -> list[int]:
        """Ids of positions [start, end) of prompt + output, without joining the whole lists."""
        end = self.num_tokens if end is None else end
        p = len(self.prompt)
        head = self.prompt[start:min(end, p)] if start < p else []
        return head + self.output[max(start - p, 0):max(end - p, 0)]

    @property
    def prefilled(self) -> bool:
        """Whether every known token is computed (the next step decodes, after a sample)."""
        return self.num_computed >= self.num_tokens


@dataclasses.dataclass(frozen=True)
class Scheduled:
    """Compute ``num_tokens`` tokens of ``request`` from position ``start`` this step: its known
    tokens, then ``draft`` (speculated tokens, counted in ``num_tokens``)."""

    request: Request
    start: int
    num_tokens: int
    draft: tuple[int, ...] = ()

    def tokens(self) -> list[int]:
        """The ids this row feeds."""
        known = self.num_tokens - len(self.draft)
        return self.request.tokens(self.start, self.start + known) + list(self.draft)


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[Scheduled] = dataclasses.field(default_factory=list)
    #: Copy-on-write block copies (src, dst) the runner makes before the step.
    copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    #: Requests preempted this step (their blocks are freed: the runner releases them).
    preempted: list[Request] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, blocks: Blocks, max_batch_tokens: int, max_num_seqs: int, spec_budget: int = 0) -> None:
        """``spec_budget``: most speculated tokens one step computes (all requests together)."""
        self.blocks = blocks
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.spec_budget = spec_budget
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # -- requests in and out ------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue ``request`` (FCFS). InputError when its id is taken or it could never fit the whole
        pool (it would wait forever, or preempt itself forever)."""
        if request.request_id in self.requests:
            raise InputError(f"request id {request.request_id!r} is already in use; give each request its own id")
        size = self.blocks.block_size
        need = -(-request.max_len // size)
        if need > self.blocks.num_blocks:
            raise InputError(
                f"request {request.request_id!r} may hold {request.max_len} tokens ({len(request.prompt)} of prompt "
                f"+ max new tokens) = {need} KV blocks of {size}, but the whole pool has {self.blocks.num_blocks}; "
                "shorten the prompt, lower max_new_tokens, or raise Config.kv_cache_memory")
        request.status = WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish(self, request: Request) -> None:
        """End ``request`` (finished or aborted): it leaves the queues and its blocks come back now."""
        if request.status == RUNNING:
            self.running.remove(request)
            self.blocks.free(request.seq_id)
        elif request.status == WAITING:
            self.waiting.remove(request)
        request.status = FINISHED
        self.requests.pop(request.request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- a step -------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Book the next step (see the module docstring for the order)."""
        out = SchedulerOutput()
        budget = self.max_batch_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            n = min(request.num_tokens - request.num_computed, budget)
            if not self._reserve_slots(request, request.num_computed + n, out):
                break  # it preempted itself: it was the newest, nothing after it is left
            out.scheduled.append(Scheduled(request, request.num_computed, n))
            budget -= n
            index += 1
        while not out.preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            tokens = request.tokens()
            if not self.blocks.can_allocate(tokens, request.salt):
                break
            cached = self.blocks.allocate(request.seq_id, tokens, request.salt)
            self.waiting.popleft()
            request.num_computed = cached
            if request.cached_tokens is None:
                request.cached_tokens = cached
            request.status = RUNNING
            self.running.append(request)
            n = min(len(tokens) - cached, budget)
            out.scheduled.append(Scheduled(request, cached, n))
            budget -= n
        if self.spec_budget and budget > 0:
            self._book_drafts(out, min(budget, self.spec_budget))
        return out

    def _book_drafts(self, out: SchedulerOutput, budget: int) -> None:
        """Give decode rows with a draft as many of its tokens as ``budget`` and the free blocks
        allow, oldest request first; never preempting (a draft that does not fit shrinks)."""
        for index, item in enumerate(out.scheduled):
            request = item.request
            if budget <= 0:
                break
            if not request.draft or item.num_tokens != 1 or item.start + 1 != request.num_tokens:
                continue  # not a decode (a prompt chunk, a recomputation)
            k = min(len(request.draft), budget)
            while k and not self.blocks.can_append(request.seq_id, k):
                k -= 1
            if not k:
                continue
            draft = tuple(request.draft[:k])
            out.copies.extend(self.blocks.append(request.seq_id, draft))
            out.scheduled[index] = Scheduled(request, item.start, 1 + k, draft)
            budget -= k

    def _reserve_slots(self, request: Request, end: int, out: SchedulerOutput) -> bool:
        """Cache slots for ``request``'s tokens up to ``end`` (a decode token needs one; prompt
        chunks got theirs at admission), preempting the newest running requests while the pool is
        full. False when ``request`` itself had to go."""
        have = self.blocks.num_tokens(request.seq_id)
        if end <= have:
            return True
        while not self.blocks.can_append(request.seq_id, end - have):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is request:
                return False
        out.copies.extend(self.blocks.append(request.seq_id, request.tokens(have, end)))
        return True

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Free ``request``'s blocks and send it to the front of the queue to be recomputed."""
        self.running.remove(request)
        self.blocks.free(request.seq_id)
        request.num_computed = 0
        request.preemptions += 1
        request.status = WAITING
        self.waiting.appendleft(request)
        out.preempted.append(request)
        self.num_preemptions += 1

    def computed(self, out: SchedulerOutput) -> None:
        """The runner ran ``out``: the scheduled tokens now hold K/V (full blocks among them enter
        the prefix cache)."""
        for item in out.scheduled:
            request = item.request
            request.num_computed = item.start + item.num_tokens - len(item.draft)
            self.blocks.computed(request.seq_id, request.num_computed)

    def accepted(self, item: Scheduled, accepted: int) -> None:
        """A speculative row was verified: the first ``accepted`` of its draft tokens (now part of
        the request's output) hold K/V; the rejected rest leave the block manager (their slots are
        written again by later steps), and none of them was ever marked computed before."""
        request = item.request
        keep = item.start + 1 + accepted
        request.num_computed = keep
        self.blocks.truncate(request.seq_id, keep)
        self.blocks.computed(request.seq_id, keep)
