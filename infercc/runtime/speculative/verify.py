"""Verification: the target's logits over [last token + k proposals] decide which proposals stand.

Greedy: a proposal stands while it equals the target's own choice (argmax after penalties) at its
position; the first mismatch is replaced by the target's token, and when all k stand the target's
token after them comes free (the bonus token). The output is token for token what decoding one
token per step would give.

Sampling: standard speculative rejection sampling (Leviathan et al. 2023, Chen et al. 2023). The
proposal x_i drawn from the draft's q_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)),
p_i being the target's processed distribution (penalties, temperature, top-k/p, min-p: exactly
``Sampler.probabilities``); at the first rejection a token is drawn from norm(max(0, p_i - q_i))
and the step ends; all accepted -> one more token drawn from p_{k}. Each emitted token is then
distributed as p: the output distribution is the target's. A deterministic proposer is q = point
mass on x (accept with probability p(x); the residual is p without x). Draws use the request's
seeded generator, so a seed gives the same text on every run.

Trees of candidates (``Proposal.parents``): ``verify_tree``, greedy only, walks from the last
token to the child the target chooses at each node; the emitted tokens are again plain greedy
decoding's. A sampled tree would need rejection sampling per branch (SpecInfer's multi-draft
scheme): sampling requests keep chains.

Penalties depend on the output so far, so each position's p is computed on a copy of ``output``
extended by the tokens accepted before it.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..sampling import Sampler
from .policy import DepthPolicy, SpeculationStats
from .proposer import Proposal

if TYPE_CHECKING:
    from ...compiled import CompiledModel


def verify(proposal: Proposal, logits: np.ndarray, sampler: Sampler, context: Sequence[int],
           output: list[int]) -> list[int]:
    """The tokens to emit (1..k+1) for ``proposal``; ``logits`` [k+1, vocab] are the target's at
    the positions predicting each proposed token and the one after."""
    tokens = proposal.tokens
    if logits.shape[0] != len(tokens) + 1:
        raise ValueError(f"verify needs {len(tokens) + 1} rows of logits for {len(tokens)} proposed tokens, "
                         f"got {logits.shape[0]}")
    out = list(output)
    emitted: list[int] = []
    for i in range(len(tokens) + 1):
        if sampler.params.greedy:
            token = sampler(logits[i], context, out)
            emitted.append(token)
            if i == len(tokens) or token != tokens[i]:
                return emitted
            out.append(token)
            continue
        p = sampler.probabilities(logits[i], context, out)
        if i == len(tokens):  # every proposal stood: the bonus token from p
            emitted.append(draw(sampler.rng, p))
            return emitted
        x = int(tokens[i])
        if proposal.probs is None:  # point mass: q(x) = 1
            q_x, residual = 1.0, p.copy()
            residual[x] = 0.0
        else:
            q = np.asarray(proposal.probs[i], np.float64)
            q_x, residual = float(q[x]), np.maximum(p - q, 0.0)
        if q_x > 0 and sampler.rng.random() * q_x < p[x]:  # accept with probability min(1, p/q)
            emitted.append(x)
            out.append(x)
            continue
        # Rejected: p - q has no positive part only when p == q (then x could not be rejected
        # but for rounding); draw from p itself there.
        emitted.append(draw(sampler.rng, residual if residual.sum() > 0 else p))
        return emitted
    return emitted  # (unreachable: the loop returns at i == len(tokens))


def verify_tree(proposal: Proposal, logits: np.ndarray, sampler: Sampler, context: Sequence[int],
                output: list[int]) -> tuple[list[int], list[int]]:
    """Greedy verification of a tree of candidates (``proposal.parents``): ``logits`` [n+1, vocab]
    are the target's at the row's last token (row 0) and at each proposed token (row i + 1, which
    attended to its ancestors only). From the last token, take the child whose token is the
    target's choice there, until no child is: the emitted tokens are that path plus the target's
    own next token, so the output is token for token plain greedy decoding. Returns the emitted
    tokens and the logits rows that chose them (0, then the accepted nodes' rows + 1): their K/V
    (all but the last) are the ones to keep. Sampling has no tree form here (a point-mass
    residual per branch would be needed): ValueError for a sampling request."""
    if not sampler.params.greedy:
        raise ValueError("tree proposals are verified greedily only; a sampling request speculates with a chain")
    tokens = proposal.tokens
    parents = proposal.parents if proposal.parents is not None else list(range(-1, len(tokens) - 1))
    if logits.shape[0] != len(tokens) + 1:
        raise ValueError(f"verify needs {len(tokens) + 1} rows of logits for {len(tokens)} proposed tokens, "
                         f"got {logits.shape[0]}")
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        children.setdefault(p, []).append(i)
    out = list(output)
    emitted: list[int] = []
    rows, node = [0], -1
    while True:
        token = sampler(logits[node + 1], context, out)
        emitted.append(token)
        node = next((c for c in children.get(node, ()) if tokens[c] == token), None)
        if node is None:
            return emitted, rows
        rows.append(node + 1)
        out.append(token)


def verify_counted(proposal: Proposal, logits: np.ndarray, sampler: Sampler, context: Sequence[int],
                   output: list[int], stats: SpeculationStats, policy: DepthPolicy, key: Hashable) -> list[int]:
    """``verify``, with the outcome counted in ``stats`` and in ``policy``'s acceptance of ``key``
    (a sequence speculating alone: the loop, a session's sequence)."""
    emitted = verify(proposal, logits, sampler, context, output)
    count(proposal, emitted, stats, policy, key)
    return emitted


def count(proposal: Proposal, emitted: list[int], stats: SpeculationStats, policy: DepthPolicy,
          key: Hashable) -> None:
    """Count a verified proposal (chain or tree) in ``stats`` and ``policy``: ``emitted`` is the
    accepted tokens, then the target's own."""
    accepted = len(emitted) - 1
    stats.add(len(proposal.tokens), accepted)
    policy.record(key, len(proposal.tokens), accepted)


def draw(rng: np.random.Generator, probs: np.ndarray) -> int:
    """A token from the (possibly unnormalized) distribution ``probs``, as ``Sampler`` draws."""
    cumulative = np.cumsum(probs)
    token = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return min(token, int(np.flatnonzero(probs)[-1]))


def warn_if_inexact(compiled: CompiledModel) -> None:
    """Warn once per compiled model when greedy speculation on it may leave plain greedy decoding's
    text. Verification is exact when a step's logits for a row do not depend on how many rows the
    step computes. ONNX Runtime's MatMulNBits breaks that: it computes a several-row product with
    another kernel than a one-row one and quantizes its activations to int8, so logits of the same
    position move by ~0.1 (measured on SmolLM2 Q4_1), enough to flip a near tie. The generated-C
    runtime and float weights keep the identity; a warning says so instead of a silent difference
    (once: a server would repeat it per request)."""
    if compiled.runtime == "c" or compiled.__dict__.get("_inexact_warned"):
        return
    if any(n.op_type == "MatMulNBits" for n in compiled.model.graph.nodes):
        compiled.__dict__["_inexact_warned"] = True
        warnings.warn("speculative greedy output may differ from plain decoding at near ties on this model: ONNX "
                      "Runtime's MatMulNBits computes a several-row verify step with another kernel than a one-token "
                      "step; backend='c' keeps them identical", RuntimeWarning, stacklevel=4)
