"""The ``kv_cache_layout="contiguous"`` runner and its memory accounting: the engine's fallback room.

``ContiguousRunner`` has the paged runner's door (runtime/paged_runner.py: ``step(rows)`` -> each
row's last-token logits, ``copy_blocks``, ``release``) over what generation used before the paged
cache: one ``ModelRunner`` and one batch-1 ``KVCache`` per sequence, keyed by the engine's sequence
id. It runs when the layout is "contiguous", and for a graph without a KV cache (nothing to page:
each step recomputes the sequence).

Each row is stepped alone, on its own cache. That is always correct (no padding, no shared
buffers) and it is the baseline the paged layout is measured against; batching rows into one run
is the paged runner's job, not this one's. Block tables are ignored: each sequence's K/V live in
its own buffer.

``ReservedBlocks`` is the contiguous layout's answer to the block manager's door: what a contiguous
cache costs is a buffer that may grow to the model's whole context, so each sequence reserves
max-context tokens of the pool when it is admitted (rounded up to whole blocks), never less, and
nothing is shared (no prefix caching, no copy-on-write). The engine sizes the pool the same way for
both layouts, so the number of sequences that fit at once is the comparison.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..errors import InferccError, InputError
from .block_manager import BlockReport, OutOfBlocks
from .kv_cache import CacheSpec, KVCache
from .model_runner import ModelRunner

if TYPE_CHECKING:
    from ..compiled import CompiledModel

#: What one token costs a graph without a KV cache: the int64 id and mask the runner keeps.
UNCACHED_BYTES_PER_TOKEN = 16


class Row(Protocol):
    seq_id: Hashable
    tokens: list[int]
    start: int
    block_table: list[int]
    num_logits: int


class ContiguousRunner:
    """One cache per sequence, each row stepped alone (see the module docstring)."""

    form = "contiguous"

    def __init__(self, compiled: CompiledModel, num_blocks: int, block_size: int,
                 max_context: int | None = None) -> None:
        self.runner = ModelRunner(compiled.backend, compiled.model, max_context)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.bytes_per_block = self.bytes_per_token(compiled) * block_size
        self.caches: dict[Hashable, KVCache] = {}
        self.last_hidden: np.ndarray | None = None

    @staticmethod
    def bytes_per_token(compiled: CompiledModel) -> int:
        """K+V bytes of one token over all layers (a graph without a cache: its token record)."""
        spec = CacheSpec.from_model(compiled.model)
        return spec.bytes_per_token if spec else UNCACHED_BYTES_PER_TOKEN

    def step(self, rows: Sequence[Row]) -> np.ndarray:
        """Feed each row's new tokens to its own cache; float32 logits of each row's last
        ``num_logits`` tokens (default 1), stacked [sum(num_logits), vocab]. A row that starts
        before its cache's end rolls the cache back to ``start`` first (rejected speculation)."""
        out: list[np.ndarray] = []
        hidden: list[np.ndarray] | None = [] if self.runner.has_hidden else None
        for row in rows:
            cache = self.caches.get(row.seq_id)
            if cache is None:
                cache = self.caches[row.seq_id] = self.runner.new_cache(1)
            if cache.length < row.start:
                raise InferccError(
                    f"internal error: sequence {row.seq_id!r} has {cache.length} cached tokens but the step starts it "
                    f"at {row.start}; a preempted or ended sequence must be released before it runs again")
            cache.truncate(row.start)
            keep = row.num_logits
            if keep == 1:
                out.append(self.runner.step(cache, [row.tokens], hidden=hidden)[0][None])
            else:
                out.append(self.runner.step(cache, [row.tokens], all_logits=True, hidden=hidden)[0, -keep:])
            if hidden:
                hidden[-1] = hidden[-1][0][None] if keep == 1 else hidden[-1][0, -keep:]
        if not out:
            raise InputError("nothing to run: the step has no rows")
        #: The step's final hidden states, rows as its logits (graphs exposing them only).
        self.last_hidden = np.concatenate(hidden) if hidden else None
        return np.concatenate(out).astype(np.float32, copy=False)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Nothing is shared between contiguous caches, so there is never anything to copy."""

    def release(self, seq_id: Hashable) -> None:
        """The sequence ended or was preempted: its buffers go now (a later step starts it anew)."""
        cache = self.caches.pop(seq_id, None)
        if cache is not None:
            cache.free()

    @property
    def memory_bytes(self) -> int:
        """Bytes the live caches hold now (what the reservation stands for)."""
        return sum(c.nbytes for c in self.caches.values())


class ReservedBlocks:
    """The block manager's door for the contiguous layout: each sequence reserves ``reserve``
    tokens' worth of blocks when allocated, and appends within it need nothing more."""

    def __init__(self, num_blocks: int, block_size: int, reserve: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.per_sequence = -(-reserve // block_size)
        self._free = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[Hashable, list[int]] = {}
        self._tokens: dict[Hashable, int] = {}

    def can_allocate(self, prompt: Sequence[int], salt: bytes = b"") -> bool:
        return len(prompt) <= self.per_sequence * self.block_size and len(self._free) >= self.per_sequence

    def allocate(self, seq_id: Hashable, prompt: Sequence[int], salt: bytes = b"") -> int:
        """Reserve a whole sequence's blocks; returns 0 (nothing is ever cached)."""
        if seq_id in self._tables:
            raise InputError(f"sequence {seq_id!r} already holds blocks; free it first")
        if not self.can_allocate(prompt):
            raise OutOfBlocks(f"{self.per_sequence} blocks for sequence {seq_id!r} (a contiguous reservation) but "
                              f"{len(self._free)} are free")
        self._tables[seq_id] = [self._free.pop() for _ in range(self.per_sequence)]
        self._tokens[seq_id] = len(prompt)
        return 0

    def can_append(self, seq_id: Hashable, n: int = 1) -> bool:
        return self.num_tokens(seq_id) + n <= self.per_sequence * self.block_size

    def append(self, seq_id: Hashable, tokens: Sequence[int]) -> list[tuple[int, int]]:
        if not self.can_append(seq_id, len(tokens)):
            raise OutOfBlocks(f"sequence {seq_id!r} would outgrow its reservation of "
                              f"{self.per_sequence * self.block_size} tokens")
        self._tokens[seq_id] += len(tokens)
        return []

    def computed(self, seq_id: Hashable, num_tokens: int) -> None:
        self.num_tokens(seq_id)  # (checks the id) nothing is cached for reuse

    def truncate(self, seq_id: Hashable, num_tokens: int) -> None:
        """Keep the first ``num_tokens`` tokens; the reservation stays whole."""
        length = self.num_tokens(seq_id)
        if not 0 < num_tokens <= length:
            raise InputError(f"cannot truncate sequence {seq_id!r} of {length} tokens to {num_tokens}; "
                             f"keep 1..{length}")
        self._tokens[seq_id] = num_tokens

    def free(self, seq_id: Hashable) -> None:
        self.num_tokens(seq_id)
        self._free.extend(reversed(self._tables.pop(seq_id)))
        del self._tokens[seq_id]

    def block_table(self, seq_id: Hashable) -> list[int]:
        self.num_tokens(seq_id)
        return list(self._tables[seq_id])

    def num_tokens(self, seq_id: Hashable) -> int:
        try:
            return self._tokens[seq_id]
        except KeyError:
            raise InputError(f"unknown sequence {seq_id!r}: it holds no blocks") from None

    def report(self) -> BlockReport:
        used = self.num_blocks - len(self._free)
        tokens = sum(self._tokens.values())
        return BlockReport(total=self.num_blocks, free=len(self._free), cached=0, used=used, tokens=tokens,
                           waste=1 - tokens / (used * self.block_size) if used else 0.0,
                           prefix_queries=0, prefix_hits=0)
