"""The EAGLE draft layer on the generated-C runtime: its ONNX graph computes ``EagleDraft.forward``
(checked in float32 on onnxruntime, no compiler needed) and the int8 C build stays within int8's
tolerance of it, keys and values included, over a cache that grows and rolls back."""

import numpy as np
import onnxruntime as ort
import pytest

from infercc.runtime.speculative.eagle_c import INPUTS, LOGITS, OUTPUTS, c_draft, draft_graph
from infercc.runtime.speculative.eagle_draft import EagleDraft, expected_shapes, rotary

HIDDEN, HEADS, DIM, INTER, VOCAB = 48, 2, 16, 40, 37


def random_draft(seed: int = 0) -> EagleDraft:
    rng = np.random.default_rng(seed)
    weights = {name: (rng.standard_normal(shape) * (0.2 if len(shape) == 2 else 1.0)).astype(np.float32)
               for name, shape in expected_shapes(HIDDEN, HEADS, DIM, INTER).items()}
    for name in ("layer.input_layernorm.weight", "layer.post_attention_layernorm.weight"):
        weights[name] = np.abs(weights[name]) + 0.5
    return EagleDraft(weights, HEADS, DIM)


def rows(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.standard_normal((n, HIDDEN)).astype(np.float32), rng.standard_normal((n, HIDDEN)).astype(np.float32)


@pytest.mark.parametrize("past,n", [(0, 1), (0, 4), (6, 1), (6, 3)])
def test_the_graph_computes_the_numpy_layer(past, n):
    draft = random_draft()
    session = ort.InferenceSession(draft_graph(draft).SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(past + n)
    cache = draft.new_cache(2)
    if past:
        draft.forward(cache, *rows(rng, past))
    keys, values = (c[:past].reshape(past, HEADS * DIM).copy() for c in (cache.k, cache.v))
    features, embeds = rows(rng, n)
    expected = draft.forward(cache, features, embeds)
    cos, sin = rotary(np.arange(2 + past, 2 + past + n), DIM, draft.rope_theta)
    feeds = dict(zip(INPUTS, [np.concatenate([embeds, features], 1), keys, values, cos[:, 0], sin[:, 0]]))
    feature, k, v = session.run(list(OUTPUTS), feeds)
    np.testing.assert_allclose(feature, expected, rtol=1e-4, atol=1e-4)
    lm_head = (rng.standard_normal((VOCAB, HIDDEN)) * 0.2).astype(np.float32)
    with_head = ort.InferenceSession(draft_graph(draft, lm_head).SerializeToString(), providers=["CPUExecutionProvider"])
    (logits,) = with_head.run([LOGITS], feeds)
    np.testing.assert_allclose(logits, expected[-1:] @ lm_head.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(k, cache.k[past:past + n].reshape(n, -1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(v, cache.v[past:past + n].reshape(n, -1), rtol=1e-4, atol=1e-4)


def test_the_c_build_follows_the_numpy_layer_within_int8_tolerance():
    """Features, keys and the draft-vocabulary logits of the last position (the LM head rows built
    into the library) within int8 rounding of the float32 layer's."""
    draft = random_draft(1)
    lm_head = (np.random.default_rng(9).standard_normal((VOCAB, HIDDEN)) * 0.2).astype(np.float32)
    built, why = c_draft(draft, 1, lm_head)
    if built is None:
        pytest.skip(why)
    assert built.hidden == HIDDEN and "generated-C" in built.runs_on and "LM head" in built.runs_on
    rng = np.random.default_rng(3)
    reference, cache = draft.new_cache(5), built.new_cache(5)
    for n in (4, 1, 1, 3):  # a catch-up over several tokens, single guesses, then a rollback and more
        features, embeds = rows(rng, n)
        (expected, expected_logits), (got, logits) = (d.step(c, features, embeds, lm_head)
                                                      for d, c in ((draft, reference), (built, cache)))
        span = np.abs(expected).max()
        assert got.shape == expected.shape and np.abs(got - expected).max() <= 0.05 * span
        assert logits.shape == (VOCAB,)
        assert np.abs(logits - expected_logits).max() <= 0.05 * np.abs(expected_logits).max()
        assert cache.length == reference.length
        np.testing.assert_allclose(cache.k[:cache.length], reference.k[:reference.length], atol=0.05 * span)
        reference.length = cache.length = cache.length - 1  # the last position was a rejected guess


def test_without_a_compiler_the_numpy_layer_runs(monkeypatch):
    """A machine where the C runtime cannot build: (None, why), so the proposer keeps NumPy."""
    from infercc.runtime import c_backend

    def refuse(*args, **kwargs):
        raise c_backend.CUnavailable("no C compiler found (install gcc or clang)")

    monkeypatch.setattr(c_backend, "CBackend", refuse)
    built, why = c_draft(random_draft(), 1)
    assert built is None and "NumPy" in why and "no C compiler" in why
