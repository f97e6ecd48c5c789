"""The serve case's own report, made from the harness's `RunResult`: a contender x concurrency table,
ratios against vLLM and llama.cpp at each concurrency, what cancelling streams did, the KV-cache
memory line, and a plot of output tokens/s against concurrency (``throughput.png``).

Why beside the harness's table: the harness reports one row per configuration (here a server) with
one column per figure; a serving comparison is read per concurrency level, across servers. These
lines go into the run's results (``RunResult.checks``: printed under the table, kept in
results.json), so nothing is measured twice.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.harness import ConfigResult, RunResult, metric_ratio, paired_metric_ratio

REFERENCES = ("vllm", "llama.cpp")
GIB = 2**30
_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of each sample of a Prometheus text exposition; comments and lines
    that do not parse are skipped (a scrape is evidence, not input to trust)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#") or not (m := _SAMPLE.match(line)):
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), value))
    return out


def _first(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float | None:
    return next((v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())), None)


def kv_sample(kind: str, samples: list[tuple[str, dict[str, str], float]]) -> dict[str, float] | None:
    """Blocks in use, blocks in the pool, block size and running requests from one scrape of
    infercc's or vLLM's /metrics; None when the scrape lacks them."""
    if kind == "infercc":
        used = _first(samples, "infercc_kv_blocks", state="used")
        total = _first(samples, "infercc_kv_pool_blocks")
        total = _first(samples, "infercc_kv_blocks_total") if total is None else total  # the name before the merge
        running = _first(samples, "infercc_requests_running")
        if used is None or total is None or running is None:
            return None
        out = {"used_blocks": used, "total_blocks": total, "running": running}
        if (waste := _first(samples, "infercc_kv_block_waste")) is not None:
            out["waste"] = waste
        return out
    if kind == "vllm":
        usage, running = _first(samples, "vllm:kv_cache_usage_perc"), _first(samples, "vllm:num_requests_running")
        info = next((lab for n, lab, _ in samples if n == "vllm:cache_config_info"), {})
        blocks = info.get("num_gpu_blocks") or info.get("num_cpu_blocks")
        if usage is None or running is None or not blocks or not str(blocks).isdigit():
            return None
        out = {"used_blocks": round(usage * int(blocks)), "total_blocks": float(blocks), "running": running}
        if str(info.get("block_size", "")).isdigit():
            out["block_size"] = float(info["block_size"])
        return out
    return None


def _fmt(value: float | None, scale: float = 1.0, spec: str = ".1f") -> str:
    return "-" if value is None else format(value * scale, spec)


def _ok(result: RunResult) -> list[ConfigResult]:
    return [c for c in result.configs if c.status == "ok" and c.metrics]


def table(result: RunResult, levels: list[dict[str, Any]]) -> list[str]:
    """One row per contender and load: medians over rounds."""
    head = ["contender", "load", "out tok/s", "req/s", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms", "TPOT p50 ms",
            "errors", "srv CPU ms/tok", "other cores"]
    rows = [head]
    for c in result.configs:
        if c.status != "ok":
            rows.append([c.name, f"{c.status.upper()}: {c.error}"])
            continue
        for level in levels:
            m, p = c.metrics, level["label"]
            if f"{p}_out_tok_per_s" not in m:
                continue
            errors = int(m.get(f"{p}_errors", 0))
            cancelled = int(m.get(f"{p}_cancelled", 0))
            rows.append([c.name, p + (f" ({cancelled} cancelled)" if cancelled else ""),
                         _fmt(m.get(f"{p}_out_tok_per_s")), _fmt(m.get(f"{p}_req_per_s"), spec=".2f"),
                         _fmt(m.get(f"{p}_ttft_p50_s"), 1e3), _fmt(m.get(f"{p}_ttft_p95_s"), 1e3),
                         _fmt(m.get(f"{p}_itl_p50_s"), 1e3), _fmt(m.get(f"{p}_tpot_p50_s"), 1e3),
                         str(errors) + (f" ({int(m[f'{p}_short'])} short)" if m.get(f"{p}_short") else ""),
                         _fmt(m.get(f"{p}_server_cpu_ms_per_tok"), spec=".2f"), _fmt(m.get(f"{p}_other_cores"), spec=".2f")])
    full = [r for r in rows if len(r) == len(head)]
    widths = [max(len(r[i]) for r in full) for i in range(len(head))]
    lines = ["serve: medians over rounds (TTFT = time to first token, ITL = between text chunks, TPOT = per "
             "token after the first; other cores = CPU that processes outside the test used during the load)"]
    for r in rows:
        if len(r) != len(head):
            lines.append(f"{r[0]}: {r[1]}")
            continue
        lines.append("  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1])]
                               + [v.rjust(w) for v, w in zip(r[2:], widths[2:])]).rstrip())
    return lines


def _ratio(x: ConfigResult, ref: ConfigResult, name: str) -> tuple[float | None, float | None]:
    """('>1 = better' ratio of medians, median of per-round ratios) of one figure, x against ref."""
    if name not in x.metrics or name not in ref.metrics:
        return None, None
    return (metric_ratio(name, ref.metrics[name], x.metrics[name]),
            paired_metric_ratio(name, ref.metric_rounds.get(name, []), x.metric_rounds.get(name, [])))


def _x(pair: tuple[float | None, float | None]) -> str:
    ratio, paired = pair
    return "-" if ratio is None else f"x{ratio:.2f}" + (f" (paired x{paired:.2f})" if paired is not None else "")


def ratios(result: RunResult, levels: list[dict[str, Any]]) -> list[str]:
    """Every other contender against vLLM and llama.cpp at each concurrency (>1 = better), and
    llama.cpp against vLLM."""
    ok = {c.name: c for c in _ok(result)}
    lines = []
    for ref_name in REFERENCES:
        if ref_name not in ok:
            continue
        for name, x in ok.items():
            if name == ref_name or (name in REFERENCES and REFERENCES.index(name) < REFERENCES.index(ref_name)):
                continue  # the references against each other once (llama.cpp vs vLLM), not both ways
            for level in levels:
                p = level["label"]
                if level["cancel"] or f"{p}_out_tok_per_s" not in x.metrics:
                    continue
                lines.append(f"{name} vs {ref_name} at {p}: out tok/s {_x(_ratio(x, ok[ref_name], f'{p}_out_tok_per_s'))}, "
                             f"TTFT p50 {_x(_ratio(x, ok[ref_name], f'{p}_ttft_p50_s'))}, "
                             f"ITL p50 {_x(_ratio(x, ok[ref_name], f'{p}_itl_p50_s'))}")
    return lines


#: Issue 13: infercc with ``--speculation auto`` keeps at least this share of plain infercc's
#: throughput at the highest concurrency.
SPEC_TARGET = 0.95


def speculation(result: RunResult, out: Path, levels: list[dict[str, Any]]) -> list[str]:
    """infercc-spec against plain infercc at each concurrency (out tok/s, TPOT), and its acceptance
    as its last /metrics scrape of this run says."""
    ok = {c.name: c for c in _ok(result)}
    if "infercc-spec" not in ok or "infercc" not in ok:
        return []
    spec, plain = ok["infercc-spec"], ok["infercc"]
    plain_levels = [level for level in levels if not level["cancel"]]
    top = max((level["concurrency"] for level in plain_levels), default=None)
    lines = []
    for level in plain_levels:
        p = level["label"]
        if f"{p}_out_tok_per_s" not in spec.metrics or f"{p}_out_tok_per_s" not in plain.metrics:
            continue
        pair = _ratio(spec, plain, f"{p}_out_tok_per_s")
        target = ""
        if level["concurrency"] == top and pair[0] is not None:
            target = f" (target >= x{SPEC_TARGET:.2f}: {'met' if pair[0] >= SPEC_TARGET else 'MISSED'})"
        lines.append(f"infercc-spec vs infercc at {p}: out tok/s {_x(pair)}{target}, "
                     f"TPOT p50 {_x(_ratio(spec, plain, f'{p}_tpot_p50_s'))}")
    counts = [data for data in _calls(out, result.started_at)
              if data.get("contender") == "infercc-spec" and data.get("metrics_text")]
    if counts:
        samples = parse_prometheus(counts[-1]["metrics_text"])
        proposed, accepted, steps = (_counter(samples, f"infercc_spec_{n}") for n in
                                     ("proposed_tokens", "accepted_tokens", "verify_steps"))
        if proposed is not None:
            rate = f"{accepted / proposed:.1%}" if proposed and accepted is not None else "-"
            per_step = f"{((accepted or 0) + steps) / steps:.2f}" if steps else "-"
            lines.append(f"infercc-spec speculation (server lifetime, last call): {int(proposed)} proposed, "
                         f"{int(accepted or 0)} accepted ({rate}), {per_step} tokens per verify step")
    return lines


def _counter(samples: list[tuple[str, dict[str, str], float]], name: str) -> float | None:
    """A counter's value, as prometheus_client exposes it (``_total``) or as written."""
    value = _first(samples, f"{name}_total")
    return _first(samples, name) if value is None else value


def _relative(m: dict[str, float], plain: str, variant: str) -> Any:
    """figure -> 'xR' of the variant's median over the plain load's (R = variant / plain)."""
    def rel(figure: str) -> str:
        x, y = m.get(f"{plain}_{figure}"), m.get(f"{variant}_{figure}")
        return "-" if not x or y is None else f"x{y / x:.2f}"

    return rel


def cancel_effect(result: RunResult, levels: list[dict[str, Any]]) -> list[str]:
    """Each contender's cancel variant against its own uncancelled load at the same concurrency."""
    lines = []
    for variant in (v for v in levels if v["cancel"]):
        plain = next((v for v in levels if v["concurrency"] == variant["concurrency"] and not v["cancel"]), None)
        if plain is None:
            continue
        for c in _ok(result):
            m, a, b = c.metrics, plain["label"], variant["label"]
            if f"{a}_out_tok_per_s" not in m or f"{b}_out_tok_per_s" not in m:
                continue
            rel = _relative(m, a, b)
            lines.append(f"{c.name}: {b} ({int(m.get(f'{b}_cancelled', 0))} of {variant['requests']} streams closed "
                         f"half-way) vs {a}: out tok/s {rel('out_tok_per_s')}, req/s {rel('req_per_s')}, the others' "
                         f"TPOT p50 {rel('tpot_p50_s')} and TTFT p50 {rel('ttft_p50_s')}, server CPU per delivered "
                         f"token {rel('server_cpu_ms_per_tok')}, errors {int(m.get(f'{b}_errors', 0))} (ratios: variant/plain)")
    return lines


def _calls(out: Path, started: str) -> list[dict[str, Any]]:
    """The per-call detail files (`benchmarks.cases.serve.sweep`) this run wrote."""
    try:
        since = datetime.fromisoformat(started).timestamp()
    except ValueError:
        since = 0.0
    calls = []
    for path in sorted((out / "servers").glob("*-call*.json")):
        if path.stat().st_mtime < since:
            continue  # an earlier run's file in the same folder
        try:
            calls.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return calls


def runner_forms(out: Path, started: str) -> list[str]:
    """Which model-runner form infercc's engine used (``infercc_engine_info{runner=...}``)."""
    forms = sorted({lab["runner"] for data in _calls(out, started) if data.get("metrics_text")
                    for name, lab, _ in parse_prometheus(data["metrics_text"])
                    if name == "infercc_engine_info" and "runner" in lab})
    return [f"infercc's engine ran the {' / '.join(forms)} runner"] if forms else []


def _kv_peaks(out: Path, started: str) -> dict[str, dict[str, float]]:
    """The largest KV peak (most running requests) each contender's calls of this run recorded."""
    peaks: dict[str, dict[str, float]] = {}
    for data in _calls(out, started):
        for load in data.get("loads", []):
            peak = load.get("kv_peak")
            best = peaks.get(data.get("contender"), {})
            if peak and peak.get("running", 0) > best.get("running", -1):
                peaks[data["contender"]] = peak
    return peaks


def memory(result: RunResult, out: Path, levels: list[dict[str, Any]]) -> list[str]:
    """Sequences held per GiB of KV cache: paged (blocks of ``block_size`` tokens, as many as a
    sequence fills) vs contiguous (every sequence reserves the whole context), computed from the
    model's bytes per token; and what the servers' /metrics showed at their busiest."""
    kv, notes = result.notes.get("kv"), result.notes
    if not kv:
        return []
    bpt, ctx, bs = kv["bytes_per_token"], kv["context_length"], kv["block_size"]
    length = notes["prompt_len"] + notes["new_tokens"]
    paged = math.ceil(length / bs) * bs * bpt
    lines = [f"memory: KV {bpt} bytes/token ({kv['layers']} layers x K,V x {kv['kv_heads']} heads x {kv['head_dim']} x "
             f"{kv['cache_dtype']}); a {length}-token sequence holds {GIB / paged:.1f} per GiB paged ({bs}-token blocks, "
             f"{paged / 2**20:.2f} MiB each) vs {GIB / (ctx * bpt):.2f} per GiB contiguous at the full context {ctx} "
             f"({ctx * bpt / 2**20:.0f} MiB each): x{ctx * bpt / paged:.0f}"]
    for name, peak in _kv_peaks(out, result.started_at).items():
        block = peak.get("block_size", bs)
        if not peak.get("used_blocks") or not peak.get("running"):
            continue
        per_seq = peak["used_blocks"] / peak["running"]
        line = (f"memory measured ({name} /metrics at its busiest): {peak['running']:.0f} request(s) running in "
                f"{peak['used_blocks']:.0f} of {peak['total_blocks']:.0f} blocks ({per_seq:.1f} blocks each) -> "
                f"{GIB / (per_seq * block * bpt):.1f} sequences per GiB")
        if "waste" in peak:
            line += f", {peak['waste']:.1%} of used slots empty"
        if notes.get("kv_cache_gib"):
            line += f"; pool {peak['total_blocks']:.0f} blocks for {notes['kv_cache_gib']} GiB = " \
                    f"{notes['kv_cache_gib'] * GIB / peak['total_blocks'] / 1024:.0f} KiB/block " \
                    f"(computed: {block * bpt / 1024:.0f} KiB)"
        lines.append(line)
    return lines


def load_line(result: RunResult) -> list[str]:
    others = [v for c in _ok(result) for k, v in c.metrics.items() if k.endswith("_other_cores")]
    before = result.notes.get("load_before", {})
    line = (f"machine load: before the run {before.get('busy_cores', float('nan')):.2f} cores busy (loadavg "
            f"{', '.join(f'{x:.2f}' for x in before.get('loadavg', []))})")
    if others:
        line += f"; during the loads other processes used {min(others):.2f}-{max(others):.2f} cores (median per load)"
    return [line]


def plot(result: RunResult, levels: list[dict[str, Any]], path: Path) -> Path | None:
    """Output tokens/s and TTFT p50 against concurrency, a line per contender, per-round dots."""
    plain = [v for v in levels if not v["cancel"]]
    ok = _ok(result)
    if not ok or not plain:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    for c in ok:
        xs = [v["concurrency"] for v in plain if f"{v['label']}_out_tok_per_s" in c.metrics]
        for axis, figure, scale in ((ax, "out_tok_per_s", 1.0), (ax2, "ttft_p50_s", 1e3)):
            ys = [c.metrics[f"{v['label']}_{figure}"] * scale for v in plain if f"{v['label']}_{figure}" in c.metrics]
            if len(ys) != len(xs):
                continue
            line, = axis.plot(xs, ys, marker="o", label=c.name)
            for v in plain:
                pts = [r * scale for r in c.metric_rounds.get(f"{v['label']}_{figure}", []) if r is not None]
                axis.scatter([v["concurrency"]] * len(pts), pts, s=10, color=line.get_color(), alpha=0.6)
    for axis, label in ((ax, "output tokens/s (all streams)"), (ax2, "TTFT p50 (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks([v["concurrency"] for v in plain], [str(v["concurrency"]) for v in plain])
        axis.set_xlabel("concurrent streams")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    ax2.set_yscale("log")
    ax.set_ylim(bottom=0)
    fig.suptitle(f"{result.case}: medians over {result.options['rounds']} rounds (dots: rounds)", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(result: RunResult, out: Path, levels: list[dict[str, Any]]) -> list[str]:
    """`Case.checks` of the serve case: the lines above, and the plot written to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    lines = table(result, levels)
    lines += ["", *ratios(result, levels)] if _ok(result) else []
    lines += speculation(result, out, levels)
    lines += cancel_effect(result, levels) + memory(result, out, levels) + load_line(result)
    lines += runner_forms(out, result.started_at)
    png = plot(result, levels, out / "throughput.png")
    if png is not None:
        lines.append(f"plot: {png}")
    return lines
