"""What the ``infercc`` commands share: the optimization flags, the Config options they map to, compiling
with a progress bar, loading a compiled folder or compiling anything else, streaming to stdout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def compile_options(args: argparse.Namespace) -> dict:
    opts = {}
    if getattr(args, "no_optimize", False):
        opts["optimize"] = False
    if getattr(args, "disable_pass", None):
        opts["disable_passes"] = tuple(args.disable_pass)
    for name in ("lowering", "provider", "backend"):
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


def compile_with_progress(path: str, options: dict):
    from tqdm import tqdm

    from .. import compile
    from ..config import Config
    from ..passes import build_pipeline

    total = len(build_pipeline(Config().replace(**options)))
    with tqdm(total=total, desc="compiling", unit="pass", file=sys.stderr, leave=False, disable=None) as bar:
        def on_pass(p, record):
            bar.set_postfix_str(p.name)
            bar.update(1)

        return compile(path, on_pass=on_pass, **options)



def load_for_run(model: str, options: dict):
    """A compiled folder loads as it is; anything else (.gguf, HF folder, .onnx) is compiled."""
    from .. import load

    path = Path(model)
    if path.is_dir() and (path / "manifest.json").is_file():
        return load(path)
    return compile_with_progress(model, options)


def stream_to_stdout(compiled, prompt, options: dict):
    """Print pieces as they come; return the GenerationResult."""
    stream = compiled.stream(prompt, **options)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return stream.result


def print_speed(result) -> None:
    print(
        f"prompt {len(result.prompt_token_ids)} tokens in {result.prompt_seconds:.2f} s "
        f"({result.prompt_tokens_per_second:.1f} tokens/s); decode {len(result.token_ids)} tokens in "
        f"{result.decode_seconds:.2f} s ({result.tokens_per_second:.1f} tokens/s, {result.decode_loop} loop); "
        f"finish: {result.finish_reason}",
        file=sys.stderr,
    )



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
