"""Prompt lookup: the longest matching suffix wins, the latest earlier occurrence is used, k
limits the proposal, no match proposes nothing, and the incremental index always agrees with a
brute-force search (growing sequences, rewinds, reused ids)."""

from __future__ import annotations

import numpy as np
import pytest

from infercc.runtime.speculative.prompt_lookup import PromptLookup


def brute_force(tokens: list[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """The definition: for n from max_ngram down, the latest j with tokens[j:j+n] == the last n
    tokens and j + n < len(tokens); propose what followed it."""
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        suffix = tokens[len(tokens) - n:]
        for j in range(len(tokens) - n - 1, -1, -1):
            if tokens[j:j + n] == suffix:
                return tokens[j + n:j + n + k]
    return []


def test_longest_ngram_wins_over_a_later_shorter_match():
    tokens = [1, 2, 3, 10, 11, 12, 9, 3, 20, 1, 2, 3]  # (1, 2, 3) at 0; (3,) latest at 7
    assert PromptLookup().propose("s", tokens, 3).tokens == [10, 11, 12]
    assert PromptLookup(max_ngram=1).propose("s", tokens, 3).tokens == [20, 1, 2]


def test_falls_back_to_shorter_ngrams_and_uses_the_latest_occurrence():
    assert PromptLookup().propose("s", [5, 7, 3, 20, 21, 8, 3], 2).tokens == [20, 21]
    assert PromptLookup().propose("s", [4, 1, 4, 2, 4], 5).tokens == [2, 4]


def test_no_match_proposes_nothing_and_min_ngram_is_respected():
    assert PromptLookup().propose("s", [1, 2, 3, 4], 4).tokens == []
    assert PromptLookup().propose("s", [7], 4).tokens == []
    assert PromptLookup(min_ngram=2).propose("s", [5, 7, 3, 20, 21, 8, 3], 2).tokens == []
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookup(max_ngram=1, min_ngram=2)


@pytest.mark.parametrize("k", [0, 1, 2, 5, 50])
def test_k_limits_the_proposal(k):
    tokens = [1, 2, 3, 4, 5, 6, 7, 1, 2]
    proposal = PromptLookup().propose("s", tokens, k)
    assert proposal.tokens == [3, 4, 5, 6, 7, 1, 2][:k] and proposal.probs is None


def test_incremental_index_matches_brute_force_while_growing_and_rewinding():
    rng = np.random.default_rng(0)
    lookup = PromptLookup()
    for trial in range(20):
        tokens = rng.integers(0, 6, size=int(rng.integers(1, 10))).tolist()
        for _ in range(40):
            k = int(rng.integers(1, 6))
            assert lookup.propose(trial % 3, tokens, k).tokens == brute_force(tokens, k), tokens
            if rng.random() < 0.15:  # a rewind (rejected tokens) or another text under the same id
                tokens = tokens[: int(rng.integers(0, len(tokens) + 1))] or [0]
            tokens = tokens + rng.integers(0, 6, size=int(rng.integers(1, 4))).tolist()
    lookup.release(0)
    assert lookup.propose(0, [1, 2, 1], 2).tokens == [2, 1]
