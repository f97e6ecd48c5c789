"""Cached vs uncached on every decoder fixture of both exporters: a prompt, then 32 decode steps
through the contract (presents fed back as pasts), equal to the uncached model on the whole
sequence within 1e-4 at every real token; batch 1, and batch 4 with prompts of different
lengths (left padding). The ORT lowering (MultiHeadAttention) and the standard-ONNX one (these
fixtures' opsets decompose it: Concat and MatMul)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import infercc
from tests.fixtures import catalog

from ._drive import DECODERS, TOLERANCE, compare, fixture, real_diff, run_cached, run_uncached, sequence

BATCHES = {"batch1": [12], "batch4": [12, 5, 9, 1]}


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("name", DECODERS)
def test_cached_decode_equals_uncached(name: str, batch: str) -> None:
    assert fixture(name).diagnostics["kv_cache_insertion"].status == "applied"
    assert compare(name, BATCHES[batch]) <= TOLERANCE


@pytest.mark.parametrize("name", DECODERS)
def test_standard_onnx_lowering(name: str) -> None:
    cm = fixture(name, "onnx")
    assert not any(n.domain for n in cm.model.graph.walk())
    assert compare(name, BATCHES["batch4"], 8, lowering="onnx") <= TOLERANCE


@pytest.mark.parametrize("name", ["llama_dynamo", "gpt2_torchscript", "mistral_torchscript"])
def test_multi_token_calls_on_a_batch(name: str) -> None:
    """Chunked prefill and several new tokens per call on a batch (GroupQueryAttention would refuse
    those; MultiHeadAttention takes them)."""
    assert compare(name, BATCHES["batch4"], 12, chunks=[12, 3, 1, 5, 3]) <= TOLERANCE
    assert compare(name, [7], 12, chunks=[3, 4, 5, 1, 6]) <= TOLERANCE


@pytest.mark.parametrize("name", ["llama_dynamo", "mistral_dynamo", "gpt2_dynamo", "phi_torchscript"])
def test_prompt_call_equals_the_source(name: str) -> None:
    """A prompt call (empty past) computes what the uncached model does at every real position.
    Left-padding positions (no key to attend to) are unspecified with GroupQueryAttention (see
    passes/kv_cache/gqa.py) but finite: a NaN there would reach the cache."""
    ids, mask, width = sequence(256, BATCHES["batch4"], 0)
    got = run_cached(fixture(name), ids, mask, [width])
    expected = run_uncached(fixture(name, kv=False), ids, mask)
    assert real_diff(got, expected, mask) <= TOLERANCE
    assert np.isfinite(got).all()


@pytest.mark.parametrize("name", ["llama_dynamo", "gpt2_dynamo"])
def test_multi_head_fallback_equals_the_source_everywhere(name: str) -> None:
    """Where GroupQueryAttention does not fit (here: an fp16 cache for a float32 model),
    MultiHeadAttention keeps the canonical semantics exactly, padded rows included."""
    cm = fixture(name, dtype="fp16")
    assert cm.model.graph.op_histogram().get("com.microsoft::MultiHeadAttention") == 2
    reasons = " ".join(cm.diagnostics["lower_canonical_ops"].reasons)
    assert "not GroupQueryAttention: the cache is stored as" in reasons
    ids, mask, width = sequence(256, BATCHES["batch4"], 0)
    got = run_cached(cm, ids, mask, [width])
    expected = run_uncached(fixture(name, kv=False), ids, mask)
    assert float(np.abs(got - expected).max()) <= 2e-2  # the fp16 cache's rounding


def test_kernels_chosen() -> None:
    """GroupQueryAttention for every layer, reading the packed q/k/v projection and rotating q and k
    itself (no Split, no RotaryEmbedding left for attention), and the diagnostics say so."""
    for name in ("llama_dynamo", "gpt2_dynamo"):
        cm = fixture(name)
        graph = cm.model.graph
        hist = graph.op_histogram()
        assert hist.get("com.microsoft::GroupQueryAttention") == 2 and "If" not in hist
        assert "com.microsoft::MultiHeadAttention" not in hist and "com.microsoft::RotaryEmbedding" not in hist
        for node in (n for n in graph.nodes if n.op_type == "GroupQueryAttention"):
            assert node.inputs[1] is None and node.inputs[2] is None  # one packed q/k/v input
        assert cm.diagnostics["lower_canonical_ops"].changes["Attention_as_GroupQueryAttention"] == 2
    rotated = [n for n in fixture("llama_dynamo").model.graph.nodes if n.op_type == "GroupQueryAttention"]
    assert all(n.attrs["do_rotary"].value == 1 for n in rotated)


@pytest.mark.parametrize("name", [n for n in DECODERS if not n.startswith("gpt2")])
def test_layers_share_their_metadata(name: str) -> None:
    """What every layer computes alike runs once per step: the rotary nodes read one position
    tensor and one pair of cos/sin caches, the attention nodes one bias (the lowerings read batch
    and sequence lengths once, post-lowering CSE merges the rest)."""
    graph = fixture(name).model.graph
    rotary = [n for n in graph.nodes if n.op_type == "RotaryEmbedding"]
    attention = [n for n in graph.nodes if n.op_type == "GroupQueryAttention"]
    assert len(rotary) in (0, 4) and len(attention) == 2  # absorbed by the kernel, or partial rotary kept
    for i in (1, 2, 3):
        assert len({id(n.inputs[i]) for n in rotary}) <= 1, f"rotary input {i} differs between layers"
    for i in (5, 6, 7, 8, 10, 16):  # seqlens_k, total length, cos/sin tables, attention_bias, query_seqlens
        assert len({id(n.inputs[i]) for n in attention}) == 1, f"attention input {i} differs between layers"


@pytest.mark.parametrize("name", ["llama_torchscript", "mistral_dynamo", "gpt_neox_dynamo"])
def test_opset23_lowers_to_onnx_attention_with_past(name: str) -> None:
    """At opset 23 the "onnx" lowering is ONNX's own Attention, past and present included."""
    proto = onnx.load(str(catalog.fixture_path(name)))
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 23
    cached = infercc.compile(proto, provider="cpu", lowering="onnx", strict=True, kv_cache=True)
    plain = infercc.compile(proto, provider="cpu", lowering="onnx", strict=True, kv_cache=False)
    ops = cached.model.graph.op_histogram()
    assert ops.get("Attention") == 2 and "Softmax" not in ops and not any(n.domain for n in cached.model.graph.walk())
    ids, mask, width = sequence(256, BATCHES["batch4"], 16)
    got = run_cached(cached, ids, mask, [width, 3] + [1] * 13)
    assert real_diff(got, run_uncached(plain, ids, mask), mask) <= TOLERANCE
