"""Speculative decoding for a session's sequences (``session.sequence(speculation=...)``) and the
one decode step every sequence takes, speculating or not.

Why: a stream of ``seq.decode()`` calls costs one model step per token. A speculating sequence
runs, when it needs a step, one verify step of [its next token + k proposed tokens] (the proposer
door: speculative/proposer.py; the depth k: speculative/policy.py) and keeps what verification
accepts (speculative/verify.py, the engine's and the loop's verification) for its next calls.

What callers see does not change: ``decode()`` returns exactly ONE token per call, the token plain
decoding gives (greedy: token for token; sampling: the target's distribution by rejection sampling,
drawn from the sequence's seeded generator -- a seed gives the same tokens on every run, though not
the plain sequence's draws). ``tokens``, ``len(seq)``, ``text``, ``output`` and ``logits`` show
only returned tokens (``logits``: those after the last returned token, as plain decoding's).

State kept beyond the returned tokens (``SequenceSpeculation``):

* ``pending``: accepted proposals the cache already holds, each with the logits after it; the next
  ``decode()`` calls return them without a model step;
* ``next``: the token verification chose last (the target's own, or rejection sampling's
  correction): chosen but not fed. The ``decode()`` that returns it feeds it with the next
  proposal. It must not be drawn again: redrawing a rejected position from p would bias the text.

Anything else that changes the sequence (``append``, ``set_adapter``, ``reset``, ``close``; a
``fork``'s child starts from the returned tokens, the parent keeps its pending ones) first drops
both and rolls the cache back to the returned tokens: paged, the slots and blocks past them go back
(``SessionPool.keep`` -> ``BlockManager.truncate``, as the engine drops rejected tokens);
contiguous, ``KVCache.truncate``. Dropped tokens are not redrawn the same way later: after such a
change, sampled text goes on from fresh draws (still the target's distribution).

A method that cannot run here (no KV cache, no draft, no heads) is plain decoding with the reason
in ``seq.speculation_reason`` and a warning, never an error (as ``generate``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import warnings
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from .block_manager import OutOfBlocks
from .session_pool import Feed
from .speculative.loop import _clipped, proposer_for
from .speculative.policy import DepthPolicy, SpeculationStats
from .speculative.proposer import Proposal
from .speculative.verify import verify_counted

if TYPE_CHECKING:
    from ..config import Config
    from .session import Sequence, Session

log = logging.getLogger(__name__)

#: Proposer keys of sequences: proposers (a draft model, its caches) are shared by every sequence
#: and generation of a compiled model, so each sequence has its own key.
_KEYS = itertools.count()


class SequenceSpeculation:
    """One sequence's speculation: proposer, depth policy, counts and the verified tokens not yet
    returned (see the module docstring)."""

    def __init__(self, proposer: Any, policy: DepthPolicy) -> None:
        self.proposer = proposer
        self.policy = policy
        self.key = ("session", next(_KEYS))
        self.stats = SpeculationStats()
        self.pending: deque[tuple[int, np.ndarray]] = deque()
        self.next: int | None = None

    def pop(self, seq: Sequence) -> None:
        """Return the first pending token: no model step (its K/V and logits are there)."""
        token, logits = self.pending.popleft()
        seq.output.append(token)
        seq.logits = logits

    def plan(self, seq: Sequence) -> _Step:
        """The token this call returns (``next``, else a draw from ``seq.logits``) and the
        proposal to verify with it, at most as deep as the policy says and the context allows."""
        token = self.next if self.next is not None else seq.sampler(seq.logits, seq.context, seq.output)
        tokens = [*seq.tokens, token]
        k = self.policy.depth(self.key)
        if seq.session.max_context is not None:
            k = min(k, seq.session.max_context - len(tokens))
        proposal = _clipped(self.proposer.propose(self.key, tokens, k, seq.params), k) if k > 0 else Proposal([])
        return _Step(seq, token, proposal)

    def verified(self, step: _Step, rows: np.ndarray, hidden: np.ndarray | None) -> None:
        """After the step: keep the accepted proposals pending and the chosen token as ``next``;
        the cache gives back the rejected proposals' slots."""
        seq, proposal = step.seq, step.proposal
        accepted = 0
        if proposal.tokens:
            emitted = verify_counted(proposal, rows, seq.sampler, seq.context, seq.output, self.stats, self.policy,
                                     self.key)
            accepted = len(emitted) - 1
            self.pending.extend(zip(emitted[:accepted], rows[1:accepted + 1]))
            self.next = emitted[accepted]
            seq._keep(seq.length + accepted)
        else:
            self.next = None
        if hidden is not None and getattr(self.proposer, "needs_hidden", False):
            # the states whose logits chose the accepted tokens and the next one (the last of them:
            # sequence index length + accepted); Medusa reads the last, EAGLE all of them
            self.proposer.observe(self.key, seq.length + accepted + 1, hidden.reshape(-1, hidden.shape[-1])[:accepted + 1])

    def drop(self, seq: Sequence) -> None:
        """Forget the verified tokens not returned and give back their cache slots."""
        if self.pending:
            self.pending.clear()
            seq._keep(seq.length)
        self.next = None

    def release(self) -> None:
        """The sequence is gone: its proposer and policy state go too."""
        self.pending.clear()
        self.proposer.release(self.key)
        self.policy.release(self.key)


@dataclasses.dataclass(eq=False)
class _Step:
    """One sequence's part of a model step: the token it returns, fed with the proposal after it."""

    seq: Sequence
    token: int
    proposal: Proposal

    @property
    def fed(self) -> list[int]:
        return [self.token, *self.proposal.tokens]


def start(session: Session, method: str | None,
          own: Config | None = None) -> tuple[SequenceSpeculation | None, str | None]:
    """A sequence's speculation for ``method`` (None: off; ``own``: its own speculation fields,
    spec_engine.request_config), or (None, why it cannot run here):
    the sequence then decodes plainly and says why (``speculation_reason``, a warning)."""
    if method is None:
        return None, None
    if not session.cached:
        why = "the model has no KV cache (every step recomputes the sequence: nothing to verify in one step)"
    else:
        proposer, why = proposer_for(session.compiled, method)
        if proposer is not None:
            policy = DepthPolicy(own or session.compiled.config, draft_cost=float(getattr(proposer, "cost", 0.0)))
            return SequenceSpeculation(proposer, policy), None
    reason = f"speculation={method!r} is off for this sequence: {why}"
    log.info("%s; decoding without it", reason)
    warnings.warn(f"{reason}; decoding without it", RuntimeWarning, stacklevel=4)
    return None, reason


def decode(seqs: list[Sequence]) -> list[int]:
    """One token for each of ``seqs`` (their locks held; several only on the paged pool): pending
    tokens are returned as they are, every other sequence joins ONE model step (its token, plus
    its proposal when it speculates). A failed step changes nothing: samplers are put back, and
    no sequence pops a pending token before the step succeeded."""
    for seq in seqs:
        seq._check_open("decode")
        seq._check_decode()
    ready = [seq for seq in seqs if seq._spec is not None and seq._spec.pending]
    stepping = [seq for seq in seqs if seq._spec is None or not seq._spec.pending]
    if stepping:
        states = [seq.sampler.rng.bit_generator.state for seq in stepping]  # (a dict: cheap, unlike a deepcopy)
        try:
            steps = [_plan(seq) for seq in stepping]
            hidden: list | None = [] if any(_wants_hidden(seq) for seq in stepping) else None
            try:
                results = _run(steps, hidden)
            except OutOfBlocks:  # proposals shrink, they never fail a decode plain decoding could run
                if not any(step.proposal.tokens for step in steps):
                    raise
                for step in steps:
                    step.proposal = Proposal([])
                results = _run(steps, hidden)  # (a failed feed added no hidden states)
        except BaseException:
            for seq, state in zip(stepping, states):
                seq.sampler.rng.bit_generator.state = state
            raise
        for i, (step, logits) in enumerate(zip(steps, results)):
            rows = logits if logits.ndim == 2 else logits[None]
            step.seq.output.append(step.token)
            step.seq.logits = rows[0]
            if step.seq._spec is not None:
                step.seq._spec.verified(step, rows, hidden[i] if hidden else None)
    for seq in ready:
        seq._spec.pop(seq)  # type: ignore[union-attr]
    return [seq.output[-1] for seq in seqs]


def _plan(seq: Sequence) -> _Step:
    if seq._spec is not None:
        return seq._spec.plan(seq)
    return _Step(seq, seq.sampler(seq.logits, seq.context, seq.output), Proposal([]))


def _wants_hidden(seq: Sequence) -> bool:
    return seq._spec is not None and getattr(seq._spec.proposer, "needs_hidden", False)


def _run(steps: list[_Step], hidden: list | None) -> list[np.ndarray]:
    """The model step: one pool feed of every row (paged), else the one sequence's runner step.
    Each result: [vocab], or [1 + k, vocab] for a row verifying k proposals."""
    seq = steps[0].seq
    if seq._paged:
        pool = seq.session.pool
        assert pool is not None
        feeds = [Feed(s.seq._id, s.seq.length, s.fed, adapter=s.seq.adapter, speculated=len(s.proposal.tokens))
                 for s in steps]
        results = pool.feed(feeds, hidden)
        for s in steps:
            s.seq._history.extend(s.fed)
        return results
    assert len(steps) == 1, "only the paged pool runs several sequences in one step"
    fed = steps[0].fed
    out = [] if hidden is not None else None
    logits = seq._runner.step(seq._cache, [fed], all_logits=len(fed) > 1, hidden=out)[0]
    if hidden is not None:
        hidden.append(out[0][0] if out else None)
    return [logits]
