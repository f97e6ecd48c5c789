"""A Session's paged KV pool: every sequence of the session is a sequence id in one block pool, and
the steps of several sequences run together.

Why a pool per session (issue 12): with one contiguous cache per sequence, ten sequences that share
a long system prompt hold and compute it ten times, and ten threads decoding ten sequences run ten
model calls per token. On the pool (the engine's rooms, runtime/engine.py):

* ``BlockManager`` (prefix caching on) books the blocks: a new sequence whose prompt starts with
  full blocks another sequence already computed reuses them and computes only the rest; ``fork``
  shares every block copy-on-write (parallel samples from one prompt).
* ``PagedRunner`` ("c-paged" on the generated-C runtime, "ort-gather" on ONNX Runtime) runs one
  step over rows of several sequences, whatever their lengths.

Batching (leader/follower): a thread feeding a sequence books its blocks under the pool's lock and
queues its row. If no step is running, it becomes the leader: it takes EVERY queued row, runs them
in one runner step with the lock released (so other threads queue meanwhile), then records the
result under the lock and wakes the others. A thread whose row another leader ran just returns its
logits; one whose row is still queued when the step ends leads the next step. A leader that finds
no row queued yet from some thread that fed in the last two steps waits up to ``BATCH_WAIT_S`` for
it (that thread is between two decodes: sampling, Python): without that, threads drift into
alternating half-full steps. So N threads decoding N sequences cost about one step per round, not
N; a single thread, even one stepping many sequences in turn, never waits (threads are awaited,
not sequences).

Copy-on-write copies are made at booking time, not by the leader: the destination is a fresh block
no one else holds and the source's slots that are copied (the shared tokens) are never written
again, so the copy is safe while another step runs, and a booking rolled back (a failed step, an
OutOfBlocks on a later sequence of ``session.decode``) still leaves its sequence's last block valid.

Every booking is undone when its step fails (``truncate`` to the tokens held before, or ``free``
for a new sequence): a failed feed leaves the sequence exactly as it was.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError
from .block_manager import BlockManager, BlockReport, OutOfBlocks
from .engine import pool_blocks
from .kv_cache import check_context
from .model_runner import ModelRunner, _ids
from .paged_runner import PagedRow, PagedRunner

if TYPE_CHECKING:
    from ..compiled import CompiledModel


#: Longest a leader waits for rows of the threads that fed the last steps (seconds).
BATCH_WAIT_S = 0.002


def check_pool_memory(memory: object) -> int:
    """A session's ``kv_cache_memory``, checked: bytes >= 0 (0 = auto)."""
    if not isinstance(memory, int) or isinstance(memory, bool) or memory < 0:
        raise ConfigError(f"session kv_cache_memory must be an integer number of bytes >= 0 (0 = auto), got "
                          f"{memory!r}; pass e.g. compiled.session(kv_cache_memory=64 << 20)")
    return memory


@dataclasses.dataclass(frozen=True)
class Feed:
    """One sequence's part of a step: ``tokens`` after the ``before`` tokens it holds."""

    seq_id: int
    before: int
    tokens: list[int]
    all_logits: bool = False
    #: The sequence's LoRA adapter (``infercc.lora.AdapterRef``) or None; its identity salts the
    #: prefix-cache keys, so only sequences of the same adapter share blocks.
    adapter: Any = None
    #: Trailing tokens that are speculated (a sequence's verify step): their logits come back too
    #: ([speculated + 1, vocab]) and they stay out of the prefix cache until ``keep`` says which
    #: of them stood (as the engine's rejected tokens never enter it).
    speculated: int = 0


@dataclasses.dataclass(eq=False)
class _Job:
    feed: Feed
    row: PagedRow
    thread: int = dataclasses.field(default_factory=threading.get_ident)
    logits: np.ndarray | None = None
    hidden: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False


class SessionPool:
    """The block pool, block manager and paged runner of one Session; thread-safe."""

    def __init__(self, compiled: CompiledModel, probe: ModelRunner, kv_cache_memory: int | None = None,
                 dead: list[int] | None = None) -> None:
        """``probe``: the session's ModelRunner (its context limit and vocabulary);
        ``kv_cache_memory``: pool bytes, default ``Config.kv_cache_memory`` (0 = auto, as the engine);
        ``dead``: ids of sequences dropped without close() (their finalizers append; freed here at
        the next booking -- a finalizer may run inside any thread, even one holding the lock)."""
        config = compiled.config
        memory = config.kv_cache_memory if kv_cache_memory is None else check_pool_memory(kv_cache_memory)
        self.block_size = block_size = config.kv_block_size
        self.bytes_per_block = PagedRunner.bytes_per_token(compiled) * block_size
        self.max_context = probe.max_context
        self.vocab_size = probe.vocab_size
        num_blocks = pool_blocks(memory, self.bytes_per_block, block_size, self.max_context)
        self.runner = PagedRunner(compiled, num_blocks, block_size)
        self.runner.max_context = self.max_context  # (a session's max_context overrides the model's)
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching=True)
        self._cond = threading.Condition()
        self._pending: list[_Job] = []
        self._busy = False
        self._known: set[int] = set()   # sequence ids the block manager holds
        self._dead = dead if dead is not None else []
        self._recent: deque[set[int]] = deque(maxlen=2)  # the threads that fed the last steps
        #: Runner steps so far, and tokens run through the model (prompt tokens served by the
        #: prefix cache are not): how much work the sessions' feeds cost.
        self.steps = 0
        self.computed_tokens = 0
        self.closed = False

    @property
    def form(self) -> str:
        return self.runner.form

    # -- booking ---------------------------------------------------------------------------------
    def _book(self, feed: Feed) -> _Job:
        """Blocks for ``feed`` (under the lock); the row to run. Nothing changes when it raises."""
        tokens, bm = feed.tokens, self.blocks
        check_context(feed.before + len(tokens), self.max_context)
        _ids(tokens, self.vocab_size)  # a bad id fails this feed alone, not the step it would join
        try:
            if feed.before == 0:
                # Logits of every position are asked for: none may be served from the prefix cache.
                bm.prefix_caching = not feed.all_logits
                try:
                    start = bm.allocate(feed.seq_id, tokens, feed.adapter.identity if feed.adapter else b"")
                finally:
                    bm.prefix_caching = True
                self._known.add(feed.seq_id)
            else:
                start = feed.before
                self.runner.copy_blocks(bm.append(feed.seq_id, tokens))
        except OutOfBlocks as exc:
            raise OutOfBlocks(
                f"the session's KV pool is full ({exc}): close() or reset() sequences that are no longer needed "
                f"(their blocks come back at once), or give sessions more memory with Config.kv_cache_memory or "
                f"compiled.session(kv_cache_memory=...) (now {bm.num_blocks} blocks x {self.bytes_per_block} "
                "bytes)") from None
        new = tokens[start - feed.before:]
        row = PagedRow(feed.seq_id, new, start, bm.block_table(feed.seq_id),
                       num_logits=len(new) if feed.all_logits else feed.speculated + 1, adapter=feed.adapter)
        return _Job(feed, row)

    def _undo(self, job: _Job) -> None:
        """Give back what ``_book`` took (under the lock)."""
        seq_id, before = job.feed.seq_id, job.feed.before
        if before == 0:
            self.blocks.free(seq_id)
            self._known.discard(seq_id)
        else:
            self.blocks.truncate(seq_id, before)

    def _drain_dead(self) -> None:
        while self._dead:
            self._release(self._dead.pop())

    def _release(self, seq_id: Hashable) -> None:
        if seq_id in self._known:
            self._known.discard(seq_id)
            self.blocks.free(seq_id)

    # -- the door for sequences ------------------------------------------------------------------
    def feed(self, feeds: list[Feed], hidden: list | None = None) -> list[np.ndarray]:
        """Run every feed in one step (joined by other threads' queued rows); each feed's logits:
        [vocab], or [tokens, vocab] with ``all_logits`` ([speculated + 1, vocab] for a verify
        step). On any error nothing is fed. ``hidden``: a list each feed's final hidden states (the
        rows of its logits; None when the graph does not expose them) are appended to."""
        with self._cond:
            self._check_open()
            self._drain_dead()
            jobs: list[_Job] = []
            try:
                for feed in feeds:
                    jobs.append(self._book(feed))
            except BaseException:
                for job in reversed(jobs):
                    self._undo(job)
                raise
            self._pending.extend(jobs)
            self._cond.notify_all()  # a leader may be waiting for these rows
            while not all(job.done for job in jobs):
                if self._busy:
                    self._cond.wait()
                    continue
                self._busy = True
                self._gather()
                batch, self._pending = self._pending, []
                self._recent.append({job.thread for job in batch})
                self._cond.release()
                try:
                    self._run(batch)
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self._record(batch)
                    self._cond.notify_all()
        for job in jobs:
            if job.error is not None:
                raise job.error
        if hidden is not None:
            hidden.extend(job.hidden for job in jobs)
        return [job.logits for job in jobs]  # type: ignore[misc]

    def _gather(self) -> None:
        """As the leader (under the lock): wait a little for rows of the threads that fed lately."""
        expect = set().union(*self._recent)
        deadline = time.monotonic() + BATCH_WAIT_S
        while not expect <= {job.thread for job in self._pending}:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _run(self, batch: list[_Job]) -> None:
        """One runner step over ``batch`` (the lock released); results or the error on each job."""
        try:
            logits = self.runner.step([job.row for job in batch])
        except BaseException as exc:  # each caller re-raises it; the leader's own call too
            for job in batch:
                job.error = exc
            return
        offset, hidden = 0, self.runner.last_hidden
        for job in batch:
            n = job.row.num_logits
            rows = slice(offset, offset + n) if job.feed.all_logits or job.feed.speculated else offset
            job.logits = logits[rows]
            job.hidden = None if hidden is None else hidden[rows]
            offset += n

    def _record(self, batch: list[_Job]) -> None:
        """Under the lock: the computed tokens enter the prefix cache, or failed bookings are undone."""
        ran = False
        for job in batch:
            if job.error is None:
                row = job.row
                self.blocks.computed(row.seq_id, row.start + len(row.tokens) - job.feed.speculated)
                self.computed_tokens += len(row.tokens)
                ran = True
            else:
                self._undo(job)
            job.done = True
        self.steps += ran

    def fork(self, parent: int, child: int) -> None:
        """``child`` shares every block of ``parent`` (copy-on-write on its next feed)."""
        with self._cond:
            self._check_open()
            self.blocks.fork(parent, child)
            self._known.add(child)

    def keep(self, seq_id: int, num_tokens: int) -> None:
        """Keep the sequence's first ``num_tokens`` tokens (its verified ones: they enter the prefix
        cache) and give back the slots and blocks of the rest (rejected or dropped speculated
        tokens), as the engine rolls a verify step back (``BlockManager.truncate``)."""
        with self._cond:
            self._check_open()
            if num_tokens < self.blocks.num_tokens(seq_id):
                self.blocks.truncate(seq_id, num_tokens)
            self.blocks.computed(seq_id, num_tokens)

    def release(self, seq_id: int) -> None:
        """The sequence was reset or closed: its blocks come back (cached ones stay findable)."""
        with self._cond:
            self._drain_dead()
            self._release(seq_id)

    # -- queries ---------------------------------------------------------------------------------
    def blocks_held(self, seq_id: int) -> int:
        with self._cond:
            return len(self.blocks.block_table(seq_id)) if seq_id in self._known else 0

    def report(self) -> BlockReport:
        with self._cond:
            return self.blocks.report()

    def close(self) -> None:
        """Drop the pool's arrays (the sequences are closed first by the session)."""
        with self._cond:
            self.closed = True
            for seq_id in list(self._known):
                self._release(seq_id)
            self.runner.pools = {}

    def _check_open(self) -> None:
        if self.closed:  # the session refuses first; this guards direct use
            from .session import CLOSED_HOW, SessionClosedError

            raise SessionClosedError(f"this session's KV pool is closed: {CLOSED_HOW}")
