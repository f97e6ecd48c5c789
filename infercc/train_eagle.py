"""``infercc train-heads --kind eagle``: an EAGLE draft layer for a model, trained on text the
model writes itself (train_heads.py generates it and collects the hidden states, as for Medusa).

What is trained (runtime/speculative/eagle_draft.py has the layer): at each position j of a
generated sequence the layer reads (embedding of token j + 1, the target's feature f_j) and is
taught f_{j+1} (smooth L1, EAGLE's feature regression) and token j + 2 through the target's LM
head, frozen and restricted to the ``draft_vocab`` (cross-entropy, weight ``CE_WEIGHT`` as in the
paper); the embedding is the target's, frozen. Features are perturbed by uniform noise (EAGLE's
answer to the draft reading its own, imperfect features after the first step).

Beyond EAGLE-1's teacher forcing, the first ``unroll`` draft steps are trained as they run: step
s at position i reads the draft's own output of step s - 1 as its feature and attends to the
true positions up to its anchor plus the entries steps 2..s-1 wrote (the cache of a proposal in
flight), so step 2 and 3 see in training what they see when proposing. The sequences start at
the prompt's last position: the proposer's cache starts there too (the prompt's other states are
never computed at serving time).

The held-out report follows a chain from every position: step s's top-1 accuracy where steps
1..s-1 were right (the acceptance of the s-th guess), and the ``min_confidence`` that pays best.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .train_heads import (
    _generate,
    _prompts,
    _torch,
    best_threshold,
    check_options,
    frequent_vocab,
    held_out_ids,
    hidden_states,
    prepare,
)

#: Weight of the token loss beside the feature loss (EAGLE: 0.1).
CE_WEIGHT = 0.1
#: Uniform noise added to input features, relative to their standard deviation.
NOISE = 0.1
#: Loss weight of draft step s: STEP_DECAY ** (s - 1).
STEP_DECAY = 0.8
#: Draft steps reported on held-out text.
EVAL_STEPS = 5


def train_eagle(model: Any, output: str | Path, *, steps: int = 300, lr: float = 1e-3, seq_len: int = 128,
                batch: int = 8, draft_vocab: int = 4096, unroll: int = 3, heads: int | None = None,
                head_dim: int | None = None, intermediate: int | None = None, texts: str | Path | None = None,
                held_out: float = 0.15, seed: int = 0, threads: int | None = None, progress: bool = True,
                log: Callable[[str], None] = print) -> dict:
    """Train an EAGLE draft layer for ``model`` (a path ``infercc.compile`` takes, or a model
    compiled with ``speculation="eagle"``) and write it into ``output``; returns the summary
    (held-out accuracy of each draft step, positions trained on, the file written). ``batch`` is
    sequences per step; the attention is ``heads`` x ``head_dim`` wide and the MLP
    ``intermediate`` (defaults: about half the target's width, twice it)."""
    torch = _torch()
    from .runtime.speculative.eagle import Embedding
    from .runtime.speculative.eagle_draft import save_draft
    from .runtime.speculative.medusa import lm_head_weights

    check_options(steps=(steps, 1), seq_len=(seq_len, 2), batch=(batch, 1), draft_vocab=(draft_vocab, 16),
                  unroll=(unroll, 1))
    compiled = prepare(torch, model, "eagle", lr, texts, threads)
    lm_head = lm_head_weights(compiled.model)  # (an error when the graph exposes no hidden state)
    vocab, hidden = lm_head.shape
    head_dim = head_dim or max(2, min(64, hidden // 4) // 2 * 2)
    heads = heads or max(1, hidden // 2 // head_dim)
    intermediate = intermediate or 2 * hidden
    check_options(heads=(heads, 1), head_dim=(head_dim, 2), intermediate=(intermediate, 1))
    if head_dim % 2:
        raise InputError(f"train-heads: head_dim must be even (rotary pairs), got {head_dim}")
    start = time.perf_counter()
    sequences = _generate(compiled, _prompts(compiled, texts), seq_len, seed)
    sequences = [s for s in sequences if len(s[1]) >= 2]
    if not sequences:
        raise InputError("train-heads: the model generated no text to train on; give prompts it answers at length")
    data = hidden_states(compiled, sequences)
    first = [len(p) - 1 for p, _ in sequences]
    log(f"generated {sum(len(s[1]) for s in sequences)} tokens in {len(sequences)} sequences and collected "
        f"{sum(len(f) for f, _ in data)} hidden states in {time.perf_counter() - start:.0f} s")
    test_ids = held_out_ids(sequences, held_out, seed)
    train = [i for i in range(len(data)) if i not in test_ids] or sorted(test_ids)
    labels = np.concatenate([np.asarray(data[i][1][2:], np.int64) for i in train])
    vocab_ids, index = frequent_vocab(labels, vocab, draft_vocab)
    embedding = Embedding(compiled.model, vocab_ids)
    tensors = [_tensors(torch, f, t, embedding, index, first[i]) for i, (f, t) in enumerate(data)]
    projection = torch.from_numpy(np.ascontiguousarray(lm_head[vocab_ids]))
    net = Draft(torch, hidden, heads, head_dim, intermediate)
    _fit(torch, net, [tensors[i] for i in train], projection, steps, lr, batch, unroll, seed, progress)
    accuracy, reached, confidence = _evaluate(torch, net, [tensors[i] for i in sorted(test_ids)], projection)
    for s, (a, n) in enumerate(zip(accuracy, reached)):
        log(f"draft step {s + 1} (token +{s + 1}): top-1 accuracy {a:.1%} on {n} held-out positions "
            "where the steps before it were right")
    file = save_draft(output, net.numpy(), hidden_size=hidden, vocab_size=vocab, num_attention_heads=heads,
                      head_dim=head_dim, intermediate_size=intermediate, rope_theta=net.theta, rms_norm_eps=net.eps,
                      draft_vocab=vocab_ids.tolist(), min_confidence=confidence, trained_positions=int(
                          sum(len(tensors[i]["feats"]) for i in train)),
                      held_out_accuracy=[round(a, 4) for a in accuracy])
    log(f"guesses are proposed while the draft's probability is >= {confidence} (min_confidence)")
    log(f"wrote {file} ({file.stat().st_size / 1e6:.1f} MB); use it with "
        f"infercc.compile(MODEL, speculation='eagle', speculation_heads='{Path(output)}')")
    return {"file": str(file), "accuracy": accuracy, "min_confidence": confidence, "draft_vocab": len(vocab_ids),
            "seconds": time.perf_counter() - start}


def _tensors(torch, states: np.ndarray, tokens: list[int], embedding, index: np.ndarray, first: int) -> dict:
    """One sequence's training rows: at input i (position first + i) the feature f_i and the
    embedding of token i + 1; targets f_{i+1} and token i + 2 (draft-vocabulary index, -1 none)."""
    n = len(tokens) - 1
    ahead = np.full(n, -1, np.int64)
    ahead[:n - 1] = index[np.asarray(tokens[2:], np.int64)]
    return {"feats": torch.from_numpy(states[:n]), "embeds": torch.from_numpy(embedding(tokens[1:])),
            "next": torch.from_numpy(states[1:n + 1]), "labels": torch.from_numpy(ahead),
            "positions": torch.arange(first, first + n)}


def _batch(torch, items: list[dict]) -> dict:
    """Sequences padded at the end to one length, with the mask of real rows."""
    size = max(len(t["feats"]) for t in items)
    out: dict = {"mask": torch.zeros(len(items), size, dtype=torch.bool)}
    for key in items[0]:
        pad = -1 if key == "labels" else 0
        out[key] = torch.stack([torch.nn.functional.pad(t[key], (0, 0) * (t[key].dim() - 1) + (0, size - len(t[key])),
                                                        value=pad) for t in items])
    for i, t in enumerate(items):
        out["mask"][i, :len(t["feats"])] = True
    return out


class Draft:
    """The draft layer in torch, with the unrolled steps (see the module docstring); ``numpy()``
    gives its weights in the layout the proposer reads."""

    def __init__(self, torch, hidden: int, heads: int, head_dim: int, intermediate: int,
                 theta: float = 10000.0, eps: float = 1e-5, weights: dict[str, np.ndarray] | None = None) -> None:
        from .runtime.speculative.eagle_draft import expected_shapes

        self.torch, self.heads, self.head_dim, self.theta, self.eps = torch, heads, head_dim, theta, eps
        gen = torch.Generator().manual_seed(0)
        self.params: dict[str, Any] = {}
        for name, shape in expected_shapes(hidden, heads, head_dim, intermediate).items():
            if weights is not None:
                value = torch.from_numpy(np.array(weights[name], np.float32))
            elif name.endswith("norm.weight"):
                value = torch.ones(shape)
            elif name == "fc.bias":
                value = torch.zeros(shape)
            else:
                value = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
            self.params[name] = value.requires_grad_(weights is None)

    def numpy(self) -> dict[str, np.ndarray]:
        return {name: p.detach().numpy().copy() for name, p in self.params.items()}

    def _norm(self, x, name: str):
        return x * self.torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps) * self.params[name]

    def _qkv(self, feats, embeds, cos, sin):
        p, F = self.params, self.torch.nn.functional
        h = F.linear(self.torch.cat([embeds, feats], -1), p["fc.weight"], p["fc.bias"])
        a = self._norm(h, "layer.input_layernorm.weight")
        shape = (*a.shape[:2], self.heads, self.head_dim)
        q, k, v = (F.linear(a, p[f"layer.self_attn.{x}_proj.weight"]).view(shape) for x in "qkv")
        return h, _rotate(self.torch, q, cos, sin), _rotate(self.torch, k, cos, sin), v

    def _out(self, h, attention):
        p, F = self.params, self.torch.nn.functional
        h = h + F.linear(attention.flatten(2), p["layer.self_attn.o_proj.weight"])
        m = self._norm(h, "layer.post_attention_layernorm.weight")
        mlp = F.silu(F.linear(m, p["layer.mlp.gate_proj.weight"])) * F.linear(m, p["layer.mlp.up_proj.weight"])
        return h + F.linear(mlp, p["layer.mlp.down_proj.weight"])

    def steps(self, feats, embeds, positions, count: int) -> list:
        """Outputs [b, n, hidden] of draft steps 1..count at every position i: step s at i continues
        the chain anchored at i - s + 1 (valid where i >= s - 1)."""
        torch = self.torch
        cos, sin = _rotary(torch, positions, self.head_dim, self.theta)
        n, scale = feats.shape[1], 1.0 / math.sqrt(self.head_dim)
        h, q, k1, v1 = self._qkv(feats, embeds, cos, sin)
        rows = torch.arange(n)
        scores = torch.einsum("bqad,bkad->baqk", q, k1) * scale
        causal = rows[None, :] <= rows[:, None]  # [q, k]
        outs = [self._out(h, torch.einsum("baqk,bkad->bqad", scores.masked_fill(~causal, -math.inf).softmax(-1), v1))]
        own: list[tuple] = []  # (k, v) of steps 2.. at their positions
        for s in range(2, count + 1):
            h, q, k, v = self._qkv(_shift(torch, outs[-1], 1), embeds, cos, sin)
            own.append((k, v))
            true = rows[None, :] <= rows[:, None] - (s - 1)  # keys up to the anchor i - s + 1
            parts = [(torch.einsum("bqad,bkad->baqk", q, k1) * scale).masked_fill(~true, -math.inf)]
            shifted = [(_shift(torch, ku, s - u), _shift(torch, vu, s - u)) for u, (ku, vu) in enumerate(own, start=2)]
            parts += [(q * ku).sum(-1).transpose(1, 2)[..., None] * scale for ku, _ in shifted]
            weights = torch.cat(parts, -1).softmax(-1)
            attention = torch.einsum("baqk,bkad->bqad", weights[..., :n], v1)
            for j, (_, vu) in enumerate(shifted):
                attention = attention + weights[..., n + j].transpose(1, 2)[..., None] * vu
            outs.append(self._out(h, attention))
        return outs


def _shift(torch, x, by: int):
    """x moved ``by`` positions later along dim 1 (zeros in front): row i holds x[i - by]."""
    if by == 0:
        return x
    return torch.cat([torch.zeros_like(x[:, :by]), x[:, :-by]], 1) if by < x.shape[1] else torch.zeros_like(x)


def _rotary(torch, positions, head_dim: int, theta: float):
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions[..., None].double() * inv
    return angles.cos().float()[:, :, None], angles.sin().float()[:, :, None]


def _rotate(torch, x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _fit(torch, net: Draft, train: list[dict], projection, steps: int, lr: float, batch: int, unroll: int,
         seed: int, progress: bool) -> None:
    from tqdm import tqdm

    F = torch.nn.functional
    gen = torch.Generator().manual_seed(seed)
    spread = float(torch.cat([t["feats"] for t in train]).std())
    optimizer = torch.optim.AdamW(list(net.params.values()), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    bar = tqdm(range(steps), desc="training the EAGLE draft", unit="step", file=sys.stderr,
               disable=None if progress else True)
    for _ in bar:
        pick = torch.randint(0, len(train), (min(batch, len(train)),), generator=gen).tolist()
        b = _batch(torch, [train[i] for i in pick])
        noise = (torch.rand(b["feats"].shape, generator=gen) * 2 - 1) * (NOISE * spread)
        outs = net.steps(b["feats"] + noise, b["embeds"], b["positions"], unroll)
        loss = 0.0
        for s, out in enumerate(outs):
            mask = b["mask"].clone()
            mask[:, :s] = False  # step s + 1 needs an anchor s positions back
            regression = F.smooth_l1_loss(out[mask], b["next"][mask])
            labels = b["labels"].masked_fill(~mask, -1)
            tokens = F.cross_entropy((out @ projection.T).flatten(0, 1), labels.flatten(), ignore_index=-1) \
                if (labels >= 0).any() else out.sum() * 0
            loss = loss + STEP_DECAY ** s * (regression + CE_WEIGHT * tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")


def _evaluate(torch, net: Draft, test: list[dict], projection) -> tuple[list[float], list[int], float]:
    """Per draft step: top-1 accuracy where the steps before it were right and how many such
    positions there were; the ``min_confidence`` that pays best on the chains."""
    rights, probs = [], []
    with torch.no_grad():
        for t in test:
            b = _batch(torch, [t])
            outs = net.steps(b["feats"], b["embeds"], b["positions"], EVAL_STEPS)
            n = len(t["feats"])
            right = np.zeros((n, EVAL_STEPS), bool)
            prob = np.zeros((n, EVAL_STEPS), np.float32)
            for s, out in enumerate(outs):  # step s + 1 of the chain anchored at a sits at a + s
                p, best = (out[0] @ projection.T).softmax(-1).max(-1)
                ok = (best == t["labels"]) & (t["labels"] >= 0)
                right[:n - s, s], prob[:n - s, s] = ok[s:].numpy(), p[s:].numpy()
            rights.append(right)
            probs.append(prob)
    right, prob = np.concatenate(rights), np.concatenate(probs)
    leading = np.cumprod(right, axis=1)
    reached = [len(right)] + [int(leading[:, s - 1].sum()) for s in range(1, EVAL_STEPS)]
    accuracy = [float(leading[:, s].sum() / reached[s]) if reached[s] else 0.0 for s in range(EVAL_STEPS)]
    return accuracy, reached, best_threshold(right, prob)
