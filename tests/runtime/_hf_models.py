"""Small random checkpoints written as Hugging Face folders (config.json + model.safetensors) with
NumPy only: infercc imports them itself (no torch), with positions from the mask's cumsum."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def write_hf(folder: Path, model_type: str = "llama", *, layers: int = 2, head_size: int = 8, **extra) -> Path:
    """A small random checkpoint: LLaMA family (GQA 4/2 heads of ``head_size``, 8 by default: 16
    lowers to ONNX Runtime's GroupQueryAttention; mistral slides a window) or
    GPT-2 (learned absolute positions). Layer i's weights do not depend on ``layers`` (they are
    drawn after the embeddings, norm and head, layer by layer), so a checkpoint with fewer layers
    is exactly the first layers of one with more."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    vocab, hidden, ffn = 64, 4 * head_size if model_type != "gpt2" else 32, 48
    if model_type == "gpt2":
        config = dict(model_type="gpt2", vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=96)
        shapes = {"wte.weight": (vocab, hidden), "wpe.weight": (96, hidden), "ln_f.weight": (hidden,),
                  "ln_f.bias": (hidden,), "lm_head.weight": (vocab, hidden)}  # untied: tied ones repeat one token
        for i in range(layers):
            shapes.update({f"h.{i}.{n}": s for n, s in {
                "ln_1.weight": (hidden,), "ln_1.bias": (hidden,), "ln_2.weight": (hidden,), "ln_2.bias": (hidden,),
                "attn.c_attn.weight": (hidden, 3 * hidden), "attn.c_attn.bias": (3 * hidden,),
                "attn.c_proj.weight": (hidden, hidden), "attn.c_proj.bias": (hidden,),
                "mlp.c_fc.weight": (hidden, 4 * hidden), "mlp.c_fc.bias": (4 * hidden,),
                "mlp.c_proj.weight": (4 * hidden, hidden), "mlp.c_proj.bias": (hidden,)}.items()})
    else:
        heads, kv, head = 4, 2, head_size
        config = dict(model_type=model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=96, **extra)
        shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
                  "lm_head.weight": (vocab, hidden)}
        for i in range(layers):
            p = f"model.layers.{i}"
            shapes.update({
                f"{p}.input_layernorm.weight": (hidden,), f"{p}.post_attention_layernorm.weight": (hidden,),
                f"{p}.self_attn.q_proj.weight": (heads * head, hidden), f"{p}.self_attn.k_proj.weight": (kv * head, hidden),
                f"{p}.self_attn.v_proj.weight": (kv * head, hidden), f"{p}.self_attn.o_proj.weight": (hidden, heads * head),
                f"{p}.mlp.gate_proj.weight": (ffn, hidden), f"{p}.mlp.up_proj.weight": (ffn, hidden),
                f"{p}.mlp.down_proj.weight": (hidden, ffn)})
    tensors = {n: (rng.standard_normal(s) * 0.3).astype(np.float32) for n, s in shapes.items()}
    for name in tensors:  # norms near one, so every layer matters
        if "norm" in name or "ln_" in name:
            tensors[name] = tensors[name] * 0.1 + (0 if name.endswith("bias") else 1)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder
