"""The ``infercc`` command line. Errors are one line (``error: ...``) naming the problem and the fix;
``--debug`` shows the traceback."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .errors import InferccError


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
    print(f"\nwrote {out}/ in {time.perf_counter() - start:.1f} s "
          f"({len(compiled.model.graph.nodes)} nodes)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import load
    from .families import detect_family
    from .ir import load_model

    path = Path(args.model)
    if path.is_dir():
        compiled = load(path)
        model, diagnostics = compiled.model, compiled.diagnostics
        header = f"{path} (compiled by infercc)"
    else:
        model = load_model(path)
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
    print("\nwhat each pass " + ("did" if path.is_dir() else "would do"))
    print(diagnostics.table(sites=args.sites))
    for warning in diagnostics.warnings:
        print(f"WARNING {warning}")
    return 0


def _sig(v) -> str:
    shape = "?" if v.shape is None else "[" + ", ".join("?" if d is None else str(d) for d in v.shape) + "]"
    return f"{v.name}: {v.dtype or '?'}{shape}"


def cmd_demo(args: argparse.Namespace) -> int:
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

    p = sub.add_parser("convert", help="compile an ONNX model into an optimized artifact folder")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="output folder")
    optimization_flags(p)
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("inspect", help="show a model's structure and what each pass would do")
    p.add_argument("model", help=".onnx file or a folder written by convert")
    p.add_argument("--json", action="store_true")
    p.add_argument("--sites", action="store_true", help="list every site each pass looked at")
    optimization_flags(p)
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("demo", help="compile and run a built-in tiny transformer")
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except InferccError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        if args.debug:
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
