"""Rows with different adapters share engine steps and session steps, and each row gets exactly
what it gets alone; KV blocks are never shared across adapters; switching a sequence's adapter
recomputes its prefix."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

import infercc
from infercc.runtime.engine import Engine, log_softmax
from tests.lora._data import compiled
from tests.runtime._threads import together

PROMPTS = [[1] + [(7 * i + 3 * j) % 90 + 3 for j in range(n)] for i, n in enumerate((5, 20, 9, 33, 12, 17))]
ADAPTER_OF = ["a", "b", None, "c", "d", None]
NEW = 8


@pytest.fixture(scope="module", params=["ort", "c"])
def model(request):
    with warnings.catch_warnings():  # backend="c": adapter rows run on ONNX Runtime (test_peft_reference checks it)
        warnings.simplefilter("ignore", UserWarning)
        return compiled("llama", "a", "b", "c", "d", backend=request.param)


def _alone(model, prompt, adapter):
    result = model.generate(prompt, adapter=adapter, max_new_tokens=NEW, ignore_eos=True)
    return result.token_ids


def test_one_engine_batch_of_four_adapters_and_base_rows(model) -> None:
    engine = Engine(model)
    for i, (prompt, adapter) in enumerate(zip(PROMPTS, ADAPTER_OF)):
        engine.add_request(str(i), prompt, infercc.SamplingParams(max_new_tokens=NEW, ignore_eos=True),
                           adapter=adapter, logprobs=0)
    tokens: dict[str, list[int]] = {}
    logprobs: dict[str, list[float]] = {}
    widest, steps = 0, 0
    while engine.has_unfinished():
        before = engine.runner.runs
        outs = engine.step()
        steps += 1
        widest = max(widest, len(outs))
        runner = engine.runner
        if steps > 1 and runner.padding is None and runner._lora_padding() is None:
            # decode steps: one run for the base rows, one for every adapter row together
            assert runner.runs - before <= 2
        for out in outs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            logprobs.setdefault(out.request_id, []).extend(out.logprobs or [])
    assert widest == len(PROMPTS)  # every row was in one step together
    for i, (prompt, adapter) in enumerate(zip(PROMPTS, ADAPTER_OF)):
        assert tokens[str(i)] == _alone(model, prompt, adapter), f"row {i} (adapter {adapter})"
    assert len({tuple(t) for t in tokens.values()}) > 3  # the adapters do change the text
    with model.session() as session:  # logits too: the engine's logprobs against a sequence alone
        for i, (prompt, adapter) in enumerate(zip(PROMPTS, ADAPTER_OF)):
            seq = session.sequence(adapter=adapter)
            seq.prefill(prompt)
            alone = []
            for _ in range(NEW):
                alone.append(float(log_softmax(seq.logits)[seq.decode()]))
            np.testing.assert_allclose(logprobs[str(i)], alone, atol=1e-5)
    model.remove_adapter("d")  # nothing held: every request released its adapter
    model.add_adapter("d", Path(model.lora.info("a")["path"]).parent / "d")


def test_generate_batch_and_stream_with_an_adapter(model) -> None:
    batch = model.generate(PROMPTS[:3], adapter="b", max_new_tokens=NEW, ignore_eos=True)
    assert [r.token_ids for r in batch] == [_alone(model, p, "b") for p in PROMPTS[:3]]
    stream = model.stream(PROMPTS[0], adapter="b", max_new_tokens=NEW, ignore_eos=True)
    list(stream)
    assert stream.result.token_ids == batch[0].token_ids


def test_threads_decode_sequences_of_different_adapters(model) -> None:
    expected = [_alone(model, p, a) for p, a in zip(PROMPTS, ADAPTER_OF)]
    with model.session() as session:
        def work(i: int) -> list[int]:
            seq = session.sequence(adapter=ADAPTER_OF[i])
            seq.prefill(PROMPTS[i])
            return [seq.decode() for _ in range(NEW - 1)]

        got = together(work, len(PROMPTS))
        assert session.pool.steps < len(PROMPTS) * NEW  # steps were shared
    for i in range(len(PROMPTS)):
        assert got[i] == expected[i][:NEW - 1], f"row {i}"


def test_prefix_blocks_are_not_shared_across_adapters(model) -> None:
    shared = [1] + list(range(10, 57))  # three full blocks of 16
    with model.session() as session:
        pool = session.pool
        first = session.sequence(adapter="a")
        first.prefill(shared)
        computed = pool.computed_tokens
        same = session.sequence(adapter="a")
        same.prefill(shared)
        assert pool.computed_tokens - computed == len(shared) - 32  # two blocks served from the cache
        computed = pool.computed_tokens
        other = session.sequence(adapter="b")
        other.prefill(shared)
        base = session.sequence()
        base.prefill(shared)
        assert pool.computed_tokens - computed == 2 * len(shared)  # nothing reused across adapters
        np.testing.assert_allclose(same.logits, first.logits, atol=1e-5)


def test_switching_adapter_recomputes_the_prefix(model) -> None:
    with model.session() as session:
        seq = session.sequence(adapter="a")
        seq.prefill(PROMPTS[1])
        seq.decode()
        fresh = session.sequence(adapter="c")
        fresh.prefill(seq.tokens)
        seq.set_adapter("c")
        np.testing.assert_allclose(seq.logits, fresh.logits, atol=1e-5)
        assert seq.decode() == fresh.decode()
        seq.set_adapter(None)
        assert seq.adapter is None
        model.remove_adapter("a")  # released by the switch
        model.add_adapter("a", Path(model.lora.info("c")["path"]).parent / "a")
