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
def test_prompt_call_equals_the_source_everywhere(name: str) -> None:
    """A prompt call (empty past) computes what the uncached model does at every position, fully
    padded rows included (each export's own semantics there, as the attention fusion keeps)."""
    ids, mask, width = sequence(256, BATCHES["batch4"], 0)
    got = run_cached(fixture(name), ids, mask, [width])
    expected = run_uncached(fixture(name, kv=False), ids, mask)
    assert float(np.abs(got - expected).max()) <= TOLERANCE


def test_kernels_chosen() -> None:
    """MultiHeadAttention for every layer: grouped K/V heads fold their query heads into rows."""
    for name in ("llama_dynamo", "gpt2_dynamo"):
        hist = fixture(name).model.graph.op_histogram()
        assert hist.get("com.microsoft::MultiHeadAttention") == 2 and "If" not in hist


@pytest.mark.parametrize("name", [n for n in DECODERS if not n.startswith("gpt2")])
def test_layers_share_their_metadata(name: str) -> None:
    """What every layer computes alike runs once per step: the rotary nodes read one position
    tensor and one pair of cos/sin caches, the attention nodes one bias (the lowerings read batch
    and sequence lengths once, post-lowering CSE merges the rest)."""
    graph = fixture(name).model.graph
    rotary = [n for n in graph.nodes if n.op_type == "RotaryEmbedding"]
    attention = [n for n in graph.nodes if n.op_type == "MultiHeadAttention"]
    assert len(rotary) == 4 and len(attention) == 2
    for i in (1, 2, 3):
        assert len({id(n.inputs[i]) for n in rotary}) == 1, f"rotary input {i} differs between layers"
    assert len({id(n.inputs[5]) for n in attention}) == 1  # attention_bias


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
