"""Fast tests of the decode cases' pure logic: token accounting, per-call figures in the harness and
report, target checks (LLaMA and SmolLM2), the SmolLM2 case without its GGUF, and the GGUF writer's
rotary permutation; no model is built or run."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from benchmarks.cases import smollm2
from benchmarks.cases.decode import target_checks
from benchmarks.decoders import Generated, _timed_loop, decode_metrics, logits_check, matching_prefix
from benchmarks.gguf_export import gguf_name, permute_rotary
from benchmarks.harness import BenchOptions, Case, ConfigSpec, metric_ratio, paired_metric_ratio, run_case
from benchmarks.report import format_table
from benchmarks.tokenizer import SPECIALS, vocabulary

TARGETS = "tests.benchmarks.targets"


def test_decode_rate_counts_tokens_after_the_first() -> None:
    m = decode_metrics(Generated([5, 6, 7, 8], prefill_s=0.5, decode_s=0.3), reference=[5, 6, 9, 8])
    assert m["decode_tok_per_s"] == pytest.approx(10.0)  # 3 decode steps in 0.3 s; the prefill is apart
    assert m["prefill_s"] == 0.5 and m["new_tokens"] == 4 and m["match_prefix"] == 2
    assert decode_metrics(Generated([5], 0.5, 0.0), [5])["decode_tok_per_s"] == 0.0
    assert matching_prefix([1, 2], [1, 2, 3]) == 2 and matching_prefix([], [1]) == 0


def test_timed_loop_splits_prefill_from_decode_and_stops_early() -> None:
    fed: list[int] = []

    def step(token: int) -> int:
        fed.append(token)
        if len(fed) == 3:
            raise StopIteration  # the runtime ended the sequence
        return token + 1

    gen = _timed_loop(lambda: 10, step, new_tokens=8)
    assert gen.tokens == [10, 11, 12] and fed == [10, 11, 12]
    assert gen.prefill_s >= 0 and gen.decode_s >= 0
    assert _timed_loop(lambda: 1, lambda t: t + 1, new_tokens=4).tokens == [1, 2, 3, 4]


def test_logits_check() -> None:
    check = logits_check(np.array([[0.0, 2.0, 1.0]], np.float32), [0.0, 4.0, 2.0])
    assert check["logits_max_abs_diff"] == 2.0 and check["logits_ref_abs_max"] == 4.0
    assert check["logits_cosine"] == pytest.approx(1.0) and check["logits_same_argmax"] is True


def test_metric_ratios_read_greater_is_better() -> None:
    assert metric_ratio("decode_tok_per_s", 10.0, 20.0) == 2.0  # a rate: config / baseline
    assert metric_ratio("prefill_s", 0.2, 0.1) == 2.0  # a time: baseline / config
    assert metric_ratio("new_tokens", 4, 4) is None  # a count: no ratio
    # per round 10->20 (x2) and 10->10 (x1), a round that did not run is left out
    assert paired_metric_ratio("decode_tok_per_s", [10.0, 10.0, None], [20.0, 10.0, 5.0]) == 1.5


def _metered(name: str, rate: float, prefill: float) -> ConfigSpec:
    return ConfigSpec(name, f"{TARGETS}:metered_call", {"rate": rate, "prefill": prefill})


@pytest.mark.parametrize("mode", ["fresh", "inprocess"])
def test_call_metrics_reach_results_ratios_and_table(mode: str) -> None:
    case = Case("t", "toy", [_metered("A", 10.0, 0.2), _metered("B", 25.0, 0.1)],
                checks=lambda r: [f"B/A {r.config('B').metrics['decode_tok_per_s'] / 10:.1f}"])
    result = run_case(case, BenchOptions(mode=mode, rounds=2 if mode == "inprocess" else 1, warmup=1, repeat=2))
    b = result.config("B")
    assert b.metric_rounds["decode_tok_per_s"] == [25.0] * len(b.rounds_s)
    if mode == "fresh":  # each worker process reports its own peak resident memory
        assert 10 < b.metrics.pop("peak_rss_mib") < 100_000
        assert b.metric_ratios.pop("peak_rss_mib") > 0
        b.metric_paired.pop("peak_rss_mib")
    assert b.metrics == {"decode_tok_per_s": 25.0, "prefill_s": 0.1, "new_tokens": 4.0}
    assert b.metric_ratios == {"decode_tok_per_s": pytest.approx(2.5), "prefill_s": pytest.approx(2.0)}
    assert b.metric_paired == b.metric_ratios
    assert result.checks == ["B/A 2.5"]
    table = format_table(result)
    assert "measured inside each call" in table and "25 (x2.50 p2.50)" in table and "B/A 2.5" in table


def test_failing_checks_keep_the_measurements() -> None:
    def broken(_result: object) -> list[str]:
        raise KeyError("x")

    result = run_case(Case("t", "toy", [_metered("A", 1.0, 1.0)], checks=broken),
                      BenchOptions(mode="inprocess", rounds=1, warmup=0, repeat=1))
    assert result.config("A").status == "ok" and result.checks[0].startswith("checks failed: KeyError")


def test_target_checks_compare_decode_rates_and_prefill_times() -> None:
    case = Case("t", "toy", [_metered("uncached-export", 5.0, 1.0), _metered("infercc", 60.0, 0.1),
                             _metered("genai-fp32", 70.0, 0.1), _metered("infercc-int4", 80.0, 0.08),
                             _metered("genai-int4", 80.0, 0.05)], notes={"new_tokens": 4})
    result = run_case(case, BenchOptions(mode="inprocess", rounds=1, warmup=0, repeat=1))
    lines = target_checks(result)
    assert ("infercc vs uncached-export: decode 12.00x per-round median, 12.00x of medians "
            "(60.0 vs 5.0 tok/s, >1 = better; target >= 10x: met)") in lines
    assert ("infercc vs genai-fp32: decode 0.86x per-round median, 0.86x of medians "
            "(60.0 vs 70.0 tok/s, >1 = better; target >= 1x: MISSED)") in lines
    assert ("infercc-int4 vs genai-int4: decode 1.00x per-round median, 1.00x of medians "
            "(80.0 vs 80.0 tok/s, >1 = better; target >= 1x: met)") in lines  # equal is met
    # prefill: a time, so the ratio is the other's / ours and a faster prefill reads > 1
    assert ("infercc-int4 vs infercc: prefill 1.25x per-round median, 1.25x of medians "
            "(80.0 vs 100.0 ms, >1 = better; target >= 1x: met)") in lines
    assert ("infercc-int4 vs genai-int4: prefill 0.62x per-round median, 0.62x of medians "
            "(80.0 vs 50.0 ms, >1 = better; target >= 1x: MISSED)") in lines
    assert not any(line.startswith("infercc-export vs") for line in lines)  # absent contenders are no verdict


def test_smollm2_targets_and_a_missing_gguf_skips_every_configuration(tmp_path) -> None:
    missing = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    args = argparse.Namespace(gguf=str(missing), prompt_len=128, new_tokens=64, out=str(tmp_path), threads=2, only=None)
    case = smollm2.build_case(args)
    assert case.configs == [] and set(case.skipped) == set(smollm2.CONFIGS)
    assert all(str(missing) in reason and "--gguf" in reason for reason in case.skipped.values())
    result = run_case(case, BenchOptions(mode="inprocess", rounds=1, warmup=0, repeat=1))
    assert {c.status for c in result.configs} == {"skipped"} and result.checks == []
    toy = Case("t", "toy", [_metered("infercc-auto", 90.0, 0.05), _metered("infercc-fp32", 40.0, 0.1),
                            _metered("genai-int4", 100.0, 0.04), _metered("genai-fp32", 30.0, 0.1)])
    lines = case.checks(run_case(toy, BenchOptions(mode="inprocess", rounds=1, warmup=0, repeat=1)))
    assert [line.split(":")[0] for line in lines] == [
        "infercc-auto vs genai-int4", "infercc-fp32 vs genai-fp32", "infercc-auto vs infercc-fp32", "infercc-auto vs genai-int4"]
    assert [line.endswith(": met)") for line in lines] == [False, True, True, False]


def _rope_half(x: np.ndarray, pos: int) -> np.ndarray:
    """Hugging Face's rotary: pairs (i, i + d/2)."""
    d = x.shape[-1]
    angle = pos / 10000.0 ** (np.arange(d // 2) * 2 / d)
    cos, sin = np.tile(np.cos(angle), 2), np.tile(np.sin(angle), 2)
    return x * cos + np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1) * sin


def _rope_pairs(x: np.ndarray, pos: int) -> np.ndarray:
    """llama.cpp's rotary for the llama arch: adjacent pairs (2i, 2i + 1)."""
    d = x.shape[-1]
    angle = pos / 10000.0 ** (np.arange(d // 2) * 2 / d)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * np.cos(angle) - b * np.sin(angle), a * np.sin(angle) + b * np.cos(angle)
    return out


def test_permuted_q_k_give_llama_cpp_the_same_attention_scores() -> None:
    rng = np.random.default_rng(0)
    heads, head_dim, hidden = 3, 8, 12
    wq, wk = rng.normal(size=(2, heads * head_dim, hidden))
    x1, x2 = rng.normal(size=(2, hidden))

    def scores(wq: np.ndarray, wk: np.ndarray, rope) -> np.ndarray:
        q = rope((wq @ x1).reshape(heads, head_dim), 5)
        k = rope((wk @ x2).reshape(heads, head_dim), 2)
        return (q * k).sum(-1)

    hf = scores(wq, wk, _rope_half)
    assert np.allclose(scores(permute_rotary(wq, heads), permute_rotary(wk, heads), _rope_pairs), hf)
    assert not np.allclose(scores(wq, wk, _rope_pairs), hf)  # unpermuted weights would be wrong


def test_gguf_names_and_offline_vocabulary() -> None:
    assert gguf_name("model.layers.3.self_attn.k_proj.weight") == "blk.3.attn_k.weight"
    assert gguf_name("model.layers.0.mlp.down_proj.weight") == "blk.0.ffn_down.weight"
    assert gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    tokens = vocabulary(400)
    assert len(tokens) == len(set(tokens)) == 400 and tuple(tokens[:3]) == SPECIALS
    with pytest.raises(ValueError):
        vocabulary(100)


def test_speculative_case_without_the_gguf_skips_every_configuration(tmp_path) -> None:
    from benchmarks.cases import speculative

    args = argparse.Namespace(gguf=str(tmp_path / "missing.gguf"), out=str(tmp_path), threads=2, new_tokens=8,
                              groups="grounded,chat")
    case = speculative.build_case(args)
    assert case.configs == [] and len(case.skipped) == 10
    assert all("missing.gguf" in reason for reason in case.skipped.values())
    assert {"infercc-lookup-grounded", "llama.cpp-lookup-chat"} <= set(case.skipped)
