"""Hostile and broken checkpoints: every file is real (GGUFs written with gguf's GGUFWriter, HF
folders with config.json and safetensors, real symbolic links), and each must end in one
ModelLoadError naming the file, the field and the fix: no traceback from deep inside, no read
outside the model's folder, and no hang (each refusal is timed)."""

from __future__ import annotations

import json
import os
import struct
import time
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from infercc.errors import ModelLoadError
from infercc.importers import import_checkpoint, read_metadata
from infercc.runtime.tokenizer import Tokenizer

T = gguf.GGUFValueType
#: A hang check: refusing must take well under this many seconds of the process's CPU time (a
#: runaway loop or allocation burns CPU; the wall clock also counts other work on a shared machine).
FAST = 1.0
VOCAB, HIDDEN, HEADS, KV_HEADS, FFN = 32, 16, 2, 1, 32
TOKENS = ["<unk>", "<s>", "</s>", *(f"t{i}" for i in range(VOCAB - 3))]


def refused(call, *patterns: str) -> str:
    """Run ``call``; it must raise ModelLoadError quickly with a one-line message matching every
    pattern (case-insensitive substrings). Returns the message."""
    start = time.process_time()
    with pytest.raises(ModelLoadError) as info:
        call()
    elapsed = time.process_time() - start
    message = str(info.value)
    assert elapsed < FAST, f"took {elapsed:.2f} s of CPU: {message}"
    assert "\n" not in message
    for pattern in patterns:
        assert pattern.lower() in message.lower(), (pattern, message)
    return message


# -- synthetic GGUF ------------------------------------------------------------------------------
def llama_shapes(layers: int = 2, vocab: int = VOCAB, hidden: int = HIDDEN, q_rows: int = HIDDEN,
                 kv_rows: int = HIDDEN // HEADS * KV_HEADS, ffn: int = FFN) -> dict[str, tuple[int, ...]]:
    """GGUF tensor names -> NumPy shapes (HF layout [out, in]) of a tiny LLaMA."""
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden)}
    for i in range(layers):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.attn_q.weight": (q_rows, hidden), f"blk.{i}.attn_k.weight": (kv_rows, hidden),
            f"blk.{i}.attn_v.weight": (kv_rows, hidden), f"blk.{i}.attn_output.weight": (hidden, q_rows),
            f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ffn),
        })
    return shapes


def write_gguf(path: Path, meta: dict | None = None, shapes: dict | None = None) -> Path:
    """A tiny F32 LLaMA GGUF with a SentencePiece vocabulary. ``meta`` overrides key/values:
    key -> (value, type) or (value, ARRAY, item type), None drops the key."""
    writer = gguf.GGUFWriter(str(path), "llama")
    types = [2, 3, 3, *([1] * (VOCAB - 3))]
    defaults = {
        "llama.block_count": (2, T.UINT32), "llama.context_length": (64, T.UINT32),
        "llama.embedding_length": (HIDDEN, T.UINT32), "llama.feed_forward_length": (FFN, T.UINT32),
        "llama.attention.head_count": (HEADS, T.UINT32), "llama.attention.head_count_kv": (KV_HEADS, T.UINT32),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, T.FLOAT32), "llama.rope.freq_base": (10000.0, T.FLOAT32),
        "tokenizer.ggml.model": ("llama", T.STRING), "tokenizer.ggml.tokens": (TOKENS, T.ARRAY, T.STRING),
        "tokenizer.ggml.scores": ([0.0] * VOCAB, T.ARRAY, T.FLOAT32),
        "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32),
        "tokenizer.ggml.bos_token_id": (1, T.UINT32), "tokenizer.ggml.eos_token_id": (2, T.UINT32),
    }
    for key, value in {**defaults, **(meta or {})}.items():
        if value is None:
            writer.kv_data[0].pop(key, None)
        else:
            writer.add_key_value(key, *value)
    rng = np.random.default_rng(0)
    for name, shape in (llama_shapes() if shapes is None else shapes).items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_synthetic_gguf_itself_imports(tmp_path):
    """The baseline every hostile variant below departs from (so each refusal is the variant's)."""
    path = write_gguf(tmp_path / "ok.gguf")
    meta = read_metadata(import_checkpoint(path))
    assert (meta["vocab_size"], meta["num_layers"], meta["head_dim"], meta["context_length"]) == (VOCAB, 2, 8, 64)
    assert Tokenizer.from_pretrained(path).vocab_size == VOCAB


# -- 2. hangs: counts from the file are checked against the tensors before any allocation -------
@pytest.mark.parametrize("key,value,pattern", [
    ("llama.embedding_length", 4_000_000_000, "token_embd.weight"),
    ("llama.block_count", 1_000_000_000, "blk.2"),
    ("llama.attention.head_count", 2_000_000_000, "multiple"),
    ("llama.attention.head_count_kv", 2_000_000_000, "multiple"),
    ("llama.attention.key_length", 2_000_000_000, "attn_q.weight"),
    ("llama.feed_forward_length", 4_000_000_000, "ffn_gate.weight"),
    ("llama.vocab_size", 4_000_000_000, "rows"),
])
def test_absurd_gguf_counts_are_refused_fast(tmp_path, key, value, pattern):
    path = write_gguf(tmp_path / "big.gguf", {key: (value, T.UINT32)})
    refused(lambda: import_checkpoint(path), str(path), pattern)


def test_gguf_metadata_disagreeing_with_tensors(tmp_path):
    fewer = write_gguf(tmp_path / "fewer.gguf", {"llama.block_count": (1, T.UINT32)})
    refused(lambda: import_checkpoint(fewer), "llama.block_count is 1", "blk.1")
    q = write_gguf(tmp_path / "q.gguf", shapes=llama_shapes(q_rows=24))
    refused(lambda: import_checkpoint(q), "blk.0.attn_q.weight", "[24, 16]", "llama.attention.head_count=2")
    vocab = write_gguf(tmp_path / "vocab.gguf", shapes=llama_shapes(vocab=40))
    refused(lambda: import_checkpoint(vocab), "tokenizer.ggml.tokens gives 32 tokens", "40 rows")
    missing = llama_shapes()
    del missing["blk.1.ffn_down.weight"]
    gap = write_gguf(tmp_path / "gap.gguf", shapes=missing)
    refused(lambda: import_checkpoint(gap), "no tensor 'blk.1.ffn_down.weight'")


def test_large_real_context_length_imports(tmp_path):
    """context_length sizes nothing at import (rotary factors are computed per position in the
    graph, the KV cache grows with use): a 2**40 context is kept, not refused or clamped."""
    path = write_gguf(tmp_path / "long.gguf", {"llama.context_length": (2**40, T.UINT64),
                                               "llama.rope.freq_base": (1e6, T.FLOAT32)})
    start = time.process_time()
    meta = read_metadata(import_checkpoint(path))
    assert time.process_time() - start < FAST
    assert meta["context_length"] == 2**40


@pytest.mark.parametrize("items,item_type", [([1, 2, 3], T.UINT8), (["a", "b", "c"], T.STRING)])
def test_metadata_array_length_past_end_of_file(tmp_path, items, item_type):
    """An array whose length field says 2**62: the reader used to loop over empty reads past the
    end of the file (a hang), then one Python iteration per byte until the end of the file; the
    length is now checked against the bytes left before any item is read. The
    2 MB field after it makes an item-by-item reader take far longer than the check allows."""
    path = write_gguf(tmp_path / "array.gguf", {"zz.items": (items, T.ARRAY, item_type),
                                                "zz.padding": ("x" * 2_000_000, T.STRING)})
    data = path.read_bytes()
    needle = b"zz.items" + struct.pack("<IIQ", T.ARRAY, item_type, 3)
    assert data.count(needle) == 1
    path.write_bytes(data.replace(needle, needle[:-8] + struct.pack("<Q", 2**62)))
    message = refused(lambda: import_checkpoint(path), str(path), "cut short", "re-download")
    assert str(len(data)) in message


# -- 3. values of the wrong kind, damaged files -------------------------------------------------
@pytest.mark.parametrize("value,shown", [
    ((0, T.UINT32), "is 0"), ((-2, T.INT32), "is -2"), (("12", T.STRING), "'12' (a string)"),
    ((12.0, T.FLOAT32), "12.0 (a float)"), (([2, 2], T.ARRAY, T.UINT32), "a list of 2 items"),
    ((True, T.BOOL), "True (a bool)"),
])
def test_gguf_head_count_of_the_wrong_kind(tmp_path, value, shown):
    path = write_gguf(tmp_path / "heads.gguf", {"llama.attention.head_count": value})
    refused(lambda: import_checkpoint(path), str(path), "GGUF metadata llama.attention.head_count", shown,
            "expected an integer", "re-convert")


def test_gguf_float_fields_must_be_finite(tmp_path):
    path = write_gguf(tmp_path / "nan.gguf", {"llama.rope.freq_base": (float("nan"), T.FLOAT32)})
    refused(lambda: import_checkpoint(path), "llama.rope.freq_base is nan", "finite number > 0")
    path = write_gguf(tmp_path / "eps.gguf", {"llama.attention.layer_norm_rms_epsilon": ("tiny", T.STRING)})
    refused(lambda: import_checkpoint(path), "layer_norm_rms_epsilon is 'tiny'")


def test_gguf_without_tensors_or_required_fields(tmp_path):
    empty = write_gguf(tmp_path / "vocab-only.gguf", shapes={})
    refused(lambda: import_checkpoint(empty), "holds no tensors", "full model")
    nohead = write_gguf(tmp_path / "nohead.gguf", {"llama.attention.head_count": None})
    refused(lambda: import_checkpoint(nohead), "llama.attention.head_count is missing")


def test_truncated_gguf(tmp_path):
    path = write_gguf(tmp_path / "cut.gguf")
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    refused(lambda: import_checkpoint(path), str(path), "cut short", "re-download")
    refused(lambda: Tokenizer.from_pretrained(path), "cut short")
    path.write_bytes(data[:40])  # inside the metadata
    refused(lambda: import_checkpoint(path), "cut short")


def test_gguf_strings_that_are_not_utf8(tmp_path):
    arch = write_gguf(tmp_path / "arch.gguf", {"general.architecture": (b"ll\xffma", T.STRING)})
    refused(lambda: import_checkpoint(arch), "general.architecture is not valid UTF-8")
    template = write_gguf(tmp_path / "template.gguf", {"tokenizer.chat_template": (b"{{ \xc3 }}", T.STRING)})
    refused(lambda: import_checkpoint(template), "tokenizer.chat_template is not valid UTF-8")
    tokens = write_gguf(tmp_path / "tokens.gguf", {"tokenizer.ggml.tokens": ([*TOKENS[:-1], b"\xfe"], T.ARRAY, T.STRING)})
    refused(lambda: Tokenizer.from_pretrained(tokens), "tokenizer.ggml.tokens is not valid UTF-8")


def test_gguf_architecture_of_the_wrong_kind(tmp_path):
    path = write_gguf(tmp_path / "arch.gguf", {"general.architecture": (7, T.UINT32)})
    refused(lambda: import_checkpoint(path), "general.architecture is 7", "expected a string")


def test_gguf_vocabulary_fields(tmp_path):
    short = write_gguf(tmp_path / "types.gguf", {"tokenizer.ggml.token_type": ([1] * 5, T.ARRAY, T.INT32)})
    refused(lambda: Tokenizer.from_pretrained(short), "tokenizer.ggml.token_type is a list of 5 items",
            f"one entry per token ({VOCAB} tokens)")
    byte = write_gguf(tmp_path / "byte.gguf", {"tokenizer.ggml.token_type": ([1] * (VOCAB - 1) + [6], T.ARRAY, T.INT32)})
    refused(lambda: Tokenizer.from_pretrained(byte), f"tokenizer.ggml.tokens[{VOCAB - 1}]", "<0xNN>")
    merges = write_gguf(tmp_path / "merges.gguf", {"tokenizer.ggml.model": ("gpt2", T.STRING),
                                                   "tokenizer.ggml.merges": (["t1 t2", "t3t4"], T.ARRAY, T.STRING)})
    refused(lambda: Tokenizer.from_pretrained(merges), "tokenizer.ggml.merges[1] is 't3t4'")
    far = write_gguf(tmp_path / "far.gguf", {"tokenizer.ggml.bos_token_id": (10**6, T.UINT32)})
    with pytest.warns(UserWarning, match="token id 1000000 is outside the vocabulary"):
        assert Tokenizer.from_pretrained(far).bos_id is None
    with pytest.warns(UserWarning, match="outside the vocabulary"):
        assert "bos_token_id" not in read_metadata(import_checkpoint(far))


# -- synthetic HF folders ------------------------------------------------------------------------
HF_CONFIG = dict(model_type="llama", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                 num_hidden_layers=1, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS)


def hf_tensors(layers: int = 1, hidden: int = HIDDEN) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    names = {"model.embed_tokens.weight": (VOCAB, hidden), "model.norm.weight": (hidden,),
             "lm_head.weight": (VOCAB, hidden)}
    kv = hidden // HEADS * KV_HEADS
    for i in range(layers):
        p = f"model.layers.{i}"
        names.update({f"{p}.input_layernorm.weight": (hidden,), f"{p}.post_attention_layernorm.weight": (hidden,),
                      f"{p}.self_attn.q_proj.weight": (hidden, hidden), f"{p}.self_attn.k_proj.weight": (kv, hidden),
                      f"{p}.self_attn.v_proj.weight": (kv, hidden), f"{p}.self_attn.o_proj.weight": (hidden, hidden),
                      f"{p}.mlp.gate_proj.weight": (FFN, hidden), f"{p}.mlp.up_proj.weight": (FFN, hidden),
                      f"{p}.mlp.down_proj.weight": (hidden, FFN)})
    return {name: (rng.standard_normal(shape) * 0.1).astype(np.float32) for name, shape in names.items()}


def write_hf(folder: Path, config=None, tensors: dict | None = None, **overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    body = config if config is not None else {**HF_CONFIG, **overrides}
    (folder / "config.json").write_text(json.dumps(body))
    if tensors is None:
        tensors = hf_tensors()
    if tensors:
        save_file(tensors, str(folder / "model.safetensors"))
    return folder


def lm_head(model) -> np.ndarray:
    value = next(v for v in model.graph.initializers.values() if v.name.startswith("lm_head.weight"))
    return value.const.numpy()


def sharded_with_lm_head_at(tmp_path: Path, shard: str) -> Path:
    """A model folder whose index puts lm_head.weight (all 7.0) in ``shard`` (a name relative to
    the folder); that shard is written at the path the name points to."""
    folder = tmp_path / "model"
    tensors = hf_tensors()
    head = tensors.pop("lm_head.weight")
    write_hf(folder, tensors=tensors)
    target = (folder / shard) if not os.path.isabs(shard) else Path(shard)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lm_head.weight": np.full_like(head, 7.0)}, str(target))
    weight_map = {name: "model.safetensors" for name in tensors} | {"lm_head.weight": shard}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


# -- 1. confinement ------------------------------------------------------------------------------
def test_index_shard_inside_the_folder_is_read(tmp_path):
    """The control for the refusals below: the same index with the shard inside is used."""
    folder = sharded_with_lm_head_at(tmp_path, "sub/head.safetensors")
    assert np.all(lm_head(import_checkpoint(folder)) == 7.0)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE"])
def test_index_naming_a_file_outside_is_refused(tmp_path, shard):
    if shard == "ABSOLUTE":
        shard = str(tmp_path / "outside.safetensors")
    folder = sharded_with_lm_head_at(tmp_path, shard)
    assert (tmp_path / "outside.safetensors").is_file()
    refused(lambda: import_checkpoint(folder), str(folder), "model folder", "inside")


def test_symlinked_shard_pointing_outside_is_refused(tmp_path):
    outside = tmp_path / "elsewhere"
    write_hf(outside)
    folder = write_hf(tmp_path / "model", tensors={})
    os.symlink(outside / "model.safetensors", folder / "model.safetensors")
    message = refused(lambda: import_checkpoint(folder), str(folder / "model.safetensors"),
                      f"points to {outside / 'model.safetensors'}", "copy the file into the folder")
    assert "symbolic links" in message
    os.unlink(folder / "model.safetensors")  # control: the same file linked from inside works
    os.symlink("real.safetensors", folder / "model.safetensors")
    (folder / "real.safetensors").write_bytes((outside / "model.safetensors").read_bytes())
    assert read_metadata(import_checkpoint(folder))["vocab_size"] == VOCAB


def test_linked_subfolder_in_index_is_refused(tmp_path):
    folder = sharded_with_lm_head_at(tmp_path, "sub/head.safetensors")
    (tmp_path / "away").mkdir()
    (folder / "sub" / "head.safetensors").rename(tmp_path / "away" / "head.safetensors")
    (folder / "sub").rmdir()
    os.symlink(tmp_path / "away", folder / "sub")
    refused(lambda: import_checkpoint(folder), "sub/head.safetensors", str(tmp_path / "away" / "head.safetensors"))


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "generation_config.json",
                                  "chat_template.jinja", "model.safetensors.index.json"])
def test_linked_metadata_file_pointing_outside_is_refused(tmp_path, name):
    folder = write_hf(tmp_path / "model")
    outside = tmp_path / f"secret-{name}"
    outside.write_text(json.dumps(HF_CONFIG) if name == "config.json" else "{}")
    (folder / name).unlink(missing_ok=True)
    os.symlink(outside, folder / name)
    refused(lambda: import_checkpoint(folder), str(folder / name), str(outside))


def write_tokenizer(folder: Path) -> None:
    vocab = {token: i for i, token in enumerate(TOKENS)}
    HFTokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(folder / "tokenizer.json"))


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "config.json",
                                  "generation_config.json", "chat_template.jinja"])
def test_tokenizer_files_linked_outside_are_refused(tmp_path, name):
    folder = write_hf(tmp_path / "model")
    write_tokenizer(folder)
    assert Tokenizer.from_pretrained(folder).vocab_size == VOCAB
    outside = tmp_path / f"secret-{name}"
    if name == "tokenizer.json":
        write_tokenizer(tmp_path)
        (tmp_path / "tokenizer.json").rename(outside)
    else:
        outside.write_text("{}")
    (folder / name).unlink(missing_ok=True)
    os.symlink(outside, folder / name)
    refused(lambda: Tokenizer.from_pretrained(folder), str(folder / name), str(outside))


def test_folder_named_through_a_link_is_the_folder(tmp_path):
    """The user's own path may be a link: confinement starts from the folder it resolves to."""
    folder = write_hf(tmp_path / "real")
    os.symlink(folder, tmp_path / "alias")
    assert read_metadata(import_checkpoint(tmp_path / "alias"))["vocab_size"] == VOCAB


def test_hub_cache_layout_links_into_its_blobs(tmp_path):
    """snapshot_download folders link every file to ../../blobs/<hash>: that (and only that) may
    leave the folder."""
    repo = tmp_path / "hub" / "models--org--tiny"
    source = write_hf(tmp_path / "src")
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for i, name in enumerate(["config.json", "model.safetensors"]):
        (repo / "blobs" / f"hash{i}").write_bytes((source / name).read_bytes())
        os.symlink(f"../../blobs/hash{i}", snapshot / name)
    assert read_metadata(import_checkpoint(snapshot))["vocab_size"] == VOCAB
    # blobs itself a link to elsewhere: refused
    (repo / "blobs").rename(tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", repo / "blobs")
    refused(lambda: import_checkpoint(snapshot), "config.json", "outside the model folder")


# -- 2./3. HF config values ----------------------------------------------------------------------
@pytest.mark.parametrize("value,shown", [("12", "'12' (a string)"), (0, "is 0"), (12.0, "12.0 (a float)"),
                                         (True, "True (a bool)"), ([2], "a list of 1 items"), (-4, "is -4")])
def test_hf_config_value_of_the_wrong_kind(tmp_path, value, shown):
    folder = write_hf(tmp_path / "m", num_attention_heads=value)
    refused(lambda: import_checkpoint(folder), str(folder / "config.json"), "num_attention_heads", shown,
            "expected an integer")


def test_hf_config_null_list_and_nested_objects(tmp_path):
    null = write_hf(tmp_path / "null", num_attention_heads=None)
    refused(lambda: import_checkpoint(null), "has no 'num_attention_heads' (absent or null)")
    listed = write_hf(tmp_path / "list", config=[HF_CONFIG])
    refused(lambda: import_checkpoint(listed), "config.json holds a JSON list, not an object")
    rope = write_hf(tmp_path / "rope", rope_scaling=["linear"])
    refused(lambda: import_checkpoint(rope), "rope_scaling is a list of 1 items", "expected an object")
    theta = write_hf(tmp_path / "theta", rope_theta="1e4")
    refused(lambda: import_checkpoint(theta), "rope_theta is '1e4'")
    deep = write_hf(tmp_path / "deep")
    (deep / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(lambda: import_checkpoint(deep), "not valid JSON")


@pytest.mark.parametrize("overrides,pattern", [
    (dict(hidden_size=4_000_000_000), "model.embed_tokens.weight"),
    (dict(num_hidden_layers=1_000_000_000), "no tensor 'model.layers.1.*'"),
    (dict(vocab_size=4_000_000_000), "vocab_size=4000000000"),
    (dict(intermediate_size=2_000_000_000), "mlp.gate_proj.weight"),
    (dict(num_key_value_heads=2_000_000_000), "multiple"),
    (dict(head_dim=1_000_000_000), "q_proj.weight"),
    (dict(hidden_size=15), "not a multiple of num_attention_heads"),
    (dict(num_key_value_heads=2), "k_proj.weight"),
    (dict(num_hidden_layers=0), "expected an integer from 1"),
])
def test_hf_config_disagreeing_with_safetensors_headers(tmp_path, overrides, pattern):
    folder = write_hf(tmp_path / "m", **overrides)
    refused(lambda: import_checkpoint(folder), str(folder), pattern)


def test_hf_extra_layers_and_bad_bias(tmp_path):
    extra = write_hf(tmp_path / "extra", tensors=hf_tensors(layers=2))
    refused(lambda: import_checkpoint(extra), "num_hidden_layers is 1", "model.layers.1.*")
    tensors = hf_tensors()
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(5, np.float32)
    bias = write_hf(tmp_path / "bias", tensors=tensors)
    refused(lambda: import_checkpoint(bias), "q_proj.bias", "[5]", f"[{HIDDEN}]")


def test_hf_generation_and_tokenizer_config_values(tmp_path):
    folder = write_hf(tmp_path / "m")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": "2"}))
    refused(lambda: import_checkpoint(folder), "generation_config.json: eos_token_id is '2'")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 10**6]}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_metadata(import_checkpoint(folder))["eos_token_ids"] == [2]
    assert any("10000" in str(w.message) for w in caught)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": [1, 2]}))
    refused(lambda: import_checkpoint(folder), "tokenizer_config.json: chat_template is a list")
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "chat_template.jinja").write_bytes(b"{{ \xff }}")
    refused(lambda: import_checkpoint(folder), "chat_template.jinja is not UTF-8")


def test_damaged_safetensors(tmp_path):
    folder = write_hf(tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    (folder / "model.safetensors").write_bytes(data[:8] + b"[" + data[9:8 + size] + data[8 + size:])
    refused(lambda: import_checkpoint(folder), "model.safetensors is not a readable safetensors file")
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + data[8:])
    refused(lambda: import_checkpoint(folder), "not a readable safetensors")
    (folder / "model.safetensors").write_bytes(data[:-64])  # data cut short
    refused(lambda: import_checkpoint(folder), "not a readable safetensors")
    write_tokenizer(folder)
    (folder / "tokenizer.json").write_text('{"model": 3}')
    refused(lambda: Tokenizer.from_pretrained(folder), "tokenizer.json is not a readable tokenizer")


def test_gpt2_config_against_tensors(tmp_path):
    n, layers = 8, 1
    rng = np.random.default_rng(2)
    shapes = {"wte.weight": (VOCAB, n), "wpe.weight": (16, n), "ln_f.weight": (n,), "ln_f.bias": (n,)}
    for i in range(layers):
        shapes.update({f"h.{i}.ln_1.weight": (n,), f"h.{i}.ln_1.bias": (n,), f"h.{i}.ln_2.weight": (n,),
                       f"h.{i}.ln_2.bias": (n,), f"h.{i}.attn.c_attn.weight": (n, 3 * n),
                       f"h.{i}.attn.c_attn.bias": (3 * n,), f"h.{i}.attn.c_proj.weight": (n, n),
                       f"h.{i}.attn.c_proj.bias": (n,), f"h.{i}.mlp.c_fc.weight": (n, 4 * n),
                       f"h.{i}.mlp.c_fc.bias": (4 * n,), f"h.{i}.mlp.c_proj.weight": (4 * n, n),
                       f"h.{i}.mlp.c_proj.bias": (n,)})
    tensors = {f"transformer.{k}": rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    config = dict(model_type="gpt2", vocab_size=VOCAB, n_embd=n, n_layer=layers, n_head=2)
    ok = write_hf(tmp_path / "ok", config=config, tensors=tensors)
    assert read_metadata(import_checkpoint(ok))["context_length"] == 16  # from wpe: no n_positions given
    wide = write_hf(tmp_path / "wide", config={**config, "n_embd": 3_000_000_001}, tensors=tensors)
    refused(lambda: import_checkpoint(wide), "n_embd 3000000001 is not a multiple of n_head 2")
    wide = write_hf(tmp_path / "wide2", config={**config, "n_embd": 4_000_000_000}, tensors=tensors)
    refused(lambda: import_checkpoint(wide), "transformer.wte.weight", "n_embd=4000000000")
    deep = write_hf(tmp_path / "deep", config={**config, "n_layer": 10**9}, tensors=tensors)
    refused(lambda: import_checkpoint(deep), "no tensor 'transformer.h.1.*'")
    positions = write_hf(tmp_path / "pos", config={**config, "n_positions": 1024}, tensors=tensors)
    refused(lambda: import_checkpoint(positions), "transformer.wpe.weight", "n_positions=1024")
