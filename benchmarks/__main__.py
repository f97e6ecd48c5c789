"""CLI: ``python -m benchmarks CASE [--rounds N] [--mode fresh|inprocess] [--out DIR] ...``, ``--list``.

Parsing happens in two passes so each case can add its own options (``CASE --help`` shows them),
and thread pinning happens before the cases (and therefore numpy) are imported, so that it also
holds for in-process measurements.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.harness import BenchOptions, run_case
from benchmarks.machine import REPO_ROOT, pin_threads
from benchmarks.report import format_table, write_all

#: ``--threads`` of cases whose default is not 1. Kept here, not in the case modules: threads are
#: pinned before any case (and so numpy) is imported.
CASE_THREADS = {"smollm2": 2, "stories": 2, "serve": 2, "speculative": 2}


def _parser(add_help: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        add_help=add_help,
        description="Run configurations of a benchmark case side by side.",
    )
    p.add_argument("case", nargs="?", help="case to run (see --list)")
    p.add_argument("--list", action="store_true", help="list cases and exit")
    p.add_argument(
        "--mode",
        choices=["fresh", "inprocess"],
        default="fresh",
        help="fresh: a new process per round and configuration (default); inprocess: set up once",
    )
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per round (default 3)")
    p.add_argument(
        "--repeat", type=int, default=10, help="timed calls per round; the round keeps their median"
    )
    p.add_argument(
        "--threads", type=int, default=None,
        help="intra-op/BLAS threads for every configuration (default 1; "
        + ", ".join(f"{case}: {n}" for case, n in CASE_THREADS.items()) + ")",
    )
    p.add_argument("--baseline", help="configuration the ratios are relative to (default: the case's)")
    p.add_argument("--only", help="comma-separated configurations to run (default: all)")
    p.add_argument(
        "--timeout", type=float, default=600.0, help="seconds per fresh worker before it counts as failed"
    )
    p.add_argument("--out", help="output directory (default bench_out/<case>/ in the repo root)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-round progress on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pre, _ = _parser(add_help=False).parse_known_args(argv)
    threads = pre.threads if pre.threads is not None else CASE_THREADS.get(pre.case, 1)
    pinning = pin_threads(max(1, threads))
    from benchmarks.cases import CASES  # imported after pinning on purpose

    if pre.list or not pre.case:
        wants_help = bool({"-h", "--help"} & set(argv))
        if wants_help:
            _parser(add_help=True).print_help()
            print("\ncases:")
        elif not pre.list:
            print("error: name a case or pass --list; cases:", file=sys.stderr)
        for name, case_def in CASES.items():
            print(f"  {name:12s} {case_def.help}")
        return 0 if pre.list or wants_help else 2
    if pre.case not in CASES:
        print(f"error: unknown case {pre.case!r}; known: {', '.join(CASES)}", file=sys.stderr)
        return 2
    case_def = CASES[pre.case]
    parser = _parser(add_help=True)
    if case_def.add_arguments:
        case_def.add_arguments(parser)
    args = parser.parse_args(argv)
    args.threads = threads
    if min(args.rounds, args.repeat, args.threads) < 1 or args.warmup < 0:
        parser.error("--rounds, --repeat and --threads must be >= 1, --warmup >= 0")
    args.out = Path(args.out) if args.out else REPO_ROOT / "bench_out" / args.case
    case = case_def.build(args)
    if args.only:
        keep = set(args.only.split(","))
        if unknown := keep - {c.name for c in case.configs} - set(case.skipped):
            parser.error(f"--only: unknown configurations {sorted(unknown)}")
        case.configs = [c for c in case.configs if c.name in keep]
        case.skipped = {k: v for k, v in case.skipped.items() if k in keep}
        if case.baseline not in keep:
            case.baseline = None
    for name, reason in case.skipped.items():
        print(f"skipping {name}: {reason}", file=sys.stderr)
    opts = BenchOptions(
        mode=args.mode,
        rounds=args.rounds,
        warmup=args.warmup,
        repeat=args.repeat,
        threads=pinning["threads"],
        timeout_s=args.timeout,
        baseline=args.baseline,
    )
    if opts.baseline and opts.baseline not in {c.name for c in case.configs} | set(case.skipped):
        parser.error(f"--baseline {opts.baseline!r} is not a configuration of {case.name!r}")
    result = run_case(case, opts, progress=None if args.quiet else lambda msg: print(msg, file=sys.stderr))
    result.notes["thread_pinning"] = pinning
    paths = write_all(result, args.out)
    print(format_table(result))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0 if any(c.status == "ok" for c in result.configs) else 1


if __name__ == "__main__":
    sys.exit(main())
