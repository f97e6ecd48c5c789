"""Verification. Greedy: the longest matching prefix plus the target's own token, penalties applied
as decoding applies them. Sampling: on a small-vocabulary model (a 2-layer random LLaMA as the
target, its 1-layer prefix as the draft, vocabulary 64), the tokens rejection sampling emits are
distributed as the target's own distribution (chi-square at fixed seeds), for a sampling draft and
a deterministic one; two wrong acceptance rules fail the same test."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

import infercc
from infercc.runtime.model_runner import ModelRunner
from infercc.runtime.sampling import Sampler, SamplingParams
from infercc.runtime.speculative import Proposal, verify
from infercc.runtime.speculative.verify import draw
from tests.runtime._hf_models import write_hf

VOCAB = 64
CONTEXT = [3, 7, 1, 4, 9]
TRIALS = 4000


def test_greedy_accepts_the_matching_prefix_then_the_targets_token():
    logits = np.zeros((4, 8))
    logits[[0, 1, 2, 3], [5, 6, 2, 7]] = 1.0  # the target's choices: 5, 6, 2, then 7
    sampler = Sampler(SamplingParams())
    assert verify(Proposal([5, 6, 2]), logits, sampler, [1], []) == [5, 6, 2, 7]  # all stand + bonus
    assert verify(Proposal([5, 1, 2]), logits, sampler, [1], []) == [5, 6]  # corrected at the mismatch
    assert verify(Proposal([0, 6, 2]), logits, sampler, [1], []) == [5]
    assert verify(Proposal([]), logits[:1], sampler, [1], []) == [5]
    with pytest.raises(ValueError, match="rows of logits"):
        verify(Proposal([5]), logits, sampler, [1], [])


def test_greedy_applies_penalties_to_the_output_as_it_grows():
    # Token 2 leads at both positions, token 3 close behind; a repetition penalty makes a 2 that
    # was just emitted lose to 3 at the next position, as one-token-per-step decoding would.
    logits = np.array([[0, 0, 2.0, 1.9], [0, 0, 2.0, 1.9], [0, 0, 2.0, 1.9]])
    sampler = Sampler(SamplingParams(repetition_penalty=1.5))
    out: list[int] = []
    for row in logits:
        out.append(sampler(row, [0], out))
    assert out == [2, 3, 2]  # (both seen by then: 2 leads again)
    assert verify(Proposal([2, 2]), logits, sampler, [0], []) == [2, 3]
    assert verify(Proposal([2, 3]), logits, sampler, [0], []) == [2, 3, 2]
    assert verify(Proposal([2, 3]), logits, Sampler(SamplingParams()), [0], []) == [2, 2]


# -- the sampling distribution ------------------------------------------------------------------
@pytest.fixture(scope="module")
def distributions(tmp_path_factory):
    """Target logits after CONTEXT + [x0, x1] for every x0, x1 and the draft's q0, q1(x0)."""
    root = tmp_path_factory.mktemp("verify")
    target = infercc.compile(write_hf(root / "target"))
    draft = infercc.compile(write_hf(root / "draft", layers=1))
    pairs = [[a, b] for a in range(VOCAB) for b in range(VOCAB)]
    runner = ModelRunner(target.backend, target.model)
    cache = runner.new_cache(len(pairs))
    target_logits = runner.step(cache, [CONTEXT + p for p in pairs], all_logits=True)[:, -3:]
    target_logits = target_logits.reshape(VOCAB, VOCAB, 3, VOCAB)
    runner = ModelRunner(draft.backend, draft.model)
    cache = runner.new_cache(VOCAB)
    draft_logits = runner.step(cache, [CONTEXT + [a] for a in range(VOCAB)], all_logits=True)[:, -2:]
    return target_logits, draft_logits


Verify = Callable[[Proposal, np.ndarray, Sampler, list[int], list[int]], list[int]]


def accept_always(proposal: Proposal, logits: np.ndarray, sampler: Sampler, context, output) -> list[int]:
    """Wrong: every proposal stands (the draft's distribution comes out)."""
    bonus = draw(sampler.rng, sampler.probabilities(logits[len(proposal.tokens)], context))
    return [*proposal.tokens, bonus]


def resample_from_p(proposal: Proposal, logits: np.ndarray, sampler: Sampler, context, output) -> list[int]:
    """Wrong, subtly: the right acceptance test, but a rejection redraws from p, not max(0, p - q)."""
    out = list(output)
    for i, x in enumerate(proposal.tokens):
        p = sampler.probabilities(logits[i], context, out)
        q_x = 1.0 if proposal.probs is None else proposal.probs[i][x]
        if sampler.rng.random() * q_x < p[x]:
            out.append(x)
            continue
        return [*out[len(output):], draw(sampler.rng, p)]
    return [*out[len(output):], draw(sampler.rng, sampler.probabilities(logits[-1], context, out))]


def emitted(distributions, rule: Verify, params: SamplingParams, deterministic: bool) -> tuple[list, dict]:
    """First emitted tokens over TRIALS speculative steps, and the second ones by first token."""
    target_logits, draft_logits = distributions
    draft = Sampler(params.replace(seed=1))
    sampler = Sampler(params.replace(seed=2))
    firsts, seconds = [], {}
    for _ in range(TRIALS):
        q0 = draft.probabilities(draft_logits[0, 0], CONTEXT)
        x0 = int(np.argmax(q0)) if deterministic else draw(draft.rng, q0)
        q1 = draft.probabilities(draft_logits[x0, 1], CONTEXT)
        x1 = int(np.argmax(q1)) if deterministic else draw(draft.rng, q1)
        proposal = Proposal([x0, x1], None if deterministic else np.stack([q0, q1]))
        tokens = rule(proposal, target_logits[x0, x1], sampler, CONTEXT, [])
        firsts.append(tokens[0])
        if len(tokens) > 1:
            seconds.setdefault(tokens[0], []).append(tokens[1])
    return firsts, seconds


def chi_square_fits(samples: list[int], probs: np.ndarray) -> bool:
    """Whether ``samples`` fit ``probs`` at the 0.1% level (cells expecting < 5 merged)."""
    counts = np.bincount(samples, minlength=probs.size).astype(float)
    expected = probs * len(samples)
    small = expected < 5
    observed = np.append(counts[~small], counts[small].sum())
    wanted = np.append(expected[~small], expected[small].sum())
    if wanted[-1] < 5:  # fold a still-small remainder into the largest cell
        observed, wanted = observed[:-1], wanted[:-1]
        observed[np.argmax(wanted)] += counts[small].sum()
        wanted[np.argmax(wanted)] += expected[small].sum()
    statistic = float(((observed - wanted) ** 2 / wanted).sum())
    df = len(wanted) - 1
    z = 3.09  # the 0.999 quantile of N(0, 1): Wilson-Hilferty's chi-square quantile
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return statistic < critical


def fits_target(distributions, rule: Verify, params: SamplingParams, deterministic: bool = False) -> bool:
    """Both the first emitted token and the second (after the most frequent accepted first) fit p."""
    target_logits, _ = distributions
    firsts, seconds = emitted(distributions, rule, params, deterministic)
    target = Sampler(params)
    p0 = target.probabilities(target_logits[0, 0, 0], CONTEXT)
    first = max(seconds, key=lambda a: len(seconds[a]))
    p1 = target.probabilities(target_logits[first, 0, 1], CONTEXT, [first])
    return chi_square_fits(firsts, p0) and chi_square_fits(seconds[first], p1)


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_p=0.9),
                                    SamplingParams(temperature=1.2, repetition_penalty=1.3)],
                         ids=["t1", "t0.8-top_p0.9", "repetition_penalty"])
def test_rejection_sampling_gives_the_target_distribution(distributions, params):
    assert fits_target(distributions, verify, params)


def test_a_deterministic_proposal_gives_the_target_distribution(distributions):
    assert fits_target(distributions, verify, SamplingParams(temperature=1.0), deterministic=True)


@pytest.mark.parametrize("wrong", [accept_always, resample_from_p])
def test_wrong_acceptance_rules_fail_the_same_test(distributions, wrong):
    assert not fits_target(distributions, wrong, SamplingParams(temperature=1.0))
