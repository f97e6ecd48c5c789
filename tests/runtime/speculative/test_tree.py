"""Trees of candidates (speculative/tree.py) and their greedy verification (verify.verify_tree):
the best k nodes by cumulative probability, ancestor-closed and breadth-first; the walk takes the
target's choice at each node (the right branch need not come first), stops at the first node
without it, and emits the target's next token; sampling has no tree form."""

from __future__ import annotations

import numpy as np
import pytest

from infercc.runtime.sampling import Sampler, SamplingParams
from infercc.runtime.speculative.proposer import Proposal
from infercc.runtime.speculative.tree import MIN_SIBLING, Candidate, best_tree, expand, top_tokens
from infercc.runtime.speculative.verify import verify_tree

VOCAB = 12


def one_hot_logits(choices: list[int]) -> np.ndarray:
    """Logits whose row i has its maximum at choices[i]."""
    logits = np.zeros((len(choices), VOCAB), np.float32)
    logits[np.arange(len(choices)), choices] = 5.0
    return logits


def test_best_tree_keeps_the_most_probable_ancestor_closed_nodes_breadth_first():
    candidates = [Candidate(5, -1, 0.6), Candidate(6, -1, 0.3),  # depth 1
                  Candidate(7, 0, 0.5), Candidate(8, 1, 0.29),  # depth 2
                  Candidate(9, 2, 0.45), Candidate(10, 3, 0.28)]  # depth 3
    tree = best_tree(candidates, 4)
    assert tree.tokens == [5, 6, 7, 9] and tree.parents == [-1, -1, 0, 2]
    assert tree.first_path().tokens == [5, 7, 9] and best_tree(candidates, 6).first_path().tokens == [5, 7, 9]
    tree = best_tree(candidates, 2)
    assert tree.tokens == [5, 7] and tree.parents == [-1, 0] and not tree.is_tree


def test_expand_adds_runners_up_only_when_probable_enough():
    candidates: list[Candidate] = []
    top, probs = top_tokens(np.log(np.asarray([0.05, 0.6, 0.3, MIN_SIBLING / 2, 0.0001])), 3)
    assert top.tolist() == [1, 2, 0]
    first = expand(candidates, [-1], top, probs)
    assert [c.token for c in candidates] == [1, 2] and first == [0, 1]
    expand(candidates, first, top[:1], probs[:1])
    assert [(c.token, c.parent) for c in candidates[2:]] == [(1, 0), (1, 1)]
    assert candidates[2].score == pytest.approx(candidates[0].score * probs[0])


def test_verify_tree_walks_the_targets_choices():
    sampler = Sampler(SamplingParams())
    # row 0 = the last token; nodes: 0 (3), 1 (4), 2 (5, under 1), 3 (6, under 1), 4 (7, under 3)
    proposal = Proposal([3, 4, 5, 6, 7], parents=[-1, -1, 1, 1, 3])
    # the target: 4 after the last token (the second branch), then 6 (second child), then 7, then 9
    logits = one_hot_logits([4, 0, 6, 0, 7, 9])
    emitted, rows = verify_tree(proposal, logits, sampler, [1, 2], [])
    assert emitted == [4, 6, 7, 9] and rows == [0, 2, 4, 5]
    emitted, rows = verify_tree(proposal, one_hot_logits([11, 0, 0, 0, 0, 0]), sampler, [1, 2], [])
    assert emitted == [11] and rows == [0]  # every branch wrong: the target's own token
    with pytest.raises(ValueError, match="greedily only"):
        verify_tree(proposal, logits, Sampler(SamplingParams(temperature=0.8, seed=1)), [1, 2], [])


@pytest.mark.parametrize("parents,words", [([-1, 0], "2 parents"), ([-1, 1, 0], "parent 1"),
                                           ([-1, 0, -1], "breadth-first")])
def test_malformed_trees_are_refused(parents, words):
    with pytest.raises(ValueError, match=words):
        Proposal([1, 2, 3], parents=parents)
