"""Calibration inputs generated from the model itself, and the statistics activation-aware
quantization takes from them: each quantized MatMul's input Hessian (GPTQ) and each weight's
end-to-end sensitivity (mixed precision).

Why generated: a compile has no dataset, and the quantized model must not depend on one the user
did not choose. What is generated (seeded, so a compile is reproducible):

* decoders (an output whose last axis is the vocabulary: logits): text *sampled from the model*,
  16 sequences of 128 tokens starting with BOS when the checkpoint names one. Sampling token by
  token would cost 128 forward passes without a cache; instead the sequences are refined in
  parallel (Jacobi iteration): start from uniform random tokens, then ``JACOBI_ROUNDS`` times
  replace every token by a sample from the model's distribution given the tokens before it. After
  r rounds the first r + 1 tokens are exact samples and every later token is a model sample given
  a slightly older prefix: the token statistics of the model's own text at r forward passes.
* encoders (no vocabulary output): uniform random token ids, in sequences of geometric lengths 8
  to 128 (512 tokens each): every sequence covers the positions below its length, so short
  inputs, the common case, are covered as much as long ones. Measured on all-MiniLM-L6-v2
  (natural-order GPTQ, int4): embedding cosine 0.979-0.981 with 64-token sequences (three seeds),
  0.985 with this mix; calibrating on the test sentences themselves would give 0.996, the price of
  not shipping a corpus (uniform ids are not word statistics).

Measured on stories260K: the calibration seed moves int4 perplexity by a few percent (+3.0 to +6.9%
over four seeds) while the KL divergence to the float model stays within 0.047-0.057; random tokens
instead of sampled text: +7.3%.

The float model is run by onnxruntime on CPU (canonical ops lowered on a copy); the activations of
interest are exposed as extra graph outputs through Identity taps, so the lowering cannot rename
them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import numpy as np

from ...ir import DType, Graph, Model, Value

ENCODER_LENGTHS = (8, 16, 32, 64, 128)
ENCODER_TOKENS_PER_LENGTH = 512
DECODER_SEQUENCES, DECODER_LENGTH = 16, 128
JACOBI_ROUNDS = 4
#: Tokens per forward run (bounds the memory of exposed activations and logits).
RUN_TOKENS = 512
#: Tokens the sensitivity of each weight is measured on.
SENSITIVITY_TOKENS = 512
#: Bytes of Hessians accumulated per pass over the calibration set.
HESSIAN_BUDGET = 256 << 20
_PASS_THROUGH = ("Cast", "Unsqueeze", "Reshape", "Flatten", "Squeeze", "Identity")


class NoCalibration(Exception):
    """The model cannot generate its own calibration inputs; the message says why."""


@dataclasses.dataclass
class Calibration:
    batches: list[dict[str, np.ndarray]]
    description: str
    tokens: int
    seconds: float
    #: Name of the output the sensitivity is measured on, and whether it is a distribution.
    output: str
    logits: bool


def make_calibration(model: Model, config, *, seed: int = 0) -> Calibration:
    """Seeded calibration feeds for ``model`` (see the module docstring), or NoCalibration."""
    start = time.perf_counter()
    graph = model.graph
    ids, vocab = _token_input(graph)
    rng = np.random.default_rng(seed)
    logits = _logits_output(graph, vocab)
    if logits is None:
        shapes = dict.fromkeys(_fit(ids, RUN_TOKENS // t, t) for t in ENCODER_LENGTHS)  # static dims win
        batches = [_feeds(graph, ids, rng.integers(0, vocab, shape))
                   for shape in shapes for _ in range(max(1, ENCODER_TOKENS_PER_LENGTH // (shape[0] * shape[1])))]
        lengths = sorted({shape[1] for shape in shapes})
        output = next((v.name for v in graph.outputs if v.dtype in (DType.FLOAT, DType.FLOAT16)), None)
        if output is None:
            raise NoCalibration("the model has no float output to measure errors on")
        text = (f"{sum(b[ids.name].size for b in batches)} uniform random token ids in sequences of "
                f"{'/'.join(map(str, lengths))} tokens (encoder)")
    else:
        batches = _sampled(model, config, ids, logits, vocab, rng)
        output = logits.name
        shape = (sum(len(b[ids.name]) for b in batches), batches[0][ids.name].shape[1])
        text = (f"{shape[0]} x {shape[1]} tokens sampled from the model "
                f"({JACOBI_ROUNDS} parallel refinement rounds from random tokens)")
    tokens = sum(int(b[ids.name].size) for b in batches)
    return Calibration(batches, text, tokens, time.perf_counter() - start, output, logits is not None)


def hessians(model: Model, config, calibration: Calibration, taps: dict[str, Value]) -> Iterator[dict[str, np.ndarray]]:
    """X^T X (summed over every calibration token; float32 sums of a few thousand products) of
    each tapped activation [..., K], yielded in groups that fit ``HESSIAN_BUDGET`` (one pass over
    the calibration set per group)."""
    group: list[str] = []
    size = 0
    for key, value in taps.items():
        k = int(value.shape[-1]) if value.shape and isinstance(value.shape[-1], int) else 0
        if group and size + 4 * k * k > HESSIAN_BUDGET:
            yield _accumulate(model, config, calibration, {g: taps[g] for g in group})
            group, size = [], 0
        group.append(key)
        size += 4 * k * k
    if group:
        yield _accumulate(model, config, calibration, {g: taps[g] for g in group})


def sensitivities(model: Model, config, calibration: Calibration, probes: dict) -> dict:
    """For each probe (key -> {initializer name: its quantized-then-dequantized value, same
    layout}), the error of the model's output when those weights alone are replaced: mean KL
    divergence per token for logits, else mean (1 - cosine) over the output's rows. Errors of
    different weights nearly add up (all-MiniLM-L6-v2 at int4: sum of single errors 0.0246, all
    together 0.0239), so ranking them ranks what keeping each one at higher precision buys."""
    clone = model.clone()
    graph = clone.graph
    inputs, originals = {}, {}
    for name in sorted({n for probe in probes.values() for n in probe}):
        const = graph.initializers.pop(name)
        free = graph.add_input(graph.names.fresh(name + "_probe"), const.dtype, const.shape)
        const.replace_all_uses_with(free)
        inputs[name], originals[free.name] = free.name, np.asarray(const.const.numpy())
    session = _session(clone, config)
    batches, count = [], 0
    for batch in calibration.batches:
        if count >= SENSITIVITY_TOKENS:
            break
        batches.append(batch)
        count += next(iter(batch.values())).size
    reference = [session.run([calibration.output], {**b, **originals})[0] for b in batches]
    out = {}
    for key, probe in probes.items():
        feeds = dict(originals)
        for name, value in probe.items():
            feeds[inputs[name]] = value.astype(originals[inputs[name]].dtype, copy=False)
        got = [session.run([calibration.output], {**b, **feeds})[0] for b in batches]
        out[key] = float(np.mean([_error(r, g, calibration.logits) for r, g in zip(reference, got)]))
    return out


# -- generation ---------------------------------------------------------------------------------------
def _token_input(graph: Graph) -> tuple[Value, int]:
    """The integer input that indexes an embedding table, and the table's size."""
    for value in graph.inputs:
        if value.const is None and value.dtype is not None and value.dtype.is_integer:
            rows = _table_rows(value)
            if rows:
                return value, rows
    raise NoCalibration("no integer input indexes an embedding table: the model's inputs cannot be generated")


def _table_rows(value: Value, depth: int = 0) -> int:
    for node, i in value.uses:
        if node.op_type == "Gather" and i == 1 and node.inputs[0].const is not None and int(node.attr("axis", 0)) == 0:
            shape = node.inputs[0].shape
            if shape and len(shape) == 2 and node.inputs[0].dtype in (DType.FLOAT, DType.FLOAT16):
                return int(shape[0])
        if node.op_type in _PASS_THROUGH and i == 0 and depth < 4:
            rows = _table_rows(node.outputs[0], depth + 1)
            if rows:
                return rows
    return 0


def _logits_output(graph: Graph, vocab: int) -> Value | None:
    for value in graph.outputs:
        if value.dtype in (DType.FLOAT, DType.FLOAT16) and value.shape and len(value.shape) == 3 and value.shape[-1] == vocab:
            return value
    return None


def _feeds(graph: Graph, ids: Value, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for a batch of ``tokens`` [B, T]: masks all ones, positions 0..T-1, pasts (of a
    cached graph) empty, inputs with a default their default (the session runs them as plain
    inputs), any other input zeros, every symbolic dim read from the ids' shape."""
    b, t = tokens.shape
    symbols = {}
    if ids.shape and len(ids.shape) == 2:
        symbols = {str(ids.shape[0]): b, str(ids.shape[1]): t}
    feeds = {ids.name: tokens.astype(ids.dtype.numpy)}
    for value in graph.inputs:
        if value is ids:
            continue
        if value.const is not None:
            feeds[value.name] = value.const.numpy()
            continue
        name = value.name.lower()
        shape = [_dim(d, i, symbols, b, t, "past" in name) for i, d in enumerate(value.shape or ())]
        dtype = (value.dtype or DType.FLOAT).numpy
        if "mask" in name:
            feeds[value.name] = np.ones(shape, dtype)
        elif "position" in name and shape:
            feeds[value.name] = np.broadcast_to(np.arange(shape[-1]), shape).astype(dtype)
        else:
            feeds[value.name] = np.zeros(shape, dtype)
    return feeds


def _fit(ids: Value, batch: int, length: int) -> tuple[int, int]:
    """(batch, length), or the token input's static sizes where it has them."""
    shape = ids.shape if ids.shape and len(ids.shape) == 2 else (None, None)
    return (shape[0] if isinstance(shape[0], int) else batch, shape[1] if isinstance(shape[1], int) else length)


def _dim(d, axis: int, symbols: dict[str, int], b: int, t: int, past: bool) -> int:
    if isinstance(d, int):
        return d
    if str(d) in symbols:
        return symbols[str(d)]
    if past:
        return b if axis == 0 else 0
    return b if axis == 0 else t


def _sampled(model: Model, config, ids: Value, logits: Value, vocab: int, rng: np.random.Generator) -> list[dict]:
    from ...importers.metadata import read_metadata

    bos = read_metadata(model).get("bos_token_id")
    per_run, length = _fit(ids, max(1, RUN_TOKENS // DECODER_LENGTH), DECODER_LENGTH)
    sequences = max(per_run, DECODER_SEQUENCES * DECODER_LENGTH // (length * per_run) * per_run)
    tokens = rng.integers(0, vocab, (sequences, length))
    if bos is not None and 0 <= int(bos) < vocab:
        tokens[:, 0] = int(bos)
    session = _session(model, config)
    for _ in range(JACOBI_ROUNDS):
        nxt = tokens.copy()
        for s in range(0, sequences, per_run):
            batch = tokens[s:s + per_run]
            out = session.run([logits.name], _feeds(model.graph, ids, batch))[0].astype(np.float32)
            gumbel = -np.log(-np.log(rng.random(out.shape[:2] + (vocab,), dtype=np.float32) + 1e-20) + 1e-20)
            nxt[s:s + per_run, 1:] = np.argmax(out[:, :-1, :vocab] + gumbel[:, :-1], axis=-1)
        tokens = nxt
    return [_feeds(model.graph, ids, tokens[s:s + per_run]) for s in range(0, sequences, per_run)]


# -- running the float model ----------------------------------------------------------------------------
def _session(model: Model, config):
    """An ORT session over ``model`` with its canonical ops lowered (on a copy)."""
    from ...runtime.ort_backend import OrtBackend
    from .report import runnable

    backend = OrtBackend(runnable(model, config), ["CPUExecutionProvider"], intra_op_threads=config.intra_op_threads)
    return backend.session


def _accumulate(model: Model, config, calibration: Calibration, taps: dict[str, Value]) -> dict[str, np.ndarray]:
    clone = model.clone()
    graph = clone.graph
    names = {}
    for key, value in taps.items():
        tap = graph.make_node("Identity", [graph.value(value.name)])
        out = tap.outputs[0]
        out.name = graph.names.fresh("calibration_tap")
        out.dtype, out.shape = value.dtype, value.shape
        graph.outputs.append(out)
        names[key] = out.name
    session = _session(clone, config)
    sums: dict[str, np.ndarray] = {}
    for batch in calibration.batches:
        values = session.run(list(names.values()), batch)
        for key, x in zip(names, values):
            x = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
            if key in sums:
                sums[key] += x.T @ x
            else:
                sums[key] = x.T @ x
    return sums


def _error(reference: np.ndarray, got: np.ndarray, logits: bool) -> float:
    ref = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    new = got.reshape(-1, got.shape[-1]).astype(np.float64)
    if logits:
        p = ref - ref.max(-1, keepdims=True)
        p -= np.log(np.exp(p).sum(-1, keepdims=True))
        q = new - new.max(-1, keepdims=True)
        q -= np.log(np.exp(q).sum(-1, keepdims=True))
        return float(np.mean((np.exp(p) * (p - q)).sum(-1)))
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(new, axis=1)
    return float(np.mean(1 - (ref * new).sum(1) / np.where(norms > 0, norms, 1)))
