"""How deep to speculate: the depth k of each sequence's next step (0 = off), and the counts
GenerationResult and the server report.

Model: each proposed token stands with probability a (measured per sequence), so k proposals give
E(k) = (1 - a^(k+1)) / (1 - a) tokens per step (the k accepted ones plus the target's own). A
step of R positions costs 1 + c*(R - 1) one-position steps (c: what one more position costs; small
where a step is bound by reading the weights once, larger where each position's products cost
compute, as on CPUs without int8 dot-product instructions) and the proposer adds d*k (0 for prompt
lookup; a model draft's cost per token relative to the target). The serving engine measures c
and d from its own steps (StepCosts: a batch-1 sequence first decodes a couple of plain steps to
time one position); elsewhere they are the constant below and the proposer's estimate. With n
other sequences in the
step, each contributing one token, the depth is the k in 0..num_speculative_tokens maximizing
the step's tokens per cost, (n + E(k)) / (1 + c*(n + k) + d*k): at batch 1 the latency gain
E(k) / (1 + (c + d)*k); in a batch the extra positions slow every row of the step, so the same
acceptance buys less depth, and none once the batch's own rows fill the compute. The depth falls
as acceptance falls and turns speculation off where it would not pay, and rises again on its
own: while off, the measured rate decays toward the prior, so the sequence probes again after a
while, and after EXPLORE_STEPS steps off it verifies one guess whatever the model says (the only
way measured costs that a noisy moment inflated get measured again). The "latency" policy counts
only the sequence's own time (n = 0) whatever the batch; "fixed" always takes the full depth (as
vLLM does: reproducible, for measuring acceptance), off only when KV blocks run out. A request may
bring its own policy and compute share (``own``).

``a`` is a decaying count of accepted proposals over trials (accepted + the rejected one, if
any: the maximum-likelihood rate of the geometric model), started from a prior worth half a trial.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Hashable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...config import Config

#: Extra cost of one more verified position relative to a one-token step at batch 1. A decode
#: step of a small model reads its weights once whatever the number of positions, but on a CPU
#: without int8 dot-product instructions (VNNI) each position's quantized products cost their own
#: compute: measured on SmolLM2-135M Q4_1, generated C, AVX2, a 5-position step costs 1.7x (2
#: threads) to 2.2x (1 thread) a 1-position step, i.e. 0.18-0.30 per position. 0.2 keeps the depth
#: near the best one over that range (a simulation of the policy over recorded greedy text: a
#: cost of 0.3 turned lookup off on text where it paid, 0.08 verified too many positions). The
#: serving engine measures it instead (StepCosts); this is its prior.
VERIFY_COST = 0.2
#: Measured step costs (StepCosts): steps of each size (and proposals) remembered, their minimum
#: counting, and the range a measured cost is held in.
WINDOW = 8
COST_RANGE = (0.02, 3.0)
#: One-position steps timed before a batch-1 sequence speculates, when nothing is measured yet.
PROBE_STEPS = 2
#: The acceptance rate assumed before anything was measured, and its weight in trials.
PRIOR_RATE, PRIOR_WEIGHT = 0.6, 0.5
#: Weight kept by past measurements at each record: about the last ten trials count.
DECAY = 0.9
#: ... and at each step spent off: the rate creeps back toward the prior, so a sequence whose
#: proposals failed probes again after a few dozen steps (the text may have changed character).
OFF_DECAY = 0.97
#: Steps off in a row after which a sequence verifies one proposed token anyway: the measured
#: step costs only change when steps of several positions run, so without this one noisy moment
#: (a descheduled worker timing a verify step 3x slow) would keep a long-lived engine off for good.
EXPLORE_STEPS = 64


@dataclasses.dataclass
class SpeculationStats:
    """Proposed and accepted tokens and verify steps (one request, or a whole engine)."""

    proposed: int = 0
    accepted: int = 0
    #: Target steps that verified a proposal (emitted = accepted + steps).
    steps: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens emitted per verify step: 1 + the accepted proposals on average."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0

    def add(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted
        self.steps += 1

    def to_dict(self) -> dict[str, float]:
        return {"proposed": self.proposed, "accepted": self.accepted, "steps": self.steps,
                "acceptance_rate": self.acceptance_rate, "tokens_per_step": self.tokens_per_step}


@dataclasses.dataclass
class _Rate:
    accepted: float = 0.0
    trials: float = 0.0
    #: Depth-0 decisions in a row (EXPLORE_STEPS).
    off: int = 0

    @property
    def value(self) -> float:
        return (self.accepted + PRIOR_RATE * PRIOR_WEIGHT) / (self.trials + PRIOR_WEIGHT)

    def decay(self, factor: float = DECAY) -> None:
        self.accepted *= factor
        self.trials *= factor


class StepCosts:
    """What one more verified position costs on this model and machine, measured from the
    target's own decode steps instead of assumed: ``VERIFY_COST`` was measured once on one CPU,
    and it moves with everything (int8 dot-product instructions or not, threads, a faster
    one-position step: when the bandwidth-bound single row got 25% faster the compute-bound extra
    rows did not, and the same constant then speculated at a loss). A step of P decode positions
    costs c = (tP / t1 - 1) / (P - 1), t1 the time of a one-position step. Each time is the
    minimum of the last ``WINDOW`` steps of that many positions: noise on a shared machine only
    ever slows a step (a descheduled worker, a page fault), so the minimum is what the step
    costs, and the window follows the context's growth. A model draft's cost per proposed token
    is measured against t1 the same way (``draft``)."""

    def __init__(self, verify_cost: float = VERIFY_COST) -> None:
        #: The per-position cost in use: the constant until steps measured it.
        self.verify_cost = verify_cost
        self.one_steps = 0
        self.measured = 0
        self._times: dict[int, collections.deque[float]] = {}

    @property
    def t1(self) -> float | None:
        """Seconds of a one-position step (None until one was timed)."""
        ones = self._times.get(1)
        return min(ones) if ones else None

    def step(self, positions: int, seconds: float) -> None:
        """A target step of ``positions`` decode positions (every row decoding) took ``seconds``."""
        if positions < 1 or not seconds > 0:
            return
        self._times.setdefault(positions, collections.deque(maxlen=WINDOW)).append(seconds)
        if positions == 1:
            self.one_steps += 1
        else:
            self.measured += 1
        t1 = self.t1
        if t1 is None or len(self._times) < 2:
            return
        seen = sorted((min(times) / t1 - 1) / (p - 1) for p, times in self._times.items() if p > 1)
        self.verify_cost = min(max(seen[(len(seen) - 1) // 2], COST_RANGE[0]), COST_RANGE[1])  # (lower median)

    def draft(self, tokens: int, seconds: float) -> float | None:
        """A proposer's cost per token relative to a one-position step, from one proposal of
        ``tokens`` that took ``seconds`` (None while no step was timed)."""
        t1 = self.t1
        if tokens < 1 or t1 is None or not seconds >= 0:
            return None
        return min(seconds / tokens / t1, COST_RANGE[1])


class DepthPolicy:
    """Depth k per sequence from its acceptance rate and the load (see the module docstring)."""

    def __init__(self, config: Config, *, draft_cost: float = 0.0, fixed: int | None = None,
                 costs: StepCosts | None = None) -> None:
        self.config = config
        #: Always this depth, whatever the acceptance (measurements of acceptance; tests).
        self.fixed = fixed
        self.max_depth = config.num_speculative_tokens
        self.policy = config.speculation_policy
        #: Cost of proposing one token relative to a target step (a model draft's): the proposer's
        #: estimate until ``observe_draft`` measured it.
        self.draft_cost = draft_cost
        #: Measured step costs (shared by the policies of one engine), or None: ``VERIFY_COST``.
        self.costs = costs
        self._drafts: collections.deque[float] = collections.deque(maxlen=WINDOW)
        self._rates: dict[Hashable, _Rate] = {}
        #: A request's own speculation_policy and max_speculation_compute_fraction (``own``).
        self._own: dict[Hashable, tuple[str, float]] = {}

    def own(self, seq_id: Hashable, config: Config) -> None:
        """``seq_id`` follows ``config``'s speculation_policy and max_speculation_compute_fraction
        (a request's own fields) instead of this policy's; the measured costs stay shared. Its
        fraction can lower the engine's share, not raise it (the scheduler's budget per step
        stays the engine's: a client does not take more than the operator allows)."""
        fraction = min(config.max_speculation_compute_fraction, self.config.max_speculation_compute_fraction)
        self._own[seq_id] = (config.speculation_policy, fraction)

    def observe_draft(self, tokens: int, seconds: float) -> None:
        """A proposal of ``tokens`` took ``seconds`` (with ``costs``: the draft cost becomes the
        least of the last few, as a step's time in StepCosts)."""
        seen = self.costs.draft(tokens, seconds) if self.costs is not None else None
        if seen is not None:
            self._drafts.append(seen)
            self.draft_cost = min(self._drafts)

    def depth(self, seq_id: Hashable, *, running: int = 1, waiting: int = 0, free_fraction: float = 1.0) -> int:
        """k for ``seq_id``'s next step: 0 = decode one token without speculating."""
        if self.fixed is not None:
            return self.fixed
        rate = self._rates.setdefault(seq_id, _Rate())
        running = max(running, 1)
        limit = self.max_depth
        others = running - 1
        policy, fraction = self._own.get(seq_id, (self.policy, self.config.max_speculation_compute_fraction))
        if policy == "fixed":
            return 0 if free_fraction < 0.05 else _budget(limit, running, fraction, self.config)
        if policy == "latency":
            others = 0
            if free_fraction < 0.05:
                return 0
        else:
            if policy == "throughput" and (waiting or free_fraction < 0.25):
                return 0
            if free_fraction < 0.1:
                return 0
            if waiting:
                limit = max(limit // 2, 1)
        limit = _budget(limit, running, fraction, self.config)
        costs = self.costs
        if costs is not None and costs.one_steps < PROBE_STEPS and running == 1:
            return 0  # time one-position steps first: the measured costs need t1
        verify_cost = VERIFY_COST if costs is None else costs.verify_cost
        k = best_depth(rate.value, verify_cost, limit, others=others, draft_cost=self.draft_cost)
        if k == 0:
            rate.decay(OFF_DECAY)  # drift back toward the prior: probe again later
            rate.off += 1
            if rate.off >= EXPLORE_STEPS and limit > 0:
                k = 1  # one verified guess re-measures the acceptance and a wider step's cost
        if k:
            rate.off = 0
        return k

    def record(self, seq_id: Hashable, proposed: int, accepted: int) -> None:
        """A verify step's outcome: ``accepted`` of ``proposed`` tokens stood."""
        if proposed <= 0:
            return
        rate = self._rates.setdefault(seq_id, _Rate())
        rate.decay()
        rate.accepted += accepted
        rate.trials += accepted + (1 if accepted < proposed else 0)

    def release(self, seq_id: Hashable) -> None:
        self._rates.pop(seq_id, None)
        self._own.pop(seq_id, None)

    def rate(self, seq_id: Hashable) -> float:
        """The acceptance rate the policy believes for ``seq_id`` now."""
        return self._rates.get(seq_id, _Rate()).value


def _budget(limit: int, running: int, fraction: float, config: Config) -> int:
    """``limit`` within a batch's share of the speculated tokens per step: ``fraction`` of the
    step's token budget split over the running requests (batch 1: no cap)."""
    if running <= 1:
        return limit
    return min(limit, int(fraction * config.max_batch_tokens) // running)


def best_depth(rate: float, verify_cost: float, limit: int, *, others: int = 0, draft_cost: float = 0.0) -> int:
    """argmax over k in 0..limit of (others + E(k)) / (1 + verify_cost * (others + k) + draft_cost * k)
    (see the module docstring; 0 when nothing beats not speculating)."""
    best, best_gain = 0, (others + 1) / (1 + verify_cost * others)
    expected, power = 1.0, 1.0
    for k in range(1, max(limit, 0) + 1):
        power *= rate
        expected += power
        gain = (others + expected) / (1 + verify_cost * (others + k) + draft_cost * k)
        if gain > best_gain + 1e-9:
            best, best_gain = k, gain
    return best
