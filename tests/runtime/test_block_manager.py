"""The paged KV cache's block manager: each door and error, prefix reuse and its last-token cap,
copy-on-write after fork, LRU eviction order, all-or-nothing OutOfBlocks, the report, and random
operation sequences checked step by step against a model of what the pool must hold."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from infercc.errors import ConfigError, InferccError, InputError
from infercc.runtime.block_manager import BlockManager, BlockReport, OutOfBlocks


def snapshot(bm: BlockManager) -> tuple:
    """Everything a failed call must leave untouched (public report and tables plus the private
    free list, LRU order, ref counts and prefix table)."""
    seqs = {sid: (bm.block_table(sid), bm.num_tokens(sid)) for sid in bm._tables}
    return (bm.report(), seqs, list(bm._free), list(bm._evictable), list(bm._refs), dict(bm._cache),
            dict(bm._computed), {sid: list(d) for sid, d in bm._digests.items()})


def run(bm: BlockManager, seq_id, prompt) -> int:
    """Allocate and mark the whole prompt computed, as a finished prefill does."""
    cached = bm.allocate(seq_id, prompt)
    bm.computed(seq_id, len(prompt))
    return cached


# -- basic doors --------------------------------------------------------------------------------
def test_allocate_append_slots_and_report():
    bm = BlockManager(8, 4)
    assert bm.allocate("a", [1, 2, 3, 4, 5]) == 0
    table = bm.block_table("a")
    assert len(table) == 2 and len(set(table)) == 2 and bm.num_tokens("a") == 5
    assert [bm.slot("a", p) for p in (0, 3, 4)] == [table[0] * 4, table[0] * 4 + 3, table[1] * 4]
    assert bm.append("a", [6, 7, 8]) == [] and bm.block_table("a") == table   # fills block 1, no new one
    assert bm.append("a", [9]) == [] and len(bm.block_table("a")) == 3
    report = bm.report()
    assert (report.total, report.used, report.free, report.cached, report.tokens) == (8, 3, 5, 0, 9)
    assert report.waste == pytest.approx(1 - 9 / 12)
    bm.block_table("a").append(99)                                             # a copy: no effect
    assert len(bm.block_table("a")) == 3
    bm.free("a")
    assert bm.report().free == 8 and bm.num_free() == 8


def test_blocks_needed_and_can_append():
    bm = BlockManager(2, 4)
    assert [bm.blocks_needed(n) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]
    bm.allocate("a", [1, 2, 3])
    assert bm.can_append("a", 5) and not bm.can_append("a", 6)
    assert bm.can_allocate([1] * 4) and not bm.can_allocate([1] * 5)
    with pytest.raises(OutOfBlocks, match="needs 2 more KV blocks, 1 of 2 are free; finish or preempt"):
        bm.allocate("b", [1] * 5)
    with pytest.raises(OutOfBlocks, match="9 tokens needs 3 more KV blocks.*can never fit: shorten"):
        bm.allocate("b", [1] * 9)


@pytest.mark.parametrize("kwargs", [{"num_blocks": 0}, {"num_blocks": 4, "block_size": 0},
                                    {"num_blocks": 2.5}, {"num_blocks": True}])
def test_bad_sizes_are_config_errors(kwargs):
    with pytest.raises(ConfigError, match="integer >= 1.*kv_cache_memory"):
        BlockManager(**kwargs)


@pytest.mark.parametrize("call", [
    lambda bm: bm.append("ghost", [1]), lambda bm: bm.can_append("ghost"), lambda bm: bm.computed("ghost", 1),
    lambda bm: bm.fork("ghost", "c"), lambda bm: bm.free("ghost"), lambda bm: bm.block_table("ghost"),
    lambda bm: bm.num_tokens("ghost"), lambda bm: bm.slot("ghost", 0),
])
def test_unknown_sequence_is_named(call):
    bm = BlockManager(4, 4)
    with pytest.raises(InputError, match="unknown sequence 'ghost'; allocate"):
        call(bm)


def test_misuse_errors_name_the_sequence_and_fix():
    bm = BlockManager(4, 4)
    bm.allocate("a", [1, 2])
    before = snapshot(bm)
    with pytest.raises(InputError, match="sequence 'a' already has blocks; free"):
        bm.allocate("a", [3])
    with pytest.raises(InputError, match="child sequence 'a' already exists"):
        bm.fork("a", "a")
    with pytest.raises(InputError, match="prompt is empty"):
        bm.allocate("b", [])
    with pytest.raises(InputError, match="has 2 tokens, cannot mark 3 computed"):
        bm.computed("a", 3)
    with pytest.raises(InputError, match="position 2 is outside sequence 'a'"):
        bm.slot("a", 2)
    assert snapshot(bm) == before
    assert issubclass(OutOfBlocks, InferccError)


# -- prefix caching -----------------------------------------------------------------------------
PROMPT = list(range(100, 140))       # 40 tokens: 2 full blocks of 16 and 8 more


def test_identical_prompt_reuses_computed_full_blocks():
    bm = BlockManager(16, 16)
    assert bm.allocate("a", PROMPT) == 0
    assert bm.allocate("early", PROMPT) == 0          # nothing computed yet: nothing to reuse
    bm.computed("a", 20)                               # a chunked prefill: block 0 is done
    assert bm.allocate("b", PROMPT) == 16
    bm.computed("a", 40)
    assert bm.allocate("c", PROMPT) == 32
    a, c = bm.block_table("a"), bm.block_table("c")
    assert c[:2] == a[:2] and c[2] != a[2]
    report = bm.report()
    assert (report.prefix_queries, report.prefix_hits) == (160, 48)
    assert report.used == 3 + 3 + 2 + 1               # a, early, b's 2 fresh, c's 1 fresh


def test_shared_first_block_only_and_last_token_cap():
    bm = BlockManager(16, 16)
    run(bm, "a", PROMPT[:32])
    assert bm.allocate("first", PROMPT[:16] + [7] * 20) == 16       # diverges in block 1
    assert bm.allocate("same", PROMPT[:32]) == 16                   # both blocks cached, 1 token must run
    assert bm.allocate("longer", PROMPT[:33]) == 32
    assert bm.allocate("other", [7] + PROMPT[1:32]) == 0            # block 0 differs: the chain breaks
    # same tokens in block 1 behind a different block 0 is a different prefix
    assert bm.block_table("other")[1] != bm.block_table("a")[1]


def test_freed_blocks_stay_cached_until_evicted():
    bm = BlockManager(4, 16)
    run(bm, "a", PROMPT)
    bm.free("a")
    report = bm.report()
    assert (report.cached, report.free, report.used) == (2, 2, 0)   # the partial block is not cached
    assert bm.num_free() == 4
    assert run(bm, "b", PROMPT) == 32                                # revived from the LRU set
    assert bm.report().cached == 0
    bm.free("b")
    run(bm, "filler", [5] * 64)                                      # needs all 4 blocks: evicts both
    bm.free("filler")
    assert bm.allocate("c", PROMPT) == 0


def test_prefix_caching_off():
    bm = BlockManager(8, 16, prefix_caching=False)
    run(bm, "a", PROMPT)
    assert bm.allocate("b", PROMPT) == 0
    bm.computed("b", 40)
    bm.free("a")
    bm.free("b")
    report = bm.report()
    assert (report.free, report.cached, report.prefix_queries, report.prefix_hits) == (8, 0, 0, 0)


def test_duplicate_blocks_of_concurrent_identical_prompts():
    bm = BlockManager(8, 16)
    bm.allocate("a", PROMPT)
    bm.allocate("b", PROMPT)
    bm.computed("a", 40)
    bm.computed("b", 40)                 # same keys as a's blocks: b's stay ordinary blocks
    bm.free("b")
    assert bm.report().cached == 0 and bm.report().free == 5
    bm.free("a")
    assert bm.report().cached == 2
    assert bm.allocate("c", PROMPT) == 32


# -- copy-on-write ------------------------------------------------------------------------------
def test_fork_shares_blocks_and_copies_a_partial_last_block_once():
    bm = BlockManager(8, 4)
    run(bm, "p", [1, 2, 3, 4, 5, 6])
    bm.fork("p", "c")
    table = bm.block_table("p")
    assert bm.block_table("c") == table and bm.num_tokens("c") == 6
    assert bm.report().used == 2 and bm.report().tokens == 12
    pairs = bm.append("c", [7])
    child = bm.block_table("c")
    assert pairs == [(table[1], child[1])] and child[0] == table[0] and child[1] != table[1]
    assert bm.append("p", [8]) == [] and bm.block_table("p") == table   # p's last block is its own now
    bm.free("p")
    assert bm.block_table("c")[0] == table[0] and bm.report().used == 2


def test_fork_of_full_last_block_stays_shared():
    bm = BlockManager(8, 4)
    run(bm, "p", [1, 2, 3, 4])
    bm.fork("p", "c")
    assert bm.append("c", [5]) == [] and bm.append("p", [6]) == []
    assert bm.block_table("c")[0] == bm.block_table("p")[0]
    assert bm.report().used == 3
    assert bm.report().waste == pytest.approx(1 - 6 / 12)   # the shared block's slots count once


def test_fork_without_room_then_cow_is_out_of_blocks():
    bm = BlockManager(2, 4)
    run(bm, "p", [1, 2, 3, 4, 5])
    bm.fork("p", "c")                                      # forking needs no block
    assert not bm.can_append("c", 1)
    before = snapshot(bm)
    with pytest.raises(OutOfBlocks, match="needs 1 more KV blocks, 0 are free"):
        bm.append("c", [6])
    assert snapshot(bm) == before


# -- eviction order -----------------------------------------------------------------------------
def test_lru_evicts_tail_blocks_and_older_sequences_first():
    bm = BlockManager(6, 4)
    a, b = [1] * 12, [2] * 9
    run(bm, "a", a)
    run(bm, "b", b)                          # blocks: a 0 1 2, b 3 4 5(partial)
    bm.free("a")                             # LRU: 2 1 0 (tail first)
    bm.free("b")                             # LRU: 2 1 0 4 3; free: 5
    assert list(bm._evictable) == [2, 1, 0, 4, 3]
    run(bm, "x", [9] * 8)                    # takes the free 5, then evicts a's tail block 2
    assert bm.block_table("x") == [5, 2]
    assert bm.allocate("a2", a[:8] + [0]) == 8   # a's first two blocks survived; the fresh one evicts 4
    assert bm.block_table("a2") == [0, 1, 4]
    bm.free("a2")                            # 4 was never computed: free; a's 1 0 become the most recent
    bm.free("x")
    assert list(bm._evictable) == [3, 1, 0, 2, 5] and bm._free == [4]
    run(bm, "y", [8] * 8)                    # the free 4, then b's 3 (least recent) rather than a's
    assert bm.block_table("y") == [4, 3]
    assert bm.allocate("a3", a) == 8


# -- all or nothing -----------------------------------------------------------------------------
def test_allocate_does_not_count_its_own_hits_as_free():
    bm = BlockManager(3, 4)
    run(bm, "a", list(range(9)))             # blocks 0 1 keyed, 2 partial
    bm.free("a")
    prompt = list(range(8)) + [50] * 5       # 2 hits (both evictable) + 2 fresh; only 1 block is left
    assert bm.num_free() == 3 and not bm.can_allocate(prompt)
    before = snapshot(bm)
    with pytest.raises(OutOfBlocks, match="13 tokens needs 2 more KV blocks, 1 of 3"):
        bm.allocate("b", prompt)
    assert snapshot(bm) == before
    assert bm.allocate("b", prompt[:12]) == 8


def test_append_out_of_blocks_leaves_state():
    bm = BlockManager(3, 4)
    bm.allocate("a", [1] * 8)
    before = snapshot(bm)
    with pytest.raises(OutOfBlocks, match="sequence 'a' needs 2 more"):
        bm.append("a", [1] * 5)
    assert snapshot(bm) == before


def test_truncate_frees_tail_blocks_and_unkeys_a_rewritten_last_block():
    bm = BlockManager(8, 4)
    bm.allocate("a", list(range(10)))
    bm.computed("a", 10)                      # blocks 0 and 1 full and keyed, block 2 partial
    table = bm.block_table("a")
    bm.truncate("a", 6)                       # block 2 goes; block 1 is kept half and rewritten
    assert bm.block_table("a") == table[:2] and bm.num_tokens("a") == 6
    assert bm._key[table[1]] is None and bm._key[table[0]] is not None
    assert table[2] in bm._free
    assert bm.append("a", [99]) == []         # its own block: no copy
    with pytest.raises(InputError, match="pass a count in 1..7"):
        bm.truncate("a", 0)
    bm.fork("a", "b")
    bm.truncate("b", 5)                       # shared last block: copied on b's next append
    assert bm.append("b", [42]) == [(table[1], bm.block_table("b")[1])]


def test_a_truncated_block_shared_then_left_is_unkeyed_when_written():
    """Found by the state machine below: a block cut by truncate while shared keeps its key (the
    other holder's copy of it is full and valid); when the other holder leaves and this sequence
    writes into it, the key must go, or a later prompt with the old prefix reads the new K/V."""
    bm = BlockManager(8, 4)
    bm.allocate("a", [1, 2, 3, 4])
    bm.computed("a", 4)                       # block A keyed by [1, 2, 3, 4]
    block = bm.block_table("a")[0]
    bm.fork("a", "b")
    bm.append("a", [3])
    bm.truncate("a", 1)                       # a keeps A's first slot; A is still b's full block
    assert bm._key[block] is not None
    bm.free("b")                              # a alone holds A now
    assert bm.append("a", [3]) == []          # writes A's second slot: no copy, and no key
    assert bm._key[block] is None
    assert bm.allocate("c", [1, 2, 3, 4, 5]) == 0   # no stale hit on [1, 2, 3, 4]
    bm.computed("a", 2)
    assert bm.block_table("c")[0] != block


def test_report_string():
    bm = BlockManager(4, 16)
    run(bm, "a", PROMPT)
    bm.allocate("b", PROMPT)
    text = str(bm.report())
    assert text.startswith("KV blocks 4: 4 used, 0 cached, 0 free; 80 tokens")
    assert "prefix hits 32/80 tokens (40.0%)" in text
    assert isinstance(bm.report(), BlockReport)


# -- random operation sequences against a model of the pool -------------------------------------
BS, BLOCKS = 4, 8
#: Prompt starts that share whole blocks: a common first block, and a common second block behind a
#: different first one (the same tokens under another prefix must not hit).
BASES = [[], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [9, 9, 9, 9, 5, 6, 7, 8],
         [7, 7, 7, 7, 7, 7, 7, 7, 7, 7]]


class PoolMachine(RuleBasedStateMachine):
    """Drives a BlockManager and plays the runner: ``pool`` maps a slot to the prefix whose K/V it
    holds (tokens[:pos + 1]); after every step each sequence's computed positions must read back
    its own prefix, however blocks were shared, copied, cached or evicted."""

    prefix_caching = True

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(BLOCKS, BS, prefix_caching=self.prefix_caching)
        self.tokens: dict[int, list[int]] = {}
        self.done: dict[int, int] = {}
        self.pool: dict[int, tuple[int, ...]] = {}
        self.next_id = 0
        self.seen: list[tuple[list[int], Callable[[], int]]] = []

    def _pick(self, data) -> int | None:
        return data.draw(st.sampled_from(sorted(self.tokens))) if self.tokens else None

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    @rule(data=st.data(), base=st.sampled_from(BASES), suffix=st.lists(st.integers(0, 2), max_size=6))
    def allocate(self, data, base, suffix):
        must_hit = 0
        if self.seen and data.draw(st.booleans()):            # a prompt sharing a seen sequence's prefix
            src, keyed = data.draw(st.sampled_from(self.seen))
            base = src[:data.draw(st.integers(0, len(src)))]
            must_hit = min(keyed(), len(base) // BS)          # a live one's keyed blocks cannot be evicted
        prompt = base + suffix or [0]
        must_hit = min(must_hit, (len(prompt) - 1) // BS) * BS
        sid, before = self._new_id(), snapshot(self.bm)
        if not self.bm.can_allocate(prompt):
            with pytest.raises(OutOfBlocks):
                self.bm.allocate(sid, prompt)
            assert snapshot(self.bm) == before
            return
        cached = self.bm.allocate(sid, prompt)
        assert cached % BS == 0 and cached <= (len(prompt) - 1) // BS * BS
        assert cached == 0 or self.prefix_caching
        assert cached >= must_hit
        self._track(sid, list(prompt), cached)

    def _track(self, sid: int, tokens: list[int], done: int) -> None:
        """A new live sequence; ``seen`` keeps its token list (shared, so it grows) for later prompts,
        with how many of its leading blocks are in the prefix cache."""
        def keyed() -> int:
            if sid not in self.tokens:
                return 0
            table = self.bm.block_table(sid)
            return next((i for i, b in enumerate(table) if self.bm._key[b] is None), len(table))
        self.tokens[sid], self.done[sid] = tokens, done
        self.seen.append((tokens, keyed))

    @rule(data=st.data(), new=st.lists(st.integers(0, 2), min_size=1, max_size=6))
    def append(self, data, new):
        sid = self._pick(data)
        if sid is None:
            return
        self._append(sid, new)

    def _append(self, sid: int, new: list[int]) -> None:
        before = snapshot(self.bm)
        if not self.bm.can_append(sid, len(new)):
            with pytest.raises(OutOfBlocks):
                self.bm.append(sid, new)
            assert snapshot(self.bm) == before
            return
        for src, dst in self.bm.append(sid, new):
            assert self.bm._refs[src] >= 1 and self.bm._refs[dst] == 1
            for offset in range(BS):
                self.pool[dst * BS + offset] = self.pool.get(src * BS + offset, ())
        self.tokens[sid] += new

    @rule(data=st.data(), chunk=st.integers(1, 9))
    def compute(self, data, chunk):
        sid = self._pick(data)
        if sid is None:
            return
        self._compute(sid, chunk)

    def _compute(self, sid: int, chunk: int) -> None:
        tokens = self.tokens[sid]
        end = min(len(tokens), self.done[sid] + chunk)
        for pos in range(self.done[sid], end):
            self.pool[self.bm.slot(sid, pos)] = tuple(tokens[:pos + 1])
        self.done[sid] = end
        self.bm.computed(sid, end)

    @rule(data=st.data())
    def fork(self, data):
        sid = self._pick(data)
        if sid is None:
            return
        self._fork(sid)

    def _fork(self, sid: int) -> int:
        child = self._new_id()
        self.bm.fork(sid, child)
        self._track(child, list(self.tokens[sid]), self.done[sid])
        return child

    @rule(data=st.data(), a=st.integers(0, 2), b=st.integers(3, 5))
    def fork_and_diverge(self, data, a, b):
        """n > 1 sampling after prefill: the parent and its child each add a different token."""
        sid = self._pick(data)
        if sid is None:
            return
        self._compute(sid, 99)
        child = self._fork(sid)
        for seq, token in ((child, a), (sid, b)):
            if self.bm.can_append(seq, 1):
                self._append(seq, [token])
                self._compute(seq, 9)

    @rule(data=st.data())
    def truncate(self, data):
        """Speculated tokens rejected (or a rewind): the tail goes, the kept prefix reads back."""
        sid = self._pick(data)
        if sid is None:
            return
        keep = data.draw(st.integers(1, len(self.tokens[sid])))
        self.bm.truncate(sid, keep)
        del self.tokens[sid][keep:]                            # in place: ``seen`` shares the list
        self.done[sid] = min(self.done[sid], keep)

    @rule(data=st.data())
    def free(self, data):
        sid = self._pick(data)
        if sid is None:
            return
        self.bm.free(sid)
        del self.tokens[sid], self.done[sid]

    @invariant()
    def consistent(self):
        bm, holders = self.bm, [0] * BLOCKS
        for sid, tokens in self.tokens.items():
            table = bm.block_table(sid)
            assert len(table) == -(-len(tokens) // BS) == bm.blocks_needed(len(tokens))
            assert len(set(table)) == len(table) and bm.num_tokens(sid) == len(tokens)
            for block in table:
                holders[block] += 1
            for pos in range(self.done[sid]):
                assert self.pool.get(bm.slot(sid, pos)) == tuple(tokens[:pos + 1])
        assert bm._refs == holders
        free, cached = set(bm._free), set(bm._evictable)
        assert len(free) == len(bm._free) and not free & cached
        assert all(holders[b] == 0 and bm._key[b] is None for b in free)
        assert all(holders[b] == 0 and bm._key[b] is not None for b in cached)
        assert all(bm._cache[bm._key[b]] == b for b in range(BLOCKS) if bm._key[b] is not None)
        assert all(bm._key[b] == key for key, b in bm._cache.items())
        report = bm.report()
        assert report.free + report.cached + report.used == BLOCKS
        assert report.used == sum(1 for h in holders if h) and report.free == len(free)
        assert report.tokens == sum(map(len, self.tokens.values())) and 0 <= report.waste < 1
        assert bm.num_free() == report.free + report.cached

    def teardown(self):
        for sid in list(self.tokens):
            self.bm.free(sid)
        report = self.bm.report()
        assert (report.used, report.tokens, report.waste) == (0, 0, 0.0)
        assert report.free + report.cached == BLOCKS and all(r == 0 for r in self.bm._refs)
        assert report.cached == 0 or self.prefix_caching


class PoolMachineNoCache(PoolMachine):
    prefix_caching = False


# database=None: no .hypothesis folder left in the checkout; failures print their reproducing steps
_SETTINGS = settings(max_examples=60, stateful_step_count=30, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow])
TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = _SETTINGS
TestPoolMachineNoCache = PoolMachineNoCache.TestCase
TestPoolMachineNoCache.settings = _SETTINGS
