"""Issue 12's acceptance on the engine's KV pool: a repeated long prompt's second prefill computes only
its last partial block (counted in tokens through the model, usage and the block report, and timed),
with the same output; and a mixed-length serving workload wastes at most 4% of the allocated slots.

Model: the tiny random-weight LLaMA GGUF with a 1024-token context (prompts up to 600 + 300 new
tokens), on the generated-C runtime where it is available (c-paged: the workload runs in seconds),
else on ONNX Runtime.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

import infercc
from infercc.runtime.engine import Engine, RequestOutput
from infercc.runtime.sampling import SamplingParams
from tests.fuzz.synthetic import write_tiny_gguf

#: 636 tokens: 39 full blocks of 16 and 12 more (ids of the tiny model's 273-token vocabulary).
LONG = [1] + list(range(3, 272)) * 2 + list(range(3, 100))
GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory):
    return write_tiny_gguf(tmp_path_factory.mktemp("engine_prefix") / "tiny.gguf", context=1024)


@pytest.fixture(scope="module")
def tiny(gguf) -> infercc.CompiledModel:
    return infercc.compile(gguf)


@pytest.fixture(scope="module")
def fast(gguf, tiny) -> infercc.CompiledModel:
    """The C-runtime model where it builds (rows of every length in one call), else ``tiny``."""
    compiled = infercc.compile(gguf, backend="c")
    return compiled if compiled.runtime == "c" else tiny


def finish(eng: Engine) -> dict[str, RequestOutput]:
    """Step until done; each request's last output."""
    last: dict[str, RequestOutput] = {}
    while eng.has_unfinished():
        for out in eng.step():
            last[out.request_id] = out
    return last


def admit(eng: Engine, request_id: str, prompt: list[int]) -> tuple[int, float, RequestOutput]:
    """Add a request and run the step that prefills it (the whole prompt fits one step): tokens it
    ran through the model, the step's CPU seconds (all the process's threads: the wall clock also
    counts whatever else a shared machine runs), its first output."""
    before = eng.stats().computed_tokens
    eng.add_request(request_id, prompt, GREEDY)
    start = time.process_time()
    outputs = eng.step()
    seconds = time.process_time() - start
    (out,) = [o for o in outputs if o.request_id == request_id]
    return eng.stats().computed_tokens - before, seconds, out


def test_a_repeated_long_prompt_computes_only_its_last_partial_block(tiny):
    eng = Engine(tiny)
    assert eng.scheduler.max_batch_tokens >= len(LONG)
    computed, _, first = admit(eng, "first", LONG)
    blocks = eng.stats().blocks
    assert computed == len(LONG) and first.cached_tokens == 0 and blocks.prefix_hits == 0
    first = finish(eng)["first"]
    computed, _, again = admit(eng, "again", LONG)
    cached = len(LONG) // 16 * 16
    assert computed == len(LONG) - cached == 12  # only the last, partial block
    assert again.cached_tokens == cached and again.prompt_tokens == len(LONG)
    report = eng.stats().blocks
    assert report.prefix_hits == cached and report.prefix_queries == 2 * len(LONG)
    again = finish(eng)["again"]
    assert again.token_ids == first.token_ids and again.cached_tokens == cached
    stats = eng.stats()
    assert stats.cached_tokens == cached and stats.prefix_hit_rate == pytest.approx(cached / (2 * len(LONG)))


def test_the_second_prefill_is_measurably_faster(fast):
    """Best of three: the cached prefill computes 12 of 636 tokens, so it takes a small fraction of
    the first one's time; 0.7 leaves a wide margin for a busy machine."""
    firsts, seconds = [], []
    for _ in range(3):
        eng = Engine(fast)
        admit(eng, "warm", [1] + list(range(50, 90)) * 15)  # a first run of these shapes, not cached later
        finish(eng)
        _, first, a = admit(eng, "a", LONG)
        finish(eng)
        _, second, b = admit(eng, "b", LONG)
        assert b.cached_tokens == 624 and b.token_ids == a.token_ids
        firsts.append(first)
        seconds.append(second)
    assert min(seconds) < 0.7 * min(firsts), (firsts, seconds)


def test_a_repeated_long_prompt_in_a_session(tiny):
    with tiny.session() as session:
        a, b = session.sequence(), session.sequence()
        first = a.prefill(LONG)
        pool = session.pool
        before = pool.computed_tokens
        second = b.prefill(LONG)
        assert pool.computed_tokens - before == 12 and pool.report().prefix_hits == 624
        np.testing.assert_allclose(second, first, atol=1e-4)
        assert [a.decode() for _ in range(6)] == [b.decode() for _ in range(6)]


# -- internal waste ------------------------------------------------------------------------------
def mean_waste(compiled: infercc.CompiledModel, requests: list[tuple[int, int]], block_size: int,
               max_num_seqs: int = 64, seed: int = 0) -> float:
    """Run ``requests`` ((prompt tokens, new tokens) each, all submitted at once) through an Engine
    and return BlockReport.waste averaged over every step, weighted by the blocks in use."""
    eng = Engine(compiled, compiled.config.replace(kv_block_size=block_size, max_num_seqs=max_num_seqs))
    rng = np.random.default_rng(seed)
    for i, (prompt, new) in enumerate(requests):
        ids = [1] + rng.integers(3, 273, prompt - 1).tolist()  # distinct prompts: no prefix sharing
        eng.add_request(str(i), ids, SamplingParams(max_new_tokens=new, ignore_eos=True))
    wasted = used = 0.0
    while eng.has_unfinished():
        eng.step()
        report = eng.stats().blocks
        wasted += report.waste * report.used
        used += report.used
    assert eng.stats().blocks.used == 0 and eng.stats().generation_tokens == sum(n for _, n in requests)
    return wasted / used


def serving_mix(n: int = 24, seed: int = 0) -> list[tuple[int, int]]:
    """Prompts of 20..600 tokens and outputs of 10..300, drawn uniformly."""
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(20, 601)), int(rng.integers(10, 301))) for _ in range(n)]


@pytest.mark.parametrize("block_size", [16, pytest.param(8, marks=pytest.mark.slow)])
def test_internal_waste_of_a_mixed_workload_is_at_most_4_percent(fast, block_size):
    """Slots are booked only for known tokens (a prompt at admission, each sampled token when it is
    fed), so only each sequence's last block is partly empty: about half a block per sequence
    (measured: 1.7% at block 16, 0.8% at block 8)."""
    assert mean_waste(fast, serving_mix(), block_size) <= 0.04


@pytest.mark.slow
def test_internal_waste_of_the_serve_benchmark_load(fast):
    """The serve benchmark's requests (100 prompt + 64 new tokens, 16 at a time) are short, so half
    a block each is a larger share: measured 5.4% at block 16, 2.6% at block 8."""
    load = [(100, 64)] * 48
    assert mean_waste(fast, load, 16, max_num_seqs=16) <= 0.08
    assert mean_waste(fast, load, 8, max_num_seqs=16) <= 0.04
