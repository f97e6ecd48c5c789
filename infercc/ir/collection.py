"""Fewer cyclic garbage collections while the IR is built and rewritten.

Why: the IR is made of reference cycles (a value points to its producer, the producer to its
outputs; a value to its users and back), and a compile makes tens of thousands of such objects (the
import, one snapshot per pass for its rollback, the exports for shape inference). At Python's default
threshold (a young collection every 700 allocations, an older one every 10 of those) the collector
runs thousands of times per compile and rescans the growing graph each time: 15-25% of a compile's
CPU time on the test fixtures. The passes' garbage is still collected (later and in bigger batches),
and the process's own threshold is restored when the outermost compile ends.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: Allocations between young collections while compiling (Python's default is 700), and young
#: collections per older one (default 10): a compile then triggers a few dozen collections.
YOUNG = 20_000
OLDER = 20

_lock = threading.Lock()
_depth = 0
_saved: tuple[int, ...] = ()


@contextmanager
def fewer_collections() -> Iterator[None]:
    """Raise the collector's thresholds for the duration. Nested and concurrent uses share one
    raise; the last one out restores the thresholds the process had before the first came in."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = gc.get_threshold()
            first, *rest = _saved
            if first:  # a threshold of 0 means the process turned collection off: leave it so
                gc.set_threshold(max(first, YOUNG), *(max(r, OLDER) for r in rest))
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved[0]:
                gc.set_threshold(*_saved)
