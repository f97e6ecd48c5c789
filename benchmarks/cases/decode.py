"""Decode speed: greedy generation of the ~100M LLaMA (prompt 128, 128 new tokens, batch 1) by
infercc (cached graph) vs the uncached export vs onnxruntime-genai (and llama.cpp) on the same weights.

Why: a KV cache is the difference between recomputing the whole sequence for every token and
one token's work; the issue's targets are cached decode >= 10x the uncached export and >= 1x
onnxruntime-genai at the same precision (fp32, int4), and an int4 prefill no slower than the float
one's nor genai int4's. The timed unit is one full generation; each call reports its own prefill
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import Case, ConfigSpec, RunResult, metric_ratio, paired_metric_ratio
from benchmarks.models import ensure_hf_folder, ensure_model

DECODERS = "benchmarks.decoders"
BASELINE = "genai-fp32"
#: Spelled out, so that the artifacts stay cached if the default ever changes.
CACHED = {"kv_cache": True}
#: The issue's targets: (figure, config, compared with, minimum ratio). Ratios read '>1 = better'
#: (`benchmarks.harness.metric_ratio`): decode tokens/s config / other, prefill time other / config,
#: so a prefill target of 1 means "no slower than".
TARGETS = (("decode_tok_per_s", "infercc", "uncached-export", 10.0),
           ("decode_tok_per_s", "infercc-export", "uncached-export", 10.0),
           ("decode_tok_per_s", "infercc", "genai-fp32", 1.0), ("decode_tok_per_s", "infercc-export", "genai-fp32", 1.0),
           ("decode_tok_per_s", "infercc-int4", "genai-int4", 1.0),
           ("decode_tok_per_s", "infercc-int4-head4", "genai-int4", 1.0),
           ("decode_tok_per_s", "infercc-int4-genai-format", "genai-int4", 1.0),
           ("prefill_s", "infercc-int4", "infercc", 1.0), ("prefill_s", "infercc-int4", "genai-int4", 1.0),
           # the generated-C runtime (backend="c"): decode >= 1.3x genai int4, >= 1x fp32, >= 1.2x int8;
           # prefill <= 0.8x genai's time (a '>1 = better' ratio of 1.25) at every precision
           ("decode_tok_per_s", "infercc-c", "genai-fp32", 1.0), ("decode_tok_per_s", "infercc-c-int4", "genai-int4", 1.3),
           ("decode_tok_per_s", "infercc-c-int8", "genai-int8", 1.2), ("decode_tok_per_s", "infercc-c", "infercc", 1.0),
           # genai's int4 recipe exactly (LM head int4, nothing kept int8): the same bytes per token
           ("decode_tok_per_s", "infercc-c-int4-head4", "genai-int4", 1.3),
           ("prefill_s", "infercc-c", "genai-fp32", 1.25), ("prefill_s", "infercc-c-int4", "genai-int4", 1.25),
           ("prefill_s", "infercc-c-int8", "genai-int8", 1.25))
#: How a target's figure is named and shown: (word, unit, scale of the shown medians).
FIGURES = {"decode_tok_per_s": ("decode", "tok/s", 1.0), "prefill_s": ("prefill", "ms", 1e3)}


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
    """Compile and save one infercc artifact; returns what the notes should say about it. A
    configuration that names no backend is an ONNX Runtime one (the issue-10 path), whatever
    ``Config.backend`` defaults to."""
    import infercc

    options.setdefault("backend", "ort")
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
    from benchmarks.contenders import ensure_genai, ensure_gguf, llama_cpp_extra_buffers

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
                                                                  "quant_int8_fraction": 0.0}),
                                  # ...and its weight format too: no zero points (MatMulNBits runs an
                                  # int4 weight with zero points 1.2-1.3x slower per decode step on
                                  # AVX2), so both sides run the same kernels on the same bytes
                                  ("infercc-int4-genai-format", folder, {**CACHED, **int4, "quant_lm_head": "int4",
                                                                         "quant_int8_fraction": 0.0, "quant_symmetric": True}),
                                  ("infercc-c", folder, {**CACHED, "backend": "c"}),
                                  ("infercc-c-int4", folder, {**CACHED, **int4, "backend": "c"}),
                                  ("infercc-c-int4-head4", folder, {**CACHED, **int4, "backend": "c", "quant_lm_head": "int4",
                                                                    "quant_int8_fraction": 0.0}),
                                  ("infercc-c-int8", folder, {**CACHED, "quantize": "int8", "backend": "c"})):
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
    for precision in ("fp32", "int4", "int8"):
        if wanted is not None and f"genai-{precision}" not in wanted:
            continue
        path, note = ensure_genai(precision, folder)
        notes[f"genai-{precision}"] = note
        if path is None:
            skipped[f"genai-{precision}"] = note
        else:
            configs.append(spec(f"genai-{precision}", "genai_generate", f"onnxruntime-genai {precision} (model builder)",
                                model=str(path)))
    for kind in ("F32", "Q4_0", "Q8_0"):
        name = f"llama.cpp-{kind.lower()}"
        path, note = ensure_gguf(kind) if importlib.util.find_spec("llama_cpp") else (None, "llama-cpp-python not installed")
        notes[name] = note
        if path is None:
            skipped[name] = note
        else:
            extra_buffers, buffers = llama_cpp_extra_buffers(path)
            notes[name] = f"{note}; {buffers}"
            configs.append(spec(name, "llama_cpp_generate", f"llama.cpp {kind} GGUF (llama-cpp-python)", model=str(path),
                                extra_buffers=extra_buffers))
    names = {c.name for c in configs}
    return Case(
        name=f"decode-llama-p{args.prompt_len}-n{args.new_tokens}",
        description=f"greedy generation, ~100M LLaMA, prompt {args.prompt_len} + {args.new_tokens} new tokens, batch 1",
        configs=configs, baseline=BASELINE if BASELINE in names else "infercc", skipped=skipped, notes=notes,
        checks=target_checks,
    )


def target_checks(result: RunResult, targets: Sequence[tuple[str, str, str, float]] = TARGETS) -> list[str]:
    """A verdict line per target whose two configurations both ran (met or MISSED, judged on the
    median of per-round paired ratios, which cancels drift between rounds), then agreement lines."""
    lines = []
    for figure, name, other, minimum in targets:
        ours, theirs = (next((c for c in result.configs if c.name == n and c.metrics.get(figure)), None)
                        for n in (name, other))
        if ours is None or theirs is None:
            continue
        paired = paired_metric_ratio(figure, theirs.metric_rounds[figure], ours.metric_rounds[figure]) or 0.0
        of_medians = metric_ratio(figure, theirs.metrics[figure], ours.metrics[figure]) or 0.0
        word, unit, scale = FIGURES[figure]
        verdict = "met" if paired >= minimum else "MISSED"
        lines.append(f"{name} vs {other}: {word} {paired:.2f}x per-round median, {of_medians:.2f}x of medians "
                     f"({ours.metrics[figure] * scale:.1f} vs {theirs.metrics[figure] * scale:.1f} {unit}, >1 = better; "
                     f"target >= {minimum:g}x: {verdict})")
    new_tokens = result.notes.get("new_tokens")
    for c in result.configs:
        if c.status == "ok" and "match_prefix" in c.metrics:
            lines.append(f"{c.name}: greedy tokens match the reference for {c.metrics['match_prefix']:.0f}/"
                         f"{new_tokens} (worst round {min(v for v in c.metric_rounds['match_prefix'] if v is not None):.0f}); "
                         f"logits after the prompt max|diff| {c.metadata.get('logits_max_abs_diff', float('nan')):.2g}")
    return lines
