"""Trees of candidates (EAGLE-2 style): of the tokens a proposer considered, keep the ``k`` most
probable by cumulative draft probability and hand them over as one ``Proposal`` with parents,
which the target verifies in one row with tree attention (runtime/tree_attention.py).

Why keep the best ``k`` nodes rather than a fixed shape: every verified position costs a share of
a step (on a CPU without int8 dot-product instructions ~0.2 of a step at batch 1, more as rows
widen), so the rows go where the draft expects tokens: a confident draft gets a long chain, an
unsure one a bushy first level. A node's cumulative probability is at most its parent's, so taking
nodes by falling probability (ties: shallower first) always keeps a node's ancestors.

When trees pay: the tree adds the draft's second and third guesses at a depth; they stand only
where the target disagrees with the draft's first guess and agrees with a runner-up. Whether that
outweighs the positions they take from the chain is the model's and draft's matter, so trees are
a knob (``Config.speculation_tree_width``, default 1 = chains) and measured per model (bench
``speculative --eagle DIR --tree-width 3``). On SmolLM2-135M with its EAGLE draft (2-core AVX2 CPU,
greedy chat): the tree proposes in more steps than the chain (the draft's first doubtful depth still
gets its candidates), so its tokens per *verify* step fall (3.6 against 4.1) while its tokens per
*forward* step rise; 1.1-1.2x the chain's decode tok/s at 1 thread on a loaded machine, 0.96x at 2
threads on a quiet one, where a verified position costs relatively more.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .proposer import Proposal

#: Least draft probability of a runner-up token to be a candidate (rarer ones would take a verified
#: position for almost no chance of a token).
MIN_SIBLING = 0.1


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A token a proposer considered: its parent candidate's index (-1: the sequence's last real
    token) and its cumulative draft probability (its own times its parent's)."""

    token: int
    parent: int
    score: float


def best_tree(candidates: list[Candidate], k: int) -> Proposal:
    """The ``k`` most probable candidates as a breadth-first tree ``Proposal`` (see the module
    docstring); candidates list parents before children."""
    depth: list[int] = []
    for c in candidates:
        depth.append(1 if c.parent < 0 else depth[c.parent] + 1)
    order = sorted(range(len(candidates)), key=lambda i: (-candidates[i].score, depth[i], i))
    kept: set[int] = set()
    for i in order:
        if len(kept) == k:
            break
        if candidates[i].parent < 0 or candidates[i].parent in kept:
            kept.add(i)
    chosen = sorted(kept, key=lambda i: (depth[i], i))
    index = {old: new for new, old in enumerate(chosen)}
    parents = [index[candidates[i].parent] if candidates[i].parent >= 0 else -1 for i in chosen]
    return Proposal([candidates[i].token for i in chosen], parents=parents)


def top_tokens(logits: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``width`` most likely entries of ``logits`` (best first) and their softmax probabilities."""
    top = np.argsort(-logits, kind="stable")[:width]
    return top, np.exp(logits[top] - logits[top[0]]) / np.exp(logits - logits[top[0]]).sum()


def expand(candidates: list[Candidate], parents: list[int], tokens: np.ndarray, probs: np.ndarray) -> list[int]:
    """Add ``tokens`` (one depth's top tokens, best first, with their draft probabilities) under
    each of ``parents`` (-1: the sequence's last token): the first always, runners-up from
    ``MIN_SIBLING`` on. Returns the new candidates' indices."""
    added = []
    for parent in parents:
        base = 1.0 if parent < 0 else candidates[parent].score
        for i, (token, p) in enumerate(zip(tokens, probs)):
            if i == 0 or p >= MIN_SIBLING:
                added.append(len(candidates))
                candidates.append(Candidate(int(token), parent, base * float(p)))
    return added
