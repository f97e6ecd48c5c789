"""``infercc serve``: a model over OpenAI's HTTP API (the server itself is infercc/server/)."""

from __future__ import annotations

import argparse
import os
import sys

from ..config import SPECULATION_POLICIES, SPECULATIONS
from ..errors import InputError
from .common import compile_options, load_for_run, optimization_flags


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve MODEL over OpenAI's HTTP API until SIGTERM or Ctrl-C; both drain first (no new
    connections, in-flight requests finish), then the command returns."""
    if not 0 <= args.port <= 65535:
        raise InputError(f"serve: --port must be in [0, 65535] (0 = any free port), got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise InputError("serve: --api-key is empty; pass a non-empty key, or leave the option out to serve "
                         "without authentication")
    options = compile_options(args)
    if args.speculation in ("medusa", "eagle"):  # compiled for it: the graph exposes the final hidden state
        options["speculation"] = args.speculation
    compiled = load_for_run(args.model, options)
    if args.tokenizer:
        from ..runtime.tokenizer import Tokenizer

        compiled.tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    knobs = {name: getattr(args, name) for name in ("max_batch_tokens", "kv_cache_memory", "speculation",
                                                     "speculation_policy", "speculation_heads")
             if getattr(args, name) is not None}
    config = compiled.config.replace(**knobs)  # validated here: a bad value is a ConfigError naming the field
    from ..server import model_name_for, serve

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


def add_parser(sub) -> None:
    """The ``serve`` subcommand (registered by cli.build_parser)."""
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
