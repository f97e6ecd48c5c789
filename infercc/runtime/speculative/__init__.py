"""Speculative decoding (issue 13): proposers guess tokens, the target verifies them in one step.

proposer.py (the door: Proposal, Proposer, make_proposer), prompt_lookup.py (n-gram lookup),
draft.py (a separately compiled draft model), self_draft.py (the target's first layers),
medusa.py (heads on the target's final hidden state; heads.py: their file layout and forward pass),
verify.py (greedy and rejection-sampling verification), policy.py (depth per sequence, stats),
loop.py (the single-sequence speculative generation loop).
"""

from .policy import DepthPolicy, SpeculationStats
from .proposer import Proposal, Proposer, make_proposer
from .verify import verify

__all__ = ["DepthPolicy", "Proposal", "Proposer", "SpeculationStats", "make_proposer", "verify"]
