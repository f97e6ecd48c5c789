"""The serve case's report on a finished run: table rows, ratios, cancel effect, memory line, plot."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from benchmarks.harness import ConfigResult, RunResult, summarize
from benchmarks.serve_report import memory, report, runner_forms

LEVELS = [{"label": "c1", "concurrency": 1, "requests": 8, "cancel": 0.0},
          {"label": "c4", "concurrency": 4, "requests": 16, "cancel": 0.0},
          {"label": "c4_cancel", "concurrency": 4, "requests": 16, "cancel": 0.1}]


def _config(name: str, rounds: dict[str, list[float]]) -> ConfigResult:
    res = ConfigResult(name, rounds_s=[10.0] * 2, metric_rounds={k: list(v) for k, v in rounds.items()})
    summarize(res)
    return res


def _result(tmp_path: Path) -> RunResult:
    fast = _config("infercc", {"c1_out_tok_per_s": [100, 120], "c1_ttft_p50_s": [0.1, 0.1], "c1_itl_p50_s": [0.01, 0.01],
                               "c4_out_tok_per_s": [300, 300], "c4_ttft_p50_s": [0.2, 0.2], "c4_tpot_p50_s": [0.012, 0.012],
                               "c4_errors": [0, 0], "c4_cancel_out_tok_per_s": [290, 290], "c4_cancel_cancelled": [2, 2],
                               "c4_cancel_tpot_p50_s": [0.012, 0.012], "c4_cancel_errors": [0, 0]})
    slow = _config("llama.cpp", {"c1_out_tok_per_s": [50, 40], "c1_ttft_p50_s": [0.2, 0.2], "c1_itl_p50_s": [0.01, 0.01],
                                 "c4_out_tok_per_s": [60, 60], "c4_ttft_p50_s": [2.0, 2.0]})
    failed = ConfigResult("vllm", status="failed", error="ServerStartError: failed to start: boom", rounds_s=[None, None])
    notes = {"prompt_len": 100, "new_tokens": 64, "kv_cache_gib": 1, "load_before": {"busy_cores": 0.1, "loadavg": [0.5]},
             "kv": {"layers": 30, "kv_heads": 3, "head_dim": 64, "cache_dtype": "float32", "bytes_per_token": 46080,
                    "context_length": 8192, "block_size": 16}}
    started = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - 60))
    return RunResult("serve-t", "toy", {"rounds": 2}, "llama.cpp", {}, [fast, slow, failed], notes=notes,
                     started_at=started)


def test_report_lines_and_plot(tmp_path: Path) -> None:
    lines = report(_result(tmp_path), tmp_path, LEVELS)
    text = "\n".join(lines)
    row = next(line for line in lines if line.startswith("infercc") and " c1 " in line)
    assert row.split()[2:4] == ["110.0", "-"]  # median of 100 and 120; no req/s figure
    assert "vllm: FAILED: ServerStartError: failed to start: boom" in text
    assert "infercc vs llama.cpp at c1: out tok/s x2.44 (paired x2.50), TTFT p50 x2.00 (paired x2.00)" in text
    assert "infercc vs vllm" not in text  # a failed reference gives no ratios
    assert "c4_cancel (2 of 16 streams closed half-way) vs c4: out tok/s x0.97" in text
    assert "the others' TPOT p50 x1.00" in text
    assert (tmp_path / "throughput.png").stat().st_size > 1000


def test_memory_line_paged_vs_contiguous_and_measured(tmp_path: Path) -> None:
    result = _result(tmp_path)
    calls = tmp_path / "servers"
    calls.mkdir()
    peak = {"used_blocks": 88, "total_blocks": 1456, "running": 8, "waste": 0.1}
    info = '# TYPE infercc_engine_info gauge\ninfercc_engine_info{runner="c-paged"} 1.0\n'
    (calls / "infercc-x-call0.json").write_text(json.dumps({"contender": "infercc", "loads": [{"kv_peak": peak}],
                                                            "metrics_text": info}))
    old = calls / "infercc-y-call0.json"  # an earlier run's file: ignored
    old.write_text(json.dumps({"contender": "infercc", "loads": [{"kv_peak": {**peak, "running": 99}}]}))
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    lines = memory(result, tmp_path, LEVELS)
    # 164 tokens -> 11 blocks of 16 -> 176 x 46080 bytes; contiguous: 8192 x 46080 bytes
    assert f"holds {2**30 / (176 * 46080):.1f} per GiB paged" in lines[0]
    assert f"vs {2**30 / (8192 * 46080):.2f} per GiB contiguous" in lines[0] and "x47" in lines[0]
    assert len(lines) == 2 and "8 request(s) running in 88 of 1456 blocks (11.0 blocks each)" in lines[1]
    assert f"-> {2**30 / (11 * 16 * 46080):.1f} sequences per GiB, 10.0% of used slots empty" in lines[1]
    assert f"= {2**30 / 1456 / 1024:.0f} KiB/block (computed: 720 KiB)" in lines[1]
    assert runner_forms(tmp_path, result.started_at) == ["infercc's engine ran the c-paged runner"]


def test_memory_line_needs_the_geometry(tmp_path: Path) -> None:
    result = _result(tmp_path)
    del result.notes["kv"]
    assert memory(result, tmp_path, LEVELS) == []


def test_speculation_lines_against_plain_infercc(tmp_path: Path) -> None:
    """infercc-spec (``--speculation auto``) is reported against plain infercc at each load, the
    highest concurrency against the 0.95x target, with the acceptance its /metrics counted."""
    result = _result(tmp_path)
    spec = _config("infercc-spec", {"c1_out_tok_per_s": [200, 240], "c1_ttft_p50_s": [0.1, 0.1],
                                    "c4_out_tok_per_s": [270, 270], "c4_tpot_p50_s": [0.013, 0.013]})
    result.configs.append(spec)
    calls = tmp_path / "servers"
    calls.mkdir()
    counters = ("# TYPE infercc_spec_proposed_tokens counter\ninfercc_spec_proposed_tokens_total 400.0\n"
                "# TYPE infercc_spec_accepted_tokens counter\ninfercc_spec_accepted_tokens_total 100.0\n"
                "# TYPE infercc_spec_verify_steps counter\ninfercc_spec_verify_steps_total 50.0\n")
    (calls / "infercc-spec-x-call0.json").write_text(json.dumps({"contender": "infercc-spec", "loads": [],
                                                                 "metrics_text": counters}))
    text = "\n".join(report(result, tmp_path, LEVELS))
    assert "infercc-spec vs infercc at c1: out tok/s x2.00 (paired x2.00)" in text
    assert "infercc-spec vs infercc at c4: out tok/s x0.90 (paired x0.90) (target >= x0.95: MISSED)" in text
    assert "400 proposed, 100 accepted (25.0%), 3.00 tokens per verify step" in text
