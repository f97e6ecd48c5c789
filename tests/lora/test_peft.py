"""Adapter folders are hostile input: each broken one gets an error naming the problem, and a
refused adapter leaves nothing loaded."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from infercc.lora import AdapterError, read_adapter
from tests.lora._data import DATA, compiled, prompt

A = DATA / "llama" / "a"


@pytest.fixture(scope="module")
def model():
    return compiled("llama", backend="ort")


def _copy(tmp_path: Path, src: Path = A) -> Path:
    return Path(shutil.copytree(src, tmp_path / "adapter"))


def _rewrite(folder: Path, change) -> None:
    from infercc.lora.peft import read_safetensors

    tensors = read_safetensors(folder / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def test_reads_rank_alpha_scaling_and_modules() -> None:
    adapter = read_adapter(A)
    assert (adapter.rank, adapter.alpha, adapter.scaling) == (4, 8.0, 2.0)
    assert "model.layers.1.mlp.down_proj" in adapter.modules and len(adapter.modules) == 14
    rs = read_adapter(DATA / "llama" / "b")  # use_rslora: alpha / sqrt(r)
    assert rs.scaling == pytest.approx(16 / 8 ** 0.5)
    gpt2 = read_adapter(DATA / "gpt2" / "a")  # transformer. prefix dropped, as the importer names weights
    assert "h.0.attn.c_attn" in gpt2.modules


@pytest.mark.parametrize("name", ["../x", "a;b", "", "1abc", "a b", "x" * 65, None])
def test_hostile_names_are_refused(model, name) -> None:
    with pytest.raises(AdapterError, match="adapter name"):
        model.add_adapter(name, A)
    assert model.adapters == []


def test_missing_files(model, tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="not a folder"):
        model.add_adapter("x", tmp_path / "nowhere")
    folder = _copy(tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors: no such file"):
        model.add_adapter("x", folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json: no such file"):
        model.add_adapter("x", folder)
    assert model.adapters == []


def test_weights_linked_outside_the_folder_are_refused(model, tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    (folder / "adapter_model.safetensors").rename(outside)
    (folder / "adapter_model.safetensors").symlink_to(outside)
    with pytest.raises(AdapterError, match="outside the model folder"):
        model.add_adapter("x", folder)


@pytest.mark.parametrize("damage, match", [
    (lambda b: b[:5], "too short"),
    (lambda b: struct.pack("<Q", 1 << 40) + b[8:], "header claims"),
    (lambda b: b[:8] + b"{" * 4 + b[12:], "not valid JSON"),
    (lambda b: b[:-100], "truncated or corrupted"),
])
def test_corrupted_safetensors(model, tmp_path: Path, damage, match) -> None:
    folder = _copy(tmp_path)
    path = folder / "adapter_model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(AdapterError, match=match):
        model.add_adapter("x", folder)
    assert model.adapters == []


def test_wrong_target_names_the_module_and_loads_nothing(model, tmp_path: Path) -> None:
    folder = _copy(tmp_path)

    def rename(tensors):
        for half in "AB":
            tensors[f"base_model.model.model.layers.1.mlp.gate_projx.lora_{half}.weight"] = \
                tensors.pop(f"base_model.model.model.layers.1.mlp.gate_proj.lora_{half}.weight")

    _rewrite(folder, rename)
    with pytest.raises(AdapterError, match="'model.layers.1.mlp.gate_projx' is not a projection of this model"):
        model.add_adapter("x", folder)
    assert model.adapters == []


def test_wrong_shape_names_the_module(model, tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    key = "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"
    _rewrite(folder, lambda t: t.__setitem__(key, np.zeros((31, 4), np.float32)))
    with pytest.raises(AdapterError, match=r"'model.layers.0.self_attn.o_proj' has lora_A \[4, 32\] and lora_B \[31, 4\]"):
        model.add_adapter("x", folder)


def test_rank_above_the_limit(tmp_path: Path) -> None:
    model = compiled("llama", backend="ort", max_lora_rank=4)
    model.add_adapter("a", A)  # r = 4: fits
    with pytest.raises(AdapterError, match="r=8 is above Config.max_lora_rank=4"):
        model.add_adapter("b", DATA / "llama" / "b")
    assert model.adapters == ["a"]


@pytest.mark.parametrize("field, value", [("use_dora", True), ("r", 0), ("peft_type", "IA3"), ("bias", "all"),
                                          ("lora_alpha", "big")])
def test_unsupported_or_bad_config(model, tmp_path: Path, field, value) -> None:
    folder = _copy(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config[field] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=field):
        model.add_adapter("x", folder)


def test_add_remove_and_base_unchanged(tmp_path: Path) -> None:
    model = compiled("llama", backend="ort")
    ids = prompt("llama")
    with model.session() as session:
        before = session.sequence().prefill(ids, all_logits=True)
        model.add_adapter("a", A)
        with pytest.raises(AdapterError, match="already loaded"):
            model.add_adapter("a", A)
        seq = session.sequence(adapter="a")
        seq.prefill(ids)
        with pytest.raises(AdapterError, match="in use by 1"):
            model.remove_adapter("a")
        seq.close()
        model.remove_adapter("a")
        assert model.adapters == []
        after = session.sequence().prefill(ids, all_logits=True)
    np.testing.assert_array_equal(before, after)
    with pytest.raises(AdapterError, match="no adapter named 'a'"):
        model.remove_adapter("a")
    with pytest.raises(Exception, match="no adapter named 'zzz' is loaded"):
        model.generate(ids, adapter="zzz", max_new_tokens=2)
