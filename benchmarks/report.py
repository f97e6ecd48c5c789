"""Render a `RunResult` as a text table, a JSON file and a PNG bar chart.

Why three outputs: the table is what people paste into reviews, the JSON keeps every round and
the machine facts so later runs can be checked for comparability, and the chart makes noise
(IQR, per-round scatter) visible at a glance where a single median would hide it.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.harness import ConfigResult, RunResult

#: A configuration whose IQR exceeds this fraction of its median is flagged: ratios closer to 1
#: than that spread are not evidence of anything.
NOISY_IQR = 0.05


def _unit(result: RunResult) -> tuple[float, str]:
    """Pick ms, or us when everything is sub-millisecond, so the table keeps significant digits."""
    medians = [c.median_s for c in result.configs if c.median_s]
    return (1e6, "us") if medians and max(medians) < 1e-3 else (1e3, "ms")


def _fmt(value: float | None, scale: float = 1.0, spec: str = ".3f") -> str:
    return "-" if value is None else format(value * scale, spec)


def _info(res: ConfigResult) -> str:
    if res.status != "ok":
        return f"{res.status.upper()}: {res.error}"
    parts = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.metadata.items()]
    if res.setup_s is not None:
        parts.insert(0, f"setup={res.setup_s:.2f}s")
    if res.iqr_s and res.median_s and res.iqr_s / res.median_s > NOISY_IQR:
        parts.insert(0, f"NOISY(IQR {100 * res.iqr_s / res.median_s:.0f}% of median)")
    return " ".join(parts)


def format_table(result: RunResult) -> str:
    scale, unit = _unit(result)
    m, opts = result.machine, result.options
    pkgs = " ".join(f"{k}={v or 'n/a'}" for k, v in m.get("packages", {}).items())
    lines = [
        f"case: {result.case} - {result.description}",
        f"mode={opts['mode']} rounds={opts['rounds']} warmup={opts['warmup']} repeat={opts['repeat']} "
        f"threads={opts['threads']} | cpu: {m.get('cpu_model')} ({m.get('usable_cores')}/{m.get('logical_cores')} cores) "
        f"| load {_fmt((m.get('loadavg') or [None])[0], spec='.2f')}",
        f"{pkgs} | git {str(m.get('git_commit'))[:10]}{' (dirty)' if m.get('git_dirty') else ''}",
        f"{result.ratio_direction}; baseline = {result.baseline}; paired = median of per-round ratios",
        "",
    ]
    head = [
        "config",
        "status",
        f"median {unit}",
        f"min {unit}",
        f"IQR {unit}",
        "rounds",
        "ratio",
        "paired",
        "info",
    ]
    rows = [head]
    for c in result.configs:
        ran = sum(v is not None for v in c.rounds_s)
        rows.append(
            [
                c.name + (" *" if c.name == result.baseline else ""),
                c.status,
                _fmt(c.median_s, scale),
                _fmt(c.min_s, scale),
                _fmt(c.iqr_s, scale),
                f"{ran}/{len(c.rounds_s)}",
                _fmt(c.ratio, spec=".3f"),
                _fmt(c.paired_ratio, spec=".3f"),
                _info(c),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    for r in rows:
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])] + [
            r[i].rjust(widths[i]) for i in range(2, len(widths))
        ]
        lines.append("  ".join(cells + [r[-1]]).rstrip())
    lines.append(f"(* baseline; total {result.duration_s:.1f} s, started {result.started_at})")
    lines.extend(format_metrics(result))
    if result.checks:
        lines += ["", "checks:", *(f"  {line}" for line in result.checks)]
    return "\n".join(lines)


def _figure(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"


def format_metrics(result: RunResult) -> list[str]:
    """The figures the calls measured themselves (`CallMetrics`): median over rounds, and the
    '>1 = better' ratio vs the baseline in brackets; no lines when no call returned any."""
    names = list(dict.fromkeys(name for c in result.configs for name in c.metrics))
    if not names:
        return []
    rows = [["config", *names]]
    for c in result.configs:
        cells = [c.name + (" *" if c.name == result.baseline else "")]
        for name in names:
            value, ratio, paired = c.metrics.get(name), c.metric_ratios.get(name), c.metric_paired.get(name)
            cell = "-" if value is None else _figure(value)
            if ratio is not None and value is not None:
                cell += f" (x{ratio:.2f}" + (f" p{paired:.2f})" if paired is not None else ")")
            cells.append(cell)
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["", "measured inside each call: median over rounds (xR = ratio of medians vs baseline, "
             "pR = median of per-round ratios; >1 = better)"]
    for r in rows:
        lines.append("  ".join([r[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(r[1:], widths[1:])]).rstrip())
    return lines


def write_json(result: RunResult, path: Path) -> Path:
    path.write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    return path


def write_png(result: RunResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, unit = _unit(result)
    configs = result.configs
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 * len(configs) + 2), 4.5), layout="constrained")
    xs = range(len(configs))
    ok = [c.median_s is not None for c in configs]
    heights = [(c.median_s or 0.0) * scale for c in configs]
    lower = [((c.median_s - c.q1_s) * scale) if ok_ else 0.0 for c, ok_ in zip(configs, ok)]
    upper = [((c.q3_s - c.median_s) * scale) if ok_ else 0.0 for c, ok_ in zip(configs, ok)]
    colors = ["tab:gray" if c.name == result.baseline else "tab:blue" for c in configs]
    ax.bar(xs, heights, color=colors, alpha=0.8)
    ran = [x for x in xs if ok[x]]
    ax.errorbar(
        ran,
        [heights[x] for x in ran],
        yerr=[[lower[x] for x in ran], [upper[x] for x in ran]],
        fmt="none",
        ecolor="black",
        capsize=6,
    )
    top = max(heights, default=0.0) or 1.0
    for x, c in zip(xs, configs):
        pts = [v * scale for v in c.rounds_s if v is not None]
        ax.scatter([x] * len(pts), pts, color="black", s=10, zorder=3)
        if c.median_s is None:
            label = c.status
        elif c.name == result.baseline:
            label = "baseline"
        else:
            label = f"x{c.ratio:.2f}" if c.ratio else ""
        ax.annotate(
            label,
            (x, max(heights[x], max(pts, default=0.0))),
            xytext=(0, 4),
            textcoords="offset points",
            ha="center",
            va="bottom",
        )
    ax.set_ylim(0, top * 1.25)
    ax.set_xticks(list(xs), [c.name for c in configs])
    ax.set_ylabel(f"median time per call ({unit})")
    o = result.options
    ax.set_title(
        f"{result.case}: {o['mode']}, {o['rounds']} rounds, {o['threads']} thread(s)\n"
        "bars: median, whiskers: IQR, dots: rounds, label: baseline/config (>1 faster)",
        fontsize=9,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(result: RunResult, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "results.txt"
    table.write_text(format_table(result) + "\n")
    return {
        "table": table,
        "json": write_json(result, out_dir / "results.json"),
        "png": write_png(result, out_dir / "results.png"),
    }
