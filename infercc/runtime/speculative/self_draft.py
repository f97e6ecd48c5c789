"""The self-speculative draft (placeholder until the proposer lands)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...compiled import CompiledModel
    from ...config import Config
    from .proposer import Proposer


def make_self_draft(compiled: CompiledModel, config: Config) -> tuple[Proposer | None, str]:
    return None, "self_draft: the self-speculative draft is not implemented yet"
