"""Decode speed on a real model: SmolLM2-135M-Instruct Q4_1 (GGUF), greedy, prompt 128 + 64 new
tokens, batch 1, by infercc (its 4-bit grids, and float) vs onnxruntime-genai int4/fp32 vs llama.cpp.

Why beside the LLaMA decode case: that one is random-initialized (its greedy tokens fall into
loops) and was quantized by us; this is the checkpoint users run, quantized by its publisher, with
a real text as the prompt, so agreement (``match_prefix``) means something and the 4-bit path
starts from the file's own grids. The issue's targets: infercc's default (``quantize="auto"``,
which keeps the Q4_1 grids) decodes >= 1x genai int4 and infercc float >= 1x genai fp32; the
4-bit prefill is no slower than the float one's nor genai int4's.

All contenders read the same weights: infercc and llama.cpp the GGUF itself; onnxruntime-genai's
model builder (its CPU defaults, as for the LLaMA) a Hugging Face folder that transformers made by
dequantizing the GGUF (`benchmarks.models.ensure_hf_from_gguf`, cached), so genai int4 is the
builder's own re-quantization of those float weights. The reference is Hugging Face's torch model
on that folder, greedy with its cache: float arithmetic, so the 4-bit contenders may drift from
its tokens after a while (their logits difference is in the metadata).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
from pathlib import Path
from typing import Any

from benchmarks.cases.decode import DECODERS, compile_infercc, reference, target_checks, uncommitted
from benchmarks.harness import Case, ConfigSpec
from benchmarks.machine import REPO_ROOT

#: The shared models folder beside the repo, as the tests find it (tests/importers/_models.py).
DEFAULT_GGUF = (REPO_ROOT / ".." / "shared" / "models" / "smollm2-135m-instruct-q4_1"
                / "SmolLM2-135M-Instruct.Q4_1.gguf").resolve()
CONFIGS = ("infercc-auto", "infercc-fast-grids", "infercc-fp32", "infercc-c", "infercc-c-fp16kv", "infercc-c-fp32",
           "genai-int4", "genai-fp32", "llama.cpp-q4_1")
BASELINE = "genai-fp32"
#: ``infercc.compile`` options per configuration: the defaults (quantize="auto": Q4_1 exact, with
#: its correction beside each projection), the Q4_1 grids moved to integer zero points (one
#: MatMulNBits each, not exact: the speed side of that trade-off), float, and the C runtime with a
#: float16 KV cache (read in place by its attention: the long-prompt side, e.g. --prompt-len 1024).
INFERCC = {"infercc-auto": {}, "infercc-fast-grids": {"quant_native_exact": False}, "infercc-fp32": {"quantize": None},
           "infercc-c": {"backend": "c"}, "infercc-c-fp16kv": {"backend": "c", "kv_cache_dtype": "fp16"},
           "infercc-c-fp32": {"quantize": None, "backend": "c"}}
#: (figure, config, compared with, minimum '>1 = better' ratio); see decode.TARGETS.
TARGETS = (("decode_tok_per_s", "infercc-auto", "genai-int4", 1.0),
           ("decode_tok_per_s", "infercc-fp32", "genai-fp32", 1.0),
           ("prefill_s", "infercc-auto", "infercc-fp32", 1.0),
           ("prefill_s", "infercc-auto", "genai-int4", 1.0),
           # the generated-C runtime, Q4_1 grid kept: >= 1.3x genai int4, prefill <= 0.8x genai's time
           ("decode_tok_per_s", "infercc-c", "genai-int4", 1.3), ("decode_tok_per_s", "infercc-c-fp32", "genai-fp32", 1.0),
           ("prefill_s", "infercc-c", "genai-int4", 1.25), ("prefill_s", "infercc-c-fp32", "genai-fp32", 1.25))
#: The prompt: plain prose (written for this benchmark), cut to ``--prompt-len`` tokens; repeated
#: when a longer prompt is asked for.
TEXT = (
    "The harbor town woke slowly in winter. Before dawn the bakers lit their ovens, and the smell of "
    "fresh bread drifted down the narrow streets toward the water, where the fishing boats rocked "
    "against the old stone pier. The lighthouse keeper climbed the spiral stairs one last time, turned "
    "down the lamp, and wrote the night's weather in a leather book that had belonged to his "
    "grandfather. Out on the bay, a ferry sounded its horn as it left for the islands, carrying mail, "
    "tools and a few sleepy passengers wrapped in wool coats. At the market, merchants argued about the "
    "price of apples and salt while children ran between the stalls, chasing a dog that had stolen a "
    "loaf of bread. By noon the fog had lifted, and the whole town could see the mountains on the far "
    "side of the water, white with the first snow of the year. The old teacher at the village school "
    "told her students that"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("smollm2 case")
    g.add_argument("--gguf", default=str(DEFAULT_GGUF), help=f"the SmolLM2 GGUF (default {DEFAULT_GGUF})")
    g.add_argument("--prompt-len", type=int, default=128)
    g.add_argument("--new-tokens", type=int, default=64)


def prompt_ids(folder: Path, gguf: Path, length: int) -> tuple[list[int], dict[str, Any]]:
    """`TEXT` (repeated as needed) tokenized by the model's Hugging Face tokenizer, cut to ``length``
    ids; the notes say whether infercc's own GGUF tokenizer gives the same ids."""
    from transformers import AutoTokenizer

    from infercc.runtime.tokenizer import Tokenizer

    hf = AutoTokenizer.from_pretrained(folder)
    text, ids = TEXT, hf(TEXT).input_ids
    while len(ids) < length:
        text += "\n\n" + TEXT
        ids = hf(text).input_ids
    ours = Tokenizer.from_pretrained(gguf).encode(text)
    prompt = ids[:length]
    return prompt, {"prompt_text": hf.decode(prompt), "tokenizer": "transformers (from the GGUF)",
                    "infercc_tokenizer_agrees": ours[:length] == prompt}


def build_case(args: argparse.Namespace) -> Case:
    name = f"decode-smollm2-135m-q4_1-p{args.prompt_len}-n{args.new_tokens}"
    description = (f"greedy generation, SmolLM2-135M-Instruct Q4_1 GGUF, prompt {args.prompt_len} (real text) "
                   f"+ {args.new_tokens} new tokens, batch 1")
    gguf = Path(args.gguf).expanduser().resolve()
    if not gguf.is_file():
        reason = f"the GGUF {gguf.name} is not at {gguf} (see that folder's SOURCE.txt to obtain it, or pass --gguf)"
        return Case(name, description, configs=[], baseline=BASELINE, skipped=dict.fromkeys(CONFIGS, reason),
                    notes={"gguf": str(gguf)}, checks=functools.partial(target_checks, targets=TARGETS))
    from benchmarks.contenders import ensure_genai, llama_cpp_extra_buffers
    from benchmarks.models import ensure_hf_from_gguf

    folder = ensure_hf_from_gguf(gguf, "smollm2_hf")
    artifacts = Path(args.out) / "artifacts"
    notes: dict[str, Any] = {"gguf": str(gguf), "hf_folder": str(folder), "infercc": {},
                             "infercc_uncommitted": uncommitted("infercc")}
    wanted = set(args.only.split(",")) if getattr(args, "only", None) else None
    for config, options in INFERCC.items():
        if wanted is None or config in wanted:  # compiling takes a while: only what runs
            notes["infercc"][config] = compile_infercc(gguf, artifacts / config, args.threads, **options)
    prompt, prompt_notes = prompt_ids(folder, gguf, args.prompt_len)
    ref_tokens, ref_logits = reference(folder, prompt, args.new_tokens, args.threads)
    notes.update(prompt_notes, prompt_len=len(prompt), new_tokens=args.new_tokens,
                 reference="transformers LlamaForCausalLM fp32 on the GGUF dequantized by transformers, "
                           "greedy with its KV cache",
                 reference_tokens=ref_tokens, reference_distinct_tokens=len(set(ref_tokens)))
    common = {"prompt": prompt, "new_tokens": args.new_tokens, "reference": ref_tokens, "reference_logits": ref_logits}

    def spec(config: str, function: str, description: str, **kwargs: Any) -> ConfigSpec:
        return ConfigSpec(config, f"{DECODERS}:{function}", {**kwargs, **common}, description)

    configs = [spec(config, "infercc_generate", f"infercc.compile({gguf.name}, {info['options']}).generate",
                    artifact=str(artifacts / config)) for config, info in notes["infercc"].items()]
    skipped: dict[str, str] = {}
    for precision in ("int4", "fp32"):
        path, note = ensure_genai(precision, folder, "smollm2_genai")
        notes[f"genai-{precision}"] = note
        if path is None:
            skipped[f"genai-{precision}"] = note
        else:
            configs.append(spec(f"genai-{precision}", "genai_generate",
                                f"onnxruntime-genai {precision} (model builder on the dequantized folder)",
                                model=str(path)))
    if importlib.util.find_spec("llama_cpp"):
        extra_buffers, notes["llama.cpp-q4_1"] = llama_cpp_extra_buffers(gguf)
        configs.append(spec("llama.cpp-q4_1", "llama_cpp_generate", "llama.cpp on the GGUF as it is (llama-cpp-python)",
                            model=str(gguf), extra_buffers=extra_buffers))
    else:
        skipped["llama.cpp-q4_1"] = "llama-cpp-python not installed"
    names = {c.name for c in configs}
    return Case(name=name, description=description, configs=configs,
                baseline=BASELINE if BASELINE in names else "infercc-fp32", skipped=skipped, notes=notes,
                checks=functools.partial(target_checks, targets=TARGETS))
