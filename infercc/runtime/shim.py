"""TEMPORARY stand-ins for the block manager's and paged runner's doors until those modules land
on main (then this file goes and imports come from runtime/block_manager.py, runtime/paged_runner.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable

from ..errors import InferccError

try:
    from .block_manager import BlockManager, BlockReport, OutOfBlocks  # noqa: F401
except ImportError:
    BlockManager = None  # type: ignore[assignment,misc]

    class OutOfBlocks(InferccError):  # type: ignore[no-redef]
        """The pool cannot hold it; the manager's state is unchanged."""

    @dataclasses.dataclass(frozen=True)
    class BlockReport:  # type: ignore[no-redef]
        total: int
        free: int
        cached: int
        used: int
        tokens: int
        waste: float
        prefix_queries: int
        prefix_hits: int

try:
    from .paged_runner import PagedRow, PagedRunner  # noqa: F401
except ImportError:
    PagedRunner = None  # type: ignore[assignment,misc]

    @dataclasses.dataclass
    class PagedRow:  # type: ignore[no-redef]
        seq_id: Hashable
        tokens: list[int]
        start: int
        block_table: list[int]
