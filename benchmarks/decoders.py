"""Greedy generation loops of the decode case's contenders, and their token accounting.

Every contender's timed call is one full generation (the prompt, then ``new_tokens`` greedy
tokens) and returns `CallMetrics`: ``prefill_s`` (time to the first new token: the prompt's
forward step plus the first pick), ``decode_s`` (the remaining tokens, one forward step each),
``decode_tok_per_s`` ((new tokens - 1) / decode_s), ``new_tokens`` and ``match_prefix`` (how many
leading tokens equal the reference's, so a fast wrong result shows up next to its speed).

Untimed, in setup, each contender also computes its logits after the prompt; the difference from
the reference logits (Hugging Face's torch model) goes to the metadata: greedy tokens of a
random-initialized model fall into short loops, so the logits are the stronger agreement check.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import CallMetrics, SkipConfig


@dataclass(frozen=True)
class Generated:
    """One generation's new tokens and where its time went."""

    tokens: list[int]
    prefill_s: float
    decode_s: float


def matching_prefix(tokens: Sequence[int], reference: Sequence[int]) -> int:
    """Number of leading positions where ``tokens`` equals ``reference``."""
    n = 0
    for a, b in zip(tokens, reference):
        if int(a) != int(b):
            break
        n += 1
    return n


def decode_metrics(gen: Generated, reference: Sequence[int]) -> CallMetrics:
    """The figures every contender reports; tokens after the first are the decode steps."""
    steps = max(len(gen.tokens) - 1, 0)
    return CallMetrics(
        decode_tok_per_s=steps / gen.decode_s if steps and gen.decode_s > 0 else 0.0,
        prefill_s=gen.prefill_s,
        decode_s=gen.decode_s,
        new_tokens=len(gen.tokens),
        match_prefix=matching_prefix(gen.tokens, reference),
    )


def logits_check(logits: np.ndarray, reference: Sequence[float]) -> dict[str, float | bool]:
    """How far a contender's logits after the prompt are from the reference's."""
    ours, ref = np.asarray(logits, np.float64).reshape(-1), np.asarray(reference, np.float64)
    return {
        "logits_max_abs_diff": float(np.abs(ours - ref).max()),
        "logits_ref_abs_max": float(np.abs(ref).max()),
        "logits_cosine": float(ours @ ref / (np.linalg.norm(ours) * np.linalg.norm(ref))),
        "logits_same_argmax": bool(ours.argmax() == ref.argmax()),
    }


def _timed_loop(first: Callable[[], int], step: Callable[[int], int], new_tokens: int) -> Generated:
    """``first()`` feeds the prompt and picks a token; ``step(token)`` feeds it and picks the next,
    or raises StopIteration when its runtime ended the sequence (fewer tokens, same accounting)."""
    t0 = time.perf_counter()
    tokens = [first()]
    t1 = time.perf_counter()
    try:
        while len(tokens) < new_tokens:
            tokens.append(step(tokens[-1]))
    except StopIteration:
        pass
    return Generated(tokens, t1 - t0, time.perf_counter() - t1)


# ---------------------------------------------------------------- contenders (harness setup functions)


def uncached_export(threads: int, model: str, prompt: list[int], new_tokens: int, reference: list[int],
                    reference_logits: list[float]) -> tuple[Callable[[], CallMetrics], dict]:
    """Plain onnxruntime on the exported graph, recomputing the whole sequence for every token."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def forward(ids: list[int]) -> np.ndarray:
        x = np.asarray([ids], np.int64)
        return session.run(["logits"], {"input_ids": x, "attention_mask": np.ones_like(x)})[0][0, -1]

    meta = logits_check(forward(prompt), reference_logits)

    def call() -> CallMetrics:
        ids = list(prompt)

        def pick(token: int | None = None) -> int:
            if token is not None:
                ids.append(token)
            return int(forward(ids).argmax())

        return decode_metrics(_timed_loop(pick, pick, new_tokens), reference)

    return call, meta


def infercc_generate(threads: int, artifact: str, prompt: list[int], new_tokens: int, reference: list[int],
                     reference_logits: list[float]) -> tuple[Callable[[], CallMetrics], dict]:
    """A saved infercc artifact through ``compiled.generate`` (its own prompt/decode timings)."""
    import infercc

    compiled = infercc.load(artifact)
    compiled.config = compiled.config.replace(intra_op_threads=threads, inter_op_threads=1)
    with compiled.session() as session:
        cached = session.cached
        meta = logits_check(session.sequence().prefill(prompt), reference_logits)
    meta.update(cached=cached, cache_inputs=sum(i["name"].startswith("past_key_values.") for i in compiled.inputs),
                quantize=compiled.config.quantize)

    def call() -> CallMetrics:
        result = compiled.generate(prompt, max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
        return decode_metrics(Generated(result.token_ids, result.prompt_seconds, result.decode_seconds), reference)

    return call, meta


def genai_generate(threads: int, model: str, prompt: list[int], new_tokens: int, reference: list[int],
                   reference_logits: list[float]) -> tuple[Callable[[], CallMetrics], dict]:
    """onnxruntime-genai's Generator, greedy, max_length = prompt + new tokens. ``append_tokens``
    runs the prompt; each ``generate_next_token`` picks a token (running the previous one first)."""
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise SkipConfig(f"onnxruntime-genai is not installed: {exc}") from None
    config = og.Config(model)
    threads_json = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": threads_json}}}))
    og_model = og.Model(config)

    def generator() -> og.Generator:
        params = og.GeneratorParams(og_model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens, batch_size=1)
        return og.Generator(og_model, params)

    probe = generator()
    probe.append_tokens(prompt)
    meta = logits_check(probe.get_logits(), reference_logits)
    del probe

    def call() -> CallMetrics:
        gen = generator()

        def first() -> int:
            gen.append_tokens(prompt)
            return step(-1)

        def step(_token: int) -> int:
            if gen.is_done():  # an end-of-sequence token: the generation comes out short
                raise StopIteration
            gen.generate_next_token()
            return int(gen.get_next_tokens()[0])

        return decode_metrics(_timed_loop(first, step, new_tokens), reference)

    return call, meta


@contextlib.contextmanager
def llama_cpp_model_params(**fields: Any) -> Iterator[None]:
    """Within it, ``llama_cpp.Llama(...)`` loads with these ``llama_model_params`` fields changed:
    its constructor exposes no ``use_extra_bufts``, and takes its params from this default."""
    import llama_cpp.llama_cpp as api

    default = api.llama_model_default_params

    def changed() -> Any:
        params = default()
        for name, value in fields.items():
            setattr(params, name, value)
        return params

    api.llama_model_default_params = changed
    try:
        yield
    finally:
        api.llama_model_default_params = default


def llama_cpp_generate(threads: int, model: str, prompt: list[int], new_tokens: int, reference: list[int],
                       reference_logits: list[float], extra_buffers: bool = True) -> tuple[Callable[[], CallMetrics], dict]:
    """llama.cpp through llama-cpp-python: ``eval`` the prompt in one batch, then one token per
    ``eval``, argmax of the last logits. ``reset`` first, so no call reuses a previous prompt's cache.
    ``extra_buffers=False`` loads without llama.cpp's extra buffer types (AMX tiles, repacked
    weights), for machines where they crash (`benchmarks.contenders.llama_cpp_extra_buffers`)."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise SkipConfig(f"llama-cpp-python is not installed: {exc}") from None
    with llama_cpp_model_params(use_extra_bufts=extra_buffers):
        llm = llama_cpp.Llama(model_path=model, n_ctx=len(prompt) + new_tokens + 8, n_batch=len(prompt),
                              n_threads=threads, n_threads_batch=threads, verbose=False)

    vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        """The last fed token's logits, read in place (``eval`` keeps none without logits_all)."""
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))

    def first() -> int:
        llm.reset()
        llm.eval(prompt)
        return int(last_logits().argmax())

    def step(token: int) -> int:
        llm.eval([token])
        return int(last_logits().argmax())

    first()
    meta = logits_check(last_logits().copy(), reference_logits)
    meta["gguf_type"] = Path(model).stem.replace(".", "-").rsplit("-", 1)[-1]  # model-q4_0, Name.Q4_1
    meta["extra_buffers"] = extra_buffers

    def call() -> CallMetrics:
        return decode_metrics(_timed_loop(first, step, new_tokens), reference)

    return call, meta
