"""The proposer door: what every speculative proposer (prompt lookup, draft model, self-draft, Medusa
heads, the EAGLE draft layer) gives the verifier, and ``make_proposer``, the one place a method name
becomes a proposer.

A proposer guesses the next tokens of a sequence; the target model then scores all of them in one
step (verify.py). Proposers are keyed by the caller's sequence id and are handed the whole
sequence so far on every call, so a proposer that keeps state (an n-gram index, a draft's KV cache)
brings itself up to date alone: the caller never tells it which guesses were rejected. A method
that cannot run for a model (no draft, a vocabulary that differs, a graph the self-draft cannot
be cut from) is ``(None, reason)``, never an error: the caller decodes plainly and reports why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..tree_attention import parents_problem

if TYPE_CHECKING:
    from ...compiled import CompiledModel
    from ...config import Config
    from ..sampling import SamplingParams

#: The proposers ``make_proposer`` builds; "auto" is prompt lookup under the depth policy.
METHODS = ("auto", "prompt_lookup", "draft", "self_draft", "medusa", "eagle")


@dataclasses.dataclass
class Proposal:
    """Tokens guessed to continue a sequence. ``probs`` [len(tokens), vocab] float64 is the draft
    distribution q each token was drawn from (rejection sampling needs it); None = a deterministic
    proposer (prompt lookup, a greedy draft): q is a point mass on each token."""

    tokens: list[int]
    probs: np.ndarray | None = None
    #: A tree of candidates instead of a chain: ``parents[i]`` is the index of token i's parent
    #: among ``tokens``, -1 for a child of the sequence's last real token. None = a chain (each
    #: token continues the one before). Trees come in breadth-first order (parents before
    #: children, depths non-decreasing: the verifying row gives token i position start + depth(i),
    #: which a graph computing positions from the mask's running count can only take that way) and
    #: are verified greedily only (``verify_tree``): sampling keeps chains.
    parents: list[int] | None = None

    def __post_init__(self) -> None:
        if self.probs is not None and self.probs.shape[0] != len(self.tokens):
            raise ValueError(f"a proposal of {len(self.tokens)} tokens has {self.probs.shape[0]} rows of probabilities")
        if self.parents is not None:
            problem = parents_problem(self.parents, len(self.tokens))
            if problem is not None:
                raise ValueError(f"a tree proposal {problem}")
            if self.probs is not None:
                raise ValueError("a tree proposal carries no draft probabilities: trees are verified greedily only")

    @property
    def is_tree(self) -> bool:
        """Whether some token has a sibling (a tree that is not just a chain)."""
        return self.parents is not None and any(p != i - 1 for i, p in enumerate(self.parents))

    def first_path(self) -> Proposal:
        """The chain of first children from the root (the proposers list a node's likeliest child
        first): a tree's best guess where only a chain can be verified."""
        if self.parents is None:
            return self
        path, node = [], -1
        while (node := next((i for i, p in enumerate(self.parents) if p == node), None)) is not None:
            path.append(self.tokens[node])
        return Proposal(path)


class Proposer(Protocol):
    """Guesses up to ``k`` next tokens of a sequence (see the module docstring)."""

    #: "prompt_lookup" | "draft" | "self_draft" | "medusa" | "eagle". A proposer reading the
    #: target's hidden states (Medusa, EAGLE) also has ``needs_hidden = True`` and ``observe(seq_id,
    #: length, hidden)``: after each target step, ``hidden`` [n, hidden] are the states whose logits
    #: chose the sequence's tokens ``length - n .. length - 1`` (every token the step emitted: EAGLE
    #: keeps a feature per position; Medusa reads the last).
    name: str

    def propose(self, seq_id: Hashable, tokens: Sequence[int], k: int, params: SamplingParams) -> Proposal:
        """0..k tokens continuing ``tokens`` (the sequence so far: prompt + output)."""
        ...

    def release(self, seq_id: Hashable) -> None:
        """The sequence ended: drop what was kept for it."""
        ...


def make_proposer(compiled: CompiledModel, method: str, config: Config) -> tuple[Proposer | None, str]:
    """The proposer for ``method`` on ``compiled`` ("auto" and "prompt_lookup": n-gram lookup;
    "draft": ``config.draft_model``, or the self-draft without one; "self_draft"), or ``(None,
    why not)``: the caller then decodes without speculation and records the reason."""
    from ...errors import InferccError

    if method in ("auto", "prompt_lookup"):
        from .prompt_lookup import PromptLookup

        # Matches of 2..3 tokens: a lone token's earlier continuation is right too rarely to pay for
        # its verified positions (on SmolLM2's greedy text, grounded and chat prompts alike, the
        # proposals of 1-token matches lowered the tokens per unit of step cost by 3-8%).
        return PromptLookup(max_ngram=3, min_ngram=2), "prompt lookup: n-gram match in the prompt and output"
    if method == "medusa":  # missing heads: (None, why); a heads file that does not fit: HeadsError
        from .medusa import make_medusa

        return make_medusa(compiled, config)
    if method == "eagle":  # the same: (None, why) for a missing draft, HeadsError for a bad one
        from .eagle import make_eagle

        return make_eagle(compiled, config)
    try:
        if method == "draft" and config.draft_model is not None:
            from .draft import load_draft

            return load_draft(compiled, config)
        if method in ("draft", "self_draft"):
            from .self_draft import make_self_draft

            return make_self_draft(compiled, config)
    except InferccError as exc:  # a draft that does not load or compile: decode plainly, say why
        return None, f"{method}: {exc}"
    return None, f"unknown speculation method {method!r}; known: {list(METHODS)}"
