"""Projection packing (the ``pack_projections`` pass) on and off: one decoding step with a cached
past, and a prompt's prefill, of the benchmark LLaMA in float32 and int4.

Why: packing q/k/v and gate/up trades three (two) kernels for one wider kernel and a Split that
copies its result. For one token the copy is a few KB and the kernels' fixed costs dominate; for a
prompt the copy is [seq, N] floats. This case measures both sides, so the pass's default is a
measurement, not an assumption. Artifacts are compiled up front (cached by options beside the
export and infercc's source digest); int4 uses ``rtn`` so that the build takes seconds (the kernel does not care which method
chose the codes; the mixed-precision split, which decides what can pack, is the default's).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks.harness import Case, ConfigSpec
from benchmarks.models import ensure_model, infercc_digest

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

    target = source.parent / "packing" / infercc_digest() / name
    if not (target / "model.onnx").exists():
        infercc.compile(source, **{"backend": "ort", **options}).save(target)  # run by ONNX Runtime
    return target / "model.onnx"


def build_case(args: argparse.Namespace) -> Case:
    source = ensure_model("llama", "dynamo")
    models = {name: prepare(source, name, options) for name, options in VARIANTS.items()}
    if args.phase == "decode":
        configs = [ConfigSpec(name, "benchmarks.steps:setup_step", {"model": str(path), "past": args.past},
                              f"{name}: one token after {args.past} cached") for name, path in models.items()]
    else:
        configs = [ConfigSpec(name, "benchmarks.steps:setup_prefill", {"model": str(path), "batch": 1, "seq": args.seq},
                              f"{name}: prefill of {args.seq} tokens") for name, path in models.items()]
    what = f"one decoding step after {args.past}" if args.phase == "decode" else f"prefill of {args.seq}"
    return Case(f"packing-{args.phase}", f"pack_projections on/off, llama (dynamo), {what}, batch 1", configs,
                baseline="fp32-separate", notes={"model": str(source), "variants": VARIANTS})
