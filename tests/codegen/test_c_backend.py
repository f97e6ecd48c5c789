"""The generated-C runtime against ONNX Runtime on the same compiled graphs: every fixture (both
exporters), every architecture fixture, quantized weights, KV caches in fp32/fp16/int8, greedy
generation with padded batches, and a real checkpoint (stories260K). Padded positions are compared
only where they are defined (a query row with no visible key is unspecified: see attention_op)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

import infercc
from infercc.passes.lowering import lower_for_ort
from infercc.runtime.feeds import check_feeds
from infercc.runtime.ort_backend import OrtBackend
from tests.fixtures import catalog
from tests.importers._models import STORIES, require

TOLERANCE = 1e-4
ARCHITECTURES = sorted(p.stem for p in (Path(catalog.__file__).parent / "architectures").glob("*.onnx"))
#: Default run: one exporter per fixture family (decoders with rotary, learned positions, partial
#: rotary; encoders) and the architectures whose attention differs most (ALiBi, relative position,
#: softcap + sliding window, MQA, fused-QKV phi3); the others (each two gcc builds) behind -m slow.
SLOW_FIXTURES = {"bert_torchscript", "gpt2_torchscript", "gpt_neox_dynamo", "llama_torchscript", "mistral_torchscript",
                 "phi_dynamo", "qwen2_dynamo"}
SLOW_ARCHITECTURES = {"codegen", "distilbert", "falcon", "gemma", "gptj", "mpt", "olmo", "opt", "roberta", "stablelm",
                      "starcoder2"}


def _default_or_slow(names: list[str], slow: set[str]) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in names]


@functools.cache
def pair(source: str, **options) -> tuple[infercc.CompiledModel, infercc.CompiledModel]:
    """(ONNX Runtime, generated C) compiles of one source with the same options (a float32 cache
    unless asked)."""
    options = {"kv_cache_dtype": "fp32", **options}
    return infercc.compile(source, **options), infercc.compile(source, backend="c", **options)


def _compare(ort_out: dict, c_out: dict, mask: np.ndarray | None, tolerance: float) -> None:
    assert ort_out.keys() == c_out.keys()
    for name, expected in ort_out.items():
        got = c_out[name]
        assert got.shape == expected.shape and got.dtype == expected.dtype, name
        real = None if mask is None else mask.astype(bool)
        if real is not None and expected.ndim == 3 and expected.shape[:2] == mask.shape:  # real positions only
            expected, got = expected[real], got[real]
        elif real is not None and expected.ndim == 4 and (expected.shape[0], expected.shape[2]) == mask.shape:
            expected, got = expected.transpose(0, 2, 1, 3)[real], got.transpose(0, 2, 1, 3)[real]  # cache rows
        np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=0, atol=tolerance, err_msg=name)


@pytest.mark.parametrize("name", _default_or_slow(catalog.list_fixtures(), SLOW_FIXTURES))
def test_fixture_outputs_equal_ort(name: str) -> None:
    ort_model, c_model = pair(str(catalog.fixture_path(name)))
    assert c_model.runtime == "c", c_model.runtime_reason
    feeds = catalog.random_feeds(name, 2, 5, padding=True, seed=3)
    _compare(ort_model.run(feeds), c_model.run(feeds), feeds.get("attention_mask"), TOLERANCE)


@pytest.mark.parametrize("name", _default_or_slow(ARCHITECTURES, SLOW_ARCHITECTURES))
def test_architecture_outputs_equal_ort(name: str) -> None:
    ort_model, c_model = pair(str(Path(catalog.__file__).parent / "architectures" / f"{name}.onnx"))
    assert c_model.runtime == "c", c_model.runtime_reason
    ids = np.random.default_rng(0).integers(3, 60, (2, 6))
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    feeds = {k: v for k, v in {"input_ids": ids, "attention_mask": mask}.items() if k in {i["name"] for i in ort_model.inputs}}
    _compare(ort_model.run(feeds), c_model.run(feeds), mask, TOLERANCE)


#: Default run: one fixture per precision (each pair is two builds); the rest behind -m slow.
QUANT_CASES = [("llama_dynamo", "int4"), ("gpt2_torchscript", "int8"),
               *(pytest.param(n, q, marks=pytest.mark.slow) for n, q in
                 [("llama_dynamo", "int8"), ("gpt2_torchscript", "int4"), ("phi_dynamo", "int4"), ("phi_dynamo", "int8")])]
#: Default run: three exporter/architecture kinds of decoder; every decoder fixture with -m slow.
PADDED_DEFAULT = {"llama_dynamo", "gpt2_dynamo", "phi_torchscript"}


@pytest.mark.parametrize(("name", "quantize"), QUANT_CASES)
def test_quantized_weights_equal_ort_matmulnbits(name: str, quantize: str) -> None:
    """The C kernels quantize activations to int8 per block and take integer dot products, as ORT's
    MatMulNBits does at its accuracy level 4: both agree to float rounding (measured <= 2.4e-7),
    while either is ~4e-3..7e-3 from the exact dequantized product (the activation rounding)."""
    ort_model, c_model = pair(str(catalog.fixture_path(name)), quantize=quantize)
    assert c_model.runtime == "c", c_model.runtime_reason
    assert any(n.op_type == "MatMulQuant" for n in c_model.model.graph.nodes)
    feeds = catalog.random_feeds(name, 2, 5, padding=True, seed=4)
    _compare(ort_model.run(feeds), c_model.run(feeds), feeds.get("attention_mask"), TOLERANCE)
    exact = OrtBackend(lower_for_ort(c_model.model, c_model.config.replace(lowering="onnx")), ["CPUExecutionProvider"])
    _compare(exact.run(check_feeds(c_model.model.graph, feeds)), c_model.run(feeds), feeds.get("attention_mask"), 2e-2)


@pytest.mark.parametrize("name", [n if n in PADDED_DEFAULT else pytest.param(n, marks=pytest.mark.slow)
                                  for n in catalog.list_fixtures(kind="decoder")])
def test_greedy_generation_equals_ort_on_a_padded_batch(name: str) -> None:
    ort_model, c_model = pair(str(catalog.fixture_path(name)))
    prompts = [[5, 9, 13, 2, 7], [11, 4]]
    expected = [r.token_ids for r in ort_model.generate(prompts, max_new_tokens=10)]
    assert [r.token_ids for r in c_model.generate(prompts, max_new_tokens=10)] == expected


@pytest.mark.parametrize("kv", ["fp16", "int8"])
def test_smaller_kv_caches_generate_the_same_tokens(kv: str) -> None:
    ort_model, c_model = pair(str(catalog.fixture_path("llama_dynamo")), kv_cache_dtype=kv)
    assert c_model.runtime == "c", c_model.runtime_reason
    prompts = [[5, 9, 13, 2, 7], [11, 4]]
    expected = [r.token_ids for r in ort_model.generate(prompts, max_new_tokens=10)]
    assert [r.token_ids for r in c_model.generate(prompts, max_new_tokens=10)] == expected


def test_stories260k_greedy_text_equals_ort() -> None:
    path = require(STORIES)
    ort_model, c_model = pair(path)
    assert c_model.runtime == "c", c_model.runtime_reason
    expected = ort_model.generate("Once upon a time", max_new_tokens=40)
    got = c_model.generate("Once upon a time", max_new_tokens=40)
    assert got.token_ids == expected.token_ids and got.text == expected.text

