"""Speculative decoding inside the serving engine: a request that speculates gives exactly the
tokens it gives alone without speculation (greedy), inside a 16-request continuous batch, on
every runner form (C paged, ORT gather, contiguous), through preemption; rejected tokens never
reach the prefix cache; blocks always come back; stops, lengths and logprobs land exactly.

Model: the tiny random-weight LLaMA GGUF (context 64). Its greedy output falls into loops, so
prompt lookup is accepted often on repetitive prompts (the tests check it was), and rejected
often on the others: both paths run.
"""

from __future__ import annotations

import pytest

import infercc
from infercc import InputError
from infercc.runtime.engine import Engine
from infercc.runtime.sampling import SamplingParams
from tests.fuzz.synthetic import write_tiny_gguf
from tests.runtime.test_engine import BLOCK_BYTES, all_blocks_back, run, tokens

#: 16 prompts of mixed lengths; every other one repeats a short pattern (prompt lookup finds it).
PROMPTS = [[1] + (list(range(20 + i, 24 + i)) * 6)[:n] if i % 2 else [1] + list(range(30 + i, 30 + i + n))
           for i, n in enumerate((3, 17, 1, 30, 8, 12, 24, 5, 9, 21, 2, 14, 6, 19, 11, 26))]
MAX_NEW = [20, 24, 18, 16, 22, 20, 14, 24, 19, 17, 25, 21, 23, 15, 20, 18]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> infercc.CompiledModel:
    return infercc.compile(write_tiny_gguf(tmp_path_factory.mktemp("spec") / "tiny.gguf"))


@pytest.fixture(scope="module")
def alone(tiny: infercc.CompiledModel) -> list[list[int]]:
    """Each prompt run on its own without speculation (greedy, EOS ignored)."""
    return [tiny.generate(p, max_new_tokens=m, ignore_eos=True).token_ids for p, m in zip(PROMPTS, MAX_NEW)]


def engine(compiled: infercc.CompiledModel, layout: str = "paged", **knobs) -> Engine:
    knobs.setdefault("speculation", "prompt_lookup")
    # "fixed": the depth never follows this machine's step timings (a loaded machine's slow verify
    # steps would turn "auto" or "latency" off), so every run speculates alike
    knobs.setdefault("speculation_policy", "fixed")
    return Engine(compiled, compiled.config.replace(kv_cache_layout=layout, **knobs))


def submit(eng: Engine, prompts=PROMPTS, max_new=MAX_NEW, **params) -> None:
    for i, (prompt, m) in enumerate(zip(prompts, max_new)):
        eng.add_request(str(i), prompt, SamplingParams(max_new_tokens=m, ignore_eos=True, **params))


def check_batch(eng: Engine, alone: list[list[int]]) -> None:
    """Every request's tokens equal its own run; speculation proposed and was accepted; each
    step's new ids add up; the blocks all came back."""
    submit(eng)
    outputs = run(eng)
    assert tokens(outputs, len(PROMPTS)) == alone
    for outs in outputs.values():
        assert sum((o.new_token_ids for o in outs), []) == outs[-1].token_ids
        assert outs[-1].finish_reason == "length" and [o.finished for o in outs].count(True) == 1
    stats = eng.stats()
    spec = stats.speculation
    assert spec is not None and spec.proposed > 0 and 0 < spec.accepted < spec.proposed, spec
    # several tokens in one step happened, and the steps were fewer than the tokens of the longest
    assert any(len(o.new_token_ids) > 1 for outs in outputs.values() for o in outs)
    assert stats.generation_tokens == sum(len(t) for t in alone)
    assert stats.steps < max(MAX_NEW) + len(PROMPTS)
    per_request = [outs[-1].speculation for outs in outputs.values()]
    assert sum(s.proposed for s in per_request) == spec.proposed
    assert sum(s.accepted for s in per_request) == spec.accepted
    all_blocks_back(eng)


def test_the_engine_times_its_steps_for_the_depth_policy(tiny: infercc.CompiledModel, alone: list[list[int]]) -> None:
    """Alone, a request first decodes PROBE_STEPS plain steps (timing a one-position step), then
    its verify steps measure what a position costs; its tokens stay those it gives alone."""
    from infercc.runtime.speculative.policy import PROBE_STEPS

    eng = engine(tiny, speculation_policy="latency")
    submit(eng, PROMPTS[1:2], MAX_NEW[1:2])
    outputs = run(eng)
    assert tokens(outputs, 1) == alone[1:2]
    costs = eng.speculation.costs
    assert costs.one_steps >= PROBE_STEPS and costs.t1 is not None and costs.measured > 0, vars(costs)
    assert eng.stats().speculation.proposed > 0
    all_blocks_back(eng)


# -- equality with each request alone, in a 16-request batch, on every form ----------------------
def test_ort_gather_batch_equals_each_alone(tiny, alone):
    eng = engine(tiny)
    assert eng.form == "ort-gather"
    check_batch(eng, alone)


def test_contiguous_batch_equals_each_alone(tiny, alone):
    eng = engine(tiny, "contiguous")
    assert eng.form == "contiguous"
    check_batch(eng, alone)


def test_c_paged_batch_equals_each_alone(tiny_c):
    """On C the k+1 positions come from PagedAttention reading the new queries against the pool
    in place; each request equals the C decode loop alone (whose float rounding differs from
    ONNX Runtime's, so the reference is its own)."""
    alone = []
    for prompt, max_new in zip(PROMPTS, MAX_NEW):
        result = tiny_c.generate(prompt, max_new_tokens=max_new, ignore_eos=True)
        assert result.decode_loop == "c"
        alone.append(result.token_ids)
    eng = engine(tiny_c)
    assert eng.form == "c-paged"
    check_batch(eng, alone)


def test_preemption_with_speculation(tiny, alone):
    """Five blocks hold one context: requests are preempted (recomputed) while speculating, and a
    draft never causes a preemption of its own (it shrinks to what is free)."""
    eng = engine(tiny, kv_cache_memory=5 * BLOCK_BYTES, max_batch_tokens=7)
    submit(eng)
    outputs = run(eng)
    assert tokens(outputs, len(PROMPTS)) == alone
    stats = eng.stats()
    assert stats.preemptions > 0 and stats.speculation.accepted > 0
    all_blocks_back(eng)


def test_drafts_stay_within_the_step_budget(tiny, alone):
    """Drafts are booked from what the step's budget leaves after decodes and prompt chunks, and
    at most ``max_speculation_compute_fraction`` of the budget: a step never computes more than
    ``max_batch_tokens`` tokens, nor proposes more than the fraction allows."""
    eng = engine(tiny, max_batch_tokens=4, max_speculation_compute_fraction=0.5)
    assert eng.scheduler.spec_budget == 0  # made with the first request that speculates
    submit(eng, PROMPTS[1:4:2], MAX_NEW[1:4:2])
    assert eng.scheduler.spec_budget == 2
    computed = proposed = 0
    outputs = {}
    while eng.has_unfinished():
        for out in eng.step():
            outputs.setdefault(out.request_id, []).append(out)
        stats = eng.stats()
        assert stats.computed_tokens - computed <= 4 and stats.speculation.proposed - proposed <= 2
        computed, proposed = stats.computed_tokens, stats.speculation.proposed
    assert [outputs[str(i)][-1].token_ids for i in range(2)] == [alone[1], alone[3]]
    assert proposed > 0 and eng.stats().preemptions == 0


# -- the prefix cache, stops, logprobs, per-request switches --------------------------------------
def test_prefix_cache_is_never_keyed_on_rejected_tokens(tiny, alone):
    """After a speculating batch, prompts that extend earlier prompts by their outputs hit the
    blocks those requests cached (prompt and output); what they then generate equals their
    own run from scratch, so every cached block holds the K/V of the tokens it is keyed on."""
    eng = engine(tiny)
    submit(eng)
    run(eng)
    assert eng.stats().speculation.proposed > eng.stats().speculation.accepted  # some were rejected
    longer = [p + a[:40 - len(p)] for p, a in zip(PROMPTS, alone) if len(p) + len(a) >= 40]
    want = [tiny.generate(p, max_new_tokens=12, ignore_eos=True).token_ids for p in longer]
    hits_before = eng.stats().cached_tokens
    submit(eng, longer, [12] * len(longer), )
    got = run(eng)
    assert [got[str(i)][-1].token_ids for i in range(len(longer))] == want
    assert eng.stats().cached_tokens - hits_before >= 32 * len(longer)  # output blocks were reused
    all_blocks_back(eng)


def test_stops_and_lengths_land_exactly(tiny, alone):
    """A stop id inside an accepted run of proposals ends the request right there (the stop id
    not in the output), as without speculation; max_new_tokens is never exceeded."""
    eng = engine(tiny)
    stops = {}
    for i, (prompt, want) in enumerate(zip(PROMPTS, alone)):
        stop = want[len(want) // 2]
        stops[str(i)] = want[:want.index(stop)]
        eng.add_request(str(i), prompt, SamplingParams(max_new_tokens=MAX_NEW[i], ignore_eos=True,
                                                       stop_token_ids=(stop,)))
    outputs = run(eng)
    for request_id, want in stops.items():
        last = outputs[request_id][-1]
        assert (last.token_ids, last.finish_reason) == (want, "stop"), request_id
    assert eng.stats().speculation.accepted > 0
    all_blocks_back(eng)


def test_logprobs_of_several_tokens_per_step(tiny):
    """Each emitted token's log-probability comes from its own position's logits: the same as
    decoding one token per step."""
    plain, spec = Engine(tiny), engine(tiny)
    for eng in (plain, spec):
        for i in (1, 3, 5):
            eng.add_request(str(i), PROMPTS[i], SamplingParams(max_new_tokens=16, ignore_eos=True), logprobs=2)
    want, got = run(plain), run(spec)
    assert any(len(o.new_token_ids) > 1 for outs in got.values() for o in outs)
    for request_id, outs in want.items():
        flat = lambda outs, field: sum((getattr(o, field) for o in outs), [])  # noqa: E731
        assert flat(got[request_id], "new_token_ids") == flat(outs, "new_token_ids")
        assert flat(got[request_id], "logprobs") == pytest.approx(flat(outs, "logprobs"), abs=1e-4)
        tops = flat(got[request_id], "top_logprobs")
        assert [sorted(t) for t in tops] == [sorted(t) for t in flat(outs, "top_logprobs")]


def test_per_request_speculation_overrides_the_config(tiny, alone):
    """Config off + a request asking for prompt lookup speculates that request only; config on +
    "off" does not; a bad value is an InputError naming the request and the allowed values."""
    eng = Engine(tiny, tiny.config.replace(speculation_policy="latency"))
    eng.add_request("on", PROMPTS[1], SamplingParams(max_new_tokens=MAX_NEW[1], ignore_eos=True),
                    speculation="prompt_lookup")
    eng.add_request("plain", PROMPTS[3], SamplingParams(max_new_tokens=MAX_NEW[3], ignore_eos=True))
    outputs = run(eng)
    assert outputs["on"][-1].token_ids == alone[1] and outputs["plain"][-1].token_ids == alone[3]
    assert outputs["on"][-1].speculation.proposed > 0 and outputs["plain"][-1].speculation is None
    eng = engine(tiny)
    eng.add_request("off", PROMPTS[1], SamplingParams(max_new_tokens=MAX_NEW[1], ignore_eos=True), speculation="off")
    outputs = run(eng)
    assert outputs["off"][-1].token_ids == alone[1] and outputs["off"][-1].speculation is None
    assert all(len(o.new_token_ids) <= 1 for o in outputs["off"])
    with pytest.raises(InputError, match=r"request 'bad'.*speculation='lookahead'.*prompt_lookup"):
        eng.add_request("bad", PROMPTS[0], SamplingParams(), speculation="lookahead")
    assert not eng.has_unfinished()


def test_auto_policy_stays_off_under_a_full_batch(tiny, alone):
    """The "auto" policy charges each verified position by the batch: at 16 running requests it
    proposes nothing, and turns on again as the batch drains."""
    eng = engine(tiny, speculation_policy="auto", speculation="auto")
    submit(eng)
    first_steps = []
    for _ in range(3):
        eng.step()
        first_steps.append(eng.stats().speculation.proposed)
    assert first_steps == [0, 0, 0]
    outputs = run(eng)
    assert tokens(outputs, len(PROMPTS)) == alone
    all_blocks_back(eng)


def test_seeded_sampling_with_speculation_finishes_and_returns_blocks(tiny):
    """Sampling verifies by rejection sampling (distribution checked in tests/runtime/speculative);
    here: lengths respected, a seed repeats, every block back."""
    runs = []
    for _ in range(2):
        eng = engine(tiny)
        submit(eng, temperature=0.8, seed=7)
        outputs = run(eng)
        runs.append(tokens(outputs, len(PROMPTS)))
        assert all(len(t) == m for t, m in zip(runs[-1], MAX_NEW))
        all_blocks_back(eng)
    assert runs[0] == runs[1]


def test_generate_of_a_batch_speculates_on_the_engine(tiny, alone):
    """``EngineGeneration`` (generate of several prompts) passes the speculation on and reports
    each prompt's counts in its result."""
    from infercc.runtime.engine_generation import EngineGeneration
    from infercc.runtime.model_runner import ModelRunner

    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    generation = EngineGeneration(tiny, ModelRunner(tiny.backend, tiny.model), None, PROMPTS[:4], params,
                                  speculation="prompt_lookup")
    results = generation.run()
    assert [r.token_ids for r in results] == [a[:16] for a in alone[:4]]
    assert all(r.speculation is not None for r in results) and sum(r.speculation.proposed for r in results) > 0
    assert results[0].speculation_reason is None


def test_a_graph_without_a_cache_speculates_by_recomputing(tmp_path):
    """Without a KV cache the contiguous runner recomputes each sequence; a verified row rolls
    its token record back to the accepted length all the same."""
    compiled = infercc.compile(write_tiny_gguf(tmp_path / "tiny.gguf"), kv_cache=False)
    eng = engine(compiled)
    assert eng.form == "contiguous"
    submit(eng, PROMPTS[:4], MAX_NEW[:4])
    assert tokens(run(eng), 4) == [compiled.generate(p, max_new_tokens=m, ignore_eos=True).token_ids
                                   for p, m in zip(PROMPTS[:4], MAX_NEW[:4])]
    assert eng.stats().speculation.accepted > 0


def test_model_drafts_in_the_batch_and_a_missing_draft_falls_back(tiny, alone, tmp_path):
    """The self-draft (the model's first layers) runs inside the batch with the same tokens; a
    draft model that cannot load decodes plainly with the reason in the stats."""
    eng = engine(tiny, speculation="self_draft")
    submit(eng, PROMPTS[:6], MAX_NEW[:6])
    assert tokens(run(eng), 6) == alone[:6]
    # The draft's cost enters the depth choice (on the tiny model, where the embedding and LM head
    # are most of the weights, it costs about as much as the target: the policy may keep k at 0).
    assert eng.stats().speculation is not None and not eng.stats().speculation_notes
    assert 0 < eng.speculation._policies["self_draft"].draft_cost
    all_blocks_back(eng)
    eng = engine(tiny, speculation="draft", draft_model=str(tmp_path / "missing.gguf"))
    submit(eng, PROMPTS[:3], MAX_NEW[:3])
    outputs = run(eng)
    assert tokens(outputs, 3) == alone[:3] and outputs["0"][-1].speculation is None
    assert "missing.gguf" in eng.stats().speculation_notes["draft"]


@pytest.mark.parametrize("uniform", [True, False])
def test_speculating_decode_rows_share_one_forward_run(tiny_c, uniform):
    """Rows of one length share a graph run of the c-paged runner (whose rows of different past
    lengths share runs): drafts of a step are given one width (shorter ones padded, rows without
    a proposal too while cheap), so speculation widens the decode run instead of adding runs.
    ``uniform=False`` shows what it saves."""
    alone = [tiny_c.generate(p, max_new_tokens=16, ignore_eos=True).token_ids for p in PROMPTS[:4]]
    eng = engine(tiny_c)
    assert eng._speculation().uniform  # the engine's choice on this form
    eng.speculation = None
    eng._speculation().uniform = uniform
    submit(eng, PROMPTS[:4], [16] * 4)
    while any(not r.output for r in eng.scheduler.running) or eng.scheduler.waiting:  # prompts done
        eng.step()
    runs, steps = eng.runner.runs, eng.stats().steps
    outputs = run(eng)
    assert [outputs[str(i)][-1].token_ids for i in range(4)] == alone
    per_step = (eng.runner.runs - runs) / (eng.stats().steps - steps)
    assert per_step < 1.3 if uniform else per_step > 1.3, per_step


def test_a_request_brings_its_own_policy_fields(tiny, alone):
    """speculation_policy / max_speculation_compute_fraction per request: a batched request that
    brings a share of 0 never speculates while the others do (a request may lower the engine's
    share, never raise it: the scheduler's budget per step stays the engine's); the tokens stay
    those of each alone. A value Config refuses is an InputError naming the field."""
    eng = engine(tiny)
    eng.add_request("0", PROMPTS[1], SamplingParams(max_new_tokens=10, ignore_eos=True),
                    max_speculation_compute_fraction=0.0)
    eng.add_request("1", PROMPTS[1], SamplingParams(max_new_tokens=MAX_NEW[1], ignore_eos=True))
    outputs = run(eng)
    assert outputs["0"][-1].token_ids == alone[1][:10] and outputs["1"][-1].token_ids == alone[1]
    assert outputs["0"][-1].speculation.proposed == 0 < outputs["1"][-1].speculation.proposed
    for field, value in (("speculation_policy", "eager"), ("max_speculation_compute_fraction", 2.0)):
        with pytest.raises(InputError, match=field):
            eng.add_request("bad", PROMPTS[0], SamplingParams(max_new_tokens=4), **{field: value})
    all_blocks_back(eng)


def test_generate_and_sequences_take_the_policy_fields(tiny, alone):
    """generate (one prompt: the speculative loop; several: the engine) and session.sequence take
    a request's own speculation_policy; "fixed" speculates whatever the acceptance, the tokens
    stay the plain ones; a bad value is an InputError naming the field before anything runs."""
    one = tiny.generate(PROMPTS[1], max_new_tokens=MAX_NEW[1], ignore_eos=True, speculation="prompt_lookup",
                        speculation_policy="fixed")
    batch = tiny.generate(PROMPTS[:2], max_new_tokens=12, ignore_eos=True, speculation="prompt_lookup",
                          speculation_policy="fixed", max_speculation_compute_fraction=0.5)
    assert one.token_ids == alone[1] and one.speculation.proposed > 0
    assert [r.token_ids for r in batch] == [a[:12] for a in alone[:2]]
    assert sum(r.speculation.proposed for r in batch) > 0
    with pytest.raises(InputError, match="speculation_policy"):
        tiny.generate(PROMPTS[0], max_new_tokens=4, speculation="prompt_lookup", speculation_policy="eager")
    session = tiny.session()
    seq = session.sequence(speculation="prompt_lookup", speculation_policy="fixed")
    seq.prefill(PROMPTS[1])
    got = [seq.decode() for _ in range(MAX_NEW[1])]
    assert got == alone[1] and seq.speculation.proposed > 0
    assert seq.fork()._own is seq._own is not None
    with pytest.raises(InputError, match="max_speculation_compute_fraction"):
        session.sequence(speculation="prompt_lookup", max_speculation_compute_fraction=-1)
