"""TEMPORARY stand-in for the paged runner's door until runtime/paged_runner.py lands on main
(then this file goes and the engine imports from it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable

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
