"""Speed of a compiled model (``infercc bench``): prefill time and decode tokens/s for a decoder,
the forward time for an encoder-only model; optionally with a profile (runtime/profiler.py).

Each measurement is a warm-up (first-run allocations, the thread pool starting) and then the
median of ``repeats`` repetitions, so one slow run (another process on the CPU) does not decide
the number. The prompt is random token ids of the vocabulary (seeded) unless ids are given: speed
does not depend on which tokens they are. The profile, when asked for, records the last
repetition only, one trace track per model run (the prefill, then each decode step).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from ..ir import Model
from .model_runner import ModelRunner
from .profiler import CRecorder, Profile, Recorder, open_recorder


@dataclasses.dataclass
class BenchResult:
    runtime: str              # "c" or "ort"
    reason: str               # why it runs there (CompiledModel.runtime_reason)
    kind: str                 # "decoder" (prefill + decode) or "encoder" (forward only)
    prompt_tokens: int
    new_tokens: int
    repeats: int
    prefill_s: list[float]    # per repetition: the prompt's run (encoders: the forward run)
    decode_s: list[float]     # per repetition: all new tokens' runs together (decoders)
    profile: Profile | None = None
    decode_loop: bool = False  # the tokens came from the library's decode loop (generated C)

    @property
    def prefill_median_s(self) -> float:
        return statistics.median(self.prefill_s)

    @property
    def decode_tokens_per_second(self) -> float:
        """New tokens per second, median over repetitions (0 without decode steps)."""
        if not self.decode_s or not self.new_tokens:
            return 0.0
        return statistics.median(self.new_tokens / s if s > 0 else float("inf") for s in self.decode_s)


def bench(compiled: Any, *, prompt_tokens: int = 128, new_tokens: int = 64, repeats: int = 3,
          profile: bool = False, prompt_ids: Sequence[int] | None = None,
          on_run: Callable[[], None] | None = None) -> BenchResult:
    """Measure ``compiled`` (a CompiledModel) on its runtime; ``on_run`` is called after every model
    run (progress). ``prompt_ids`` replace the random prompt (then ``prompt_tokens`` is their number)."""
    if prompt_tokens < 1 or new_tokens < 0 or repeats < 1:
        raise InputError(f"bench needs --prompt-tokens >= 1, --new-tokens >= 0 and repeats >= 1 (got {prompt_tokens}, "
                         f"{new_tokens}, {repeats}); pass positive counts")
    if profile:
        backend, reason = open_recorder(compiled)
        runtime = backend.runtime
    else:
        backend, runtime, reason = compiled.backend, compiled.runtime, compiled.runtime_reason or ""
    tick = on_run or (lambda: None)
    try:
        runner = ModelRunner(backend, compiled.model)
    except InputError:
        runner = None  # no text interface (an encoder): forward timings only
    if prompt_ids is not None:
        prompt = [int(t) for t in prompt_ids]
        prompt_tokens = len(prompt)
    else:
        vocab = (runner.vocab_size if runner else None) or vocab_size(compiled.model)
        prompt = np.random.default_rng(0).integers(0, vocab, prompt_tokens).tolist()
    if runner is None:
        feeds = encoder_feeds(compiled.model, prompt)
        times = [_forward(backend, feeds, tick, record=i == repeats) for i in range(repeats + 1)][1:]
        result = BenchResult(runtime, reason, "encoder", prompt_tokens, 0, repeats, times, [])
    else:
        limit = runner.max_context
        if limit and prompt_tokens + new_tokens > limit:
            raise InputError(f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} exceed the model's context "
                             f"of {limit} tokens; lower them")
        loop = _has_c_loop(backend)
        generate = _generate_in_c if loop else _generate
        pairs = [generate(runner, prompt, new_tokens, tick, record=i == repeats) for i in range(repeats + 1)][1:]
        result = BenchResult(runtime, reason, "decoder", prompt_tokens, new_tokens, repeats,
                             [p for p, _ in pairs], [d for _, d in pairs], decode_loop=loop)
    if isinstance(backend, Recorder):
        result.profile = backend.profile()
    return result


def _record(backend: Any, on: bool, label: str) -> None:
    if isinstance(backend, Recorder):
        backend.recording, backend.label = on, label


def _forward(backend: Any, feeds: dict[str, np.ndarray], tick: Callable[[], None], record: bool) -> float:
    _record(backend, record, "forward")
    start = time.perf_counter()
    backend.run(feeds)
    elapsed = time.perf_counter() - start
    _record(backend, False, "")
    tick()
    return elapsed


def _generate(runner: ModelRunner, prompt: list[int], new_tokens: int, tick: Callable[[], None],
              record: bool) -> tuple[float, float]:
    """(prefill seconds, decode seconds for ``new_tokens`` greedy steps) on a fresh cache."""
    cache = runner.new_cache(1)
    try:
        _record(runner.backend, record, "prefill")
        start = time.perf_counter()
        logits = runner.step(cache, [prompt])
        prefill = time.perf_counter() - start
        tick()
        decode = 0.0
        for i in range(new_tokens):
            token = int(np.argmax(logits[0]))
            _record(runner.backend, record, f"decode {i + 1}")
            start = time.perf_counter()
            logits = runner.step(cache, [[token]])
            decode += time.perf_counter() - start
            tick()
    finally:
        _record(runner.backend, False, "")
        cache.free()
    return prefill, decode


def _has_c_loop(backend: Any) -> bool:
    """Whether ``generate`` runs this backend's steps in its library's decode loop (the generated
    C with a loop; profiled too: the loop's token callback reads each run's timers)."""
    program = getattr(backend, "program", None)  # a recorder forwards it; ONNX Runtime has none
    return program is not None and program.has_decode


def _generate_in_c(runner: ModelRunner, prompt: list[int], new_tokens: int, tick: Callable[[], None],
                   record: bool) -> tuple[float, float]:
    """(prefill seconds, seconds of ``new_tokens`` greedy steps) in the library's decode loop, the
    path ``generate`` takes: a step there costs its kernels only, where the per-step Python of
    ``_generate`` (feeds, the runner's cache, outputs copied back) added ~2 ms on a ~100M model.
    The clock reads are the loop's token callbacks: the first ends the prefill."""
    marks = [time.perf_counter()]
    recorder = runner.backend if record and isinstance(runner.backend, CRecorder) else None

    def on_token(_token: int) -> None:
        marks.append(time.perf_counter())
        if recorder is not None:  # the run that made this token: the prefill, then one per decode step
            recorder.record_loop_run("prefill" if len(marks) == 2 else f"decode {len(marks) - 2}")
        tick()

    decoding = runner.backend.decoding(list(prompt), max_new_tokens=new_tokens + 1, stop_ids=[], temperature=0.0,
                                       top_k=0, top_p=1.0, min_p=0.0, seed=0)
    try:
        while not decoding.next(on_token):
            pass
    finally:
        decoding.close()
    return marks[1] - marks[0], marks[-1] - marks[1]


def runs_per_repetition(compiled: Any, new_tokens: int) -> int:
    """How many model runs one repetition makes (for a progress bar's total)."""
    names = {v.name for v in compiled.model.graph.inputs}
    texts = "input_ids" in names and any(v.name == "logits" for v in compiled.model.graph.outputs)
    return 1 + new_tokens if texts else 1


def vocab_size(model: Model) -> int:
    """The vocabulary size: the metadata's, else the rows of the table that ``input_ids`` indexes."""
    from ..importers import read_metadata

    known = read_metadata(model).get("vocab_size")
    if known:
        return int(known)
    for node in model.graph.walk():
        if node.op_type == "Gather" and len(node.inputs) > 1 and node.inputs[1] is not None \
                and node.inputs[1].name == "input_ids" and node.inputs[0] is not None and node.inputs[0].const is not None:
            return int(node.inputs[0].const.shape[0])
    raise InputError("cannot tell the model's vocabulary size (no vocab_size metadata and no embedding Gather of "
                     "input_ids) to make a random prompt; pass --prompt with a tokenizer")


def encoder_feeds(model: Model, prompt: list[int]) -> dict[str, np.ndarray]:
    """Feeds for one forward run of a model without the text interface: batch 1, sequence =
    the prompt; ids from the prompt, masks ones, positions 0..n-1, token types and anything
    else integer zeros, floats standard normal; fixed dims as declared."""
    n = len(prompt)
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for v in model.graph.inputs:
        if v.const is not None:
            continue
        dims = list(v.shape) if v.shape is not None else [1, n]
        shape = [d if isinstance(d, int) else (1 if i == 0 else n) for i, d in enumerate(dims)]
        dtype = np.dtype(v.dtype.numpy) if v.dtype is not None else np.dtype(np.int64)
        if dtype.kind == "f":
            feeds[v.name] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in v.name:
            feeds[v.name] = np.ones(shape, dtype)
        elif "ids" in v.name and "type" not in v.name and "position" not in v.name and shape == [1, n]:
            feeds[v.name] = np.asarray([prompt], dtype)
        elif "position" in v.name and shape == [1, n]:
            feeds[v.name] = np.arange(n, dtype=dtype)[None, :]
        else:
            feeds[v.name] = np.zeros(shape, dtype)
    return feeds
