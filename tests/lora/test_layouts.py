"""Adapters beyond the paged HF path: sequences on the contiguous layout, and a model imported
from a GGUF file (its projections carry the checkpoint's module names too)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import infercc
from infercc.lora import LoraModule
from infercc.lora.peft import write_adapter
from tests.fuzz.synthetic import write_tiny_gguf
from tests.lora._data import TOL, compiled, prompt, references


def test_contiguous_layout_sequences_match_peft() -> None:
    model = compiled("llama", "a", backend="ort", kv_cache_layout="contiguous")
    with model.session() as session:
        assert session.layout == "contiguous"
        seq = session.sequence(adapter="a")
        np.testing.assert_allclose(seq.prefill(prompt("llama"), all_logits=True), references()["llama/a"],
                                   atol=TOL, rtol=0)
        child = seq.fork()
        assert child.adapter is seq.adapter and child.decode() == seq.decode()
        seq.set_adapter(None)  # the prefix is computed again by the base model
        base = session.sequence()
        base.prefill(seq.tokens)
        np.testing.assert_allclose(seq.logits, base.logits, atol=1e-5)
        child.close()
    model.remove_adapter("a")  # every holder released it


def test_gguf_model_takes_an_adapter(tmp_path: Path) -> None:
    model = infercc.compile(write_tiny_gguf(tmp_path / "tiny.gguf"), infercc.Config(quantize=None))
    modules = model.lora.modules
    assert "model.layers.0.self_attn.q_proj" in modules and "model.layers.0.mlp.down_proj" in modules
    rng = np.random.default_rng(0)
    sites = {name: site for site in model.lora._sites for name, _ in site.sources}
    factors = {}
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"):
        site = sites[module + ".weight"]
        begin, end = site.columns(module + ".weight")
        factors[module] = LoraModule(rng.standard_normal((2, site.in_features)).astype(np.float32),
                                     rng.standard_normal((end - begin, 2)).astype(np.float32))
    model.add_adapter("x", write_adapter(tmp_path / "x", factors, alpha=2))
    ids = [1, 5, 9, 14, 3]
    with model.session() as session:
        base = session.sequence().prefill(ids, all_logits=True)
        adapted = session.sequence(adapter="x").prefill(ids, all_logits=True)
    assert np.abs(adapted - base).max() > 1e-2
    # zero B (PEFT's own initialization): exactly the base model
    zero = {m: LoraModule(f.a, np.zeros_like(f.b)) for m, f in factors.items()}
    model.add_adapter("zero", write_adapter(tmp_path / "zero", zero, alpha=2))
    with model.session() as session:
        np.testing.assert_array_equal(session.sequence(adapter="zero").prefill(ids, all_logits=True), base)


def _random_adapter(model, folder: Path, seed: int = 0) -> Path:
    """A PEFT folder of random rank-2 factors for every projection, named as in the HF model
    (``model.layers.0.self_attn.q_proj``: an export's ``model.`` wrapper scope is matched as a suffix)."""
    rng = np.random.default_rng(seed)
    factors = {}
    for site in model.lora._sites:
        for weight, width in site.sources:
            module = weight.removesuffix(".weight").removeprefix("model.")
            factors[module] = LoraModule(rng.standard_normal((2, site.in_features)).astype(np.float32) * 0.3,
                                         rng.standard_normal((width, 2)).astype(np.float32) * 0.3)
    return write_adapter(folder, factors, alpha=2)


def test_onnx_exports_find_modules_from_the_exporters_names(tmp_path: Path) -> None:
    """torch.onnx's dynamo and TorchScript exports of one HF model: their weights have no module
    names, the nodes do; the same adapter gives both the same logits."""
    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "data"
    models = [infercc.compile(fixtures / f"llama_{exporter}.onnx") for exporter in ("dynamo", "torchscript")]
    assert all("model.model.layers.1.mlp.down_proj" in m.lora.modules for m in models)
    folder = _random_adapter(models[0], tmp_path / "a")
    ids = [[1, 5, 9, 14, 3, 7]]
    outs = []
    for model in models:
        model.add_adapter("a", folder)
        with model.session() as session:
            base = session.sequence().prefill(ids[0], all_logits=True)
            adapted = session.sequence(adapter="a").prefill(ids[0], all_logits=True)
        assert np.abs(adapted - base).max() > 1e-2
        outs.append((base, adapted))
    np.testing.assert_allclose(outs[0][0], outs[1][0], atol=1e-4)  # one model, two exports
    np.testing.assert_allclose(outs[0][1], outs[1][1], atol=1e-4)
