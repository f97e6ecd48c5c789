"""The cached graph's interface, the diagnostics, and the graphs the pass leaves alone (encoders,
models that already have a cache, masks read from the token ids), a source without a mask, and a
real imported checkpoint (stories260K GGUF: cached greedy decoding equals uncached)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import infercc
from infercc import Config
from infercc.errors import ConfigError, InputError
from tests.fixtures import catalog
from tests.importers._models import STORIES, require

from ._drive import TOLERANCE, empty_pasts, fixture, real_diff, run_cached, run_uncached, sequence, session


def _record(cm):
    return cm.diagnostics["kv_cache_insertion"]


def test_interface_follows_the_contract() -> None:
    cm = fixture("llama_dynamo")
    ins = {i["name"]: i for i in cm.inputs}
    outs = {o["name"]: o for o in cm.outputs}
    assert list(ins)[:2] == ["input_ids", "attention_mask"]
    assert ins["input_ids"] == {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}
    assert ins["attention_mask"] == {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total_sequence"]}
    assert outs["logits"]["shape"] == ["batch", "kept_sequence", 256]  # logits_to_keep (0 = seq)
    for layer in range(2):
        for what in ("key", "value"):
            assert ins[f"past_key_values.{layer}.{what}"]["shape"] == ["batch", 2, "past_sequence", 16]
            assert outs[f"present.{layer}.{what}"]["shape"] == ["batch", 2, "total_sequence", 16]
            assert ins[f"past_key_values.{layer}.{what}"]["dtype"] == outs[f"present.{layer}.{what}"]["dtype"] == "float"
    assert len(ins) == 6 and len(outs) == 5


def test_diagnostics_record_every_layer_and_the_memory() -> None:
    record = _record(fixture("qwen2_torchscript"))
    assert [s.status for s in record.sites] == ["applied", "applied"]
    assert record.info["bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # layers, K and V, kv heads, head size, fp32
    assert record.info["kv_cache_dtype"] == "fp32"
    assert any(m.startswith("rotary factors") for m in record.info["metadata"])
    assert any(m.startswith("attention mask") and "from attention_mask" in m for m in record.info["metadata"])
    assert "bytes per token" in record.reasons[0]


@pytest.mark.parametrize("name", catalog.list_fixtures(kind="encoder"))
def test_encoder_is_left_alone(name: str) -> None:
    cm = fixture(name)
    record = _record(cm)
    assert record.status == "skipped" and "bidirectional" in record.reasons[0]
    assert record.sites and all(s.status == "skipped" and "bidirectional" in s.reason for s in record.sites)
    assert [i["name"] for i in cm.inputs] == ["input_ids", "attention_mask", "token_type_ids"]


def test_model_with_a_cache_is_left_alone() -> None:
    again = infercc.compile(fixture("gpt2_dynamo").to_onnx(), provider="cpu", kv_cache=True)
    assert "already takes a cache" in _record(again).reasons[0]


def test_switched_off() -> None:
    cm = fixture("llama_dynamo", kv=False)
    assert [i["name"] for i in cm.inputs] == ["input_ids", "attention_mask"]
    assert "off" in _record(cm).reasons[0]


def test_config_is_validated() -> None:
    assert Config().kv_cache is True and Config().kv_cache_dtype == "auto"  # on by default
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        Config(kv_cache_dtype="int4")
    with pytest.raises(ConfigError, match="kv_cache"):
        Config(kv_cache=1)


def _without_mask_input(name: str, mask_from_ids: bool) -> onnx.ModelProto:
    """The fixture with attention_mask computed inside: all ones, or ``input_ids != 0``."""
    proto = onnx.load(str(catalog.fixture_path(name)))
    graph = proto.graph
    kept = [i for i in graph.input if i.name != "attention_mask"]
    del graph.input[:]
    graph.input.extend(kept)
    if mask_from_ids:
        nodes = [helper.make_node("Equal", ["input_ids", "zero_id"], ["is_pad"]),
                 helper.make_node("Not", ["is_pad"], ["is_real"]),
                 helper.make_node("Cast", ["is_real"], ["attention_mask"], to=TensorProto.INT64)]
        graph.initializer.append(helper.make_tensor("zero_id", TensorProto.INT64, [], [0]))
    else:
        nodes = [helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
                 helper.make_node("ConstantOfShape", ["ids_shape"], ["attention_mask"],
                                  value=helper.make_tensor("one", TensorProto.INT64, [1], [1]))]
    for node in reversed(nodes):
        graph.node.insert(0, node)
    return proto


def test_source_without_a_mask_gets_one() -> None:
    source = _without_mask_input("llama_torchscript", mask_from_ids=False)
    cm = infercc.compile(source, provider="cpu", strict=True, kv_cache=True)
    plain = infercc.compile(source, provider="cpu", strict=True, kv_cache=False)
    assert "all ones" in _record(cm).info["attention_mask"]
    ids, mask, width = sequence(256, [9], 16)
    got = run_cached(cm, ids, mask, [width] + [1] * 16)
    expected = session(plain).run(["logits"], {"input_ids": ids})[0]
    assert real_diff(got, expected, mask) <= TOLERANCE


def test_mask_read_from_the_token_ids_is_refused() -> None:
    cm = infercc.compile(_without_mask_input("gpt2_torchscript", mask_from_ids=True), provider="cpu", strict=True,
                         kv_cache=True)
    record = _record(cm)
    assert record.status == "skipped" and "input_ids" in record.reasons[0]
    assert all(s.status == "skipped" for s in record.sites)
    assert [i["name"] for i in cm.inputs] == ["input_ids"]


def test_imported_checkpoint_greedy_equals_uncached() -> None:
    """stories260K (GGUF, positions cumsum(mask) - 1 inside): 32 greedy tokens, cached = uncached."""
    path = str(require(STORIES))
    cached = session(infercc.compile(path, provider="cpu", strict=True, kv_cache=True))
    plain = session(infercc.compile(path, provider="cpu", strict=True, kv_cache=False))
    prompt = [1, 403, 407, 261, 378]
    ids = list(prompt)
    for _ in range(32):
        row = np.asarray([ids])
        ids.append(int(plain.run(["logits"], {"input_ids": row, "attention_mask": np.ones_like(row)})[0][0, -1].argmax()))
    names = [o.name for o in cached.get_outputs()]
    pasts, tokens, new = empty_pasts(cached, 1), list(prompt), list(prompt)
    for _ in range(32):
        feeds = {"input_ids": np.asarray([new]), "attention_mask": np.ones((1, len(tokens)), np.int64), **pasts}
        out = dict(zip(names, cached.run(None, feeds)))
        pasts = {n: out["present." + n[len("past_key_values."):]] for n in pasts}
        new = [int(out["logits"][0, -1].argmax())]
        tokens += new
    assert tokens == ids


def test_imported_checkpoint_left_padded_batch() -> None:
    path = str(require(STORIES))
    cm = infercc.compile(path, provider="cpu", strict=True, kv_cache=True)
    plain = infercc.compile(path, provider="cpu", strict=True, kv_cache=False)
    ids, mask, width = sequence(512, [6, 2, 4], 10)
    got = run_cached(cm, ids, mask, [width] + [1] * 10)
    assert real_diff(got, run_uncached(plain, ids, mask), mask) <= TOLERANCE


def test_checked_compilation_keeps_the_cache() -> None:
    """check_each_pass compares the cached graph, called with an empty past, with the source."""
    cm = infercc.compile(str(catalog.fixture_path("llama_dynamo")), provider="cpu", check_each_pass=True, kv_cache=True)
    assert _record(cm).status == "applied"
    assert all(r.status != "failed" for r in cm.diagnostics.records)


def test_stateless_run_starts_an_empty_cache() -> None:
    cm = fixture("gpt2_dynamo")
    feeds, stored = catalog.reference("gpt2_dynamo")
    out = cm.run(feeds)
    assert out["present.1.value"].shape == (2, 4, 16, 16)
    real = feeds["attention_mask"].astype(bool)  # padded positions are unspecified (passes/kv_cache/gqa.py)
    assert float(np.abs(out["logits"] - stored["logits"])[real].max()) <= TOLERANCE
    with pytest.raises(InputError, match="attention_mask"):
        cm.run({**feeds, **empty_pasts(session(cm), 2), "attention_mask": feeds["attention_mask"][:, 1:]})


def test_tokens_mixed_outside_attention_are_refused() -> None:
    """A CumSum over the sequence (a recurrence the cache does not keep) leaves the model alone."""
    proto = onnx.load(str(catalog.fixture_path("gpt2_torchscript")))
    for node in proto.graph.node:
        node.output[:] = ["logits_pre" if o == "logits" else o for o in node.output]
    proto.graph.initializer.append(helper.make_tensor("seq_axis", TensorProto.INT64, [], [1]))
    proto.graph.node.append(helper.make_node("CumSum", ["logits_pre", "seq_axis"], ["logits"]))
    cm = infercc.compile(proto, provider="cpu", strict=True, kv_cache=True)
    assert "CumSum" in _record(cm).reasons[0] and [i["name"] for i in cm.inputs] == ["input_ids", "attention_mask"]
