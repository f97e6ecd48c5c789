"""Decode speed of a tiny real model: stories260K (GGUF, 260K parameters), greedy, prompt 128 + 64
new tokens, batch 1, by infercc on the generated-C runtime (its decode loop in C) and on ONNX
Runtime vs llama.cpp on the same file.

Why: with 260K parameters a token costs microseconds of arithmetic, so what a runtime spends per
token outside its kernels (Python, session dispatch, allocation) is all that is measured. The
issue's target: infercc-C decodes >= 1x llama.cpp.

The reference tokens and logits are infercc's own float path on ONNX Runtime (untimed, in the
parent): there is no Hugging Face folder for this checkpoint. The prompt is a story text tokenized
by the model's tokenizer (infercc's GGUF tokenizer), cut to ``--prompt-len`` tokens.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
from pathlib import Path
from typing import Any

from benchmarks.cases.decode import DECODERS, compile_infercc, target_checks, uncommitted
from benchmarks.harness import Case, ConfigSpec
from benchmarks.machine import REPO_ROOT

DEFAULT_GGUF = (REPO_ROOT / ".." / "shared" / "models" / "stories260K" / "stories260K.gguf").resolve()
BASELINE = "llama.cpp"
CONFIGS = ("infercc-c", "infercc-ort", "llama.cpp")
INFERCC = {"infercc-c": {"backend": "c"}, "infercc-ort": {"backend": "ort"}}
TARGETS = (("decode_tok_per_s", "infercc-c", "llama.cpp", 1.0), ("decode_tok_per_s", "infercc-c", "infercc-ort", 1.0),
           ("prefill_s", "infercc-c", "llama.cpp", 1.0))
TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
        "friends. One day, she saw a big red ball under a tree. She ran to the ball and picked it up. Her mom "
        "said, \"Lily, you must share the ball with your friends.\" Lily was sad, but she knew her mom was right. ")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("stories case")
    g.add_argument("--gguf", default=str(DEFAULT_GGUF), help=f"the stories260K GGUF (default {DEFAULT_GGUF})")
    g.add_argument("--prompt-len", type=int, default=128)
    g.add_argument("--new-tokens", type=int, default=64)


def reference(gguf: Path, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and the logits after the prompt of infercc's float graph on ONNX Runtime."""
    import infercc

    compiled = infercc.compile(gguf, backend="ort", kv_cache_dtype="fp32")
    with compiled.session() as session:
        logits = session.sequence().prefill(prompt)
    result = compiled.generate(prompt, max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    return list(result.token_ids), [float(x) for x in logits.reshape(-1)]


def build_case(args: argparse.Namespace) -> Case:
    name = f"decode-stories260k-p{args.prompt_len}-n{args.new_tokens}"
    description = f"greedy generation, stories260K GGUF, prompt {args.prompt_len} + {args.new_tokens} new tokens, batch 1"
    gguf = Path(args.gguf).expanduser().resolve()
    checks = functools.partial(target_checks, targets=TARGETS)
    if not gguf.is_file():
        reason = f"the GGUF {gguf.name} is not at {gguf} (see that folder's SOURCE.txt, or pass --gguf)"
        return Case(name, description, configs=[], baseline=BASELINE, skipped=dict.fromkeys(CONFIGS, reason),
                    notes={"gguf": str(gguf)}, checks=checks)
    from infercc.runtime.tokenizer import Tokenizer

    artifacts = Path(args.out) / "artifacts"
    notes: dict[str, Any] = {"gguf": str(gguf), "infercc": {}, "infercc_uncommitted": uncommitted("infercc")}
    wanted = set(args.only.split(",")) if getattr(args, "only", None) else None
    for config, options in INFERCC.items():
        if wanted is None or config in wanted:
            notes["infercc"][config] = compile_infercc(gguf, artifacts / config, args.threads, **options)
    tokenizer = Tokenizer.from_pretrained(gguf)
    text, ids = TEXT, tokenizer.encode(TEXT)
    while len(ids) < args.prompt_len:
        text += TEXT
        ids = tokenizer.encode(text)
    prompt = ids[:args.prompt_len]
    ref_tokens, ref_logits = reference(gguf, prompt, args.new_tokens)
    notes.update(prompt_len=len(prompt), new_tokens=args.new_tokens, reference="infercc float graph on ONNX Runtime",
                 reference_tokens=ref_tokens)
    common = {"prompt": prompt, "new_tokens": args.new_tokens, "reference": ref_tokens, "reference_logits": ref_logits}

    def spec(config: str, function: str, what: str, **kwargs: Any) -> ConfigSpec:
        return ConfigSpec(config, f"{DECODERS}:{function}", {**kwargs, **common}, what)

    configs = [spec(config, "infercc_generate", f"infercc.compile({gguf.name}, {info['options']}).generate",
                    artifact=str(artifacts / config)) for config, info in notes["infercc"].items()]
    skipped: dict[str, str] = {}
    if importlib.util.find_spec("llama_cpp"):
        from benchmarks.contenders import llama_cpp_extra_buffers

        extra_buffers, notes["llama.cpp"] = llama_cpp_extra_buffers(gguf)
        configs.append(spec("llama.cpp", "llama_cpp_generate", "llama.cpp on the GGUF (llama-cpp-python)",
                            model=str(gguf), extra_buffers=extra_buffers))
    else:
        skipped["llama.cpp"] = "llama-cpp-python not installed"
    names = {c.name for c in configs}
    return Case(name=name, description=description, configs=configs,
                baseline=BASELINE if BASELINE in names else "infercc-ort", skipped=skipped, notes=notes, checks=checks)
