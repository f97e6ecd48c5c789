"""The ``infercc`` command line. Errors are one line (``error: ...``) naming the problem and the fix;
``--debug`` shows the traceback. One module per command family: commands.py (convert, inspect, run,
bench), serve.py, demo.py; train-heads lives with its trainer (infercc/train_heads.py)."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import InferccError
from ..train_heads import add_parser as add_train_heads
from .commands import cmd_bench, cmd_convert, cmd_inspect, cmd_run
from .common import optimization_flags
from .demo import add_parser as add_demo
from .serve import add_parser as add_serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infercc", description="Inference-optimizing compiler for transformer models")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="compile an ONNX model into an optimized artifact folder")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--backend", choices=["auto", "c", "ort"],
                   help="the runtime the artifact is for: auto (default: generated C on a CPU, its source and weight "
                        "blob saved beside model.onnx), c, or ort (a model.onnx ONNX Runtime runs on its own)")
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
                   help="runtime when compiling (a compiled folder keeps its own): auto (default: generated C on "
                        "a CPU when every op has a kernel, else ONNX Runtime), c (generated C, decode loop inside the "
                        "library) or ort")
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


    add_serve(sub)
    add_demo(sub)
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

