"""Attention fusion on the real exports: every layer of every fixture (both exporters) is fused,
lowered to ORT's contrib ops or standard ONNX, and the compiled model matches the original on every
position (fully padded rows included: each file keeps its own semantics there) at several batch
sizes and lengths, with and without padding."""

from __future__ import annotations

import onnx
import pytest

from tests.fixtures import catalog

from ._attention_util import (
    FIXTURES,
    TOLERANCE,
    attention_info,
    compile_model,
    compiled_fixture,
    max_diff,
    original_session,
    run,
)

SHAPES = [(1, 5, False), (3, 24, True), (3, 5, True), (1, 24, False)]
GQA_FAMILIES = {"llama", "mistral", "qwen2"}
ROTARY_FAMILIES = {"llama", "mistral", "qwen2", "phi", "gpt_neox"}


@pytest.mark.parametrize("lowering", ["ort", "onnx"])
@pytest.mark.parametrize("name", FIXTURES)
def test_every_layer_is_fused_and_outputs_match(name: str, lowering: str) -> None:
    info = catalog.fixture_info(name)
    layers = info["config"]["num_layers"]
    cm = compiled_fixture(name, lowering)
    report = attention_info(cm)
    assert report["fused"] == layers == report["expected"], report
    assert not cm.diagnostics["attention_fusion"].warnings
    reference = original_session(name)
    for batch, seq, padding in SHAPES:
        feeds = catalog.random_feeds(name, batch, seq, padding=padding, seed=batch * 97 + seq)
        diff = max_diff(run(reference, feeds), cm.run(feeds))
        assert diff <= TOLERANCE, (name, lowering, batch, seq, padding, diff)


@pytest.mark.parametrize("name", FIXTURES)
def test_ort_lowering_uses_contrib_kernels(name: str) -> None:
    info = catalog.fixture_info(name)
    family, layers = info["family"], info["config"]["num_layers"]
    cm = compiled_fixture(name, "ort")
    ops = cm.model.graph.op_histogram()
    kernel = "GroupQueryAttention" if family in GQA_FAMILIES else "MultiHeadAttention"
    assert ops.get(f"com.microsoft::{kernel}") == layers, ops
    assert "Softmax" not in ops
    rotary = ops.get("com.microsoft::RotaryEmbedding", 0)
    assert rotary == (2 * layers if family in ROTARY_FAMILIES else 0), ops
    assert not any(op.startswith("ai.infercc") for op in ops)
    # heads are never split: Q/K/V go from the projections (and rotary) straight into the kernel
    assert ops.get("Transpose", 0) == 0, ops


@pytest.mark.parametrize("name", FIXTURES)
def test_fusion_report_describes_each_layer(name: str) -> None:
    info = catalog.fixture_info(name)
    cfg = info["config"]
    report = attention_info(compiled_fixture(name, "ort"))
    for site in report["sites"]:
        assert site["status"] == "fused"
        assert site["num_heads"] == cfg["num_heads"] and site["kv_num_heads"] == cfg["num_kv_heads"]
        assert site["head_size"] == cfg["head_dim"]
        assert site["scale"] == pytest.approx(cfg["head_dim"] ** -0.5)
        assert site["causal"] == (info["kind"] == "decoder")
        window = cfg.get("sliding_window")
        assert site["left_window"] == (window - 1 if window else -1)
        assert "padding" in site["mask"]
        rotary = cfg["rotary"]
        if rotary["type"] == "none":
            assert site["rotary"] == "none"
        else:
            partial = rotary["rotary_dim"] < cfg["head_dim"]
            assert site["rotary"] == "half-rotated" + (f", {rotary['rotary_dim']} of {cfg['head_dim']} dims" if partial else "")
        packed = info["family"] in ("gpt2", "gpt_neox")
        bias = info["family"] not in ("llama", "mistral")
        assert site["projections"].startswith("packed QKV" if packed else "separate"), site["projections"]
        assert ("+ bias" in site["projections"]) == bias and site["projections"].endswith("of one input")


def test_masks_keep_each_exporters_semantics() -> None:
    """dynamo fills masked scores with float32 min (fully padded rows average V), TorchScript with
    -inf and a NaN guard (those rows are 0): the canonical node keeps the fill."""
    dynamo = attention_info(compiled_fixture("llama_dynamo", "ort"))["sites"][0]
    torchscript = attention_info(compiled_fixture("llama_torchscript", "ort"))["sites"][0]
    assert dynamo["mask_value"] < -1e38 and dynamo["mask_value"] != float("-inf")
    assert torchscript["mask_value"] == float("-inf")


@pytest.mark.parametrize("name", ["llama_torchscript", "mistral_dynamo", "gpt_neox_dynamo", "bert_dynamo"])
def test_opset23_models_lower_to_standard_attention_and_rotary(name: str) -> None:
    """With the model at opset 23, "onnx" lowering emits ONNX's own Attention and RotaryEmbedding
    (the fixtures use nothing whose meaning changed since opset 20)."""
    proto = onnx.load(str(catalog.fixture_path(name)))
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 23
    cm = compile_model(proto, lowering="onnx", strict=True)
    info = catalog.fixture_info(name)
    ops = cm.model.graph.op_histogram()
    layers = info["config"]["num_layers"]
    assert ops.get("Attention") == layers and "Softmax" not in ops, ops
    rotary = info["config"]["rotary"]["type"] != "none"
    assert ops.get("RotaryEmbedding", 0) == (2 * layers if rotary else 0), ops
    reference = original_session(name)
    for batch, seq, padding in SHAPES[:2]:
        feeds = catalog.random_feeds(name, batch, seq, padding=padding, seed=7)
        assert max_diff(run(reference, feeds), cm.run(feeds)) <= TOLERANCE
