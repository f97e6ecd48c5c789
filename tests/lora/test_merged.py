"""The merged-weight cache: an adapter that runs whole batches alone gets a copy of the base graph
with W + s B A merged in (float, or requantized on an int8 grid), within PEFT's tolerance of PEFT's
merge_and_unload; hits and misses are counted; the LRU budget evicts; removing drops the copy."""

from __future__ import annotations

import numpy as np
import pytest

from infercc.ir.onnx_save import weight_bytes
from infercc.lora.merged import BUILD_AFTER
from tests.lora._data import TOL, compiled, prompt, references


def _prefill(model, adapter):
    with model.session() as session:
        return session.sequence(adapter=adapter).prefill(prompt("llama"), all_logits=True)


def test_merged_copy_matches_peft_merge_and_is_counted() -> None:
    one_copy = weight_bytes(compiled("llama", backend="ort").model) * 3 // 2  # room for one merged copy, not two
    model = compiled("llama", "a", "b", backend="ort", lora_merged_cache_bytes=one_copy)
    for _ in range(BUILD_AFTER - 1):
        np.testing.assert_allclose(_prefill(model, "a"), references()["llama/a"], atol=TOL, rtol=0)
    stats = model.lora.stats()["merged_cache"]
    assert (stats["hits"], stats["builds"]) == (0, 0)
    np.testing.assert_allclose(_prefill(model, "a"), references()["llama/a/merged"], atol=TOL, rtol=0)  # built now
    np.testing.assert_allclose(_prefill(model, "a"), references()["llama/a/merged"], atol=TOL, rtol=0)  # a hit
    stats = model.lora.stats()["merged_cache"]
    assert stats["builds"] == 1 and stats["hits"] == 1 and stats["cached"] == ["a"]
    for _ in range(BUILD_AFTER):  # a second copy does not fit beside the first: the LRU one goes
        _prefill(model, "b")
    stats = model.lora.stats()["merged_cache"]
    assert stats["cached"] == ["b"] and stats["evictions"] == 1
    np.testing.assert_allclose(_prefill(model, "b"), references()["llama/b/merged"], atol=TOL, rtol=0)
    model.remove_adapter("b")
    assert model.lora.stats()["merged_cache"]["cached"] == []


def test_mixed_batches_never_use_a_merged_copy() -> None:
    model = compiled("llama", "a", "c", backend="ort", lora_merged_cache_bytes=1 << 20)
    for _ in range(BUILD_AFTER + 1):
        _prefill(model, "a")
    model.generate([prompt("llama")] * 2, adapter="c", max_new_tokens=2)  # (c has no copy yet: misses)
    with model.session() as session:
        rows = [session.sequence(adapter=name) for name in ("a", "c")]
        before = model.lora.stats()["merged_cache"]
        rows[0].prefill(prompt("llama"))  # "a" alone: a hit
        rows[1].prefill(prompt("llama"))  # "c" alone: a miss
        middle = model.lora.stats()["merged_cache"]
        assert (middle["hits"], middle["misses"]) == (before["hits"] + 1, before["misses"] + 1)
        session.decode(rows)  # a mixed step: the deltas, no merged copy looked up
        after = model.lora.stats()["merged_cache"]
        assert (after["hits"], after["misses"]) == (middle["hits"], middle["misses"])


def test_int8_base_is_merged_on_its_grid() -> None:
    refs = references()
    model = compiled("llama", "a", backend="ort", quantize="int8", quant_method="rtn", lora_merged_cache_bytes=1 << 20)
    base = _prefill(model, None)
    for _ in range(BUILD_AFTER + 1):
        out = _prefill(model, "a")
    assert model.lora.stats()["merged_cache"]["hits"] == 1
    np.testing.assert_allclose(out - base, refs["llama/a"] - refs["llama/base"], atol=2e-2, rtol=0)


@pytest.mark.parametrize(("options", "tol"), [
    ({}, TOL), pytest.param({"quantize": "int8", "quant_method": "rtn"}, 2e-2, marks=pytest.mark.slow, id="int8")])
def test_generated_c_paged_merged_copy(options: dict, tol: float) -> None:
    """On the generated-C runtime the merged copy is its own paged library; int8 weights (our
    MatMulQuant) are merged on their grid too (under -m slow: two more C builds)."""
    model = compiled("llama", "a", backend="c", lora_merged_cache_bytes=1 << 22, **options)
    base = _prefill(model, None)
    for _ in range(BUILD_AFTER + 1):
        out = _prefill(model, "a")
    stats = model.lora.stats()["merged_cache"]
    assert (stats["builds"], stats["hits"]) == (1, 1), stats
    np.testing.assert_allclose(out - base, references()["llama/a"] - references()["llama/base"], atol=tol, rtol=0)
