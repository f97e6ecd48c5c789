"""Benchmark-size models exported by the real exporters, cached under ``bench_out/models``.

GPT-2 small (12 layers, hidden 768, 124M parameters) and a ~100M-parameter LLaMA (12 layers,
hidden 768, 12 heads / 4 KV heads, SwiGLU 2048, vocab 32000, tied embeddings), random-initialized
from configs (no downloads), exported with torch.onnx dynamo and TorchScript exactly as the test
fixtures are (same wrapper and exporter settings), so benchmarks measure what users feed us.
Needs the ``export`` extra (torch==2.13.0, transformers, onnxscript).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench_out" / "models"
FAMILIES = ("gpt2", "llama")
EXPORTERS = ("dynamo", "torchscript")


def _spec(family: str):
    import transformers

    from tests.fixtures.make_fixtures import FamilySpec

    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
        return FamilySpec("gpt2", "decoder", config, transformers.GPT2LMHeadModel, ("input_ids", "attention_mask"), "logits")
    if family == "llama":
        config = transformers.LlamaConfig(
            hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=True,
        )
        return FamilySpec("llama", "decoder", config, transformers.LlamaForCausalLM, ("input_ids", "attention_mask"), "logits")
    raise ValueError(f"unknown benchmark family {family!r}; choose from {FAMILIES}")


def model_path(family: str, exporter: str) -> Path:
    return CACHE / f"{family}_{exporter}" / "model.onnx"


def ensure_model(family: str, exporter: str) -> Path:
    """Export once; later runs reuse the file (delete bench_out/models to re-export)."""
    path = model_path(family, exporter)
    if path.exists():
        return path
    import numpy as np
    import torch

    from tests.fixtures import make_fixtures as mf

    spec = _spec(family)
    torch.manual_seed(0)
    wrapper = mf.SingleOutput(spec.model_cls(spec.config).eval(), spec.input_names, spec.output_name, spec.kind).eval()
    feeds = {"input_ids": np.ones((1, 8), np.int64), "attention_mask": np.ones((1, 8), np.int64)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    if exporter == "dynamo":
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
        program = torch.onnx.export(
            wrapper, tuple(torch.from_numpy(feeds[n]) for n in spec.input_names), dynamo=True,
            input_names=list(spec.input_names), output_names=[spec.output_name],
            dynamic_shapes=(tuple({0: batch, 1: seq} for _ in spec.input_names),),
        )
        program.save(str(tmp), external_data=True)
    else:
        mf.export_torchscript(wrapper, feeds, tmp)
    import onnx

    model = onnx.load(str(tmp))
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data")
    for leftover in tmp.parent.glob("model.tmp*"):
        leftover.unlink()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="export the benchmark models (cached)")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--exporters", nargs="*", default=list(EXPORTERS))
    args = parser.parse_args(argv)
    for family in args.families:
        for exporter in args.exporters:
            print(f"{family}/{exporter}: {ensure_model(family, exporter)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
