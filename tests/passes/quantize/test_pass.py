"""The quantize_weights pass on the exported fixtures and on hand-built graphs: accuracy within
stated tolerances, ORT and ONNX lowerings agreeing, save/load, no float copy left, determinism,
diagnostics, config validation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import infercc
from infercc.errors import ConfigError
from tests.fixtures.catalog import fixture_path, real_token_mask, reference

#: Stated tolerances on the (random-weight, tiny) fixtures, real tokens only: the largest logit
#: difference as a fraction of the float logits' range, and arg-max agreement per position.
TOLERANCE = {"int8": (0.02, 0.90), "int4": (0.10, 0.75)}
#: ORT's MatMulNBits at accuracy_level 4 quantizes activations to int8 per block; the ONNX lowering
#: dequantizes exactly. The two differ by that rounding only.
LOWERINGS_AGREE = 0.01
FIXTURES = ["llama_dynamo", "gpt2_torchscript", "bert_dynamo", "qwen2_torchscript"]


def _error(name: str, outputs: dict[str, np.ndarray], expected: dict[str, np.ndarray], feeds) -> tuple[float, float]:
    key = next(iter(expected))
    mask = real_token_mask(feeds)
    ref, got = expected[key][mask], outputs[key][mask]
    return float(np.abs(got - ref).max() / (ref.max() - ref.min())), float(np.mean(ref.argmax(-1) == got.argmax(-1)))


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_fixture_outputs_within_tolerance_and_lowerings_agree(name: str, bits: str) -> None:
    feeds, expected = reference(name)
    ort_out = infercc.compile(fixture_path(name), quantize=bits, strict=True).run(feeds)
    onnx_compiled = infercc.compile(fixture_path(name), quantize=bits, lowering="onnx", strict=True)
    assert not any(n.domain for n in onnx_compiled.model.graph.walk())  # standard ONNX only
    onnx_out = onnx_compiled.run(feeds)
    rel, top1 = _error(name, ort_out, expected, feeds)
    max_rel, min_top1 = TOLERANCE[bits]
    assert rel <= max_rel and top1 >= min_top1, (rel, top1)
    key = next(iter(expected))
    span = float(expected[key].max() - expected[key].min())
    real = real_token_mask(feeds)  # padded positions are unspecified on the ORT path (kv_cache/gqa.py)
    assert float(np.abs(ort_out[key][real] - onnx_out[key][real]).max()) <= LOWERINGS_AGREE * span


def test_graph_diagnostics_and_report() -> None:
    compiled = infercc.compile(fixture_path("gpt2_dynamo"), quantize="int4", quant_block_size=64)
    hist = compiled.model.graph.op_histogram()
    assert hist.get("com.microsoft::MatMulNBits") == 9 and "Gemm" not in hist  # 8 Gemm projections + LM head
    assert hist.get("com.microsoft::GatherBlockQuantized") == 2  # token and position tables
    record = compiled.diagnostics["quantize_weights"]
    info = record.info
    assert record.status == "applied" and record.changes["weights_quantized"] == 11
    roles = {layer["role"] for layer in info["layers"]}
    assert roles == {"linear", "lm_head", "embedding"}
    linear = next(layer for layer in info["layers"] if layer["role"] == "linear")
    assert linear["bits"] == 4 and linear["block_size"] == 64 and 0 < linear["rel_error"] < 0.2
    head = next(layer for layer in info["layers"] if layer["role"] == "lm_head")
    assert head["bits"] == 8 and head["block_size"] == head["K"]  # int8: per output channel
    assert info["size"]["weights_after"] < 0.35 * info["size"]["weights_before"]
    logits = info["end_to_end"]["outputs"]["logits"]
    assert logits["cosine"] > 0.99 and 0 <= logits["max_abs_rel_range"] < 0.1 and "top1_agreement" in logits
    from infercc.passes.quantize.report import format_report

    text = format_report(info, top=3)
    assert "worst 3 layers" in text and "end-to-end" in text and "top-1 agreement" in text


def test_save_load_round_trip_holds_packed_weights_only(tmp_path: Path) -> None:
    name = "llama_dynamo"
    feeds, _ = reference(name)
    compiled = infercc.compile(fixture_path(name), quantize="int4")
    in_memory = compiled.run(feeds)
    compiled.save(tmp_path / "out")
    loaded = infercc.load(tmp_path / "out")
    np.testing.assert_array_equal(loaded.run(feeds)["logits"], in_memory["logits"])
    assert loaded.diagnostics["quantize_weights"].info["layers"]  # the manifest keeps the report
    # No float initializer of the saved file equals (or is the transpose of) a quantized weight.
    source = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(fixture_path(name))).graph.initializer}
    quantized = [source[layer["weight"]] for layer in compiled.diagnostics["quantize_weights"].info["layers"]
                 if layer["weight"] in source]
    assert len(quantized) >= 15
    fingerprints = {hashlib.sha1(np.ascontiguousarray(w).tobytes()).hexdigest() for w in quantized}
    fingerprints |= {hashlib.sha1(np.ascontiguousarray(w.T).tobytes()).hexdigest() for w in quantized}
    saved = onnx.load(str(tmp_path / "out" / "model.onnx"))
    floats = [numpy_helper.to_array(i) for i in saved.graph.initializer if i.data_type == onnx.TensorProto.FLOAT
              and not i.name.endswith(("cos_cache", "sin_cache"))]  # rotary tables: positions, not weights
    assert not {hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest() for a in floats} & fingerprints
    assert sum(a.size for a in floats) < 0.25 * sum(w.size for w in quantized)  # scales and norms only


def test_same_model_and_config_give_byte_identical_weights(tmp_path: Path) -> None:
    files = []
    for i in range(2):
        infercc.compile(fixture_path("qwen2_dynamo"), quantize="int4").save(tmp_path / str(i))
        files.append((tmp_path / str(i) / "model.onnx").read_bytes())
    assert files[0] == files[1]


def test_roles_keep_and_max_error() -> None:
    kept = infercc.compile(fixture_path("llama_dynamo"), quantize="int4", quant_lm_head="keep", quant_embeddings="keep")
    record = kept.diagnostics["quantize_weights"]
    assert {layer["role"] for layer in record.info["layers"]} == {"linear"}
    assert {s["role"] for s in record.info["skipped"]} == {"lm_head", "embedding"}
    assert any("quant_lm_head is 'keep'" in r for r in record.reasons)
    assert "Gather" in kept.model.graph.op_histogram()
    # int4 weights exceed 1% relative error, int8 ones do not: every int4 weight falls back to int8
    strict = infercc.compile(fixture_path("llama_dynamo"), quantize="int4", quant_max_error=0.01, quant_int8_fraction=0)
    layers = strict.diagnostics["quantize_weights"].info["layers"]
    assert all(layer["bits"] == 8 for layer in layers) and not strict.diagnostics["quantize_weights"].info["skipped"]
    assert all("exceeds quant_max_error" in layer["fallback"] for layer in layers if layer["role"] == "linear")
    # ... and at 0.3% int8 exceeds it too: those weights stay float
    stricter = infercc.compile(fixture_path("llama_dynamo"), quantize="int4", quant_max_error=0.003)
    record = stricter.diagnostics["quantize_weights"]
    assert any("exceeds quant_max_error" in r for r in (s.reason for s in record.sites if s.reason))
    assert "MatMul" in stricter.model.graph.op_histogram()


def _tied_model(opset: int) -> onnx.ModelProto:
    """ids -> Gather(table) -> MatMul(W) + Gemm(transB=1, bias) -> MatMul(table^T copy) = logits."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((96, 64)).astype(np.float32) * 0.1
    w = rng.standard_normal((64, 80)).astype(np.float32) * 0.1
    w2 = rng.standard_normal((64, 80)).astype(np.float32) * 0.1  # Gemm weight as [N, K]
    bias = rng.standard_normal(64).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["h"], axis=0),
        helper.make_node("MatMul", ["h", "w"], ["a"]),
        helper.make_node("Reshape", ["a", "flat"], ["a2"]),
        helper.make_node("Gemm", ["a2", "w2", "bias"], ["g"], transB=1, alpha=0.5),
        helper.make_node("MatMul", ["g", "table_t"], ["logits2"]),
        helper.make_node("Reshape", ["logits2", "out_shape"], ["logits"]),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("table", table), ("w", w), ("w2", w2), ("bias", bias), ("table_t", np.ascontiguousarray(table.T)),
        ("flat", np.array([-1, 80], np.int64)), ("out_shape", np.array([2, 5, 96], np.int64)),
    ]]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2, 5])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [2, 5, 96])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


@pytest.mark.parametrize("opset", [17, 21])
@pytest.mark.parametrize("bits", ["int8", "int4"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_tied_table_shared_and_lowerings_agree(opset: int, bits: str, symmetric: bool) -> None:
    proto = _tied_model(opset)
    ids = {"ids": np.random.default_rng(1).integers(0, 96, (2, 5)).astype(np.int64)}
    options = {"quantize": bits, "quant_symmetric": symmetric, "quant_embeddings": bits, "quant_lm_head": bits}
    ort_c = infercc.compile(proto, strict=True, **options)
    onnx_c = infercc.compile(proto, strict=True, lowering="onnx", **options)
    layers = ort_c.diagnostics["quantize_weights"].info["layers"]
    assert [layer["role"] for layer in layers] == ["embedding", "linear", "linear", "lm_head"]
    assert layers[-1]["shared_with"].startswith("Gather")  # the head reuses the table's packed bytes
    packed = [v for v in ort_c.model.graph.initializers.values() if v.dtype == infercc.ir.DType.UINT8 and v.rank == 3]
    assert len(packed) == 3  # table (shared by Gather and the head), w, w2
    hist = onnx_c.model.graph.op_histogram()
    assert ("DequantizeLinear" in hist) == (opset >= 21)
    float_ref = infercc.compile(proto, optimize=False).run(ids)["logits"]
    a, b = ort_c.run(ids)["logits"], onnx_c.run(ids)["logits"]
    span = float(float_ref.max() - float_ref.min())
    assert np.abs(a - b).max() <= LOWERINGS_AGREE * span
    assert np.abs(b - float_ref).max() <= TOLERANCE[bits][0] * span


def test_tied_head_read_through_a_transpose_is_quantized() -> None:
    """x @ Transpose(table): constant folding keeps the Transpose (a second copy of a >= 1 MiB
    table), and the head still shares the table's packed bytes: no float copy is left."""
    rng = np.random.default_rng(0)
    vocab, hidden = 4200, 64
    table = (rng.standard_normal((vocab, hidden)) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], axis=0),
             helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "table_t"], ["logits"])]
    graph = helper.make_graph(nodes, "tied_t", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2, 5])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [2, 5, vocab])],
                              [numpy_helper.from_array(table, "table")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    compiled = infercc.compile(proto, quantize="int4", strict=True)
    layers = compiled.diagnostics["quantize_weights"].info["layers"]
    assert [layer["role"] for layer in layers] == ["embedding", "lm_head"] and layers[1]["shared_with"].startswith("Gather")
    graph_ops = compiled.model.graph.op_histogram()
    assert "Transpose" not in graph_ops and "MatMul" not in graph_ops
    assert "table" not in compiled.model.graph.initializers  # the float table is gone
    ids = {"ids": rng.integers(0, vocab, (2, 5)).astype(np.int64)}
    ref = infercc.compile(proto, optimize=False).run(ids)["logits"]
    got = compiled.run(ids)["logits"]
    assert np.abs(got - ref).max() <= TOLERANCE["int8"][0] * float(ref.max() - ref.min())  # table and head are int8


@pytest.mark.parametrize(("options", "match"), [
    ({"quantize": "int3"}, "quantize must be one of"),
    ({"quantize": "int4", "quant_block_size": 48}, "quant_block_size"),
    ({"quant_method": "awq"}, "quant_method"),
    ({"quant_native": "yes"}, "quant_native"),
    ({"quant_native_exact": 1}, "quant_native_exact"),
    ({"quant_native_exact": None}, "quant_native_exact"),
    ({"quant_int8_fraction": 1.5}, "quant_int8_fraction"),
    ({"quant_int8_fraction": True}, "quant_int8_fraction"),
    ({"quant_symmetric": 1}, "quant_symmetric"),
    ({"quant_lm_head": "fp16"}, "quant_lm_head"),
    ({"quant_embeddings": None}, "quant_embeddings"),
    ({"quant_max_error": 0}, "quant_max_error"),
    ({"quantize": "int8", "optimize": False}, "needs optimize=True"),
])
def test_config_validation(options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        infercc.Config(**options)


def test_check_each_pass_takes_quantization_as_the_new_reference() -> None:
    """Quantization changes numbers on purpose: the per-pass check must not roll it back, and the
    passes after it are still compared (against the quantized model)."""
    compiled = infercc.compile(fixture_path("llama_dynamo"), quantize="int8", check_each_pass=True)
    assert compiled.diagnostics["quantize_weights"].status == "applied"
    assert all(r.status != "failed" for r in compiled.diagnostics)
    assert any(n.op_type == "MatMulNBits" for n in compiled.model.graph.nodes)


def test_float_model_stays_float_by_default() -> None:
    """quantize='auto' (the default) keeps a float model float: one note, no per-site noise."""
    compiled = infercc.compile(fixture_path("bert_dynamo"))
    record = compiled.diagnostics["quantize_weights"]
    assert record.status == "skipped" and "stays float" in record.reasons[0] and len(record.reasons) == 1
    assert "com.microsoft::MatMulNBits" not in compiled.model.graph.op_histogram()


def test_none_is_off() -> None:
    compiled = infercc.compile(fixture_path("bert_dynamo"), quantize=None)
    record = compiled.diagnostics["quantize_weights"]
    assert record.status == "skipped" and "quantization is off" in record.reasons[0]
