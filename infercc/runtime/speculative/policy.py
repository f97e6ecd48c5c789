"""How deep to speculate: the depth k of each sequence's next step (0 = off), and the counts
GenerationResult and the server report.

Model: each proposed token stands with probability a (measured per sequence), so k proposals give
E(k) = (1 - a^(k+1)) / (1 - a) tokens per step (the k accepted ones plus the target's own), and a
step costs 1 + c*k target steps (c: what one more verified position costs beside the first; small
at batch 1 on a CPU, where a step reads all weights once for any number of positions, and growing
with the batch, whose rows already share that read) + d*k (the proposer: 0 for prompt lookup,
the draft's cost per token relative to the target for a model draft). The depth is the k in
0..num_speculative_tokens that maximizes E(k) / cost(k): it falls as acceptance falls and turns
speculation off where it would not pay, and it rises again on its own: while off, the measured
rate decays toward the prior, so the sequence probes again after a while.

``a`` is a decaying count of accepted proposals over trials (accepted + the rejected one, if
any: the maximum-likelihood rate of the geometric model), started from a prior worth half a trial.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...config import Config

#: Extra cost of one more verified position relative to a one-token step at batch 1 on a CPU: an
#: estimate (a decode step of a small model is bound by reading its weights once, whatever the
#: number of positions; the attention and the LM head grow with them). Not measured on a quiet
#: machine yet: the benchmark case ``speculative`` reports what the policy achieves with it.
VERIFY_COST = 0.08
#: The acceptance rate assumed before anything was measured, and its weight in trials.
PRIOR_RATE, PRIOR_WEIGHT = 0.6, 0.5
#: Weight kept by past measurements at each record: about the last ten trials count.
DECAY = 0.9
#: ... and at each step spent off: the rate creeps back toward the prior, so a sequence whose
#: proposals failed probes again after a few dozen steps (the text may have changed character).
OFF_DECAY = 0.97


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

    @property
    def value(self) -> float:
        return (self.accepted + PRIOR_RATE * PRIOR_WEIGHT) / (self.trials + PRIOR_WEIGHT)

    def decay(self, factor: float = DECAY) -> None:
        self.accepted *= factor
        self.trials *= factor


class DepthPolicy:
    """Depth k per sequence from its acceptance rate and the load (see the module docstring)."""

    def __init__(self, config: Config, *, draft_cost: float = 0.0, fixed: int | None = None) -> None:
        self.config = config
        #: Always this depth, whatever the acceptance (measurements of acceptance; tests).
        self.fixed = fixed
        self.max_depth = config.num_speculative_tokens
        self.policy = config.speculation_policy
        #: Cost of proposing one token relative to a target step (a model draft's).
        self.draft_cost = draft_cost
        self._rates: dict[Hashable, _Rate] = {}

    def depth(self, seq_id: Hashable, *, running: int = 1, waiting: int = 0, free_fraction: float = 1.0) -> int:
        """k for ``seq_id``'s next step: 0 = decode one token without speculating."""
        if self.fixed is not None:
            return self.fixed
        rate = self._rates.setdefault(seq_id, _Rate())
        running = max(running, 1)
        limit = self.max_depth
        if self.policy == "latency":
            verify_cost = VERIFY_COST
            if free_fraction < 0.05:
                return 0
        else:
            verify_cost = VERIFY_COST * running
            if self.policy == "throughput" and (waiting or free_fraction < 0.25):
                return 0
            if free_fraction < 0.1:
                return 0
            if waiting:
                limit = max(limit // 2, 1)
        if running > 1:  # the engine's budget: speculated tokens per step
            budget = int(self.config.max_speculation_compute_fraction * self.config.max_batch_tokens)
            limit = min(limit, budget // running)
        k = best_depth(rate.value, verify_cost + self.draft_cost, limit)
        if k == 0:
            rate.decay(OFF_DECAY)  # drift back toward the prior: probe again later
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

    def rate(self, seq_id: Hashable) -> float:
        """The acceptance rate the policy believes for ``seq_id`` now."""
        return self._rates.get(seq_id, _Rate()).value


def best_depth(rate: float, cost_per_token: float, limit: int) -> int:
    """argmax over k in 0..limit of E(k) / (1 + cost_per_token * k) (0 when nothing beats 1)."""
    best, best_gain = 0, 1.0
    expected, power = 1.0, 1.0
    for k in range(1, max(limit, 0) + 1):
        power *= rate
        expected += power
        gain = expected / (1 + cost_per_token * k)
        if gain > best_gain + 1e-9:
            best, best_gain = k, gain
    return best
