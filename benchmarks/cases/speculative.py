"""Speculative decoding: SmolLM2-135M Q4_1, C backend, batch 1: plain vs prompt lookup vs self-draft vs
Medusa heads (``--heads DIR`` from ``infercc train-heads``) vs the EAGLE draft layer (``--eagle DIR``
from ``infercc train-heads --kind eagle``), and llama.cpp's lookup.

What the issue asks of it (13): on input-grounded prompts (summarise / answer from a passage, edit
code) prompt lookup decodes >= 2x the tokens/s of plain decoding; the self-speculative draft and
trained Medusa heads >= 1.5x on the chat prompts (the heads' built-in training prompts include them); and prompt lookup beside llama.cpp's own lookup decoding
(llama-cpp-python's ``LlamaPromptLookupDecoding`` as the ``draft_model`` of ``llama_cpp.Llama``)
on the same GGUF and prompts, each against its own plain decoding.

Each configuration runs one group of prompts (``grounded`` or ``chat``, written below, not
downloaded) per timed call, greedy, stopping at EOS or ``--new-tokens``; its figures are the group's
totals: decode tokens/s (tokens after each prompt's first / the time after it), proposed and
accepted tokens and the tokens per verify step (infercc; llama.cpp does not report them).
infercc's configurations share one compiled artifact (the C runtime, 2 threads); speculation is
asked per request (``generate(..., speculation=...)``) with the default depth policy.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import time
from pathlib import Path
from typing import Any

from benchmarks.cases.decode import compile_infercc, target_checks, uncommitted
from benchmarks.cases.smollm2 import DEFAULT_GGUF
from benchmarks.harness import CallMetrics, Case, ConfigSpec, SkipConfig

HERE = "benchmarks.cases.speculative"
PASSAGE = (
    "The harbor town woke slowly in winter. Before dawn the bakers lit their ovens, and the smell of fresh "
    "bread drifted down the narrow streets toward the water, where the fishing boats rocked against the old "
    "stone pier. The lighthouse keeper, Tomas Berg, climbed the spiral stairs one last time, turned down the "
    "lamp, and wrote the night's weather in a leather book that had belonged to his grandfather. Out on the "
    "bay, a ferry named the Northern Star sounded its horn as it left for the islands at seven o'clock, "
    "carrying mail, tools and a few sleepy passengers wrapped in wool coats."
)
CODE = '''def average(values):
    total = 0
    for x in values:
        total = total + x
    if len(values) == 0:
        return 0
    return total / len(values)


def report(values):
    print("count:", len(values))
    print("average:", average(values))
'''
PROMPTS = {
    "grounded": [
        PASSAGE + "\n\nSummarise the passage above, keeping its details.",
        PASSAGE + "\n\nAnswer from the passage: who is the lighthouse keeper, what did he write, and which "
                  "ferry left at seven o'clock?",
        CODE + "\nRewrite this code so that the loop variable is called value instead of x and the empty "
               "check comes first. Give the whole code.",
    ],
    "chat": [
        "Write a short story about a cat who learns to swim.",
        "Give me three tips for learning to cook at home.",
        "Explain why the sky is blue in a few sentences.",
    ],
}
METHODS = {"plain": "off", "lookup": "prompt_lookup", "self_draft": "self_draft"}
#: (figure, config, compared with, minimum '>1 = better' ratio); see decode.TARGETS.
TARGETS = (("decode_tok_per_s", "infercc-lookup-grounded", "infercc-plain-grounded", 2.0),
           ("decode_tok_per_s", "infercc-self_draft-chat", "infercc-plain-chat", 1.5),
           ("decode_tok_per_s", "infercc-lookup-chat", "infercc-plain-chat", 1.0),
           ("decode_tok_per_s", "infercc-medusa-chat", "infercc-plain-chat", 1.5),
           ("decode_tok_per_s", "infercc-eagle-chat", "infercc-plain-chat", 1.5),
           ("decode_tok_per_s", "infercc-eagle-chat", "infercc-medusa-chat", 1.0),
           ("decode_tok_per_s", "infercc-eagle_tree-chat", "infercc-eagle-chat", 0.0),
           ("decode_tok_per_s", "llama.cpp-lookup-grounded", "llama.cpp-plain-grounded", 0.0),
           ("decode_tok_per_s", "llama.cpp-lookup-chat", "llama.cpp-plain-chat", 0.0),
           ("decode_tok_per_s", "infercc-lookup-grounded", "llama.cpp-lookup-grounded", 0.0))
BASELINE = "infercc-plain-grounded"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("speculative case")
    g.add_argument("--gguf", default=str(DEFAULT_GGUF), help=f"the SmolLM2 GGUF (default {DEFAULT_GGUF})")
    g.add_argument("--new-tokens", type=int, default=96, help="most new tokens per prompt (EOS ends sooner)")
    g.add_argument("--groups", default="grounded,chat", help="prompt groups to run (grounded, chat)")
    g.add_argument("--heads", help="Medusa heads (`infercc train-heads` output): adds the medusa configurations "
                                   "(the artifact is then compiled with speculation='medusa': its graph exposes "
                                   "the final hidden state; the other configurations ask for theirs per request)")
    g.add_argument("--tree-width", type=int, default=1,
                   help="with --heads / --eagle: also their tree configurations (Config.speculation_tree_width = this; "
                        "trees of candidates verified with tree attention), named <method>_tree")
    g.add_argument("--eagle", help="an EAGLE draft (`infercc train-heads --kind eagle` output): adds the eagle "
                                   "configurations (the artifact exposes the hidden state as for --heads)")


def chat_ids(gguf: str, texts: list[str]) -> list[list[int]]:
    """Each text as a one-turn chat, rendered by the GGUF's chat template and tokenized by infercc."""
    from infercc.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(gguf)
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": t}]), add_bos=False)
            for t in texts]


# ---------------------------------------------------------------- contenders (run in the workers)
def infercc_generate(threads: int, artifact: str, prompts: list[list[int]], new_tokens: int,
                     speculation: str | None, heads: str | None = None, tree_width: int = 1) -> tuple[Any, dict]:
    """compiled.generate on each prompt, greedy, with ``speculation`` per request (and the Medusa
    heads or EAGLE draft ``heads`` as ``Config.speculation_heads``, trees of ``tree_width``)."""
    import warnings

    import infercc

    compiled = infercc.load(artifact)
    compiled.config = compiled.config.replace(intra_op_threads=threads, inter_op_threads=1,
                                              speculation_tree_width=tree_width)
    if heads is not None:
        compiled.config = compiled.config.replace(speculation_heads=heads)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = compiled.generate(prompts[0], max_new_tokens=2, speculation=speculation)  # builds any draft
    meta = {"runtime": compiled.runtime, "speculation": speculation, "decode_loop": probe.decode_loop,
            "speculation_reason": probe.speculation_reason, "warnings": [str(w.message) for w in caught]}

    def call() -> CallMetrics:
        tokens = decode_s = prefill_s = proposed = accepted = steps = 0
        for prompt in prompts:
            result = compiled.generate(prompt, max_new_tokens=new_tokens, speculation=speculation)
            tokens += max(len(result.token_ids) - 1, 0)
            decode_s += result.decode_seconds
            prefill_s += result.prompt_seconds
            if result.speculation is not None:
                proposed += result.speculation.proposed
                accepted += result.speculation.accepted
                steps += result.speculation.steps
        return CallMetrics(decode_tok_per_s=tokens / decode_s if decode_s else 0.0, prefill_s=prefill_s,
                           decode_tokens=tokens, proposed=proposed, accepted=accepted,
                           acceptance_rate=accepted / proposed if proposed else 0.0,
                           tokens_per_step=(accepted + steps) / steps if steps else 1.0)

    return call, meta


def llama_cpp_generate(threads: int, model: str, prompts: list[list[int]], new_tokens: int,
                       lookup: bool, extra_buffers: bool = True) -> tuple[Any, dict]:
    """llama.cpp's own generation loop (``create_completion``, greedy, streamed so the first token's
    time is known), plain or with ``LlamaPromptLookupDecoding`` as its draft model."""
    try:
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError as exc:
        raise SkipConfig(f"llama-cpp-python is not installed: {exc}") from None
    from benchmarks.decoders import llama_cpp_model_params

    draft = LlamaPromptLookupDecoding(num_pred_tokens=10) if lookup else None
    with llama_cpp_model_params(use_extra_bufts=extra_buffers):
        llm = llama_cpp.Llama(model_path=model, n_ctx=max(map(len, prompts)) + new_tokens + 16, n_threads=threads,
                              n_threads_batch=threads, draft_model=draft, verbose=False)

    def one(prompt: list[int]) -> tuple[int, float, float]:
        llm.reset()
        start = time.perf_counter()
        first = last = 0.0
        count = 0
        for _ in llm.create_completion(prompt, max_tokens=new_tokens, temperature=0.0, top_k=1, repeat_penalty=1.0,
                                       stream=True):
            last = time.perf_counter()
            first = first or last
            count += 1
        return count, first - start, last - first

    def call() -> CallMetrics:
        tokens = decode_s = prefill_s = 0.0
        for prompt in prompts:
            count, prefill, decode = one(prompt)
            tokens, decode_s, prefill_s = tokens + max(count - 1, 0), decode_s + decode, prefill_s + prefill
        return CallMetrics(decode_tok_per_s=tokens / decode_s if decode_s else 0.0, prefill_s=prefill_s,
                           decode_tokens=tokens)

    return call, {"draft_model": "LlamaPromptLookupDecoding(num_pred_tokens=10)" if lookup else None,
                  "extra_buffers": extra_buffers}


# ---------------------------------------------------------------- the case
def build_case(args: argparse.Namespace) -> Case:
    name = f"speculative-smollm2-135m-q4_1-n{args.new_tokens}"
    description = ("SmolLM2-135M-Instruct Q4_1, C backend, batch 1, greedy: decode tok/s of plain decoding, "
                   "prompt lookup, the self-draft, Medusa heads (--heads) and the EAGLE draft (--eagle); llama.cpp "
                   "plain and with its prompt lookup")
    gguf = Path(args.gguf).expanduser().resolve()
    groups = [g for g in args.groups.split(",") if g]
    names = [f"{who}-{method}-{group}" for group in groups
             for who, methods in (("infercc", METHODS), ("llama.cpp", ("plain", "lookup"))) for method in methods]
    checks = functools.partial(target_checks, targets=TARGETS)
    if not gguf.is_file():
        reason = f"the GGUF {gguf.name} is not at {gguf} (see that folder's SOURCE.txt to obtain it, or pass --gguf)"
        return Case(name, description, configs=[], baseline=BASELINE, skipped=dict.fromkeys(names, reason),
                    notes={"gguf": str(gguf)}, checks=checks)
    artifact = Path(args.out) / "artifacts" / "infercc-c"
    weights = {method: str(Path(path).resolve()) for method, path in (("medusa", args.heads), ("eagle", args.eagle))
               if path}
    heads = {"speculation": next(iter(weights))} if weights else {}  # (either exposes the hidden state)
    methods = {**METHODS, **{method: method for method in weights}}
    if args.tree_width > 1:
        methods.update({f"{method}_tree": method for method in weights})
    notes: dict[str, Any] = {"gguf": str(gguf), "new_tokens": args.new_tokens, "prompts": PROMPTS,
                             "infercc": compile_infercc(gguf, artifact, args.threads, backend="c", **heads),
                             "infercc_uncommitted": uncommitted("infercc")}
    configs: list[ConfigSpec] = []
    skipped: dict[str, str] = {}
    has_llama = importlib.util.find_spec("llama_cpp") is not None
    if has_llama:
        from benchmarks.contenders import llama_cpp_extra_buffers

        extra_buffers, notes["llama.cpp"] = llama_cpp_extra_buffers(gguf)
    for group in groups:
        prompts = chat_ids(str(gguf), PROMPTS[group])
        notes[f"prompt_tokens_{group}"] = [len(p) for p in prompts]
        common = {"prompts": prompts, "new_tokens": args.new_tokens}
        for method, speculation in methods.items():
            configs.append(ConfigSpec(f"infercc-{method}-{group}", f"{HERE}:infercc_generate",
                                      {**common, "artifact": str(artifact), "speculation": speculation,
                                       "heads": weights.get(speculation),
                                       "tree_width": args.tree_width if method.endswith("_tree") else 1},
                                      f"infercc C runtime, generate(speculation={speculation!r}), {group} prompts"))
        for method in ("plain", "lookup"):
            if not has_llama:
                skipped[f"llama.cpp-{method}-{group}"] = "llama-cpp-python not installed"
                continue
            configs.append(ConfigSpec(f"llama.cpp-{method}-{group}", f"{HERE}:llama_cpp_generate",
                                      {**common, "model": str(gguf), "lookup": method == "lookup",
                                       "extra_buffers": extra_buffers},
                                      f"llama.cpp create_completion{' + LlamaPromptLookupDecoding' if method == 'lookup' else ''}"
                                      f", {group} prompts"))
    baseline = BASELINE if BASELINE in {c.name for c in configs} else (configs[0].name if configs else None)
    return Case(name, description, configs=configs, baseline=baseline, skipped=skipped, notes=notes, checks=checks)
