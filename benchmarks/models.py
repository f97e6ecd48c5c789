"""Benchmark-size models exported by the real exporters, cached under ``bench_out/models``.

GPT-2 small (12 layers, hidden 768, 124M parameters) and a ~100M-parameter LLaMA (12 layers,
hidden 768, 12 heads / 4 KV heads, SwiGLU 2048, vocab 32000, tied embeddings), random-initialized
from configs (no downloads), exported with torch.onnx dynamo and TorchScript exactly as the test
fixtures are (same wrapper and exporter settings), so benchmarks measure what users feed us.
Needs the ``export`` extra (torch==2.13.0, transformers, onnxscript).

The LLaMA is also saved as a Hugging Face folder (``llama_hf``: safetensors plus an offline
tokenizer) from the same seed and config, checked against the dynamo export's logits, so that the
other runtimes of the decode case (onnxruntime-genai, llama.cpp; see ``benchmarks/contenders``)
are built from exactly the weights the ONNX contenders run. ``ensure_hf_from_gguf`` makes such a
folder from a real GGUF checkpoint instead (the smollm2 case).
"""

from __future__ import annotations

import argparse
import shutil
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


def _seeded_model(family: str):
    """The random-initialized model every artifact of `family` is made from (seed 0, eval mode)."""
    import torch

    spec = _spec(family)
    torch.manual_seed(0)
    return spec.model_cls(spec.config).eval()


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
    wrapper = mf.SingleOutput(_seeded_model(family), spec.input_names, spec.output_name, spec.kind).eval()
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


def infercc_digest() -> str:
    """A short digest of infercc's source: artifacts compiled by infercc are cached under it, so a
    change to any pass compiles them again instead of timing a stale file."""
    import hashlib

    root = Path(__file__).resolve().parents[1] / "infercc"
    digest = hashlib.sha1()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def hf_path(family: str = "llama") -> Path:
    return CACHE / f"{family}_hf"


def ensure_hf_folder(family: str = "llama") -> Path:
    """Save the seeded model with ``save_pretrained`` (safetensors) plus an offline tokenizer, once.

    Why the check against the dynamo export: every contender of the decode case must run the same
    weights, and that only holds while `_seeded_model` draws them exactly as the export did."""
    folder = hf_path(family)
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    import numpy as np
    import onnxruntime as ort
    import torch

    from benchmarks.tokenizer import save_offline_tokenizer

    model = _seeded_model(family)
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (1, 16)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    session = ort.InferenceSession(str(ensure_model(family, "dynamo")), providers=["CPUExecutionProvider"])
    exported = session.run(None, feeds)[0]
    with torch.no_grad():
        ours = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}, use_cache=False).logits.numpy()
    if not np.allclose(ours, exported, atol=1e-3, rtol=1e-3):
        raise RuntimeError(f"{family}: the seeded model's logits differ from the dynamo export's by "
                           f"{np.abs(ours - exported).max():.3g}; delete bench_out/models to rebuild both")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    save_offline_tokenizer(tmp, model.config.vocab_size)
    shutil.rmtree(folder, ignore_errors=True)  # a folder left half-written by an interrupted run
    tmp.rename(folder)
    return folder


def ensure_hf_from_gguf(gguf: Path, name: str) -> Path:
    """A Hugging Face folder (``bench_out/models/<name>``: float32 safetensors plus the tokenizer)
    made by transformers from the GGUF file, once: the other runtimes' builders read such folders.

    Why not ``from_pretrained(gguf_file=...)``: that needs accelerate; this is what it does inside
    (config, then ``load_gguf_checkpoint``'s dequantized, renamed tensors), with the one weight the
    file leaves out checked to be the tied LM head."""
    folder = CACHE / name
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    loaded = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    untied = set(loaded.missing_keys) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if untied or loaded.unexpected_keys:
        raise RuntimeError(f"{gguf}: transformers' GGUF tensors do not fill {type(model).__name__}: "
                           f"missing {sorted(untied)}, unexpected {sorted(loaded.unexpected_keys)}")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)  # a folder left half-written by an interrupted run
    tmp.rename(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="export the benchmark models (cached)")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--exporters", nargs="*", default=list(EXPORTERS))
    parser.add_argument("--decode", action="store_true",
                        help="also the decode case's LLaMA artifacts: HF folder, onnxruntime-genai fp32/int4, GGUF")
    args = parser.parse_args(argv)
    for family in args.families:
        for exporter in args.exporters:
            print(f"{family}/{exporter}: {ensure_model(family, exporter)}", flush=True)
    if args.decode:
        from benchmarks.contenders import build_all

        for name, (path, note) in build_all().items():
            print(f"{name}: {path or 'not built'} ({note})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
