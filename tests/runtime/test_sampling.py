"""Sampling: parameter validation, each filter's mask, penalties as defined, seeded draws."""

from __future__ import annotations

import numpy as np
import pytest

from infercc import ConfigError
from infercc.runtime.sampling import Sampler, SamplingParams, apply_penalties, filter_logits

#: Probabilities 0.5, 0.3, 0.15, 0.05 as logits.
PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = np.log(PROBS).astype(np.float32)


def kept(params: SamplingParams, logits=LOGITS) -> set[int]:
    return set(np.flatnonzero(np.isfinite(filter_logits(logits, params))).tolist())


def draws(params: SamplingParams, logits=LOGITS, n: int = 2000, context=(), output=()) -> np.ndarray:
    sampler = Sampler(params)
    return np.array([sampler(logits, context, output) for _ in range(n)])


# -- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, needle", [
    ("temperature", -0.1, ">= 0"), ("temperature", float("nan"), ">= 0"), ("temperature", True, ">= 0"),
    ("top_k", -1, "integer >= 0"), ("top_k", 2.5, "integer >= 0"),
    ("top_p", 0.0, "(0, 1]"), ("top_p", 1.5, "(0, 1]"),
    ("min_p", -0.1, "[0, 1]"), ("min_p", 2, "[0, 1]"),
    ("repetition_penalty", 0, "> 0"), ("frequency_penalty", 2.5, "[-2, 2]"), ("presence_penalty", -3, "[-2, 2]"),
    ("seed", -1, "integer >= 0"), ("seed", "x", "integer >= 0"),
    ("max_new_tokens", 0, ">= 1"), ("stop_token_ids", [1, -2], "token ids"), ("stop", [""], "non-empty"),
    ("ignore_eos", 1, "True or False"),
])
def test_invalid_params_name_field_and_range(field, value, needle):
    with pytest.raises(ConfigError) as info:
        SamplingParams(**{field: value})
    assert f"SamplingParams.{field}" in str(info.value) and needle in str(info.value)


def test_params_normalize_and_replace():
    p = SamplingParams(stop="END", stop_token_ids=7)
    assert p.stop == ("END",) and p.stop_token_ids == (7,) and p.greedy
    assert p.replace(temperature=0.5).temperature == 0.5
    with pytest.raises(ConfigError, match="unknown sampling option"):
        p.replace(temprature=1.0)


# -- filters -------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_p, expected", [(0.4, {0}), (0.7, {0, 1}), (0.8, {0, 1}), (0.81, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_smallest_set_reaching_p(top_p, expected):
    assert kept(SamplingParams(temperature=1.0, top_p=top_p)) == expected


@pytest.mark.parametrize("min_p, expected", [(0.35, {0, 1}), (0.29, {0, 1, 2}), (0.05, {0, 1, 2, 3}), (1.0, {0})])
def test_min_p_keeps_tokens_above_fraction_of_best(min_p, expected):
    assert kept(SamplingParams(temperature=1.0, min_p=min_p)) == expected


def test_top_k_never_emits_outside_k_best():
    logits = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    best = set(np.argsort(-logits)[:5].tolist())
    got = draws(SamplingParams(temperature=2.0, top_k=5, seed=1), logits, n=3000)
    assert set(got.tolist()) == best  # all k appear, nothing else


def test_filters_combine_and_draws_respect_masks():
    params = SamplingParams(temperature=1.0, top_k=3, top_p=0.7, seed=0)
    assert kept(params) == {0, 1}
    assert set(draws(params).tolist()) == {0, 1}
    assert set(draws(SamplingParams(temperature=1.0, min_p=0.35, seed=3)).tolist()) == {0, 1}


def test_draw_frequencies_follow_probabilities():
    got = draws(SamplingParams(temperature=1.0, seed=123), n=20000)
    freq = np.bincount(got, minlength=4) / got.size
    np.testing.assert_allclose(freq, PROBS, atol=0.015)


def test_temperature_sharpens_and_flattens():
    def entropy(t):
        p = Sampler(SamplingParams(temperature=t)).probabilities(LOGITS)
        return -(p[p > 0] * np.log(p[p > 0])).sum()
    assert entropy(0.5) < entropy(1.0) < entropy(2.0)


def test_greedy_without_penalties_picks_as_the_penalized_path_does():
    """The unpenalized greedy pick skips apply_penalties' float64 copy: same index on float16
    and float32 rows, first of tied maxima, and a penalty of 1 (off) changes nothing."""
    assert not SamplingParams().penalized and SamplingParams(presence_penalty=0.5).penalized
    row = np.array([0.5, 2.0, -np.inf, 2.0, 1.0], np.float16)
    for logits in (row, row.astype(np.float32)):
        assert Sampler(SamplingParams())(logits) == 1
        assert Sampler(SamplingParams(repetition_penalty=1.0))(logits, [1, 3], [1]) == 1
    assert Sampler(SamplingParams(repetition_penalty=4.0))(row, [1], []) == 3


def test_temperature_to_zero_equals_greedy():
    logits = np.random.default_rng(5).standard_normal(1000).astype(np.float32)
    greedy = Sampler(SamplingParams())(logits)
    assert greedy == int(np.argmax(logits))
    assert set(draws(SamplingParams(temperature=1e-4, seed=9), logits, n=200).tolist()) == {greedy}


def test_same_seed_same_draws_different_seed_differs():
    logits = np.zeros(50, np.float32)
    a = draws(SamplingParams(temperature=1.0, seed=42), logits, n=50)
    b = draws(SamplingParams(temperature=1.0, seed=42), logits, n=50)
    c = draws(SamplingParams(temperature=1.0, seed=43), logits, n=50)
    assert (a == b).all() and not (a == c).all()


def test_draw_never_picks_a_masked_token():
    logits = np.array([0.0, -np.inf, 0.0, -np.inf], np.float32)
    assert set(draws(SamplingParams(temperature=1.0, seed=0), logits, n=500).tolist()) == {0, 2}


# -- penalties -----------------------------------------------------------------------------------
def test_repetition_penalty_hf_semantics():
    logits = np.array([2.0, -2.0, 1.0, -1.0], np.float32)
    out = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), context=[0], output=[1, 1])
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0, -1.0])  # positive /2, negative *2, unseen unchanged


def test_frequency_and_presence_penalties_openai_semantics():
    logits = np.zeros(4, np.float32)
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=1.0)
    out = apply_penalties(logits, params, context=[3, 3], output=[0, 0, 0, 1])
    np.testing.assert_allclose(out, [-(0.5 * 3 + 1.0), -(0.5 + 1.0), 0.0, 0.0])  # prompt tokens not penalized
    negative = apply_penalties(logits, SamplingParams(presence_penalty=-1.0), output=[2])
    assert negative[2] == 1.0


def test_penalties_change_the_distribution_and_greedy_choice():
    logits = np.array([3.0, 2.9, 0.0], np.float32)
    assert Sampler(SamplingParams())(logits, output=[0]) == 0
    assert Sampler(SamplingParams(repetition_penalty=1.5))(logits, output=[0]) == 1
    assert Sampler(SamplingParams(frequency_penalty=0.2))(logits, output=[0]) == 1
    plain = Sampler(SamplingParams(temperature=1.0)).probabilities(logits, output=[0])
    penalized = Sampler(SamplingParams(temperature=1.0, presence_penalty=1.0)).probabilities(logits, output=[0])
    assert penalized[0] < plain[0] and penalized[1] > plain[1]
    got = draws(SamplingParams(temperature=1.0, presence_penalty=2.0, seed=0), logits, n=4000, output=[0])
    freq = np.bincount(got, minlength=3) / got.size
    np.testing.assert_allclose(freq, Sampler(SamplingParams(temperature=1.0, presence_penalty=2.0)).probabilities(
        logits, output=[0]), atol=0.03)


def test_unknown_field_in_the_constructor_is_a_config_error_with_a_suggestion():
    """Not the dataclass's bare TypeError: the same error replace() gives, with the closest field."""
    with pytest.raises(ConfigError, match=r"unknown sampling option\(s\) \['tempreature'\] \(did you mean 'temperature'\?\)"):
        SamplingParams(tempreature=1.0)
    assert SamplingParams(temperature=0.5).temperature == 0.5
