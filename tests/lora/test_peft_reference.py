"""infercc's logits with PEFT adapters against PEFT's own torch forward (committed references):
every adapter of the tiny LLaMA, Qwen2 (q/k/v biases) and GPT-2 (fused c_attn, Conv1D
fan_in_fan_out), unmerged and merged, and both compositions, on ONNX Runtime and on the
generated-C runtime (whose adapter rows run the ORT variant)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.lora._data import ADAPTERS, TOL, compiled, prompt, references


def _logits(model, arch, **selection) -> np.ndarray:
    with model.session() as session:
        return session.sequence(**selection).prefill(prompt(arch), all_logits=True)


@pytest.mark.parametrize("arch", list(ADAPTERS))
def test_each_adapter_matches_peft(arch: str) -> None:
    refs = references()
    model = compiled(arch, *ADAPTERS[arch], backend="ort")
    base = _logits(model, arch)
    np.testing.assert_allclose(base, refs[f"{arch}/base"], atol=TOL, rtol=0)
    for name in ADAPTERS[arch]:
        out = _logits(model, arch, adapter=name)
        assert np.abs(out - base).max() > 0.1, f"adapter {name} changes nothing (B is non-zero)"
        np.testing.assert_allclose(out, refs[f"{arch}/{name}"], atol=TOL, rtol=0, err_msg=f"{arch}/{name}")
        np.testing.assert_allclose(out, refs[f"{arch}/{name}/merged"], atol=TOL, rtol=0, err_msg=f"{arch}/{name} merged")


@pytest.mark.parametrize("mode", ["stack", "merge"])
def test_compositions_match_peft(mode: str) -> None:
    """stack = PEFT add_weighted_adapter(cat); merge = combination_type="linear"."""
    model = compiled("llama", "a", "c", backend="ort", lora_composition=mode)
    out = _logits(model, "llama", adapter=["a", "c"], adapter_weights=[0.7, -0.4])
    np.testing.assert_allclose(out, references()[f"llama/{mode}"], atol=TOL, rtol=0)


def test_stack_and_merge_differ() -> None:
    """The two compositions are different functions (merge has cross terms), so the references
    above tell them apart."""
    refs = references()
    assert np.abs(refs["llama/stack"] - refs["llama/merge"]).max() > 1e-2


def test_generated_c_model_serves_adapters() -> None:
    """backend="c": the LoRA variant is built by the generated-C runtime too (its deltas are plain
    MatMul/Mul kernels), said in the diagnostics."""
    model = compiled("llama", "a", backend="c")
    assert model.runtime == "c" and "generated-C" in model.diagnostics.facts["lora"]
    np.testing.assert_allclose(_logits(model, "llama", adapter="a"), references()["llama/a"], atol=TOL, rtol=0)
    np.testing.assert_allclose(_logits(model, "llama"), references()["llama/base"], atol=TOL, rtol=0)
    from infercc.runtime.c_backend import CBackend

    assert all(isinstance(b, CBackend) for b in model.lora._backends.values())


def test_quantized_base_gets_a_float_delta() -> None:
    """int8 weights (MatMulNBits, q/k/v and gate/up packed): the delta lands beside the quantized
    product, so adapter minus base equals PEFT's delta up to the rounding of the base."""
    refs = references()
    model = compiled("llama", "a", backend="ort", quantize="int8", quant_method="rtn")
    assert any(n.op_type == "MatMulNBits" for n in model.model.graph.nodes)
    delta = _logits(model, "llama", adapter="a") - _logits(model, "llama")
    np.testing.assert_allclose(delta, refs["llama/a"] - refs["llama/base"], atol=2e-2, rtol=0)
