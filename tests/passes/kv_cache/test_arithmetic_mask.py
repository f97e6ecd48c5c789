"""A causal mask made by arithmetic on a 0/1 triangle (``(tril(ones) - 1) * 1e9`` added to the
scores, as older GPT-2 exports and hand-written decoders do; infercc's own demo decoder is one):
the fusion reads it as the causal triangle, so the model gets a KV cache, and its cached decoding
equals the uncached model. An upper triangle (tokens see later ones) is not causal: the site is
left alone and the compiled model still computes what the original did."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

import infercc
from infercc.demo import tiny_decoder

from ._drive import run_cached

TOLERANCE = 1e-4


def _reference(proto, ids: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input_ids": ids})[0]


def test_a_triangle_mask_made_by_arithmetic_is_causal_and_cached_decoding_matches() -> None:
    proto = tiny_decoder()
    compiled = infercc.compile(proto, provider="cpu", strict=True)
    sites = compiled.diagnostics["attention_fusion"].info["attention"]["sites"]
    assert [s["mask"] for s in sites] == ["causal", "causal"], sites
    assert compiled.diagnostics["kv_cache_insertion"].status == "applied"
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    got = run_cached(compiled, ids, mask, [5] + [1] * 7)
    expected = _reference(proto, ids)
    assert np.abs(got - expected).max() < TOLERANCE


def test_an_upper_triangle_made_by_arithmetic_is_not_taken_for_causal() -> None:
    proto = tiny_decoder()
    trilu = next(n for n in proto.graph.node if n.op_type == "Trilu")
    next(a for a in trilu.attribute if a.name == "upper").i = 1  # keeps j >= i: every token sees the later ones
    compiled = infercc.compile(proto, provider="cpu")
    assert compiled.diagnostics["kv_cache_insertion"].status != "applied"
    ids = np.random.default_rng(1).integers(0, 256, size=(2, 9)).astype(np.int64)
    got = compiled.run({"input_ids": ids})["logits"]
    assert np.abs(got - _reference(proto, ids)).max() < TOLERANCE
