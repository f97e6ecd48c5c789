"""The shared in-place KV buffer (GroupQueryAttention writes the new slots into the buffer it reads)
against the ping-pong pair (present written into a second buffer each step): the same logits at
every step, through growth past the first capacity, rows leaving the batch and left padding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import infercc
from infercc.runtime.kv_cache import MIN_CAPACITY, CacheSpec
from infercc.runtime.model_runner import ModelRunner
from tests.fixtures import catalog


@pytest.fixture(scope="module")
def compiled():
    return infercc.compile(str(catalog.fixture_path("llama_dynamo")), provider="cpu")


def _decode(runner: ModelRunner, prompts: list[list[int]], steps: int) -> list[np.ndarray]:
    cache = runner.new_cache(len(prompts))
    out = [runner.step(cache, prompts)]
    rows = list(range(len(prompts)))
    for step in range(steps):
        if step == steps // 2:  # the second row finishes: the batch keeps the others
            rows = [r for r in rows if r != 1]
            cache.keep([i for i, r in enumerate(range(len(prompts))) if r in rows])
        last = out[-1].argmax(-1)
        out.append(runner.step(cache, [[int(t)] for t in last[: len(rows)]]))
    return out


def test_graph_with_group_query_attention_shares_its_buffers(compiled) -> None:
    spec = CacheSpec.from_model(compiled.model)
    assert spec.shared
    cache = ModelRunner(compiled.backend, compiled.model).new_cache(2)
    cache.reserve(5)
    past, present = cache.past(), cache.present(5)
    for entry in spec.entries:
        assert past[entry.input] is present[entry.output] and past[entry.input].shape[2] == MIN_CAPACITY


def test_multi_head_graph_keeps_the_ping_pong_pair() -> None:
    cm = infercc.compile(str(catalog.fixture_path("llama_dynamo")), provider="cpu", kv_cache_dtype="fp16")
    assert not CacheSpec.from_model(cm.model).shared


def test_shared_buffer_equals_ping_pong(compiled) -> None:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 256, n).tolist() for n in (9, 4, 13)]
    shared = ModelRunner(compiled.backend, compiled.model)
    pairs = ModelRunner(compiled.backend, compiled.model)
    pairs.cache_spec = dataclasses.replace(pairs.cache_spec, shared=False)
    steps = MIN_CAPACITY + 10  # grows the buffers once
    got, want = _decode(shared, prompts, steps), _decode(pairs, prompts, steps)
    assert len(got) == len(want) == steps + 1
    for a, b in zip(got, want):
        assert a.shape == b.shape and float(np.abs(a - b).max()) <= 1e-5


@pytest.mark.parametrize("shared", [True, False])
def test_move_brings_slots_together_before_truncation(shared: bool) -> None:
    """KVCache.move (a verified tree's accepted path, tree_attention.compact_moves) on the shared
    buffer and on the ping-pong pair: the moved slots' K/V, ids and mask, then truncate keeps them."""
    from infercc.errors import InputError
    from infercc.runtime.kv_cache import CacheEntry, KVCache
    from infercc.runtime.tree_attention import compact_moves

    entry = CacheEntry("past_key_values.0.key", "present.0.key", np.dtype(np.float32), 2, 3)
    cache = KVCache(CacheSpec((entry,), shared=shared), 1)
    cache.append(np.arange(10, 18)[None, :], np.ones((1, 8), np.int64))
    present = cache.present(8)[entry.output]
    present[:, :, :8] = np.arange(8, dtype=np.float32)[None, None, :, None]
    cache.commit(8)
    cache.move(compact_moves(3, [0, 2, 4]))  # keep rows 0, 2, 4 of a row that started at slot 3
    cache.truncate(6)
    kept = cache.past()[entry.input][:, :, :6]
    assert kept[0, 0, :, 0].tolist() == [0, 1, 2, 3, 5, 7] and cache.tokens() == [10, 11, 12, 13, 15, 17]
    with pytest.raises(InputError, match="cannot move slot 9"):
        cache.move([(9, 1)])
