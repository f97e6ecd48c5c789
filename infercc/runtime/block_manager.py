"""The paged KV cache's block manager: which pool blocks each sequence owns, shares and may reuse.

The pool is ``num_blocks`` blocks of ``block_size`` token slots each (the runner owns the tensors;
this module only hands out block numbers). Every sequence has a block table covering its tokens,
``ceil(num_tokens / block_size)`` blocks; token ``p`` lives in slot ``table[p // bs] * bs + p % bs``.

Why ref counts and copy-on-write: ``fork`` (parallel sampling, ``n > 1``) lets a child share all of
its parent's blocks instead of copying them. A full block is never written again, so it stays
shared for good; a partially filled shared last block is copied to a fresh block by the first
``append`` that would write into it, and the (src, dst) pair goes to the runner to copy in the pool.

Why prefix caching (vLLM v1's design): a full block whose K/V are computed is keyed by a digest of
(its parent block's digest, its token ids), so the key names the whole prefix up to the block's
end. ``allocate`` walks a new prompt's full blocks and reuses cached ones up to the first miss.
When its last reference goes, a keyed block is not freed but parked in an LRU set: still
findable, evicted (key dropped) only when no truly free block is left. A sequence frees its
blocks tail first, so a prefix's deeper blocks are evicted before the blocks they depend on.
The digest is SHA-256, not Python's ``hash``: prompts come from users, and a crafted collision
would serve one request another request's K/V.

Every call that raises ``OutOfBlocks`` checks before it mutates, so the manager's state is
exactly what it was: the scheduler can try, fail, preempt and try again.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Sequence

from ..errors import ConfigError, InferccError, InputError


class OutOfBlocks(InferccError):
    """The pool cannot hold the request now; the manager's state is unchanged (preempt or wait)."""


@dataclasses.dataclass(frozen=True)
class BlockReport:
    """Pool occupancy at one moment; ``free + cached + used == total``."""

    total: int
    free: int             # empty blocks
    cached: int           # unreferenced blocks kept for prefix reuse (evictable)
    used: int             # blocks referenced by at least one live sequence
    tokens: int           # tokens held by live sequences (a forked prefix counts once per sequence)
    waste: float          # fraction of used blocks' slots holding no token (each block counted once)
    prefix_queries: int   # prompt tokens looked up in the prefix cache
    prefix_hits: int      # of those, tokens found cached

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def __str__(self) -> str:
        return (f"KV blocks {self.total}: {self.used} used, {self.cached} cached, {self.free} free; "
                f"{self.tokens} tokens, waste {self.waste:.1%}; prefix hits {self.prefix_hits}/"
                f"{self.prefix_queries} tokens ({self.hit_rate:.1%})")


def _digest(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a full block: its parent's key (fixed 32 bytes, so the encoding is unambiguous)
    followed by its token ids."""
    return hashlib.sha256(parent + ",".join(map(str, tokens)).encode()).digest()


_ROOT = b""


def _root(salt: bytes) -> bytes:
    """The parent key of a sequence's first block: empty for the base model, else a digest of the
    salt (a LoRA adapter's identity), so blocks computed under different adapters never share keys."""
    return hashlib.sha256(b"infercc-salt:" + salt).digest() if salt else _ROOT


class BlockManager:
    """Hands out pool blocks to sequences; single-threaded (the engine's step loop owns it)."""

    def __init__(self, num_blocks: int, block_size: int = 16, *, prefix_caching: bool = True) -> None:
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"BlockManager {name} must be an integer >= 1, got {value!r}; size the pool "
                                  "with Config.kv_cache_memory and Config.kv_block_size")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))   # a stack: pop() gives 0, 1, ... first
        self._evictable: OrderedDict[int, None] = OrderedDict()       # ref 0 and keyed; oldest first
        self._refs = [0] * num_blocks
        self._key: list[bytes | None] = [None] * num_blocks          # a block's prefix-cache key, if cached
        self._cache: dict[bytes, int] = {}                            # key -> block
        self._tables: dict[Hashable, list[int]] = {}
        self._tokens: dict[Hashable, list[int]] = {}
        self._computed: dict[Hashable, int] = {}                      # tokens whose K/V are written
        self._digests: dict[Hashable, list[bytes]] = {}               # keys of its computed full blocks
        self._roots: dict[Hashable, bytes] = {}                       # a salted sequence's first parent key
        self._queries = 0
        self._hits = 0

    # -- sizing helpers for the scheduler ---------------------------------------------------------
    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens (ceil division)."""
        return -(-num_tokens // self.block_size)

    def num_free(self) -> int:
        """Blocks an allocation may take now: the empty ones plus the evictable cached ones."""
        return len(self._free) + len(self._evictable)

    # -- allocation -------------------------------------------------------------------------------
    def _plan(self, prompt: Sequence[int], salt: bytes = b"") -> tuple[list[int], list[bytes], int]:
        """The cached blocks ``prompt`` would reuse, their keys, and the fresh blocks it needs more;
        OutOfBlocks when the pool cannot give them."""
        if len(prompt) == 0:
            raise InputError("BlockManager.allocate: the prompt is empty; a sequence needs at least one token")
        hits: list[int] = []
        keys: list[bytes] = []
        if self.prefix_caching:
            parent, bs = _root(salt), self.block_size
            for i in range((len(prompt) - 1) // bs):        # >= 1 token is left to compute (its logits)
                parent = _digest(parent, prompt[i * bs:(i + 1) * bs])
                block = self._cache.get(parent)
                if block is None:
                    break
                hits.append(block)
                keys.append(parent)
        fresh = self.blocks_needed(len(prompt)) - len(hits)
        available = self.num_free() - sum(1 for b in hits if b in self._evictable)
        if fresh > available:
            never = self.blocks_needed(len(prompt)) > self.num_blocks
            fix = ("it can never fit: shorten the prompt or raise Config.kv_cache_memory" if never else
                   "finish or preempt a sequence, or raise Config.kv_cache_memory")
            raise OutOfBlocks(f"a prompt of {len(prompt)} tokens needs {fresh} more KV blocks, {available} of "
                              f"{self.num_blocks} are free; {fix}")
        return hits, keys, fresh

    def can_allocate(self, prompt: Sequence[int], salt: bytes = b"") -> bool:
        try:
            self._plan(prompt, salt)
        except OutOfBlocks:
            return False
        return True

    def _take(self) -> int:
        """One block for writing: a truly free one first, else evict the least recently used cached one."""
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._cache[self._key[block]]
            self._key[block] = None
        self._refs[block] = 1
        return block

    def allocate(self, seq_id: Hashable, prompt: Sequence[int], salt: bytes = b"") -> int:
        """Blocks for a new sequence's whole prompt; returns how many leading prompt tokens are
        already cached (a multiple of block_size, < len(prompt)): the runner starts there. ``salt``
        (a LoRA adapter's identity) keys its blocks apart: only sequences of the same salt share."""
        if seq_id in self._tables:
            raise InputError(f"BlockManager.allocate: sequence {seq_id!r} already has blocks; free() it first "
                             "or use a new sequence id")
        hits, keys, fresh = self._plan(prompt, salt)
        if salt:
            self._roots[seq_id] = _root(salt)
        for block in hits:
            self._refs[block] += 1
            self._evictable.pop(block, None)
        self._tables[seq_id] = hits + [self._take() for _ in range(fresh)]
        self._tokens[seq_id] = list(prompt)
        cached = len(hits) * self.block_size
        self._computed[seq_id] = cached
        self._digests[seq_id] = keys
        if self.prefix_caching:
            self._queries += len(prompt)
            self._hits += cached
        return cached

    def _seq(self, seq_id: Hashable, where: str) -> list[int]:
        table = self._tables.get(seq_id)
        if table is None:
            raise InputError(f"BlockManager.{where}: unknown sequence {seq_id!r}; allocate() it first (was it "
                             "freed or never added?)")
        return table

    def _append_plan(self, seq_id: Hashable, n: int, where: str) -> tuple[int, bool]:
        """Fresh blocks that ``n`` more tokens need, and whether the last block must be copied first."""
        table = self._seq(seq_id, where)
        length = len(self._tokens[seq_id])
        fresh = self.blocks_needed(length + n) - len(table)
        cow = n > 0 and length % self.block_size != 0 and self._refs[table[-1]] > 1
        return fresh, cow

    def can_append(self, seq_id: Hashable, n: int = 1) -> bool:
        fresh, cow = self._append_plan(seq_id, n, "can_append")
        return fresh + cow <= self.num_free()

    def append(self, seq_id: Hashable, tokens: Sequence[int]) -> list[tuple[int, int]]:
        """Room for ``tokens`` at the end of the sequence; returns copy-on-write (src, dst) pairs
        the runner copies in the pool BEFORE the step that writes these tokens."""
        fresh, cow = self._append_plan(seq_id, len(tokens), "append")
        if fresh + cow > self.num_free():
            raise OutOfBlocks(f"sequence {seq_id!r} needs {fresh + cow} more KV blocks, {self.num_free()} are "
                              "free; preempt a sequence or raise Config.kv_cache_memory")
        table = self._tables[seq_id]
        pairs: list[tuple[int, int]] = []
        if cow:
            src = table[-1]
            self._refs[src] -= 1                  # still >= 1: another sequence holds it
            table[-1] = self._take()
            pairs.append((src, table[-1]))
        elif tokens and len(self._tokens[seq_id]) % self.block_size:
            self._unkey(table[-1])                # written now: a key it kept while shared no longer holds
        table.extend(self._take() for _ in range(fresh))
        self._tokens[seq_id].extend(tokens)
        return pairs

    def computed(self, seq_id: Hashable, num_tokens: int) -> None:
        """The first ``num_tokens`` tokens of the sequence hold K/V now; its full blocks among them
        become reusable by later prompts. Never goes backwards (a smaller count is a no-op)."""
        self._seq(seq_id, "computed")
        tokens = self._tokens[seq_id]
        if not 0 <= num_tokens <= len(tokens):
            raise InputError(f"BlockManager.computed: sequence {seq_id!r} has {len(tokens)} tokens, cannot "
                             f"mark {num_tokens} computed; pass a count in [0, num_tokens]")
        self._computed[seq_id] = max(self._computed[seq_id], num_tokens)
        if not self.prefix_caching:
            return
        digests, table, bs = self._digests[seq_id], self._tables[seq_id], self.block_size
        for i in range(len(digests), self._computed[seq_id] // bs):
            key = _digest(digests[-1] if digests else self._roots.get(seq_id, _ROOT), tokens[i * bs:(i + 1) * bs])
            digests.append(key)
            block = table[i]
            # a key cached already (an identical prompt computed alongside) keeps its first block;
            # this one stays an ordinary block, freed when its sequence ends
            if key not in self._cache and self._key[block] is None:
                self._cache[key] = block
                self._key[block] = key

    def truncate(self, seq_id: Hashable, num_tokens: int) -> None:
        """Keep the sequence's first ``num_tokens`` tokens and drop the rest (rejected speculated
        tokens, a rewind): blocks past the new end lose this reference (freed, or parked when
        cached: their K/V still match their key); a kept last block that is cached and will be
        written again leaves the prefix cache, since its slots are about to change (a shared one is
        copied on the next ``append`` instead, as any shared last block is; one that the other
        holders left meanwhile leaves the cache when ``append`` writes into it)."""
        table = self._seq(seq_id, "truncate")
        tokens = self._tokens[seq_id]
        if not 0 < num_tokens <= len(tokens):
            raise InputError(f"BlockManager.truncate: sequence {seq_id!r} has {len(tokens)} tokens, cannot keep "
                             f"{num_tokens}; pass a count in 1..{len(tokens)}")
        keep = self.blocks_needed(num_tokens)
        for block in reversed(table[keep:]):
            self._release(block)
        del table[keep:]
        del tokens[num_tokens:]
        bs = self.block_size
        self._computed[seq_id] = min(self._computed[seq_id], num_tokens)
        del self._digests[seq_id][num_tokens // bs:]
        if num_tokens % bs and self._refs[table[-1]] == 1:
            self._unkey(table[-1])

    def _unkey(self, block: int) -> None:
        """A referenced block leaves the prefix cache (its slots are about to be written)."""
        if self._key[block] is not None:
            del self._cache[self._key[block]]
            self._key[block] = None

    def _release(self, block: int) -> None:
        """Drop one reference; at zero a cached block is parked (evictable), any other freed."""
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if self._key[block] is not None:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def fork(self, parent: Hashable, child: Hashable) -> None:
        """``child`` shares all of ``parent``'s blocks and tokens (copy-on-write on append)."""
        table = self._seq(parent, "fork")
        if child in self._tables:
            raise InputError(f"BlockManager.fork: child sequence {child!r} already exists; fork into a new id")
        for block in table:
            self._refs[block] += 1
        self._tables[child] = list(table)
        self._tokens[child] = list(self._tokens[parent])
        self._computed[child] = self._computed[parent]
        self._digests[child] = list(self._digests[parent])
        if parent in self._roots:
            self._roots[child] = self._roots[parent]

    def free(self, seq_id: Hashable) -> None:
        """Drop the sequence (finished, aborted or preempted). A block whose last reference goes is
        parked for reuse when it is cached, else freed; tail blocks first, so they are evicted first."""
        table = self._seq(seq_id, "free")
        for block in reversed(table):
            self._release(block)
        for state in (self._tables, self._tokens, self._computed, self._digests):
            del state[seq_id]
        self._roots.pop(seq_id, None)

    # -- queries ----------------------------------------------------------------------------------
    def block_table(self, seq_id: Hashable) -> list[int]:
        """A copy of the sequence's block table."""
        return list(self._seq(seq_id, "block_table"))

    def num_tokens(self, seq_id: Hashable) -> int:
        self._seq(seq_id, "num_tokens")
        return len(self._tokens[seq_id])

    def slot(self, seq_id: Hashable, position: int) -> int:
        """The pool slot of the sequence's token at ``position``."""
        table = self._seq(seq_id, "slot")
        if not 0 <= position < len(self._tokens[seq_id]):
            raise InputError(f"BlockManager.slot: position {position} is outside sequence {seq_id!r}'s "
                             f"{len(self._tokens[seq_id])} tokens; append() the token first")
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def report(self) -> BlockReport:
        """Counts for logs and metrics; O(blocks in use)."""
        filled: dict[int, int] = {}
        bs = self.block_size
        for seq_id, table in self._tables.items():
            length = len(self._tokens[seq_id])
            for i, block in enumerate(table):
                filled[block] = max(filled.get(block, 0), min(bs, length - i * bs))
        used = len(filled)
        return BlockReport(
            total=self.num_blocks, free=len(self._free), cached=len(self._evictable), used=used,
            tokens=sum(len(t) for t in self._tokens.values()),
            waste=1.0 - sum(filled.values()) / (used * bs) if used else 0.0,
            prefix_queries=self._queries, prefix_hits=self._hits,
        )
