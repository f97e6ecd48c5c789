"""Peak memory of the runtimes on one artifact: resident set size (RSS) after compile, after load,
during and after a generation, and the peak (``getrusage`` maxrss), each phase in a fresh process.

Why fresh processes: a process's peak RSS never goes down, so the compile of one configuration
would hide the run of the next. ``compile`` compiles a source (an .onnx file, a GGUF, a Hugging Face
folder) and saves the artifact; ``run`` loads a saved artifact, generates, and reports. The driver
(no phase given) does both for each backend (``c``, ``ort``) and prints one table::

    python -m benchmarks.memory SOURCE [--backends c,ort] [--quantize int4] [--prompt-len 128]
        [--new-tokens 64] [--threads 2] [--out DIR]

Not a timing benchmark: one run per phase, figures in MiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

MIB = 1 << 20


def rss() -> int:
    """Bytes resident now (VmRSS: anonymous + file-backed mapped pages, what ``top`` shows)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak() -> int:
    """Bytes of the largest RSS this process had (Linux reports maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"backend": args.backend, "intra_op_threads": args.threads, "inter_op_threads": 1}
    if args.quantize:
        options["quantize"] = None if args.quantize == "none" else args.quantize
    return options


def compile_phase(args: argparse.Namespace) -> dict[str, Any]:
    import infercc

    compiled = infercc.compile(args.source, **_options(args))
    after_compile = rss()
    runtime = compiled.runtime  # builds the backend (the C library and its weight blob)
    after_backend = rss()
    compiled.save(args.artifact)
    files = {p.name: p.stat().st_size for p in Path(args.artifact).iterdir() if p.is_file()}
    return {"after_compile": after_compile, "after_backend": after_backend, "after_save": rss(), "peak": peak(),
            "runtime": runtime, "files": files}


def run_phase(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    import infercc

    model = infercc.load(args.artifact)
    after_load = rss()
    runtime = model.runtime
    after_backend = rss()
    prompt = np.random.default_rng(0).integers(3, 256, args.prompt_len).tolist()
    highest = [0]
    done = threading.Event()

    def sample() -> None:  # the RSS while the generation runs (its peak shows in maxrss too)
        while not done.wait(0.02):
            highest[0] = max(highest[0], rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    result = model.generate(prompt, max_new_tokens=args.new_tokens, ignore_eos=True)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    return {"after_load": after_load, "after_backend": after_backend, "during_generate": highest[0],
            "after_generate": rss(), "peak": peak(), "runtime": runtime, "tokens": list(result.token_ids),
            "generate_s": round(seconds, 2)}


def _child(phase: str, args: argparse.Namespace, backend: str, artifact: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.memory", str(args.source), "--phase", phase, "--backend", backend,
           "--artifact", str(artifact), "--threads", str(args.threads), "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens)] + (["--quantize", args.quantize] if args.quantize else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{phase} ({backend}) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("source")
    p.add_argument("--backends", default="c,ort")
    p.add_argument("--quantize", default=None, help="Config.quantize ('none' for float weights; default: Config's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default="bench_out/memory")
    p.add_argument("--phase", choices=["compile", "run"], help=argparse.SUPPRESS)
    p.add_argument("--backend", default="c", help=argparse.SUPPRESS)
    p.add_argument("--artifact", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:
        result = compile_phase(args) if args.phase == "compile" else run_phase(args)
        print(json.dumps(result))
        return
    results = {}
    for backend in args.backends.split(","):
        artifact = Path(args.out) / f"artifact-{backend}"
        results[backend] = {"compile": _child("compile", args, backend, artifact),
                            "run": _child("run", args, backend, artifact)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "memory.json").write_text(json.dumps(results, indent=2))
    for backend, r in results.items():
        c, g = r["compile"], r["run"]
        mib = lambda x: f"{x / MIB:7.0f}"  # noqa: E731
        print(f"{backend:4} ({g['runtime']}): compile peak {mib(c['peak'])} after-compile {mib(c['after_compile'])} "
              f"after-backend {mib(c['after_backend'])} | run: after-load {mib(g['after_load'])} after-backend "
              f"{mib(g['after_backend'])} during-generate {mib(g['during_generate'])} peak {mib(g['peak'])} MiB | "
              f"files {', '.join(f'{k} {v / MIB:.1f}' for k, v in sorted(c['files'].items()) if v > MIB)} MiB")
    tokens = {b: r["run"]["tokens"] for b, r in results.items()}
    if len(tokens) > 1:
        first = next(iter(tokens.values()))
        print("greedy tokens equal across backends:", all(t == first for t in tokens.values()))


if __name__ == "__main__":
    main()
