"""The fuzzer's own machinery: deterministic mutations, an exact GGUF re-encoder, and a harness that
really catches each way a variant can go wrong (in real child processes that misbehave on purpose)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from tests.fixtures.catalog import fixture_path
from tests.fuzz import gguf_mutate
from tests.fuzz.child import SELFTEST
from tests.fuzz.harness import group, report, run_fuzz
from tests.fuzz.onnx_mutate import MODEL, OnnxBase, mutate_onnx
from tests.fuzz.synthetic import write_tiny_gguf


def test_harness_tells_each_failure_kind_apart(tmp_path: Path) -> None:
    outcomes = run_fuzz("selftest", tmp_path, range(len(SELFTEST)), tmp_path / "work", timeout=2, memory_gib=2)
    status = {SELFTEST[o.seed]: o.status for o in outcomes}
    assert status == {"ok": "ok", "infercc_error": "error", "value_error": "bad", "abort": "crash", "hang": "timeout",
                      "huge_allocation": "bad", "escape": "accepted"}, outcomes
    by_kind = {SELFTEST[o.seed]: o for o in outcomes}
    assert by_kind["huge_allocation"].type.endswith("MemoryError")
    assert "SIGABRT" in by_kind["abort"].message and by_kind["abort"].note == "alone: crash"
    assert by_kind["value_error"].where is None and by_kind["value_error"].frames[-1].endswith("_selftest")
    text = report("selftest", tmp_path, outcomes, tmp_path)
    assert text.startswith(f"5 of {len(SELFTEST)} selftest variants") and len(group(outcomes)) == 5


@pytest.fixture(scope="module")
def tiny_layout(tmp_path_factory: pytest.TempPathFactory) -> gguf_mutate.Layout:
    path = write_tiny_gguf(tmp_path_factory.mktemp("layout") / "tiny.gguf")
    return gguf_mutate.parse(path.read_bytes())


def test_gguf_layout_reencodes_the_file_exactly(tiny_layout: gguf_mutate.Layout) -> None:
    assert gguf_mutate.assemble(tiny_layout, tiny_layout.kvs, tiny_layout.tensors) == tiny_layout.data
    labels = {s.label for s in tiny_layout.slots}
    assert {"kv[llama.block_count]", "tensor[blk.0.attn_q.weight].dim1", "header.kv_count"} <= labels


def test_gguf_mutations_are_deterministic_and_change_the_file(tiny_layout: gguf_mutate.Layout) -> None:
    for seed in range(40):
        data, text = gguf_mutate.mutate_gguf(tiny_layout, seed)
        assert (data, text) == gguf_mutate.mutate_gguf(tiny_layout, seed)
        assert data != tiny_layout.data or "->" in text, (seed, text)  # a slot set to its own value is a no-op


def test_onnx_mutations_are_deterministic() -> None:
    base = OnnxBase.load(fixture_path("gpt2_torchscript"))
    assert base.structure[0][0] == 0 and sum(b - a for a, b in base.structure) < len(base.files[base.model_file]) / 2
    for seed in range(20):
        files, text = mutate_onnx(base, seed)
        again, text_again = mutate_onnx(base, seed)
        assert text == text_again and files == again, seed
        if isinstance(files[MODEL], bytes) and "truncate" not in text and "chunk" not in text:
            try:
                onnx.load_model_from_string(files[MODEL])
            except Exception:  # a flipped bit may break the protobuf, deep nesting its depth limit
                assert "flip" in text or "overwrite" in text or "deep_nesting" in text, text
