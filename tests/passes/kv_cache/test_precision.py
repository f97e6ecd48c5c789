"""KV-cache precision: float16 and int8 caches against the uncached float32 model, over a prompt
and 32 decode steps on a left-padded batch of 4, with both lowerings.

Stated tolerances (|Δ| / max(1, |logit|) at real tokens; measured worst case in brackets):
float16 1e-3 [1.4e-4], int8 (per token and head, symmetric) 1e-2 [2.8e-3]. The reported memory
per token is checked against the layer shapes."""

from __future__ import annotations

import numpy as np
import pytest

from ._drive import compare, empty_pasts, fixture, session

TOLERANCES = {"fp16": 1e-3, "int8": 1e-2}
NAMES = ["llama_dynamo", "gpt2_torchscript", "mistral_dynamo"]  # GQA, MHA, sliding window


@pytest.mark.parametrize("lowering", ["ort", "onnx"])
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_cache_within_tolerance(name: str, dtype: str, lowering: str) -> None:
    assert compare(name, [12, 5, 9, 1], lowering=lowering, dtype=dtype) <= TOLERANCES[dtype]


def test_types_and_memory_per_token() -> None:
    layers, heads, size = 2, 2, 16
    expected = {"fp32": 4 * size, "fp16": 2 * size, "int8": size + 4}  # per head and K or V
    for dtype, per_head in expected.items():
        cm = fixture("llama_dynamo", dtype=dtype)
        info = cm.diagnostics["kv_cache_insertion"].info
        assert info["kv_cache_dtype"] == dtype
        assert info["bytes_per_token"] == layers * 2 * heads * per_head
    ins = {i["name"]: i for i in fixture("llama_dynamo", dtype="int8").inputs}
    assert ins["past_key_values.0.key"]["dtype"] == "int8"
    assert ins["past_key_values.1.value_scale"] == {"name": "past_key_values.1.value_scale", "dtype": "float",
                                                     "shape": ["batch", 2, "past_sequence", 1]}
    assert {i["dtype"] for i in fixture("llama_dynamo", dtype="fp16").inputs if i["name"].startswith("past")} == {
        "float16"}


def test_float16_cache_is_cast_around_the_kernel() -> None:
    """MultiHeadAttention computes in the model's float32: the float16 past is cast in, the present out."""
    graph = fixture("llama_dynamo", dtype="fp16").model.graph
    mha = [n for n in graph.walk() if n.op_type == "MultiHeadAttention"]
    assert mha and all(n.inputs[6].producer.op_type == "Cast" for n in mha)
    present = {v.name: v for v in graph.outputs}["present.0.key"]
    assert present.producer.op_type == "Cast" and present.dtype.name == "FLOAT16"


def test_int8_scales_grow_with_the_cache() -> None:
    sess = session(fixture("gpt2_torchscript", dtype="int8"))
    names = [o.name for o in sess.get_outputs()]
    ids = np.arange(3, 9, dtype=np.int64)[None]
    out = dict(zip(names, sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                          **empty_pasts(sess, 1)})))
    codes, scale = out["present.0.key"], out["present.0.key_scale"]
    assert codes.dtype == np.int8 and codes.shape == (1, 4, 6, 16) and scale.shape == (1, 4, 6, 1)
    assert np.abs(codes).max() == 127  # each row uses the full range
