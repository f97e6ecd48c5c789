"""Projection packing (the ``pack_projections`` pass) on and off: one decoding step with a cached
past, and a prompt's prefill, of the benchmark LLaMA in float32 and int4.

Why: packing q/k/v and gate/up trades three (two) kernels for one wider kernel and a Split that
copies its result. For one token the copy is a few KB and the kernels' fixed costs dominate; for a
prompt the copy is [seq, N] floats. This case measures both sides, so the pass's default is a
measurement, not an assumption. Artifacts are compiled up front (cached by options beside the
export); int4 uses ``rtn`` so that the build takes seconds (the kernel does not care which method
chose the codes; the mixed-precision split, which decides what can pack, is the default's).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.cases.prefill import prefill_feeds
from benchmarks.harness import Case, ConfigSpec
from benchmarks.models import ensure_model

VARIANTS = {
    "fp32-packed": {}, "fp32-separate": {"disable_passes": ["pack_projections"]},
    "int4-packed": {"quantize": "int4", "quant_method": "rtn"},
    "int4-separate": {"quantize": "int4", "quant_method": "rtn", "disable_passes": ["pack_projections"]},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("packing case")
    g.add_argument("--phase", choices=["decode", "prefill"], default="decode")
    g.add_argument("--past", type=int, default=128, help="cached tokens before the timed decoding step")
    g.add_argument("--seq", type=int, default=128, help="prompt tokens of the timed prefill")


def prepare(source: Path, name: str, options: dict[str, Any]) -> Path:
    import infercc

    target = source.parent / "packing" / name
    if not (target / "model.onnx").exists():
        infercc.compile(source, **options).save(target)
    return target / "model.onnx"


def setup_step(threads: int, model: str, past: int) -> tuple[Callable[[], Any], dict]:
    """One token after ``past`` cached random keys and values."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            dtype = np.float16 if "float16" in inp.type else np.float32
            feeds[inp.name] = rng.standard_normal((1, inp.shape[1], past, inp.shape[3])).astype(dtype)
        elif "mask" in inp.name:
            feeds[inp.name] = np.ones((1, past + 1), np.int64)
        else:
            feeds[inp.name] = rng.integers(0, 1000, (1, 1)).astype(np.int64)
    import onnx

    nodes = len(onnx.load(model, load_external_data=False).graph.node)
    return (lambda: session.run(None, feeds)), {"nodes": nodes}


def setup_prefill(threads: int, model: str, seq: int) -> tuple[Callable[[], Any], dict]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    feeds = prefill_feeds(session, 1, seq)
    return (lambda: session.run(None, feeds)), {}


def build_case(args: argparse.Namespace) -> Case:
    source = ensure_model("llama", "dynamo")
    models = {name: prepare(source, name, options) for name, options in VARIANTS.items()}
    if args.phase == "decode":
        configs = [ConfigSpec(name, f"{__name__}:setup_step", {"model": str(path), "past": args.past},
                              f"{name}: one token after {args.past} cached") for name, path in models.items()]
    else:
        configs = [ConfigSpec(name, f"{__name__}:setup_prefill", {"model": str(path), "seq": args.seq},
                              f"{name}: prefill of {args.seq} tokens") for name, path in models.items()]
    what = f"one decoding step after {args.past}" if args.phase == "decode" else f"prefill of {args.seq}"
    return Case(f"packing-{args.phase}", f"pack_projections on/off, llama (dynamo), {what}, batch 1", configs,
                baseline="fp32-separate", notes={"model": str(source), "variants": VARIANTS})
