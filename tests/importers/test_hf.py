"""Hugging Face folder import: small random LLaMA (GQA), Qwen2 (QKV bias), Mistral (sliding
window), GPT-2 and a tied SmolLM-style LLaMA built with transformers, saved as safetensors,
imported, and compared with the transformers model on a left-padded batch; plus sharded and
bfloat16 checkpoints, metadata, and malformed folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

import infercc
from infercc.errors import ModelLoadError
from infercc.importers import import_checkpoint, read_metadata

torch = pytest.importorskip("torch", reason="the HF import tests build reference models with torch")
transformers = pytest.importorskip("transformers", reason="the HF import tests need transformers")

TOLERANCE = 1e-4
#: initializer_range well above HF's 0.02 so logits are O(1) and a 1e-4 tolerance means something.
SMALL = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             initializer_range=0.2)


def make_model(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(**SMALL, num_key_value_heads=2, rope_theta=5000.0)
    elif kind == "llama_tied":
        config = transformers.LlamaConfig(**SMALL, num_key_value_heads=1, tie_word_embeddings=True, head_dim=16)
    elif kind == "qwen2":
        config = transformers.Qwen2Config(**SMALL, num_key_value_heads=2)
    elif kind == "mistral":
        config = transformers.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=4)
    elif kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if kind == "qwen2":  # HF initializes biases to zero; make them matter
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, 0.5)
    return model


def batch() -> tuple[np.ndarray, np.ndarray]:
    """Two rows, the second left-padded by 3; longer than Mistral's window of 4."""
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 100, (2, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


def hf_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Logits as HF generate computes them: position ids = cumsum(mask) - 1."""
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions))
    return out.logits.float().numpy()


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "qwen2", "mistral", "gpt2"])
def test_logits_match_transformers_on_left_padded_batch(tmp_path, kind):
    model = make_model(kind)
    model.save_pretrained(tmp_path)
    ids, mask = batch()
    expected = hf_logits(model, ids, mask)
    compiled = infercc.compile(tmp_path)
    got = compiled.run({"input_ids": ids, "attention_mask": mask})["logits"]
    real = mask.astype(bool)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got[real], expected[real], atol=TOLERANCE, rtol=0)
    # the LM head (a Reshape -> Gemm -> Reshape on rows for tied heads) runs on the last position only
    assert "computes only" in compiled.diagnostics["kv_cache_insertion"].info["logits_to_keep"]
    last = compiled.run({"input_ids": ids, "attention_mask": mask, "logits_to_keep": np.asarray(1, np.int64)})
    assert last["logits"].shape == (2, 1, expected.shape[-1])
    np.testing.assert_allclose(last["logits"][:, 0], expected[:, -1], atol=TOLERANCE, rtol=0)


def test_sharded_and_bfloat16_checkpoint(tmp_path):
    model = make_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ids, mask = batch()
    # Reload in float32: the same bf16 values widened (casting the model back would also keep the
    # bf16-rounded rotary frequencies).
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    expected = hf_logits(reloaded.eval(), ids, mask)
    got = infercc.compile(tmp_path).run({"input_ids": ids, "attention_mask": mask})["logits"]
    np.testing.assert_allclose(got[mask.astype(bool)], expected[mask.astype(bool)], atol=TOLERANCE, rtol=0)


def test_metadata_from_config_generation_and_tokenizer_config(tmp_path):
    make_model("llama").save_pretrained(tmp_path)
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 7]}))
    meta = read_metadata(import_checkpoint(tmp_path))
    assert meta["architecture"] == "llama" and meta["source_format"] == "hf"
    assert (meta["vocab_size"], meta["bos_token_id"], meta["eos_token_ids"]) == (101, 1, [2, 7])
    assert (meta["context_length"], meta["num_layers"], meta["num_kv_heads"], meta["head_dim"]) == (2048, 2, 2, 8)
    assert meta["chat_template"] == template


# -- malformed folders --------------------------------------------------------------------------
def write_config(folder, **config) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))


def test_unknown_architecture(tmp_path):
    write_config(tmp_path, model_type="bert", vocab_size=10)
    with pytest.raises(ModelLoadError, match=r"model_type 'bert' is not supported.*export that model to ONNX"):
        infercc.compile(tmp_path)


def test_missing_safetensors_and_config_fields(tmp_path):
    write_config(tmp_path, model_type="llama", vocab_size=10)
    with pytest.raises(ModelLoadError, match="has no 'num_attention_heads'"):
        import_checkpoint(tmp_path)
    make_model("llama").config.to_json_file(tmp_path / "config.json")
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weights"):
        import_checkpoint(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="save_pretrained"):
        import_checkpoint(tmp_path)


def test_missing_shard_and_missing_tensor(tmp_path):
    model = make_model("llama")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(ModelLoadError, match=r"shard\(s\).*missing"):
        import_checkpoint(tmp_path)
    single = tmp_path / "single"
    model.save_pretrained(single)
    config = json.loads((single / "config.json").read_text())
    (single / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ModelLoadError, match=r"no tensor 'model\.layers\.2\."):
        import_checkpoint(single)


def test_scaled_rope_and_config_errors(tmp_path):
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=2)
    write_config(tmp_path / "linear", **base, rope_scaling={"rope_type": "linear", "factor": 2.0})
    write_config(tmp_path / "v5", **base, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4})
    write_config(tmp_path / "gelu", **base, hidden_act="gelu")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    for name, message in (("linear", "rope scaling 'linear'"), ("v5", "rope scaling 'yarn'"),
                          ("gelu", "hidden_act 'gelu'"), ("broken", "not valid JSON")):
        (tmp_path / name / "model.safetensors").write_bytes(b"")
        with pytest.raises(ModelLoadError, match=message):
            import_checkpoint(tmp_path / name)
