"""A tiny LLaMA GGUF with a vocabulary and every tensor type infercc reads, written with gguf.GGUFWriter.

The GGUF fuzz test runs on it when ../shared is absent, and it reaches code stories260K (all
F32) does not: the F16/BF16/Q8_0/Q4_0/Q4_1 dequantizers, byte-fallback tokens, a chat template.
Weights are random: the fuzzer checks errors, not numbers.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

HIDDEN, HEADS, KV_HEADS, LAYERS, FFN = 32, 4, 2, 2, 64
#: SentencePiece token types (gguf.TokenType): normal, unknown, control, byte
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6
PIECES = ("\u2581", "O", "n", "c", "e", "\u2581O", "nc", "nce", "\u2581Once", "\u2581upon", "\u2581a", "\u2581time", "t", "i")


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *PIECES]
    types = [UNKNOWN, CONTROL, CONTROL, *[BYTE] * 256, *[NORMAL] * len(PIECES)]
    scores = [0.0] * 259 + [-float(i) for i in range(len(PIECES))]
    return tokens, scores, types


def write_tiny_gguf(path: Path, seed: int = 0, context: int = 64) -> Path:
    rng = np.random.default_rng(seed)
    tokens, scores, types = vocabulary()
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(context)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    def tensor(name: str, shape: tuple[int, ...], qtype: Q) -> None:
        data = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if qtype == Q.F32:
            writer.add_tensor(name, data)
        elif qtype == Q.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    kv_rows = HIDDEN // HEADS * KV_HEADS
    tensor("token_embd.weight", (vocab, HIDDEN), Q.F16)
    for i in range(LAYERS):
        tensor(f"blk.{i}.attn_norm.weight", (HIDDEN,), Q.F32)
        tensor(f"blk.{i}.attn_q.weight", (HIDDEN, HIDDEN), Q.Q8_0)
        tensor(f"blk.{i}.attn_k.weight", (kv_rows, HIDDEN), Q.Q4_0)
        tensor(f"blk.{i}.attn_v.weight", (kv_rows, HIDDEN), Q.Q4_1)
        tensor(f"blk.{i}.attn_output.weight", (HIDDEN, HIDDEN), Q.BF16)
        tensor(f"blk.{i}.ffn_norm.weight", (HIDDEN,), Q.F32)
        tensor(f"blk.{i}.ffn_gate.weight", (FFN, HIDDEN), Q.Q8_0)
        tensor(f"blk.{i}.ffn_up.weight", (FFN, HIDDEN), Q.Q4_0)
        tensor(f"blk.{i}.ffn_down.weight", (HIDDEN, FFN), Q.Q4_1)
    tensor("output_norm.weight", (HIDDEN,), Q.F32)
    tensor("output.weight", (vocab, HIDDEN), Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
