"""Decode speed: greedy generation of the ~100M LLaMA (prompt 128, 128 new tokens, batch 1) by
infercc (cached graph) vs the uncached export vs onnxruntime-genai (and llama.cpp) on the same weights.

Why: a KV cache is the difference between recomputing the whole sequence for every token and
one token's work; the issue's targets are cached decode >= 10x the uncached export and >= 0.9x
onnxruntime-genai fp32. The timed unit is one full generation; each call reports its own prefill
time and decode tokens/s (`benchmarks.decoders`), and ratios of those are vs genai-fp32.

Every artifact is built up front in the parent (untimed): the Hugging Face folder and the other
runtimes' models are cached (`benchmarks.models`, `benchmarks.contenders`); the infercc artifacts
are compiled again every run (seconds each, and never stale), with ``kv_cache=True`` spelled out
(it is the default), from the working tree, whose uncommitted infercc files the notes list. The reference is Hugging
Face's torch model, greedy with its own cache: its tokens are what ``match_prefix`` counts and
its logits after the prompt what each contender's are compared with.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import Case, ConfigSpec, RunResult, paired_metric_ratio
from benchmarks.models import ensure_hf_folder, ensure_model

DECODERS = "benchmarks.decoders"
BASELINE = "genai-fp32"
#: Spelled out, so that the artifacts stay cached if the default ever changes.
CACHED = {"kv_cache": True}
#: The issue's targets: (config, compared with, minimum decode tokens/s ratio).
TARGETS = (("infercc", "uncached-export", 10.0), ("infercc-export", "uncached-export", 10.0),
           ("infercc", "genai-fp32", 0.9), ("infercc-export", "genai-fp32", 0.9),
           ("infercc-int4", "genai-int4", 0.9), ("infercc-int4-head4", "genai-int4", 0.9))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("decode case")
    g.add_argument("--prompt-len", type=int, default=128)
    g.add_argument("--new-tokens", type=int, default=128)
    g.add_argument("--seed", type=int, default=0, help="seed of the random prompt ids")
    g.add_argument("--block-size", type=int, choices=[32, 64, 128], default=32, help="infercc int4 block")


def reference(folder: Path, prompt: list[int], new_tokens: int, threads: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and the logits after the prompt from Hugging Face's torch model (with its cache)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens: list[int] = []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        first_logits = out.logits[0, -1].double().tolist()
        while True:
            tokens.append(int(out.logits[0, -1].argmax()))
            if len(tokens) == new_tokens:
                return tokens, first_logits
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)


def compile_infercc(source: Path, target: Path, threads: int, **options: Any) -> dict[str, Any]:
    """Compile and save one infercc artifact; returns what the notes should say about it."""
    import infercc

    t0 = time.perf_counter()
    compiled = infercc.compile(source, intra_op_threads=threads, inter_op_threads=1, **options)
    seconds = time.perf_counter() - t0
    compiled.save(target)
    cache_inputs = sum(i["name"].startswith("past_key_values.") for i in compiled.inputs)
    chosen = {k: v for k, v in compiled.config.to_dict().items() if k.startswith(("kv_cache", "quant"))}
    return {"source": str(source), "options": options, "config": chosen, "compile_s": round(seconds, 2),
            "cache_inputs": cache_inputs}


def uncommitted(path: str) -> list[str]:
    """``git status --porcelain`` of ``path``: the compiled artifacts come from the working tree,
    which may hold passes that are not committed yet."""
    out = subprocess.run(["git", "status", "--porcelain", "--", path], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    return out.stdout.splitlines() if out.returncode == 0 else [f"git status failed: {out.stderr.strip()}"]


def build_case(args: argparse.Namespace) -> Case:
    from benchmarks.contenders import ensure_genai, ensure_gguf

    export, folder = ensure_model("llama", "dynamo"), ensure_hf_folder()
    artifacts = Path(args.out) / "artifacts"
    notes: dict[str, Any] = {"export": str(export), "hf_folder": str(folder), "infercc": {},
                             "infercc_uncommitted": uncommitted("infercc")}
    int4 = {"quantize": "int4", "quant_block_size": args.block_size}
    wanted = set(args.only.split(",")) if getattr(args, "only", None) else None
    for name, source, options in (("infercc", folder, CACHED), ("infercc-export", export, CACHED),
                                  ("infercc-int4", folder, {**CACHED, **int4}),
                                  # genai's int4 recipe: the LM head int4 too, no weights kept int8
                                  ("infercc-int4-head4", folder, {**CACHED, **int4, "quant_lm_head": "int4",
                                                                  "quant_int8_fraction": 0.0})):
        if wanted is None or name in wanted:  # compiling takes minutes: only what runs
            notes["infercc"][name] = compile_infercc(source, artifacts / name, args.threads, **options)
    vocab = 32000
    prompt = np.random.default_rng(args.seed).integers(3, vocab, args.prompt_len).tolist()
    ref_tokens, ref_logits = reference(folder, prompt, args.new_tokens, args.threads)
    notes.update(prompt_seed=args.seed, prompt_len=len(prompt), new_tokens=args.new_tokens,
                 reference="transformers LlamaForCausalLM fp32, greedy with its KV cache",
                 reference_tokens=ref_tokens, reference_distinct_tokens=len(set(ref_tokens)))
    common = {"prompt": prompt, "new_tokens": args.new_tokens, "reference": ref_tokens, "reference_logits": ref_logits}

    def spec(name: str, function: str, description: str, **kwargs: Any) -> ConfigSpec:
        return ConfigSpec(name, f"{DECODERS}:{function}", {**kwargs, **common}, description)

    configs = [spec("uncached-export", "uncached_export", "onnxruntime on the dynamo export, full recompute per token",
                    model=str(export))]
    configs += [spec(name, "infercc_generate", f"infercc.compile({Path(info['source']).name}, {info['options']})"
                     ".generate", artifact=str(artifacts / name)) for name, info in notes["infercc"].items()]
    skipped: dict[str, str] = {}
    for precision in ("fp32", "int4"):
        path, note = ensure_genai(precision)
        notes[f"genai-{precision}"] = note
        if path is None:
            skipped[f"genai-{precision}"] = note
        else:
            configs.append(spec(f"genai-{precision}", "genai_generate", f"onnxruntime-genai {precision} (model builder)",
                                model=str(path)))
    for kind in ("F32", "Q4_0"):
        name = f"llama.cpp-{kind.lower()}"
        path, note = ensure_gguf(kind) if importlib.util.find_spec("llama_cpp") else (None, "llama-cpp-python not installed")
        notes[name] = note
        if path is None:
            skipped[name] = note
        else:
            configs.append(spec(name, "llama_cpp_generate", f"llama.cpp {kind} GGUF (llama-cpp-python)", model=str(path)))
    names = {c.name for c in configs}
    return Case(
        name=f"decode-llama-p{args.prompt_len}-n{args.new_tokens}",
        description=f"greedy generation, ~100M LLaMA, prompt {args.prompt_len} + {args.new_tokens} new tokens, batch 1",
        configs=configs, baseline=BASELINE if BASELINE in names else "infercc", skipped=skipped, notes=notes,
        checks=target_checks,
    )


def target_checks(result: RunResult) -> list[str]:
    """The issue's decode targets, from the decode tokens/s medians of this run, plus agreement."""
    rate = {c.name: c.metrics.get("decode_tok_per_s") for c in result.configs}
    rounds = {c.name: c.metric_rounds.get("decode_tok_per_s", []) for c in result.configs}
    lines = []
    for name, other, minimum in TARGETS:
        if rate.get(name) and rate.get(other):
            paired = paired_metric_ratio("decode_tok_per_s", rounds[other], rounds[name]) or 0.0
            verdict = "met" if paired >= minimum else "MISSED"
            lines.append(f"{name} vs {other}: decode {paired:.2f}x per-round median, {rate[name] / rate[other]:.2f}x "
                         f"of medians (target >= {minimum:g}x: {verdict})")
    new_tokens = result.notes.get("new_tokens")
    for c in result.configs:
        if c.status == "ok" and "match_prefix" in c.metrics:
            lines.append(f"{c.name}: greedy tokens match the reference for {c.metrics['match_prefix']:.0f}/"
                         f"{new_tokens} (worst round {min(v for v in c.metric_rounds['match_prefix'] if v is not None):.0f}); "
                         f"logits after the prompt max|diff| {c.metadata.get('logits_max_abs_diff', float('nan')):.2g}")
    return lines
