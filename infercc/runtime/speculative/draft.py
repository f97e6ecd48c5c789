"""A separately compiled draft model (placeholder until the proposer lands)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...compiled import CompiledModel
    from ...config import Config
    from .proposer import Proposer


def load_draft(compiled: CompiledModel, config: Config) -> tuple[Proposer | None, str]:
    return None, "draft: the draft-model proposer is not implemented yet"
