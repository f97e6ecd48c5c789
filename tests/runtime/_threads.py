"""Run one function in several threads started together (a barrier), as concurrent users would."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def together(work: Callable[[int], T], count: int) -> list[T]:
    """``work(i)`` for i in 0..count-1, each in its own thread, all released at once; the results
    in order, or the first error raised again here (a thread's exception would otherwise vanish)."""
    results: dict[int, T] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [results[i] for i in range(count)]
