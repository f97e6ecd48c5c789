"""Speculative decoding inside the serving engine (issue 13): who proposes, how many tokens each
decode row carries, and what a verified row emits.

Why in the engine and not in a loop of its own: under continuous batching the weights are read
once per step for every row, so a row that carries its last token plus ``k`` proposed tokens
(``num_logits = k + 1``) is verified in the same forward step as everyone else's decode token --
the step's weight reads pay for up to ``k + 1`` tokens of that request. What it costs is compute
and KV slots, which is why ``k`` comes from ``DepthPolicy`` (acceptance-rate moving average; lower
or off as the batch, the queue and the free KV blocks say) and why the scheduler books the
proposed tokens last, from what the step's budget and the pool have left (runtime/scheduler.py:
a draft shrinks, it never preempts).

A step, for a request with speculation on (``EngineSpeculation``):

1. ``propose`` (before ``Scheduler.schedule``): a running request whose known tokens are all
   computed but the last sampled one gets ``k = policy.depth(...)``, capped so the row fits its
   ``max_new_tokens`` and the model's context, and its proposer's tokens go to ``request.draft``.
2. The scheduler books ``1 + k'`` tokens (``k' <= k``) and appends ``1 + k'`` slots.
3. ``verify`` (after the forward step): the row's ``k' + 1`` logits and the proposal go to
   ``speculative.verify`` (greedy: the longest matching prefix plus the target's own next token,
   so the output is token for token plain greedy decoding; sampling: rejection sampling, so the
   distribution is the target's); the engine emits the 1..k'+1 tokens through the request's
   ``_Row.take`` (a stop lands exactly where it would have), then ``Scheduler.accepted`` keeps the
   accepted tokens' K/V and drops the rest (``BlockManager.truncate``: rejected tokens never enter
   the prefix cache).

Trees of candidates (``Config.speculation_tree_width`` > 1, Medusa and EAGLE, greedy requests): the
row is the last token + the tree's nodes in breadth-first order, ``PagedRow.tree`` gives their
parents, the paged runner verifies them in one run with tree attention (runtime/tree_attention.py on
C, runtime/tree_ort.py on ONNX Runtime's gather form),
``verify_tree`` walks the target's choices, and the accepted path's K/V are moved together
(``tree_attention.compact_moves``) before ``Scheduler.accepted`` truncates the rest. A runner that
cannot verify trees (the contiguous layout, a graph whose positions or mask cannot be set per
token) gets chains, the reason in ``notes``; sampling requests and adapter rows
always speculate with chains.

A method that cannot run (no draft model, ...) falls back to plain decoding for the requests that
asked for it; ``notes`` keeps the reason (EngineStats.speculation_notes), never an error.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, InputError
from .speculative.policy import DepthPolicy, SpeculationStats, StepCosts
from .speculative.proposer import Proposal, make_proposer
from .speculative.verify import verify, verify_tree, warn_if_inexact
from .tree_attention import compact_moves

if TYPE_CHECKING:
    from ..compiled import CompiledModel
    from ..config import Config
    from .generate import _Row
    from .scheduler import Request, Scheduled, Scheduler, SchedulerOutput

#: A request's ``speculation`` that turns it off whatever ``Config.speculation`` says.
OFF = "off"
#: Most padding positions (rows without a proposal x the step's draft width) worth adding to keep
#: a step's decode rows in one forward run: one more verified position costs 0.2-0.5 of a step at
#: batch 1 on a CPU without VNNI (measured per engine: speculative/policy.py StepCosts), a second
#: run about a whole step.
PAD_LIMIT = 8


def check_method(config: Config, speculation: Any, where: str) -> str | None:
    """The method a request asks for (None = off); ``speculation`` None means the config's.
    InputError naming ``where`` and the allowed values for anything else than a method
    ``Config.speculation`` accepts or "off"."""
    if speculation is None:
        return config.speculation
    if speculation == OFF:
        return None
    try:
        config.replace(speculation=speculation)
    except ConfigError as exc:
        raise InputError(f"{where}: speculation={speculation!r} is not a speculation method ({exc}); use one of "
                         f"the values Config.speculation takes, 'off', or leave it out for the model's default") \
            from None
    return speculation


#: The speculation fields of Config a request may set for itself (generate, stream,
#: session.sequence, Engine.add_request, the server's request body); the method is ``speculation``.
REQUEST_FIELDS = ("speculation_policy", "max_speculation_compute_fraction")


def request_config(config: Config, where: str, **fields: Any) -> Config | None:
    """``config`` with a request's own REQUEST_FIELDS (None: the config's), or None when it sets
    none. InputError naming ``where`` and the field for a value Config would refuse."""
    given = {name: value for name, value in fields.items() if value is not None}
    unknown = sorted(set(given) - set(REQUEST_FIELDS))
    if unknown:
        raise InputError(f"{where}: {unknown} cannot be set per request; these can: {list(REQUEST_FIELDS)}")
    if not given:
        return None
    try:
        return config.replace(**given)
    except ConfigError as exc:
        raise InputError(f"{where}: {exc}") from None


def spec_budget(config: Config) -> int:
    """Most proposed tokens one engine step may compute (all requests together)."""
    return int(config.max_speculation_compute_fraction * config.max_batch_tokens)


@dataclasses.dataclass(eq=False)
class _Seq:
    """One request's speculation: its proposer, the proposal of this step, its counts."""

    proposer: Any
    policy: DepthPolicy
    stats: SpeculationStats = dataclasses.field(default_factory=SpeculationStats)
    proposal: Proposal | None = None
    #: Decode steps in a row its policy kept speculation off (depth 0): runtime/hand_back.py.
    off_steps: int = 0


class EngineSpeculation:
    """The engine's speculation state (one per Engine; single-threaded like it)."""

    def __init__(self, compiled: CompiledModel, config: Config) -> None:
        self.compiled = compiled
        self.config = config
        self.max_depth = config.num_speculative_tokens
        self.totals = SpeculationStats()
        #: Why a method decodes plainly here (its proposer could not be made), by method.
        self.notes: dict[str, str] = {}
        self._proposers: dict[str, Any] = {}
        #: One policy per method: a model draft's proposing cost (``proposer.cost``, relative to a
        #: target step) enters its depth choice; prompt lookup's is nothing.
        self._policies: dict[str, DepthPolicy] = {}
        #: What a verified position costs here, measured from this engine's decode steps (``timed``).
        #: Per engine, not per model: a server's engine measures once, a generate() call probes
        #: two plain steps of its own (thread counts and batch shapes differ between callers).
        self.costs = StepCosts()
        self._seqs: dict[Hashable, _Seq] = {}
        self._drafted: list[Request] = []
        #: Whether free KV blocks running short should lower the depth: not in a pool fitted to
        #: its requests (generate's batch, Engine(fit=...)), which holds all they can ever need, so
        #: a draft there never preempts anyone (and a contiguous fitted pool reads as full at once).
        self.kv_pressure = True
        #: Whether a step's speculating rows are given one width (``_one_width``): the paged
        #: runner's decode rows share a forward run only when their lengths agree.
        self.uniform = False
        #: Why the runner cannot verify trees of candidates (None: it can; the engine sets it from
        #: ``PagedRunner.tree_reason``); asked only when a proposer would propose trees.
        self.tree_check: Callable[[], str | None] = lambda: "the engine's runner verifies chains only"

    @property
    def active(self) -> bool:
        return bool(self._seqs)

    def off_steps(self, seq_id: Hashable) -> int:
        """Decode steps in a row the request's policy has kept speculation off (0 when it
        speculated last step or does not speculate)."""
        seq = self._seqs.get(seq_id)
        return seq.off_steps if seq is not None else 0

    def copy(self, seq_id: Hashable) -> SpeculationStats | None:
        """A copy of a request's counts so far (None: speculation is off for it)."""
        seq = self._seqs.get(seq_id)
        return dataclasses.replace(seq.stats) if seq is not None else None

    # -- requests in and out ------------------------------------------------------------------
    def start(self, seq_id: Hashable, method: str | None, own: Config | None = None) -> None:
        """Speculate for ``seq_id`` with ``method`` (None: it decodes plainly); ``own``: the
        request's speculation fields (``request_config``), else the engine's."""
        if method is None:
            return
        if method not in self._proposers:
            proposer, why = make_proposer(self.compiled, method, self.config)
            self._proposers[method] = proposer
            if proposer is None:
                self.notes[method] = why
            else:
                width = self.config.speculation_tree_width
                if width > 1 and hasattr(proposer, "tree_width"):  # chains where the runner cannot: the reason kept
                    no_trees = self.tree_check()
                    proposer.tree_width = width if no_trees is None else 1
                    if no_trees is not None:
                        self.notes[method] = f"trees of candidates off, chains proposed: {no_trees}"
                self._policies[method] = DepthPolicy(self.config, draft_cost=float(getattr(proposer, "cost", 0.0)),
                                                     costs=self.costs)
                warn_if_inexact(self.compiled)
        proposer = self._proposers[method]
        if proposer is not None:
            self._seqs[seq_id] = _Seq(proposer, self._policies[method])
            if own is not None:
                self._policies[method].own(seq_id, own)

    def release(self, seq_id: Hashable) -> None:
        """The request ended (finished or aborted)."""
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            seq.proposer.release(seq_id)
            seq.policy.release(seq_id)

    # -- a step -------------------------------------------------------------------------------
    def propose(self, scheduler: Scheduler, row_of: Callable[[str], _Row], max_context: int | None) -> None:
        """Drafts for the running requests about to decode (see the module docstring, 1.)."""
        self.clear()
        if not self._seqs:
            return
        running, waiting = len(scheduler.running), len(scheduler.waiting)
        free = _free_fraction(scheduler.blocks) if self.kv_pressure else 1.0
        drafted: list[tuple[Request, _Seq, int]] = []  # (request, its speculation, most tokens it may take)
        plain: list[tuple[Request, _Seq, int]] = []
        for request in scheduler.running:
            seq = self._seqs.get(request.seq_id)
            if seq is None or request.num_tokens - request.num_computed != 1:
                continue
            row = row_of(request.request_id)
            cap = min(self.max_depth, row.params.max_new_tokens - len(row.output) - 1)
            if max_context is not None:
                cap = min(cap, max_context - request.num_tokens)
            depth = seq.policy.depth(request.seq_id, running=running, waiting=waiting, free_fraction=free)
            seq.off_steps = seq.off_steps + 1 if depth == 0 else 0
            k = min(depth, cap)
            proposal = None
            if k > 0:
                start = time.perf_counter()
                proposal = seq.proposer.propose(request.seq_id, request.tokens(), k, row.params)
                if proposal is not None and proposal.tokens and getattr(seq.proposer, "cost", 0.0):
                    seq.policy.observe_draft(len(proposal.tokens), time.perf_counter() - start)  # a model draft's
            if proposal is not None and proposal.is_tree and request.adapter is not None:
                proposal = proposal.first_path()  # (adapter rows run the LoRA variants: chains only)
            if proposal is not None and proposal.tokens:
                seq.proposal = proposal
                request.draft = [int(t) for t in proposal.tokens[:k]]
                drafted.append((request, seq, cap))
            elif cap > 0:
                plain.append((request, seq, cap))
        if drafted and self.uniform:
            drafted = self._one_width(drafted, plain)
        self._drafted = [request for request, _, _ in drafted]

    def _one_width(self, drafted: list[tuple[Request, _Seq, int]],
                   plain: list[tuple[Request, _Seq, int]]) -> list[tuple[Request, _Seq, int]]:
        """Give every speculating decode row of the step the same width, so that they still run
        as one forward run (the paged runner runs rows of one length per graph run: rows of k+1
        tokens beside rows of 1 would read the weights once more). Shorter drafts are padded with
        their last token (a guess like any other: verification keeps the output exact); decode
        rows without a proposal are padded too while that is cheaper than the extra run
        (``PAD_LIMIT`` positions), else nobody speculates this step."""
        width = max(len(request.draft) for request, _, _ in drafted)
        if plain and len(plain) * width > PAD_LIMIT:
            for request, seq, _ in drafted:
                request.draft, seq.proposal = [], None
            return []
        for request, seq, cap in plain:
            seq.proposal = Proposal([])
            request.draft = [request.tokens(request.num_tokens - 1)[0]]
            drafted.append((request, seq, cap))
        for request, _, cap in drafted:
            request.draft += [request.draft[-1]] * (min(width, cap) - len(request.draft))
        return drafted

    def timed(self, plan: SchedulerOutput, seconds: float) -> None:
        """The target's forward run of ``plan`` took ``seconds``: a step in which every row
        decodes (one token and its draft; no prompt chunk, whose positions cost another regime)
        measures the cost of a position (``StepCosts``)."""
        if plan.scheduled and all(item.num_tokens == 1 + len(item.draft) for item in plan.scheduled):
            self.costs.step(sum(item.num_tokens for item in plan.scheduled), seconds)

    def clear(self) -> None:
        """Forget this step's drafts (after the step, or before proposing anew)."""
        for request in self._drafted:
            request.draft = []
            seq = self._seqs.get(request.seq_id)
            if seq is not None:
                seq.proposal = None
        self._drafted = []

    def observe(self, seq_id: Hashable, length: int, runner: Any, rows: Sequence[int]) -> None:
        """Hand a hidden-state proposer (Medusa, EAGLE) ``rows`` of the runner's last hidden
        states: those whose logits chose the tokens the step emitted, the last being token
        ``length - 1`` of the sequence."""
        seq = self._seqs.get(seq_id)
        hidden = getattr(runner, "last_hidden", None)
        if seq is not None and hidden is not None and len(rows) and getattr(seq.proposer, "needs_hidden", False):
            seq.proposer.observe(seq_id, length, hidden[np.asarray(rows, np.int64)])

    def tree(self, item: Scheduled) -> list[int] | None:
        """The row's tree (``PagedRow.tree``: its first token, then the draft) when the request
        proposed a tree this step, else None; padding after the proposer's tokens continues the
        last node as a chain."""
        seq = self._seqs.get(item.request.seq_id)
        proposal = seq.proposal if seq is not None else None
        if proposal is None or not proposal.is_tree:
            return None
        parents = proposal.parents
        return [-1] + [(parents[i] if i < len(parents) else i - 1) + 1 for i in range(len(item.draft))]

    def keep_path(self, item: Scheduled, picked: Sequence[int], runner: Any, blocks: Any) -> None:
        """After a tree row's verification, move the K/V of its accepted path (``picked``, the
        rows ``verify`` returned) to the positions after the row's first token, before the
        scheduler keeps those and drops the rest (nothing to move for a chain)."""
        moves = compact_moves(item.start, picked)
        if moves:
            runner.compact(blocks.block_table(item.request.seq_id), moves)

    def verify(self, item: Scheduled, logits: np.ndarray, row: _Row) -> tuple[list[int], list[int]]:
        """The tokens a speculative row emits (1..len(draft)+1), from its ``len(draft) + 1``
        logits, and the logits rows that chose them (a chain: 0, 1, ...; a tree: its accepted
        path, whose K/V the caller moves together, ``tree_attention.compact_moves``); records the
        counts. The caller takes them and calls ``Scheduler.accepted``."""
        seq = self._seqs[item.request.seq_id]
        assert seq.proposal is not None, "a draft was booked without a proposal"
        k = len(item.draft)
        real = min(len(seq.proposal.tokens), k)  # the proposer's tokens; any after them are padding
        tree = self.tree(item)
        if tree is not None:  # greedy only (the proposers propose trees for greedy requests)
            proposal = Proposal(list(item.draft), parents=[p - 1 for p in tree[1:]])
            emitted, rows = verify_tree(proposal, logits, row.sampler, row.prompt, row.output)
        else:
            probs = seq.proposal.probs
            if probs is not None and k > real:  # padding is a point mass: q = 1 on its token
                probs = np.concatenate([probs[:real], np.eye(probs.shape[1])[list(item.draft[real:])]])
            proposal = Proposal(list(item.draft), None if probs is None else probs[:k])
            emitted = verify(proposal, logits, row.sampler, row.prompt, row.output)
            rows = list(range(len(emitted)))
        accepted = sum(1 for r in rows[1:] if r <= real)  # what the proposer earned (padding that stood is a bonus)
        if real:
            seq.policy.record(item.request.seq_id, real, accepted)
        seq.stats.add(real, accepted)
        self.totals.add(real, accepted)
        return emitted, rows


def _free_fraction(blocks: Any) -> float:
    """Share of the pool a new block could come from (free or evictable cached)."""
    total = blocks.num_blocks
    if hasattr(blocks, "num_free"):
        return blocks.num_free() / total
    report = blocks.report()
    return (report.free + report.cached) / total


def rows_logits(scheduled: Sequence[Scheduled]) -> list[int]:
    """Where each scheduled row's logits start in the runner's stacked output."""
    offsets, at = [], 0
    for item in scheduled:
        offsets.append(at)
        at += len(item.draft) + 1
    return offsets
