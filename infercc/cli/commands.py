"""The ``convert``, ``inspect``, ``run`` and ``bench`` commands."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..errors import ConfigError, InputError, ModelLoadError
from .common import compile_options, compile_with_progress, load_for_run, print_speed, stream_to_stdout


def cmd_convert(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    compiled = compile_with_progress(args.model, compile_options(args))
    out = compiled.save(args.output)
    print(compiled.diagnostics.table())
    if compiled.config.quantize in ("int8", "int4") or _quantized(compiled):
        from ..passes.quantize.report import print_convert_report

        print_convert_report(compiled, args.model, out)
    print(f"\nwrote {out}/ in {time.perf_counter() - start:.1f} s "
          f"({len(compiled.model.graph.nodes)} nodes)")
    return 0


def _quantized(compiled) -> bool:
    """Whether the quantize pass changed any weight (quantize='auto' on a float model does not)."""
    try:
        return bool(compiled.diagnostics["quantize_weights"].info.get("layers"))
    except KeyError:
        return False


def cmd_inspect(args: argparse.Namespace) -> int:
    from .. import load
    from ..api import import_model
    from ..compiled import MANIFEST
    from ..families import detect_family

    if args.ops:
        return _print_ops(args.json)
    if args.model is None:
        raise ConfigError("infercc inspect needs a MODEL (.onnx file, .gguf, Hugging Face folder or a folder written "
                          "by convert), or --ops to list the ops the generated-C runtime claims")
    path = Path(args.model)
    compiled_folder = (path / MANIFEST).is_file()
    if compiled_folder:
        compiled = load(path)
        model, diagnostics = compiled.model, compiled.diagnostics
        header = f"{path} (compiled by infercc)"
    else:
        model = import_model(path)  # .onnx, .gguf or a Hugging Face folder, as compile() takes
        compiled = compile_with_progress(str(path), compile_options(args))
        diagnostics = compiled.diagnostics
        header = f"{path}"
    family = detect_family(model)
    report = {
        "model": header,
        "opsets": model.opset_imports,
        "inputs": [_sig(v) for v in model.graph.inputs if v.const is None],
        "outputs": [_sig(v) for v in model.graph.outputs],
        "family": family,
        "nodes": sum(1 for _ in model.graph.walk()),
        "initializers": len(model.graph.initializers),
        "parameters": int(sum(v.const.size for v in model.graph.initializers.values())),
        "op_histogram": model.graph.op_histogram(),
    }
    if args.json:
        print(json.dumps({**report, "diagnostics": diagnostics.to_dict()}, indent=2, default=str))
        return 0
    print(f"model      {header}")
    print(f"family     {family['family']} ({family['kind']}, {family['attention_layers']} attention sites)")
    opsets = ", ".join(f"{d or 'ai.onnx'}:{v}" for d, v in model.opset_imports.items())
    print(f"opsets     {opsets}")
    print(f"size       {report['nodes']} nodes, {report['parameters']:,} parameters")
    for kind in ("inputs", "outputs"):
        for sig in report[kind]:
            print(f"{kind[:-1]:<10} {sig}")
    print("\nop histogram")
    for op, n in report["op_histogram"].items():
        print(f"  {n:>5}  {op}")
    print("\nwhat each pass " + ("did" if compiled_folder else "would do"))
    print(diagnostics.table(sites=args.sites))
    for warning in diagnostics.warnings:
        print(f"WARNING {warning}")
    return 0


def _print_ops(as_json: bool) -> int:
    """The generated-C runtime's claim: standard ops with a kernel (held to the ONNX node tests by
    tests/codegen/test_conformance.py), canonical infercc ops with a kernel, and the exclusions."""
    from ..codegen.claims import CLAIMED_DTYPES, EXCLUSIONS, claimed_ops, dtype_names, kernel_ops
    from ..passes.canonical import DOMAIN

    standard, canonical = claimed_ops(), kernel_ops()
    exclusions = [{"ops": list(e.ops), "what": e.what, "reason": e.reason} for e in EXCLUSIONS]
    if as_json:
        print(json.dumps({"standard": standard, DOMAIN: canonical, "dtypes": dtype_names(CLAIMED_DTYPES).split(", "),
                          "exclusions": exclusions}, indent=2))
        return 0

    def table(names: list[str], columns: int = 5) -> None:
        width = max(len(n) for n in names) + 2
        for i in range(0, len(names), columns):
            print("  " + "".join(n.ljust(width) for n in names[i:i + columns]).rstrip())

    print(f"generated-C runtime: {len(standard)} standard ONNX ops (ai.onnx) with a C kernel, "
          "each passing the ONNX backend node tests outside the exclusions below")
    table(standard)
    print(f"\n{len(canonical)} canonical {DOMAIN} ops (produced by infercc's fusion passes) with a C kernel")
    table(canonical)
    print(f"\nelement types: {dtype_names(CLAIMED_DTYPES)}")
    print("\nnot claimed (such a model runs on ONNX Runtime):")
    for e in exclusions:
        ops = "every op" if e["ops"] == ["*"] else ", ".join(e["ops"])
        print(f"  - {e['what']} [{ops}]: {e['reason']}")
    return 0


def _sig(v) -> str:
    shape = "?" if v.shape is None else "[" + ", ".join("?" if d is None else str(d) for d in v.shape) + "]"
    return f"{v.name}: {v.dtype or '?'}{shape}"


# -- run: generate text ------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    """Generate text from a prompt, streaming it to stdout; speed goes to stderr."""
    compiled = load_for_run(args.model, compile_options(args))
    if args.tokenizer:
        from ..runtime.tokenizer import Tokenizer

        compiled.tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    try:
        compiled.tokenizer  # noqa: B018 - loads it, so a missing one is reported before any work
    except ModelLoadError as exc:
        raise ModelLoadError(f"{exc} On the command line: --tokenizer PATH (a .gguf file or a folder with "
                             "tokenizer.json).") from None
    options = {
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
        "top_p": args.top_p, "min_p": args.min_p, "repetition_penalty": args.repetition_penalty, "seed": args.seed,
    }
    if args.stop:
        options["stop"] = tuple(args.stop)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    print_speed(stream_to_stdout(compiled, prompt, options))
    return 0


# -- bench: speed, and where the time goes ------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    """Prefill time and decode tokens/s (encoders: the forward time) on the chosen runtime; with
    --profile, the time per op type and per layer and a Chrome trace."""
    from tqdm import tqdm

    from ..runtime.bench import bench, runs_per_repetition

    if args.prompt_tokens < 1 or args.new_tokens < 0 or args.repeats < 1 or (args.threads is not None and args.threads < 0):
        raise InputError(f"bench: --prompt-tokens must be >= 1, --new-tokens >= 0, --repeats >= 1 and --threads >= 0 "
                         f"(got {args.prompt_tokens}, {args.new_tokens}, {args.repeats}, {args.threads}); pass "
                         "counts in range")
    profile = args.profile or args.trace is not None
    trace = Path(args.trace if args.trace is not None else "trace.json")
    if profile and not trace.parent.resolve().is_dir():
        raise InputError(f"--trace {trace}: the folder {trace.parent} does not exist; create it or pass another path")
    compiled = load_for_run(args.model, compile_options(args))
    if args.threads is not None:
        compiled.config = compiled.config.replace(intra_op_threads=args.threads)
    prompt_ids = None
    if args.prompt is not None:
        prompt_ids = compiled.tokenizer.encode(args.prompt)
    print("building the runtime" + (" with profiling" if profile else "") + " ...", file=sys.stderr)
    runs = (args.repeats + 1) * runs_per_repetition(compiled, args.new_tokens)
    with tqdm(total=runs, desc="benchmarking", unit="run", file=sys.stderr, leave=False, disable=None) as bar:
        result = bench(compiled, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats,
                       profile=profile, prompt_ids=prompt_ids, on_run=lambda: bar.update(1))
    _print_bench(args.model, compiled, result, args.threads)
    if result.profile is not None:
        note = "kernel time measured inside the runtime, last repetition"
        print(f"\ntime per op type ({note})\n{result.profile.table('op', limit=args.top)}")
        print(f"\ntime per layer\n{result.profile.table('layer')}")
        path = result.profile.write_trace(trace)
        print(f"\ntrace: {path} ({sum(len(r.events) for r in result.profile.runs)} steps in "
              f"{len(result.profile.runs)} runs; open in https://ui.perfetto.dev or chrome://tracing)")
    return 0


def _print_bench(model: str, compiled, result, threads: int | None) -> None:
    print(f"model      {model}")
    print(f"runtime    {result.reason}")
    print(f"threads    {threads if threads else 'default'}; median of {result.repeats} runs after a warm-up")
    seconds = result.prefill_median_s
    rate = result.prompt_tokens / seconds if seconds > 0 else float("inf")
    if result.kind == "encoder":
        print(f"forward    {result.prompt_tokens} tokens in {seconds * 1000:.2f} ms ({rate:,.0f} tokens/s); "
              "encoder-only: no decode")
        return
    print(f"prefill    {result.prompt_tokens} tokens in {seconds * 1000:.2f} ms ({rate:,.0f} tokens/s)")
    if result.new_tokens:
        tps = result.decode_tokens_per_second
        how = ""
        if result.profile is not None:  # the profiled path: the loop generate runs, or a run per token
            how = "; the C decode loop, its timers read at each token" if result.decode_loop else \
                "; one run per token, to read its timers"
        print(f"decode     {result.new_tokens} tokens at {tps:,.1f} tokens/s ({1000 / tps if tps else 0:.2f} ms/token{how})")
