"""A straightforward NumPy float32 forward pass of a GGUF ``llama`` model with llama2.c run.c
semantics: one token at a time with a KV cache, interleaved-pair RoPE on the weights exactly as
stored in the file (no un-permutation), GQA by integer division of the head index.

Independent of infercc on purpose: it reads the file with ``gguf.GGUFReader`` and dequantizes
with ``gguf.quants.dequantize``, so it checks our reader, dequantizer, RoPE handling and graph.
"""

from __future__ import annotations

import numpy as np


class ReferenceLlama:
    def __init__(self, path) -> None:
        import gguf

        reader = gguf.GGUFReader(str(path))

        def meta(key, default=None):
            field = reader.fields.get(f"llama.{key}")
            return default if field is None else field.contents()

        self.dim = int(meta("embedding_length"))
        self.n_layers = int(meta("block_count"))
        self.n_heads = int(meta("attention.head_count"))
        self.n_kv_heads = int(meta("attention.head_count_kv", self.n_heads))
        self.head_size = self.dim // self.n_heads
        self.eps = np.float32(meta("attention.layer_norm_rms_epsilon", 1e-5))
        self.theta = float(meta("rope.freq_base", 10000.0))
        self.w = {
            t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
            for t in reader.tensors
        }
        self.classifier = self.w.get("output.weight", self.w["token_embd.weight"])

    def _rmsnorm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        ss = np.float32(1.0) / np.sqrt(np.mean(x * x, dtype=np.float32) + self.eps)
        return weight * (ss * x)

    def _rope(self, vec: np.ndarray, pos: int) -> np.ndarray:
        """Rotate pairs (2i, 2i+1) of each head by pos * theta^(-2i/head_size)."""
        pairs = vec.reshape(-1, self.head_size // 2, 2)
        freq = 1.0 / np.power(np.float32(self.theta), np.arange(0, self.head_size, 2, dtype=np.float32) / self.head_size)
        angle = (np.float32(pos) * freq.astype(np.float32)).astype(np.float32)
        cos, sin = np.cos(angle), np.sin(angle)
        a, b = pairs[..., 0], pairs[..., 1]
        return np.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(vec.shape)

    def forward(self, tokens: list[int], cache: list[tuple[list, list]] | None = None) -> np.ndarray:
        """Logits [len(tokens), vocab], each position seeing only its prefix. ``cache`` (per layer
        key and value lists, extended in place) continues an earlier call."""
        kv_mul = self.n_heads // self.n_kv_heads
        cache = cache if cache is not None else [([], []) for _ in range(self.n_layers)]
        out = []
        for token in tokens:
            pos = len(cache[0][0])
            x = self.w["token_embd.weight"][token].astype(np.float32)
            for layer, (keys, values) in enumerate(cache):
                p = f"blk.{layer}."
                xb = self._rmsnorm(x, self.w[p + "attn_norm.weight"])
                q = self._rope(self.w[p + "attn_q.weight"] @ xb, pos)
                keys.append(self._rope(self.w[p + "attn_k.weight"] @ xb, pos))
                values.append(self.w[p + "attn_v.weight"] @ xb)
                k_cache = np.stack(keys).reshape(pos + 1, self.n_kv_heads, self.head_size)
                v_cache = np.stack(values).reshape(pos + 1, self.n_kv_heads, self.head_size)
                heads = []
                for h in range(self.n_heads):
                    qh = q[h * self.head_size:(h + 1) * self.head_size]
                    scores = k_cache[:, h // kv_mul] @ qh / np.float32(np.sqrt(self.head_size))
                    weights = np.exp(scores - scores.max())
                    weights /= weights.sum()
                    heads.append(weights @ v_cache[:, h // kv_mul])
                x = x + self.w[p + "attn_output.weight"] @ np.concatenate(heads)
                xb = self._rmsnorm(x, self.w[p + "ffn_norm.weight"])
                gate = self.w[p + "ffn_gate.weight"] @ xb
                hidden = gate / (np.float32(1.0) + np.exp(-gate)) * (self.w[p + "ffn_up.weight"] @ xb)
                x = x + self.w[p + "ffn_down.weight"] @ hidden
            out.append(self.classifier @ self._rmsnorm(x, self.w["output_norm.weight"]))
        return np.stack(out)

    def generate(self, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
        """Greedy: the ``steps`` ids after ``prompt``, and the logits at every position of
        prompt + ids[:-1] (the ones the ids were chosen from)."""
        cache = [([], []) for _ in range(self.n_layers)]
        logits = [self.forward(prompt, cache)]
        ids: list[int] = []
        while True:
            ids.append(int(np.argmax(logits[-1][-1])))
            if len(ids) == steps:
                return ids, np.concatenate(logits)
            logits.append(self.forward(ids[-1:], cache))
