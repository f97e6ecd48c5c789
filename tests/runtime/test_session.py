"""Sessions, sequences and the KV-cache manager on a hand-built graph that follows the
cached-graph contract, checked against its uncached twin (same weights, full recomputation)."""

from __future__ import annotations

import numpy as np
import pytest

import infercc
from infercc import InferccError, InputError
from infercc.runtime.kv_cache import CacheEntry, CacheSpec, ContextOverflowError, KVCache
from infercc.runtime.session import SessionClosedError
from tests.runtime._cached_model import CONTEXT, HEAD, HEADS, tiny_lm
from tests.runtime._threads import together

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]


@pytest.fixture(scope="module")
def cached():
    return infercc.compile(tiny_lm(cached=True), optimize=False)


@pytest.fixture(scope="module")
def uncached():
    return infercc.compile(tiny_lm(cached=False), optimize=False)


def greedy(compiled, prompt, n=12, **session_options):
    with compiled.session(**session_options) as session:
        seq = session.sequence()
        seq.prefill(prompt)
        return [seq.decode() for _ in range(n)]


# -- cached path against recomputation -----------------------------------------------------------
def test_cached_and_uncached_give_same_logits_and_tokens(cached, uncached):
    with cached.session() as s1, uncached.session() as s2:
        assert s1.cached and not s2.cached
        a, b = s1.sequence(), s2.sequence()
        np.testing.assert_allclose(a.prefill(PROMPTS[1]), b.prefill(PROMPTS[1]), atol=1e-4)
        for _ in range(10):
            assert a.decode() == b.decode()
            np.testing.assert_allclose(a.logits, b.logits, atol=1e-4)
        np.testing.assert_allclose(a.append([3, 4, 5]), b.append([3, 4, 5]), atol=1e-4)
        assert a.tokens == b.tokens == PROMPTS[1] + a.output + [3, 4, 5]


def test_all_position_logits_match_full_recomputation(cached, uncached):
    """The perplexity path: every new position's logits, over a cache that already holds tokens."""
    run_cached = cached.session().runner
    cache = run_cached.new_cache(1)
    run_cached.step(cache, [[1, 2, 3]])
    stepped = run_cached.step(cache, [[4, 5, 6, 7]], all_logits=True)
    full = uncached.run({"input_ids": np.array([[1, 2, 3, 4, 5, 6, 7]]), "attention_mask": np.ones((1, 7), np.int64)})
    np.testing.assert_allclose(stepped[0], full["logits"][0, 3:], atol=1e-4)


def test_sequence_all_logits_for_perplexity(cached, uncached):
    ids = [1, 2, 3, 4, 5, 6, 7]
    full = uncached.run({"input_ids": np.array([ids]), "attention_mask": np.ones((1, 7), np.int64)})["logits"][0]
    with cached.session() as session:
        assert session.bytes_per_token == 2 * HEADS * HEAD * 4
        seq = session.sequence()
        first = seq.prefill(ids[:3], all_logits=True)
        rest = seq.append(ids[3:], all_logits=True)
        np.testing.assert_allclose(np.concatenate([first, rest]), full, atol=1e-4)
        np.testing.assert_allclose(seq.logits, full[-1], atol=1e-4)


def test_batched_left_padded_step_equals_rows_alone(cached):
    runner = cached.session().runner
    cache = runner.new_cache(len(PROMPTS))
    together = runner.step(cache, PROMPTS)
    again = runner.step(cache, [[5], [], [6]])  # the middle row sits this step out
    for i, prompt in enumerate(PROMPTS):
        alone = runner.new_cache(1)
        np.testing.assert_allclose(together[i], runner.step(alone, [prompt])[0], atol=1e-4)
        if i != 1:
            np.testing.assert_allclose(again[i], runner.step(alone, [[[5], [], [6]][i]])[0], atol=1e-4)
    assert cache.tokens(1) == PROMPTS[1] and cache.real_lengths().tolist() == [4, 7, 2]


def test_float16_cache_halves_memory_and_tracks_float32(cached):
    half = infercc.compile(tiny_lm(cached=True, kv_dtype=np.float16), optimize=False)
    with half.session() as s16, cached.session() as s32:
        a, b = s16.sequence(), s32.sequence()
        a.prefill(PROMPTS[0]), b.prefill(PROMPTS[0])
        assert a.bytes_per_token * 2 == b.bytes_per_token == 2 * HEADS * HEAD * 4
        a.decode(), b.decode()
        np.testing.assert_allclose(a.logits, b.logits, rtol=2e-3, atol=2e-2)


# -- sequences -----------------------------------------------------------------------------------
def test_sequences_are_independent(cached):
    alone = [greedy(cached, p) for p in PROMPTS]
    with cached.session() as session:
        seqs = [session.sequence() for _ in PROMPTS]
        for seq, prompt in zip(seqs, PROMPTS):
            seq.prefill(prompt)
        interleaved = [[] for _ in PROMPTS]
        for _ in range(12):
            for out, seq in zip(interleaved, seqs):
                out.append(seq.decode())
        assert interleaved == alone
        assert [len(s) for s in seqs] == [len(p) + 12 for p in PROMPTS]


def test_reset_frees_and_replays(cached):
    with cached.session() as session:
        seq = session.sequence(temperature=0.9, seed=7)
        seq.prefill(PROMPTS[0])
        first = [seq.decode() for _ in range(8)]
        assert seq.memory_bytes > 0
        seq.reset()
        assert len(seq) == 0 and seq.memory_bytes == 0 and seq.logits is None
        seq.prefill(PROMPTS[0])
        assert [seq.decode() for _ in range(8)] == first  # the sampler restarts from its seed


def test_misuse_is_explained(cached):
    with cached.session() as session:
        seq = session.sequence()
        with pytest.raises(InputError, match="prefill"):
            seq.decode()
        with pytest.raises(InputError, match="empty"):
            seq.prefill([])
        seq.prefill([1])
        with pytest.raises(InputError, match="append"):
            seq.prefill([2])
        with pytest.raises(InputError, match="outside the vocabulary"):
            seq.append([999])
        assert seq.tokens == [1]


def test_context_overflow_is_a_clear_error(cached, uncached):
    for compiled in (cached, uncached):
        with compiled.session() as session:
            seq = session.sequence()
            with pytest.raises(ContextOverflowError, match=f"sequence of {CONTEXT + 1} tokens exceeds the model's maximum context {CONTEXT}"):
                seq.prefill(list(range(1, 30)) + list(range(1, 21)))
            assert len(seq) == 0
            seq.prefill([1] * (CONTEXT - 2))
            seq.decode(), seq.decode()
            with pytest.raises(ContextOverflowError, match="reset"):
                seq.decode()
            assert len(seq) == CONTEXT  # the failed step left the sequence as it was
            assert isinstance(ContextOverflowError("x"), InferccError)
    with cached.session(max_context=8) as session:
        with pytest.raises(ContextOverflowError, match="maximum context 8"):
            session.sequence().prefill(list(range(9)))


def run_threads(compiled, prompts: list[list[int]], n: int = 16) -> list[list[int]]:
    """Each prompt in its own sequence and thread, all started together."""
    with compiled.session() as session:
        seqs = [session.sequence() for _ in prompts]

        def work(i: int) -> list[int]:
            seqs[i].prefill(prompts[i])
            return [seqs[i].decode() for _ in range(n)]

        return together(work, len(prompts))


@pytest.mark.parametrize("kind", ["cached", "uncached"])
def test_four_threads_match_sequential(kind, request):
    compiled = request.getfixturevalue(kind)
    prompts = [[1, 2], [3, 4, 5, 6], [7], [8, 9, 10]]
    assert run_threads(compiled, prompts) == [greedy(compiled, p, n=16) for p in prompts]


def test_close_frees_everything_and_refuses_use(cached):
    session = cached.session()
    seqs = [session.sequence() for _ in range(3)]
    for seq in seqs:
        seq.prefill([1, 2, 3])
    assert session.memory_bytes > 0
    session.close()
    assert session.memory_bytes == 0 and all(s.closed for s in seqs)
    with pytest.raises(SessionClosedError, match="closed"):
        seqs[0].prefill([1])
    with pytest.raises(SessionClosedError, match="compiled.session"):
        session.sequence()
    with cached.session() as other:
        other.sequence().prefill([1])
    assert other.closed


USES = {
    "prefill": lambda seq: seq.prefill([1]),
    "append": lambda seq: seq.append([1]),
    "decode": lambda seq: seq.decode(),
    "reset": lambda seq: seq.reset(),
}


@pytest.mark.parametrize("name", USES)
def test_a_sequence_that_outlived_its_with_block_says_the_session_is_closed(cached, name):
    with cached.session() as session:
        fresh, started = session.sequence(), session.sequence()
        started.prefill([1, 2])
    for seq in (fresh, started):  # a fresh one would otherwise say "prefill first" for decode
        with pytest.raises(SessionClosedError) as info:
            USES[name](seq)
        message = str(info.value)
        assert message.startswith(f"cannot {name}(): this sequence's session is closed")
        assert "`with compiled.session() as s:` closes it at the end of the block" in message
        assert "compiled.session()" in message


@pytest.mark.parametrize("name", USES)
def test_a_closed_sequence_says_it_was_closed_itself(cached, name):
    with cached.session() as session:
        seq = session.sequence()
        seq.prefill([1, 2])
        seq.close()
        seq.close()  # twice is harmless
        with pytest.raises(SessionClosedError, match=r"this sequence was closed with sequence.close\(\); make a new "
                                                     r"one with session.sequence\(\)"):
            USES[name](seq)
        other = session.sequence()  # the session itself is still usable
        other.prefill([1, 2])
        assert len(other) == 2


# -- the KV-cache manager --------------------------------------------------------------------------
def test_cache_grows_by_doubling_and_feeds_views():
    spec = CacheSpec((CacheEntry("past_key_values.0.key", "present.0.key", np.dtype(np.float32), 2, 4),
                      CacheEntry("past_key_values.0.value", "present.0.value", np.dtype(np.float32), 2, 4)))
    assert spec.layers == 1 and spec.bytes_per_token == 64
    cache = KVCache(spec, batch=2, max_context=300)
    capacities = []
    for _ in range(40):
        step = np.ones((2, 10), np.int64)
        cache.append(step, step)
        present = cache.present(cache.length + 10)
        for view in present.values():
            assert view.flags.c_contiguous
            view[:] = 1.0
        cache.commit(cache.length + 10)
        capacities.append(cache.capacity) if not capacities or capacities[-1] != cache.capacity else None
        if cache.length >= 290:
            break
    assert capacities == [64, 128, 256, 300]  # doubling, capped at the model's context
    past = cache.past()["past_key_values.0.key"]
    assert past.shape == (2, 2, 290, 4) and past.flags.c_contiguous and (past == 1.0).all()
    assert np.shares_memory(past, cache._front["past_key_values.0.key"])  # a view, not a copy
    assert cache.bytes_per_token == 128
    with pytest.raises(ContextOverflowError, match="sequence of 301 tokens"):
        cache.append(np.ones((2, 11), np.int64), np.ones((2, 11), np.int64))
    cache.free()
    assert cache.nbytes == 0 and cache.length == 0


def test_cache_keep_drops_rows_and_all_padding_slots(cached):
    runner = cached.session().runner
    prompts = [[1, 2], [3, 4, 5, 6, 7, 8], [9, 10, 11]]
    cache = runner.new_cache(3)
    runner.step(cache, prompts)
    runner.step(cache, [[12], [13], [14]])
    cache.keep([0, 2])  # the longest row leaves: 3 leading all-padding slots go too
    assert cache.batch == 2 and cache.length == 4 and cache.tokens(0) == [1, 2, 12] and cache.tokens(1) == [9, 10, 11, 14]
    kept = runner.step(cache, [[15], [16]])
    for row, prompt in enumerate([[1, 2, 12, 15], [9, 10, 11, 14, 16]]):
        np.testing.assert_allclose(kept[row], runner.step(runner.new_cache(1), [prompt])[0], atol=1e-4)


def test_pipeline_keeps_the_cache_interface_and_results(cached):
    optimized = infercc.compile(tiny_lm(cached=True))
    names = {v["name"] for v in optimized.inputs} | {v["name"] for v in optimized.outputs}
    assert {"past_key_values.0.key", "past_key_values.0.value", "present.0.key", "present.0.value"} <= names
    assert greedy(optimized, PROMPTS[1], n=16) == greedy(cached, PROMPTS[1], n=16)
