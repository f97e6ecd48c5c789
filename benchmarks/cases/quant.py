"""Weight-only quantization: prefill or decoding-step latency, artifact size and output error of
fp32 vs int8 vs int4 (infercc) vs onnxruntime's own MatMulNBitsQuantizer (int4, applied to
infercc's fp32 artifact), on one benchmark-size export (``--phase prefill|decode``).

Why: int4/int8 weights only pay off if MatMulNBits is not slower than the float MatMul it replaces
at prefill (compute bound), if they speed up decoding (memory bound), and if the error stays
small; and infercc's int4 has
to hold its own against what ORT's quantizer produces from the same file. Every artifact is built
once, up front, in the parent process (cached beside the export under a digest of infercc's source); the error of each against the
fp32 artifact is measured there too, on one fixed input, and recorded in the notes. Workers only
load and run a file.

Caveat: the benchmark models are random-initialized (no downloads), so their logits are nearly
flat and top-1 agreement means little; the relative error and cosine are the figures to read. Real
weights are covered by tests/passes/quantize/test_real_models.py.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from benchmarks.harness import Case, ConfigSpec
from benchmarks.models import EXPORTERS, FAMILIES, ensure_model, infercc_digest
from benchmarks.steps import prefill_feeds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("quant case")
    g.add_argument("--family", choices=FAMILIES, default="llama")
    g.add_argument("--exporter", choices=EXPORTERS, default="dynamo")
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--seq", type=int, default=128)
    g.add_argument("--block-size", type=int, choices=[16, 32, 64, 128], default=32, help="int4 block (both quantizers)")
    g.add_argument("--method", choices=["gptq", "mse", "rtn"], default="gptq", help="infercc's quantization method")
    g.add_argument("--int8-fraction", type=float, default=None, help="infercc's quant_int8_fraction (default: infercc's)")
    g.add_argument("--phase", choices=["prefill", "decode"], default="prefill",
                   help="time a prefill of --seq tokens, or one decoding step (batch 1) after --past cached tokens")
    g.add_argument("--past", type=int, default=128)


def prepare_infercc(source: Path, **options) -> Path:
    import infercc

    c = infercc.Config(**options)  # the tag names what decides the weights, defaults included
    tag = f"{c.quantize}-{c.quant_method}-{c.quant_block_size}-mixed{c.quant_int8_fraction:g}" if c.quantize else "fp32"
    target = source.parent / "quant" / infercc_digest() / f"infercc-{tag}"
    if not (target / "model.onnx").exists():
        infercc.compile(source, **{"backend": "ort", **options}).save(target)  # run by ONNX Runtime
    return target / "model.onnx"


def prepare_ort_int4(source: Path, block_size: int) -> tuple[Path | None, str]:
    """onnxruntime's MatMulNBitsQuantizer (RTN, asymmetric, accuracy_level 4, its defaults otherwise)
    on infercc's fp32 artifact, so that both int4 files share the same fused graph and differ only in
    how they were quantized (ORT quantizes the LM head to int4 and leaves embeddings float)."""
    target = source.parent.parent / f"ort-int4-b{block_size}" / "model.onnx"
    if target.exists():
        return target, "cached"
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    try:
        quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=4, block_size=block_size, is_symmetric=False,
                                         accuracy_level=4)
        quantizer.process()
    except Exception as exc:  # noqa: BLE001 - ORT's quantizer failing is a result to report
        return None, f"MatMulNBitsQuantizer failed: {type(exc).__name__}: {exc}"
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(quantizer.model.model, str(target), save_as_external_data=True, location="model.onnx.data")
    return target, "ok"


def folder_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in model.parent.iterdir() if p.is_file() and p.name.startswith("model.onnx"))


def run_once(model: Path, batch: int, seq: int) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, prefill_feeds(session, batch, seq))[0]


def errors(reference: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    from infercc.passes.quantize.report import compare

    return compare(reference, actual)


def build_case(args: argparse.Namespace) -> Case:
    source = ensure_model(args.family, args.exporter)
    quant = {"quant_method": args.method, "quant_block_size": args.block_size}
    if args.int8_fraction is not None:
        quant["quant_int8_fraction"] = args.int8_fraction
    models = {
        "fp32": prepare_infercc(source),
        "int8": prepare_infercc(source, quantize="int8", **quant),
        "int4": prepare_infercc(source, quantize="int4", **quant),
    }
    ort_int4, note = prepare_ort_int4(models["fp32"], args.block_size)
    skipped = {}
    if ort_int4 is not None:
        models["ort-int4"] = ort_int4
    else:
        skipped["ort-int4"] = note
    reference = run_once(models["fp32"], args.batch, args.seq)
    descriptions = {
        "fp32": "infercc, float weights", "int8": f"infercc int8 per channel ({args.method})",
        "int4": f"infercc int4 block {args.block_size} ({args.method})",
        "ort-int4": f"onnxruntime MatMulNBitsQuantizer int4 block {args.block_size} (RTN, accuracy_level 4)",
    }
    if args.phase == "prefill":
        configs = [ConfigSpec(name, "benchmarks.cases.prefill:setup", {"model": str(path), "batch": args.batch, "seq": args.seq},
                              descriptions[name]) for name, path in models.items()]
    else:
        configs = [ConfigSpec(name, "benchmarks.steps:setup_step", {"model": str(path), "past": args.past},
                              descriptions[name]) for name, path in models.items()]
    what = f"batch {args.batch}, seq {args.seq}" if args.phase == "prefill" else f"one decoding step after {args.past}"
    source_bytes = sum(p.stat().st_size for p in source.parent.iterdir() if p.is_file() and p.name.startswith("model.onnx"))
    return Case(
        name=f"quant-{args.phase}-{args.family}-{args.exporter}-b{args.batch}-s{args.seq}-bs{args.block_size}-{args.method}",
        description=f"{args.phase} latency and error of weight-only quantization, {args.family} ({args.exporter}), {what}",
        configs=configs, baseline="fp32", skipped=skipped,
        notes={
            "model": str(source), "ort_quantizer": note, "source_bytes": source_bytes,
            "artifact_bytes": {name: folder_bytes(path) for name, path in models.items()},
            "size_vs_source": {name: round(folder_bytes(path) / source_bytes, 4) for name, path in models.items()},
            "error_vs_fp32": {name: errors(reference, run_once(path, args.batch, args.seq)) for name, path in models.items() if name != "fp32"},
        },
    )
