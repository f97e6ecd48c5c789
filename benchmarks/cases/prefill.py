"""Prefill latency and fused-attention counts: plain onnxruntime vs onnxruntime's transformer
optimizer vs infercc, on a benchmark-size export (see benchmarks/models.py).

Why: the attention-fusion work has to beat ORT's optimizer at its own job. Each contender's
optimized file is produced once, up front, in the parent process (compile time is not prefill
time); workers only load and run it. The fused-attention count of each file is recorded beside
its latency, so a speed-up is never read without knowing what was fused.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from benchmarks.harness import Case, ConfigSpec
from benchmarks.models import EXPORTERS, FAMILIES, ensure_model
from benchmarks.steps import setup_prefill

ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedMultiHeadAttention")
ORT_MODEL_TYPE = {"gpt2": "gpt2", "llama": "gpt2"}  # ORT's optimizer has no llama type; gpt2 is the usual advice
SHAPES = {"gpt2": (12, 768), "llama": (12, 768)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("prefill case")
    g.add_argument("--family", choices=FAMILIES, default="gpt2")
    g.add_argument("--exporter", choices=EXPORTERS, default="dynamo")
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--seq", type=int, default=128)


def attention_count(path: str | Path) -> int:
    proto = onnx.load(str(path), load_external_data=False)
    return sum(1 for n in proto.graph.node if n.op_type in ATTENTION_OPS)


def prepare_ort_optimizer(source: Path, family: str) -> tuple[Path | None, str]:
    """Run onnxruntime.transformers.optimizer once; returns (file, note). A crash is a result too."""
    target = source.parent / "ort_optimized" / "model.onnx"
    if target.exists():
        return target, "cached"
    from onnxruntime.transformers import optimizer

    heads, hidden = SHAPES[family]
    try:
        optimized = optimizer.optimize_model(
            str(source), model_type=ORT_MODEL_TYPE[family], num_heads=heads, hidden_size=hidden, opt_level=0,
        )
    except Exception as exc:  # noqa: BLE001 - ORT's optimizer failing is what we report
        return None, f"onnxruntime optimizer failed: {type(exc).__name__}: {exc}"
    target.parent.mkdir(parents=True, exist_ok=True)
    optimized.save_model_to_file(str(target), use_external_data_format=True)
    return target, "ok"


def prepare_infercc(source: Path) -> Path:
    import infercc

    target = source.parent / "infercc"
    if not (target / "model.onnx").exists():
        infercc.compile(source, backend="ort").save(target)  # run by ONNX Runtime
    return target / "model.onnx"


def build_case(args: argparse.Namespace) -> Case:
    source = ensure_model(args.family, args.exporter)
    ort_opt, note = prepare_ort_optimizer(source, args.family)
    compiled = prepare_infercc(source)
    common = {"batch": args.batch, "seq": args.seq}
    configs = [ConfigSpec("ort", f"{__name__}:setup", {**common, "model": str(source)}, "plain onnxruntime on the export")]
    skipped = {}
    if ort_opt is not None:
        configs.append(ConfigSpec("ort-optimizer", f"{__name__}:setup", {**common, "model": str(ort_opt)},
                                  "onnxruntime.transformers.optimizer output"))
    else:
        skipped["ort-optimizer"] = note
    configs.append(ConfigSpec("infercc", f"{__name__}:setup", {**common, "model": str(compiled)}, "infercc-compiled"))
    return Case(
        name=f"prefill-{args.family}-{args.exporter}-b{args.batch}-s{args.seq}",
        description=f"prefill latency, {args.family} ({args.exporter} export), batch {args.batch}, seq {args.seq}",
        configs=configs, baseline="ort-optimizer" if ort_opt is not None else "ort", skipped=skipped,
        notes={"model": str(source), "ort_optimizer": note,
               "fused_attention": {c.name: attention_count(c.kwargs["model"]) for c in configs}},
    )


def setup(threads: int, model: str, batch: int, seq: int) -> tuple[Callable[[], Any], dict]:
    run, info = setup_prefill(threads, model, batch, seq)
    return run, {**info, "fused_attention": attention_count(model)}
