"""Driving the cached-graph contract directly with onnxruntime: prefill a (left-padded) prompt,
then feed tokens with the presents as pasts, and compare with the uncached model run once on the
whole sequence (a causal model's logits at a position do not depend on later tokens)."""

from __future__ import annotations

import functools

import numpy as np
import onnxruntime as ort

import infercc
from infercc.compiled import CompiledModel
from infercc.ir import to_proto
from tests.fixtures import catalog

TOLERANCE = 1e-4
DECODERS = catalog.list_fixtures(kind="decoder")
_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}


@functools.cache
def compiled(source: str, lowering: str = "ort", kv: bool = True, dtype: str = "auto") -> CompiledModel:
    return infercc.compile(source, provider="cpu", lowering=lowering, strict=True, kv_cache=kv, kv_cache_dtype=dtype)


def fixture(name: str, lowering: str = "ort", kv: bool = True, dtype: str = "auto") -> CompiledModel:
    return compiled(str(catalog.fixture_path(name)), lowering, kv, dtype)


def session(cm: CompiledModel) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(to_proto(cm.model).SerializeToString(), opts, providers=["CPUExecutionProvider"])


def empty_pasts(sess: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), _NUMPY[i.type])
            for i in sess.get_inputs() if i.name.startswith("past_key_values.")}


def sequence(vocab: int, prompts: list[int], new: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """Token ids and mask [batch, P + new]: row r's prompt has ``prompts[r]`` real tokens,
    left-padded to the longest (P); every later token is real."""
    rng = np.random.default_rng(seed)
    width = max(prompts)
    ids = rng.integers(3, vocab, size=(len(prompts), width + new)).astype(np.int64)
    mask = np.ones_like(ids)
    for row, length in enumerate(prompts):
        mask[row, :width - length] = 0
        ids[row, :width - length] = 0
    return ids, mask, width


def run_cached(cm: CompiledModel, ids: np.ndarray, mask: np.ndarray, chunks: list[int]) -> np.ndarray:
    """Logits [batch, total, vocab] from calls over consecutive chunks of the sequence (the first
    is the prompt), each passing the previous call's presents as pasts."""
    sess = session(cm)
    names = [o.name for o in sess.get_outputs()]
    pasts = empty_pasts(sess, ids.shape[0])
    pieces, start = [], 0
    for size in chunks:
        end = start + size
        feeds = {"input_ids": ids[:, start:end], "attention_mask": mask[:, :end], **pasts}
        out = dict(zip(names, sess.run(None, feeds)))
        pieces.append(out["logits"])
        pasts = {n: out["present." + n[len("past_key_values."):]] for n in pasts}
        start = end
    return np.concatenate(pieces, axis=1)


def run_uncached(cm: CompiledModel, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return session(cm).run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]


def real_diff(got: np.ndarray, expected: np.ndarray, mask: np.ndarray) -> float:
    """Largest |got - expected| / max(1, |expected|) over real (unpadded) positions."""
    diff = np.abs(got.astype(np.float64) - expected) / np.maximum(1.0, np.abs(expected))
    return float(diff[mask.astype(bool)].max())


def compare(name: str, prompts: list[int], new: int = 32, *, lowering: str = "ort", dtype: str = "auto",
            chunks: list[int] | None = None) -> float:
    """Cached (prompt, then one token per call unless ``chunks``) vs uncached on fixture ``name``."""
    vocab = int(catalog.fixture_info(name)["config"]["vocab"])
    ids, mask, width = sequence(vocab, prompts, new, seed=len(prompts))
    chunks = chunks or [width] + [1] * new
    got = run_cached(fixture(name, lowering, True, dtype), ids, mask, chunks)
    expected = run_uncached(fixture(name, lowering, False), ids, mask)
    return real_diff(got, expected, mask)
