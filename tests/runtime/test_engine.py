"""The serving engine on real compiled models: every request gives what it gives alone (greedy token
for token, seeded sampling draw for draw) through batching, chunked prefill, preemption, prefix
caching and aborts; blocks always come back; bad requests and pools are explained.

Models: a tiny random-weight LLaMA GGUF written here (always available, context 64) and the real
stories260K checkpoint (text, stop strings; skipped when ../shared is absent).
"""

from __future__ import annotations

import numpy as np
import pytest

import infercc
from infercc import ConfigError, InputError
from infercc.runtime.engine import Engine, RequestOutput, log_softmax
from infercc.runtime.sampling import SamplingParams
from tests.fuzz.synthetic import write_tiny_gguf
from tests.importers._models import STORIES, require

LAYOUTS = ("paged", "contiguous")
#: Prompts of different lengths (ids of the tiny model's 273-token vocabulary) and their max_tokens.
PROMPTS = [[1] + list(range(10 + i, 10 + i + n)) for i, n in enumerate((3, 17, 1, 30, 8, 12, 40, 5))]
MAX_NEW = [6, 12, 20, 3, 16, 9, 10, 14]
#: A KV block of the tiny model: 16 tokens x 2 layers x K+V x 2 kv heads x 8 dims x 4 bytes.
BLOCK_BYTES = 16 * 256
STORY_PROMPTS = ["Once upon a time", "The dog", "Lily and Tom went to the park to play", "One day, a little bird"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> infercc.CompiledModel:
    return infercc.compile(write_tiny_gguf(tmp_path_factory.mktemp("engine") / "tiny.gguf"))


@pytest.fixture(scope="module")
def stories() -> infercc.CompiledModel:
    return infercc.compile(require(STORIES))


@pytest.fixture(scope="module")
def alone(tiny: infercc.CompiledModel) -> list[list[int]]:
    """Each prompt run on its own through compiled.generate (greedy, EOS ignored)."""
    return [tiny.generate(p, max_new_tokens=m, ignore_eos=True).token_ids for p, m in zip(PROMPTS, MAX_NEW)]


def engine(compiled: infercc.CompiledModel, layout: str = "paged", **knobs) -> Engine:
    max_context = knobs.pop("max_context", None)
    return Engine(compiled, compiled.config.replace(kv_cache_layout=layout, **knobs), max_context=max_context)


def run(eng: Engine, steps: int = 10_000) -> dict[str, list[RequestOutput]]:
    """Step until done; every output by request id."""
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(steps):
        if not eng.has_unfinished():
            return outputs
        for out in eng.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError(f"engine still busy after {steps} steps: {eng.stats()}")


def submit(eng: Engine, prompts=PROMPTS, max_new=MAX_NEW, **params) -> None:
    for i, (prompt, m) in enumerate(zip(prompts, max_new)):
        eng.add_request(str(i), prompt, SamplingParams(max_new_tokens=m, ignore_eos=True, **params))


def tokens(outputs: dict[str, list[RequestOutput]], n: int = len(PROMPTS)) -> list[list[int]]:
    return [outputs[str(i)][-1].token_ids for i in range(n)]


def all_blocks_back(eng: Engine) -> None:
    report = eng.stats().blocks
    assert report.used == 0 and report.free + report.cached == report.total, report


# -- equality with each request alone ------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_burst_of_greedy_requests_equals_each_alone(tiny, alone, layout):
    eng = engine(tiny, layout)
    submit(eng)
    outputs = run(eng)
    assert tokens(outputs) == alone
    for i, outs in outputs.items():
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert outs[-1].finish_reason == "length" and outs[-1].prompt_tokens == len(PROMPTS[int(i)])
        assert sum((o.new_token_ids for o in outs), []) == outs[-1].token_ids  # each step's new ids add up
    stats = eng.stats()
    assert stats.generation_tokens == sum(MAX_NEW) and stats.prompt_tokens == sum(map(len, PROMPTS))
    assert stats.running == stats.waiting == 0 and stats.steps < sum(MAX_NEW)  # batched: fewer steps than tokens
    all_blocks_back(eng)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_chunked_prefill_gives_the_same_tokens(tiny, alone, layout):
    eng = engine(tiny, layout, max_batch_tokens=7)  # smaller than most prompts: they spread over steps
    submit(eng)
    outputs = run(eng)
    assert tokens(outputs) == alone
    assert eng.stats().computed_tokens >= sum(map(len, PROMPTS))


def test_tiny_pool_completes_a_burst_through_preemption(tiny, alone):
    """Four blocks of 16 tokens hold one 64-token context: the burst cannot fit and requests are
    preempted (recomputed later), yet each finishes with its own tokens."""
    eng = engine(tiny, "paged", kv_cache_memory=5 * BLOCK_BYTES)
    assert eng.blocks.num_blocks == 5 and eng.stats().runner == "ort-gather"
    submit(eng)
    outputs = run(eng)
    assert tokens(outputs) == alone
    assert eng.stats().preemptions > 0
    all_blocks_back(eng)


def test_c_paged_engine_matches_the_c_decode_loop(tmp_path_factory):
    """On the generated-C runtime the pool is read and written in place by the PagedAttention
    kernel: batched, chunked and preempted requests still give the C decode loop's tokens."""
    compiled = infercc.compile(write_tiny_gguf(tmp_path_factory.mktemp("engine_c") / "tiny.gguf"), backend="c")
    if compiled.runtime != "c":
        pytest.skip(f"the generated-C runtime is not available here: {compiled.runtime_reason}")
    alone = []
    for prompt, max_new in zip(PROMPTS, MAX_NEW):
        result = compiled.generate(prompt, max_new_tokens=max_new, ignore_eos=True)
        assert result.decode_loop == "c"
        alone.append(result.token_ids)
    for knobs in ({}, {"kv_cache_memory": 5 * BLOCK_BYTES, "max_batch_tokens": 7}):
        eng = engine(compiled, **knobs)
        submit(eng)
        assert tokens(run(eng)) == alone and eng.stats().runner == "c-paged"
        all_blocks_back(eng)
    assert eng.stats().preemptions > 0


def test_contiguous_layout_reserves_a_whole_context_per_sequence(tiny, alone):
    """The same pool holds a single contiguous sequence at a time: requests wait, never preempt."""
    eng = engine(tiny, "contiguous", kv_cache_memory=5 * BLOCK_BYTES)
    submit(eng)
    peak = 0
    outputs: dict[str, list[RequestOutput]] = {}
    while eng.has_unfinished():
        for out in eng.step():
            outputs.setdefault(out.request_id, []).append(out)
        peak = max(peak, eng.stats().running)
    assert tokens(outputs) == alone and peak == 1 and eng.stats().preemptions == 0
    assert eng.stats().runner == "contiguous" and "kv_cache_layout='contiguous'" in eng.stats().runner_reason


def test_prefix_cache_serves_a_repeated_prompt(tiny):
    prompt = PROMPTS[6]  # 41 tokens: two full blocks of 16
    eng = engine(tiny)
    eng.add_request("first", prompt, SamplingParams(max_new_tokens=8, ignore_eos=True))
    first = run(eng)["first"]
    eng.add_request("again", prompt, SamplingParams(max_new_tokens=8, ignore_eos=True))
    again = run(eng)["again"]
    assert first[-1].cached_tokens == 0 and again[-1].cached_tokens == 32
    assert again[-1].token_ids == first[-1].token_ids
    stats = eng.stats()
    assert stats.cached_tokens == 32 and stats.prefix_hit_rate == 32 / (2 * len(prompt))
    assert stats.blocks.cached > 0
    all_blocks_back(eng)


def test_parallel_samples_as_repeated_prompts(tiny):
    """n > 1 the way the server does it: the same prompt submitted n times. Greedy copies agree;
    seeded copies each give what that seed gives alone."""
    prompt = PROMPTS[3]
    eng = engine(tiny)
    for i in range(3):
        eng.add_request(f"greedy{i}", prompt, SamplingParams(max_new_tokens=10, ignore_eos=True))
        eng.add_request(f"seed{i}", prompt, SamplingParams(max_new_tokens=10, temperature=1.0, seed=i, ignore_eos=True))
    outputs = run(eng)
    assert len({tuple(outputs[f"greedy{i}"][-1].token_ids) for i in range(3)}) == 1
    sampled = [outputs[f"seed{i}"][-1].token_ids for i in range(3)]
    assert len({tuple(s) for s in sampled}) == 3
    for i, ids in enumerate(sampled):
        assert ids == tiny.generate(prompt, max_new_tokens=10, temperature=1.0, seed=i, ignore_eos=True).token_ids


def test_seeded_sampling_does_not_depend_on_what_else_runs(tiny):
    params = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    lone = engine(tiny)
    lone.add_request("x", PROMPTS[1], params)
    expected = run(lone)["x"][-1].token_ids
    busy = engine(tiny, max_batch_tokens=9)
    submit(busy, temperature=1.0, seed=3)
    busy.add_request("x", PROMPTS[1], params)
    assert run(busy)["x"][-1].token_ids == expected


def test_c_paged_mixed_batch_with_a_sampling_request(tiny_c):
    """Decode steps of the C paged runner write their logits straight into the step's output
    (paged_runner._direct_out): greedy rows still give the C decode loop's tokens, a seeded
    sampling row its lone draws and a logprobs row the model's distribution, mixed in one batch."""
    sampled = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=20, seed=5, ignore_eos=True)
    lone = engine(tiny_c)
    lone.add_request("s", PROMPTS[3], sampled)
    expected = run(lone)["s"][-1].token_ids
    busy = engine(tiny_c)
    submit(busy, PROMPTS[:4], MAX_NEW[:4])
    busy.add_request("s", PROMPTS[3], sampled)
    busy.add_request("p", PROMPTS[0], SamplingParams(max_new_tokens=5, ignore_eos=True), logprobs=2)
    outputs = run(busy)
    assert busy.stats().runner == "c-paged"
    assert outputs["s"][-1].token_ids == expected
    for i in range(4):
        assert outputs[str(i)][-1].token_ids == tiny_c.generate(PROMPTS[i], max_new_tokens=MAX_NEW[i],
                                                                ignore_eos=True).token_ids
    probs = [p for out in outputs["p"] for p in out.logprobs]
    assert len(probs) == 5 and all(p <= 0 for p in probs)
    assert all(max(top.values()) == lp for out in outputs["p"] for lp, top in zip(out.logprobs, out.top_logprobs))


# -- aborts and blocks ---------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_abort_midway_returns_every_block(tiny, alone, layout):
    eng = engine(tiny, layout, max_num_seqs=4)
    submit(eng)
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(3):
        for out in eng.step():
            outputs.setdefault(out.request_id, []).append(out)
    running = [r.request_id for r in eng.scheduler.running]
    waiting = [r.request_id for r in eng.scheduler.waiting]
    assert running and waiting
    used = eng.stats().blocks.used
    eng.abort(running[0])
    eng.abort(waiting[0])
    eng.abort("no-such-request")  # ignored
    assert eng.stats().blocks.used < used
    for rid, outs in run(eng).items():
        outputs.setdefault(rid, []).extend(outs)
    for rid in (running[0], waiting[0]):
        assert [o.finish_reason for o in outputs[rid]][-1:] == ["abort"] and outputs[rid][-1].finished
        assert sum(o.finished for o in outputs[rid]) == 1
    assert outputs[waiting[0]][-1].token_ids == [] and len(outputs[running[0]][-1].token_ids) == 3
    done = [i for i in range(len(PROMPTS)) if str(i) not in (running[0], waiting[0])]
    assert [outputs[str(i)][-1].token_ids for i in done] == [alone[i] for i in done]
    all_blocks_back(eng)
    eng.abort(running[1])  # finished already: ignored
    assert not eng.has_unfinished() and eng.step() == []


# -- text, stops, logprobs -----------------------------------------------------------------------
def test_text_stop_strings_and_eos_match_generate(stories):
    options = dict(max_new_tokens=30, stop=("Lily",))
    eng = engine(stories)
    for i, text in enumerate(STORY_PROMPTS):
        eng.add_request(str(i), stories.tokenizer.encode(text), SamplingParams(**options))
    outputs = run(eng)
    for i, text in enumerate(STORY_PROMPTS):
        want = stories.generate(text, **options)
        got = outputs[str(i)]
        assert got[-1].token_ids == want.token_ids and "".join(o.new_text for o in got) == want.text
        assert (got[-1].finish_reason, got[-1].stop_reason) == (want.finish_reason, want.stop_reason)
    assert any(o[-1].stop_reason == "Lily" for o in outputs.values())


def test_logprobs_are_the_models_distribution(tiny):
    eng = engine(tiny)
    eng.add_request("k3", PROMPTS[0], SamplingParams(max_new_tokens=4, ignore_eos=True), logprobs=3)
    eng.add_request("k0", PROMPTS[0], SamplingParams(max_new_tokens=4, ignore_eos=True), logprobs=0)
    eng.add_request("none", PROMPTS[0], SamplingParams(max_new_tokens=4, ignore_eos=True))
    outputs = run(eng)
    with tiny.session() as session:
        first = log_softmax(session.sequence().prefill(PROMPTS[0]))
    k3 = outputs["k3"][0]
    token = k3.new_token_ids[0]
    assert k3.logprobs == pytest.approx([first[token]], abs=1e-4)
    top = k3.top_logprobs[0]
    assert list(top) == list(np.argsort(-first)[:3]) and next(iter(top)) == token  # greedy took the best
    assert all(len(o.logprobs) == len(o.new_token_ids) and len(o.top_logprobs) == len(o.new_token_ids)
               for o in outputs["k3"])
    assert outputs["k0"][0].logprobs == k3.logprobs and outputs["k0"][0].top_logprobs is None
    assert outputs["none"][0].logprobs is None and outputs["none"][0].top_logprobs is None


def test_max_context_override_reaches_the_runner(tiny):
    """Engine(max_context=N), as session(max_context=N), lets sequences past the model's context."""
    prompt = [1] + list(range(20, 80))  # 61 tokens: 10 more would pass the model's 64
    eng = Engine(tiny, max_context=80)
    eng.add_request("long", prompt, SamplingParams(max_new_tokens=10, ignore_eos=True))
    out = run(eng)["long"][-1]
    assert out.finish_reason == "length" and len(out.token_ids) == 10


def test_context_end_finishes_with_length(tiny):
    prompt = [1] + list(range(20, 80))  # 61 of 64 tokens
    eng = engine(tiny)
    eng.add_request("long", prompt, SamplingParams(max_new_tokens=50, ignore_eos=True))
    out = run(eng)["long"][-1]
    assert out.finish_reason == "length" and len(prompt) + len(out.token_ids) == 64
    assert out.token_ids == tiny.generate(prompt, max_new_tokens=50, ignore_eos=True).token_ids


# -- what is refused, and why ---------------------------------------------------------------------
def test_bad_requests_are_explained(tiny):
    eng = engine(tiny)
    eng.add_request("a", [1, 2], SamplingParams(max_new_tokens=2))
    cases = [
        ("a", [1, 2], {}, "already in use"),
        ("b", [1] * 65, {}, "65 tokens but the model's context is 64"),
        ("c", [1, 999], {}, "token id 999 is outside the vocabulary"),
        ("d", [], {}, "non-empty list of token ids"),
        ("e", [1, 2], {"logprobs": -1}, "logprobs must be None or an integer"),
        ("", [1, 2], {}, "non-empty string"),
    ]
    for rid, prompt, extra, needle in cases:
        with pytest.raises(InputError, match=needle):
            eng.add_request(rid, prompt, SamplingParams(max_new_tokens=2), **extra)
    with pytest.raises(InputError, match="params must be a SamplingParams, got dict"):
        eng.add_request("g", [1, 2], {"max_new_tokens": 2})
    assert [r.request_id for r in eng.scheduler.waiting] == ["a"]  # nothing half-added


def test_a_pool_too_small_for_one_context_names_the_field(tiny):
    with pytest.raises(ConfigError, match=r"Config.kv_cache_memory=1000 bytes .* needs 4; set kv_cache_memory to at least 16384"):
        engine(tiny, kv_cache_memory=1000)
    assert engine(tiny, kv_cache_memory=4 * BLOCK_BYTES).blocks.num_blocks == 4
    assert engine(tiny).blocks.num_blocks > 4  # auto: a share of the available memory


def test_generate_of_a_batch_runs_on_the_engine(tiny):
    from infercc.runtime.engine_generation import EngineGeneration
    from infercc.runtime.generate import _generation

    assert isinstance(_generation(tiny, PROMPTS[:2], {}), EngineGeneration)
    assert not isinstance(_generation(tiny, PROMPTS[:1], {}), EngineGeneration)  # one prompt: the decode loop
    results = tiny.generate(PROMPTS[:4], max_new_tokens=12, ignore_eos=True)
    assert [r.token_ids for r in results] == [tiny.generate(p, max_new_tokens=12, ignore_eos=True).token_ids
                                              for p in PROMPTS[:4]]
    assert all(r.finish_reason == "length" and r.prompt_seconds > 0 for r in results)


def test_a_graph_without_a_cache_runs_on_the_contiguous_runner(tmp_path):
    compiled = infercc.compile(write_tiny_gguf(tmp_path / "tiny.gguf"), kv_cache=False)
    eng = engine(compiled)  # paged asked for, but there is nothing to page
    assert eng.stats().runner == "contiguous" and "no KV cache" in eng.stats().runner_reason
    submit(eng, PROMPTS[:3], MAX_NEW[:3])
    assert tokens(run(eng), 3) == [compiled.generate(p, max_new_tokens=m, ignore_eos=True).token_ids
                                   for p, m in zip(PROMPTS[:3], MAX_NEW[:3])]
