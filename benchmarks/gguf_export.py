"""Write the benchmark LLaMA's Hugging Face folder as a GGUF file llama.cpp runs (llama arch).

Why our own writer: llama.cpp's convert_hf_to_gguf.py is not on PyPI, and the benchmark model
needs nothing beyond plain LLaMA. What llama.cpp expects and HF does not store that way: Q and K
projection rows permuted from HF's rotate-half rotary layout to llama.cpp's interleaved pairs
(`permute_rotary`), 2-D weights as [out, in] (ggml lists dims reversed, so the numpy layout of
torch's Linear weight is already right), and a tied LM head left out (llama.cpp then reads
token_embd). Q4_0 is made by llama.cpp's own quantizer from the F32 file, as its users do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.tokenizer import SPECIALS, vocabulary

HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def permute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF rotate-half rows (per head: all first halves, then all second halves) -> llama.cpp's
    interleaved pairs (x0, x_half, x1, x_half+1, ...), as convert_hf_to_gguf.py's ``permute``."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_name(hf_name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    if parts[:2] != ["model", "layers"] or parts[-1] != "weight":
        raise ValueError(f"unexpected LLaMA tensor {hf_name!r}")
    return f"blk.{parts[2]}.{HF_TO_GGUF['.'.join(parts[3:-1])]}.weight"


def write_f32(folder: Path, target: Path) -> Path:
    """Every tensor as F32; the offline tokenizer's vocabulary as a gpt2-style (byte-level) BPE."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    weights = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(file)))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name("infercc benchmark llama (random init)")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = vocabulary(config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(["t 1"])  # llama.cpp insists on a merge list; ids are fed directly anyway
    writer.add_bos_token_id(config.get("bos_token_id", 1))
    writer.add_eos_token_id(config.get("eos_token_id", 2))
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    for name, value in weights.items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        value = np.ascontiguousarray(value, dtype=np.float32)
        if name.endswith("self_attn.q_proj.weight"):
            value = permute_rotary(value, heads)
        elif name.endswith("self_attn.k_proj.weight"):
            value = permute_rotary(value, kv_heads)
        writer.add_tensor(gguf_name(name), value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(target)
    return target


def quantize(source: Path, target: Path, kind: str = "Q4_0", threads: int = 2) -> Path:
    """llama.cpp's ``llama_model_quantize`` (its standard mix for the file type) through llama-cpp-python."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = threads
    tmp = target.with_suffix(".tmp")
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
    if status != 0 or not tmp.is_file():
        raise RuntimeError(f"llama_model_quantize({kind}) failed with status {status}")
    tmp.rename(target)
    return target
