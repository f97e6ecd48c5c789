"""Prompt lookup: propose the tokens that followed the most recent earlier occurrence of the
sequence's last n tokens (HF's ``prompt_lookup_num_tokens``, llama.cpp's lookup decoding). No
model: it pays off where the output copies from the input (summaries, answers from a passage,
code edits) and costs nothing where it finds no match.

The longest n in [max_ngram..min_ngram] whose suffix occurs earlier wins (a longer match is
more likely to continue the same way). Each sequence keeps an index n-gram -> the position
after its most recent occurrence, extended by the tokens added since the last call, so a call
costs O(new tokens * max_ngram + k), not O(length). The index is rebuilt when the sequence no
longer extends what was indexed (a rewind, or a seq_id reused for another text).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from ..sampling import SamplingParams
from .proposer import Proposal


class _Index:
    """The n-grams of one sequence, each mapped to the position after its latest occurrence."""

    def __init__(self, max_ngram: int) -> None:
        self.tokens: list[int] = []
        self.after: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram + 1)]

    def extends(self, tokens: Sequence[int]) -> bool:
        """Whether ``tokens`` continues what was indexed (checked at its last indexed token and
        a few before it: O(1), enough to catch a rewind or a different text)."""
        n = len(self.tokens)
        if len(tokens) < n:
            return False
        return all(tokens[i] == self.tokens[i] for i in range(max(n - 4, 0), n))

    def extend(self, tokens: Sequence[int]) -> None:
        """Index the n-grams whose continuation is now known: those ending before the last token."""
        seen = self.tokens
        start = len(seen)
        seen.extend(int(t) for t in tokens[start:])
        # An n-gram ending at position p (exclusive) is followed by seen[p]: index p <= len - 1.
        for p in range(max(start, 1), len(seen)):
            for n in range(1, len(self.after)):
                if p - n < 0:
                    break
                self.after[n][tuple(seen[p - n:p])] = p


class PromptLookup:
    """The n-gram proposer (see the module docstring)."""

    name = "prompt_lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}..{max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._indexes: dict[Hashable, _Index] = {}

    def propose(self, seq_id: Hashable, tokens: Sequence[int], k: int, params: SamplingParams | None = None) -> Proposal:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest matching
        suffix; none when no suffix of at least ``min_ngram`` tokens occurred before."""
        index = self._indexes.get(seq_id)
        if index is None or not index.extends(tokens):
            index = self._indexes[seq_id] = _Index(self.max_ngram)
        index.extend(tokens)
        seen = index.tokens
        if k <= 0:
            return Proposal([])
        for n in range(min(self.max_ngram, len(seen) - 1), self.min_ngram - 1, -1):
            after = index.after[n].get(tuple(seen[len(seen) - n:]))
            if after is not None:
                return Proposal(seen[after:after + k])
        return Proposal([])

    def release(self, seq_id: Hashable) -> None:
        self._indexes.pop(seq_id, None)
