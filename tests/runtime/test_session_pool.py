"""Sessions on the paged pool: sequences batch together (session.decode, concurrent threads), share
prefix blocks and fork copy-on-write, and every sequence still gives its tokens alone; a full pool,
dropped sequences and the other layouts are handled.

Models: the tiny random-weight LLaMA GGUF (context 1024) on ONNX Runtime ("ort-gather": rows with
different past lengths run in separate calls there, see PagedRunner.padding) and on the generated-C
runtime ("c-paged": every row in one call), and the hand-built one-layer graph without a cache.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

import infercc
from infercc.runtime.block_manager import OutOfBlocks
from infercc.runtime.session import FORK_SEED_OFFSET, SessionClosedError
from tests.fuzz.synthetic import write_tiny_gguf
from tests.runtime._cached_model import tiny_lm
from tests.runtime._threads import together

#: A KV block of the tiny GGUF: 16 tokens x 2 layers x K+V x 2 kv heads x 8 dims x 4 bytes.
BLOCK_BYTES = 16 * 256
PROMPTS = [[1] + list(range(10 + i, 10 + i + n)) for i, n in enumerate((3, 17, 1, 30, 8, 40))]
SYSTEM = [1] + list(range(100, 147))  # 48 tokens: three full blocks of 16


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory):
    return write_tiny_gguf(tmp_path_factory.mktemp("session_pool") / "tiny.gguf", context=1024)


@pytest.fixture(scope="module")
def tiny(gguf) -> infercc.CompiledModel:
    return infercc.compile(gguf)


@pytest.fixture(scope="module")
def tiny_c(gguf) -> infercc.CompiledModel:
    compiled = infercc.compile(gguf, backend="c")
    if compiled.runtime != "c":
        pytest.skip(f"the generated-C runtime is not available here: {compiled.runtime_reason}")
    return compiled


@pytest.fixture(params=["ort", "c"])
def model(request: pytest.FixtureRequest) -> infercc.CompiledModel:
    return request.getfixturevalue("tiny" if request.param == "ort" else "tiny_c")


def alone(compiled: infercc.CompiledModel, prompt: list[int], n: int = 12, **sampling) -> list[int]:
    """Greedy (or seeded) tokens of ``prompt`` in a session of its own."""
    with compiled.session() as session:
        seq = session.sequence(**sampling)
        seq.prefill(prompt)
        return [seq.decode() for _ in range(n)]


# -- layouts ---------------------------------------------------------------------------------------
def test_layouts_and_forms(tiny, tiny_c, gguf):
    with tiny.session() as session:
        assert session.layout == "paged" and session._pool is None  # made at the first feed
        session.sequence().prefill([1, 2, 3])
        assert session.pool.form == "ort-gather" and session.pool.block_size == tiny.config.kv_block_size
    with tiny_c.session() as session:
        assert session.pool.form == "c-paged"
    contiguous = infercc.compile(gguf, kv_cache_layout="contiguous")
    with contiguous.session() as session:
        assert session.layout == "contiguous" and session.pool is None
        seq = session.sequence()
        seq.prefill(PROMPTS[1])
        assert [seq.decode() for _ in range(12)] == alone(tiny, PROMPTS[1])
    with infercc.compile(tiny_lm(cached=False), optimize=False).session() as session:
        assert session.layout == "uncached" and session.pool is None


# -- batching --------------------------------------------------------------------------------------
def test_session_decode_runs_one_step_per_round(model):
    expected = [alone(model, p) for p in PROMPTS]
    with model.session() as session:
        seqs = [session.sequence() for _ in PROMPTS]
        for seq, prompt in zip(seqs, PROMPTS):
            seq.prefill(prompt)
        pool = session.pool
        steps, runs = pool.steps, pool.runner.runs
        rounds = [session.decode(seqs) for _ in range(12)]
        assert [list(r) for r in zip(*rounds)] == expected
        assert pool.steps - steps == 12  # one runner step per round, all six sequences in it
        if pool.runner.padding is None:  # c-paged: rows of every length share one call
            assert pool.runner.runs - runs == 12
        assert [s.tokens for s in seqs] == [p + e for p, e in zip(PROMPTS, expected)]


def test_concurrent_decodes_from_threads_batch_and_equal_each_alone(model):
    """Six threads decode six sequences: their rows share steps (fewer steps than decodes), and
    each sequence's greedy tokens are its tokens alone."""
    prompts = [[1] + list(range(20 + i, 36 + i)) for i in range(6)]  # same length: one call even on ORT
    n = 24
    expected = [alone(model, p, n) for p in prompts]
    with model.session() as session:
        seqs = [session.sequence() for _ in prompts]
        for seq, prompt in zip(seqs, prompts):
            seq.prefill(prompt)
        pool = session.pool
        steps = pool.steps
        assert together(lambda i: [seqs[i].decode() for _ in range(n)], len(prompts)) == expected
        decodes = n * len(prompts)
        # Leader/follower: a thread that finds a step running queues its row for the next one.
        assert pool.steps - steps <= decodes // 2, (pool.steps - steps, decodes)  # ideal: decodes / 6


# -- prefix sharing and forks ----------------------------------------------------------------------
def test_a_shared_system_prompt_is_computed_once(model):
    first, second = SYSTEM + [20, 21, 22], SYSTEM + [30, 31]
    expected = alone(model, second)
    with model.session() as session:
        a, b = session.sequence(), session.sequence()
        a.prefill(first)
        pool = session.pool
        before = pool.computed_tokens
        b.prefill(second)
        assert pool.computed_tokens - before == 2  # the three system blocks came from the cache
        assert pool.report().prefix_hits == 48
        assert [b.decode() for _ in range(12)] == expected
        shared = pool.report().used
        assert shared < (len(pool.blocks.block_table(a._id)) + len(pool.blocks.block_table(b._id)))
        assert session.memory_bytes == shared * pool.bytes_per_block
        assert b.memory_bytes == len(pool.blocks.block_table(b._id)) * BLOCK_BYTES
        # all_logits: every position's logits are asked for, so nothing is served from the cache
        c = session.sequence()
        before = pool.computed_tokens
        scores = c.prefill(second, all_logits=True)
        assert scores.shape == (len(second), 273) and pool.computed_tokens - before == len(second)
        with model.session() as fresh:
            reference = fresh.sequence().prefill(second, all_logits=True)
        np.testing.assert_allclose(scores, reference, atol=1e-4)


def test_fork_shares_blocks_copy_on_write_and_samples_apart(model):
    prompt = PROMPTS[3]  # 31 tokens: a full block and a shared, partly filled one
    params = dict(temperature=1.0, seed=5)
    with model.session() as session:
        parent = session.sequence(**params)
        parent.prefill(prompt)
        pool = session.pool
        used = pool.report().used
        children = [parent.fork() for _ in range(3)]
        assert pool.report().used == used and session.memory_bytes == used * pool.bytes_per_block
        assert [c.params.seed for c in children] == [5 + FORK_SEED_OFFSET * k for k in (1, 2, 3)]
        greedy = parent.fork(temperature=0.0)
        assert greedy.tokens == parent.tokens and np.array_equal(greedy.logits, parent.logits)
        drawn = [[seq.decode() for _ in range(10)] for seq in [parent, *children]]
        assert [greedy.decode() for _ in range(10)] == alone(model, prompt, 10)
        for seq, tokens in zip([parent, *children], drawn):
            assert tokens == alone(model, prompt, 10, temperature=1.0, seed=seq.params.seed)
        assert len({tuple(t) for t in drawn}) == 4
        assert pool.report().used > used  # each wrote into its own copy of the partly filled block
        for seq in [parent, *children, greedy]:
            seq.close()
        assert pool.report().used == 0 and session.memory_bytes == 0


def test_fork_on_the_contiguous_layout_recomputes(gguf, tiny):
    contiguous = infercc.compile(gguf, kv_cache_layout="contiguous")
    with contiguous.session() as session:
        parent = session.sequence()
        parent.prefill(PROMPTS[1])
        first = parent.decode()
        child = parent.fork()
        assert child.tokens == parent.tokens and child.output == [first]
        assert [first] + [child.decode() for _ in range(11)] == alone(tiny, PROMPTS[1])


# -- limits ----------------------------------------------------------------------------------------
def test_a_full_pool_is_explained_and_changes_nothing(tiny):
    with pytest.raises(infercc.ConfigError, match="kv_cache_memory"):
        with tiny.session(kv_cache_memory=3 * BLOCK_BYTES, max_context=64) as session:
            session.sequence().prefill([1])
    with tiny.session(kv_cache_memory=4 * BLOCK_BYTES, max_context=64) as session:
        a, b = session.sequence(), session.sequence()
        a.prefill(list(range(1, 41)))  # 3 blocks
        with pytest.raises(OutOfBlocks, match=r"close\(\) or reset\(\) sequences.*Config.kv_cache_memory"):
            b.prefill(list(range(50, 80)))  # 2 more
        assert len(b) == 0 and b.logits is None and session.pool.report().used == 3
        b.prefill(list(range(50, 58)))  # 8 tokens: the last block
        a.append(list(range(100, 108)))  # a fills its third block to 48
        for _ in range(8):
            b.decode()  # b fills its block to 16
        tokens_before = list(a.tokens), list(b.tokens)
        with pytest.raises(OutOfBlocks, match="kv_cache_memory"):
            session.decode([a, b])  # a would need a fourth block: neither changes
        assert (a.tokens, b.tokens) == tokens_before
        with pytest.raises(OutOfBlocks):
            a.decode()
        assert a.tokens == tokens_before[0]
        b.close()  # its block comes back: a continues
        assert isinstance(a.decode(), int) and len(a) == 49


def test_session_decode_misuse(tiny):
    with tiny.session() as session, tiny.session() as other:
        a = session.sequence()
        with pytest.raises(infercc.InputError, match="prefill"):
            session.decode([a])
        a.prefill([1, 2])
        with pytest.raises(infercc.InputError, match="appears twice"):
            session.decode([a, a])
        with pytest.raises(infercc.InputError, match="not a sequence of this session"):
            session.decode([a, other.sequence()])
        assert session.decode([]) == [] and len(a) == 2
        with pytest.raises(infercc.InputError, match="outside the vocabulary"):
            a.append([5000])
        assert a.tokens == [1, 2] and session.pool.blocks.num_tokens(a._id) == 2
    with pytest.raises(SessionClosedError, match="compiled.session"):
        a.fork()


def test_a_dropped_sequence_gives_its_blocks_back(tiny):
    with tiny.session() as session:
        keep = session.sequence()
        keep.prefill([1, 2, 3])
        dropped = session.sequence()
        dropped.prefill(list(range(1, 60)))
        assert session.pool.report().used == 5
        del dropped
        gc.collect()
        keep.decode()  # the next booking frees what the finalizer queued
        assert session.pool.report().used == 1
