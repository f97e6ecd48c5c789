"""A single speculating prompt on the generated-C runtime moves from the paged engine to the C
decode loop once its policy keeps speculation off (runtime/hand_back.py): the tokens are plain
greedy decoding's, token for token, whether it moves right after the prompt or after verified
(accepted and rejected) guesses, up to the length and context limits; what cannot move stays."""

from __future__ import annotations

import numpy as np
import pytest

import infercc
from infercc.codegen.library import RunError
from infercc.runtime.engine import Engine
from infercc.runtime.hand_back import gather_past, hand_back_problem
from infercc.runtime.sampling import SamplingParams
from infercc.runtime.speculative import policy
from tests.importers._models import SMOLLM2, require

#: The tiny model's greedy text loops, so prompt lookup finds and verifies guesses on these.
PROMPTS = [[1] + list(range(20, 24)) * 4, [1, 93, 181, 255, 150, 27, 235, 167, 134, 223, 128, 196, 54, 20], [1, 7]]


def _depth_then_off(monkeypatch, speculating_steps: int) -> None:
    """Every sequence's policy asks for 3 guesses for its first decode steps, then 0 (off)."""
    calls: dict = {}

    def depth(self, seq_id, **_):
        calls[id(self), seq_id] = calls.get((id(self), seq_id), 0) + 1
        return 3 if calls[id(self), seq_id] <= speculating_steps else 0

    monkeypatch.setattr(policy.DepthPolicy, "depth", depth)


@pytest.mark.parametrize("speculating_steps", [0, 6])
def test_moving_to_the_c_loop_keeps_greedy_tokens(tiny_c, monkeypatch, speculating_steps):
    _depth_then_off(monkeypatch, speculating_steps)
    monkeypatch.setattr(tiny_c, "config", tiny_c.config.replace(speculation_hand_back=3))
    proposed = 0
    for prompt, max_new in zip(PROMPTS, (30, 40, 62)):  # the last one ends at the context (64)
        plain = tiny_c.generate(prompt, max_new_tokens=max_new, ignore_eos=True)
        assert plain.decode_loop == "c"
        moved = tiny_c.generate(prompt, max_new_tokens=max_new, ignore_eos=True, speculation="prompt_lookup")
        assert moved.token_ids == plain.token_ids and moved.finish_reason == plain.finish_reason
        assert moved.decode_loop == "engine+c" and moved.speculation_reason is None
        proposed += moved.speculation.proposed
        stream = tiny_c.stream(prompt, max_new_tokens=max_new, ignore_eos=True, speculation="prompt_lookup")
        assert "".join(stream) == plain.text and stream.result.token_ids == plain.token_ids
    assert (proposed > 0) == (speculating_steps > 0)
    # Config.speculation_hand_back=0: it never moves
    monkeypatch.setattr(tiny_c, "config", tiny_c.config.replace(speculation_hand_back=0))
    stays = tiny_c.generate(PROMPTS[0], max_new_tokens=30, ignore_eos=True, speculation="prompt_lookup")
    assert stays.token_ids == tiny_c.generate(PROMPTS[0], max_new_tokens=30, ignore_eos=True).token_ids
    assert stays.decode_loop != "engine+c"


def test_what_cannot_move_says_why(tiny_c):
    engine = Engine(tiny_c, tiny_c.config.replace(speculation="prompt_lookup"))
    engine.add_request("greedy", PROMPTS[0], SamplingParams(max_new_tokens=8))
    engine.add_request("sampled", PROMPTS[1], SamplingParams(max_new_tokens=8, temperature=0.8, seed=1))
    engine.add_request("penalised", PROMPTS[2], SamplingParams(max_new_tokens=8, repetition_penalty=1.2))
    assert "not between two decode steps" in hand_back_problem(engine, "greedy")  # not even admitted
    engine.step()
    assert hand_back_problem(engine, "greedy") is None
    assert "sampling request" in hand_back_problem(engine, "sampled")
    assert "penalties" in hand_back_problem(engine, "penalised")
    assert "not running" in hand_back_problem(engine, "nobody")


def test_the_gathered_past_is_the_pools_rows(tiny_c):
    """gather_past lays each cache's rows out as the decode loop takes them, and the loop refuses
    a past of the wrong shape with the reason."""
    engine = Engine(tiny_c, tiny_c.config)
    prompt = [1] + list(range(2, 40))  # 39 tokens over 3 blocks of 16
    engine.add_request("a", prompt, SamplingParams(max_new_tokens=4))
    engine.step()
    runner, table = engine.runner, engine.blocks.block_table("a")
    past = gather_past(runner, table, len(prompt))
    for array, entry in zip(past, runner.cache_spec.entries):
        pool = runner.pools[entry.input]
        assert array.shape == (1, pool.shape[1], len(prompt), pool.shape[3]) and array.flags.c_contiguous
        for position in (0, 15, 16, 38):
            np.testing.assert_array_equal(array[0, :, position], pool[table[position // 16], :, position % 16])
    backend = tiny_c.backend
    with pytest.raises(RunError, match="dense"):
        backend.decoding(prompt + [5], max_new_tokens=2, stop_ids=[], temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                         seed=0, past=[a[:, :1] for a in past])
    with pytest.raises(RunError, match="could not take the past"):  # as many past tokens as tokens
        backend.decoding(prompt, max_new_tokens=2, stop_ids=[], temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                         seed=0, past=past)


@pytest.mark.slow
def test_smollm2_moves_to_the_c_loop_with_the_same_tokens(monkeypatch):
    compiled = infercc.compile(require(SMOLLM2), backend="c", speculation_hand_back=4)
    _depth_then_off(monkeypatch, 4)
    prompt = "Summarise: the cat sat on the mat because the mat was warm and the cat was cold."
    plain = compiled.generate(prompt, max_new_tokens=40)
    moved = compiled.generate(prompt, max_new_tokens=40, speculation="prompt_lookup")
    assert moved.token_ids == plain.token_ids and moved.decode_loop == "engine+c"
