"""``infercc train-heads``: Medusa heads for a model, trained on text the model writes itself.

Why self-generated text: a head is only useful where it predicts what the model will say, so the
model's own continuations of prompts like the ones it will serve are the right training set
(Medusa's self-distillation), and no data set has to be downloaded. Steps:

1. compile the model with ``speculation="medusa"`` (its graph then exposes the final hidden state);
2. generate continuations of the built-in chat prompts (or a user text file: one prompt per
   paragraph), once greedy and once sampled, batched on the serving engine;
3. run each whole sequence through the model once, keeping the hidden state at every position of
   the generated part; head i learns the token ``i + 2`` positions ahead of each state;
4. train the heads with torch (Medusa-1: the model frozen, each head a zero-initialised ResBlock,
   all sharing the model's LM head, frozen), restricted to the ``draft_vocab`` tokens most
   frequent in the generated text (the projection dominates the cost; a guess outside them would
   rarely be right), loss weighted 0.8^i per head as in Medusa;
5. report each head's top-1 accuracy on held-out sequences (the acceptance it reaches on its own:
   head i's guess is used only when heads 0..i-1 were right too) and write the heads in Medusa's
   safetensors layout with a ``config.json`` (heads.py).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, ModelLoadError

#: Chat prompts the heads learn from by default (varied tasks: stories, explanations, lists, code).
PROMPTS = [
    "Write a short story about a cat who learns to swim.",
    "Give me three tips for learning to cook at home.",
    "Explain why the sky is blue in a few sentences.",
    "What are the benefits of regular exercise?",
    "Write a poem about the ocean at night.",
    "How do I make a cup of tea?",
    "Describe a busy market in a small town.",
    "Explain what a computer program is to a child.",
    "Write a short letter to a friend about a trip to the mountains.",
    "List five fruits and say something about each one.",
    "Why do leaves change color in autumn?",
    "Tell me a story about a robot who wants to be a gardener.",
    "What should I pack for a weekend camping trip?",
    "Explain how a bicycle works.",
    "Write a Python function that reverses a string, and explain it.",
    "Give me some advice for my first day at a new job.",
    "Describe your perfect breakfast.",
    "What is the water cycle?",
    "Write a short dialogue between a teacher and a student about homework.",
    "How can I sleep better at night?",
    "Summarise the story of Little Red Riding Hood.",
    "Explain the difference between weather and climate.",
    "Write a story about a dragon who is afraid of the dark.",
    "What are some good habits for studying?",
]
#: Cost of one more verified position relative to a decode step, for choosing ``min_confidence``
#: (the generated-C runtime on a 2-core AVX2 CPU: a step over 4 tokens ~1.6-1.7x one over 1).
WIDE_COST = 0.2
#: Loss weight of head i: 0.8 ** i (Medusa's choice: later heads are harder and matter less).
DECAY = 0.8


def train_heads(model: Any, output: str | Path, *, heads: int = 3, steps: int = 300, lr: float = 3e-3,
                seq_len: int = 128, batch: int = 256, draft_vocab: int = 4096, texts: str | Path | None = None,
                held_out: float = 0.15, seed: int = 0, threads: int | None = None, progress: bool = True,
                log: Callable[[str], None] = print) -> dict:
    """Train ``heads`` Medusa heads for ``model`` (a path ``infercc.compile`` takes, or a model
    compiled with ``speculation="medusa"``) and write them into ``output``; returns the summary
    (held-out top-1 accuracy per head, tokens trained on, the file written)."""
    torch = _torch()
    from .runtime.speculative.heads import save_heads
    from .runtime.speculative.medusa import lm_head_weights

    check_options(heads=(heads, 1), steps=(steps, 1), seq_len=(seq_len, 2), batch=(batch, 1),
                  draft_vocab=(draft_vocab, 16))
    compiled = prepare(torch, model, "medusa", lr, texts, threads)
    lm_head = lm_head_weights(compiled.model)  # (an error when the graph exposes no hidden state)
    start = time.perf_counter()
    sequences = _generate(compiled, _prompts(compiled, texts), seq_len, seed)
    features, labels = _collect(compiled, sequences, heads)
    log(f"generated {sum(len(s[1]) for s in sequences)} tokens in {len(sequences)} sequences and collected "
        f"{sum(len(f) for f in features)} hidden states in {time.perf_counter() - start:.0f} s")
    test_ids = held_out_ids(sequences, held_out, seed, by_prompt=False)
    owner = np.concatenate([np.full(len(f), i) for i, f in enumerate(features)])
    x, y = np.concatenate(features), np.concatenate(labels)
    test = np.isin(owner, list(test_ids))
    vocab_ids, index = frequent_vocab(y[~test], lm_head.shape[0], draft_vocab)
    y_local = np.where(y >= 0, index[np.maximum(y, 0)], -1)
    blocks = _fit(torch, x[~test], y_local[~test], lm_head[vocab_ids], heads, steps, lr, batch, seed, progress)
    accuracy, confidence = _accuracy(torch, blocks, x[test], y[test], lm_head[vocab_ids], vocab_ids)
    for i, a in enumerate(accuracy):
        log(f"head {i + 1} (token +{i + 2}): top-1 accuracy {a:.1%} on {int((y[test][:, i] >= 0).sum())} held-out positions")
    file = save_heads(output, blocks, [None] * heads, draft_vocab=vocab_ids.tolist(),
                      hidden_size=int(lm_head.shape[1]), vocab_size=int(lm_head.shape[0]),
                      trained_tokens=int((~test).sum()), held_out_accuracy=[round(a, 4) for a in accuracy],
                      min_confidence=confidence)
    log(f"guesses are proposed while their head's probability is >= {confidence} (min_confidence)")
    log(f"wrote {file} ({file.stat().st_size / 1e6:.1f} MB); use it with "
        f"infercc.compile(MODEL, speculation='medusa', speculation_heads='{Path(output)}')")
    return {"file": str(file), "accuracy": accuracy, "min_confidence": confidence, "train_positions": int((~test).sum()),
            "test_positions": int(test.sum()), "draft_vocab": len(vocab_ids), "seconds": time.perf_counter() - start}


def frequent_vocab(labels: np.ndarray, vocab: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The draft vocabulary: the ``size`` most frequent ids of ``labels`` (-1 = none), sorted, and
    the map [vocab] from a token id to its index there (-1 outside it)."""
    counts = np.bincount(labels[labels >= 0], minlength=vocab)
    vocab_ids = np.sort(np.argsort(-counts, kind="stable")[:min(size, int((counts > 0).sum()))])
    index = np.full(vocab, -1, np.int64)
    index[vocab_ids] = np.arange(len(vocab_ids))
    return vocab_ids, index


def held_out_ids(sequences: list[tuple[list[int], list[int]]], fraction: float, seed: int,
                 by_prompt: bool = True) -> set[int]:
    """Indices of the (prompt, continuation) pairs held out of training, drawn with ``seed`` by
    prompt: a prompt's greedy and sampled continuations share much of their text, so one of them
    in training makes the other's held-out accuracy partly a measure of memory. ``by_prompt=False``
    draws pairs one by one (how the Medusa recipe's figures were measured: 23% for head 1 on
    SmolLM2-135M; kept so that they stay comparable)."""
    if not by_prompt:
        order = np.random.default_rng(seed).permutation(len(sequences))
        return set(order[:max(1, int(round(len(sequences) * fraction)))].tolist())
    prompts = sorted({tuple(p) for p, _ in sequences})
    order = np.random.default_rng(seed).permutation(len(prompts))
    held = {prompts[i] for i in order[:max(1, int(round(len(prompts) * fraction)))]}
    return {i for i, (p, _) in enumerate(sequences) if tuple(p) in held}


def check_options(**options: tuple[Any, int]) -> None:
    """InputError for an option (name=(value, least)) that is not an integer >= its least value."""
    for name, (value, low) in options.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InputError(f"train-heads: {name} must be an integer >= {low}, got {value!r}")


def prepare(torch, model: Any, method: str, lr: float, texts: str | Path | None, threads: int | None):
    """Check the options every kind shares and compile ``model`` for ``method`` (its graph then
    exposes the final hidden state), unless it is a compiled model already."""
    from .api import compile as compile_model
    from .compiled import CompiledModel

    if not isinstance(lr, (int, float)) or not 0 < lr < 1:
        raise InputError(f"train-heads: lr must be a number in (0, 1), got {lr!r}")
    if texts is not None and not Path(texts).is_file():
        raise InputError(f"train-heads: no text file at {texts}; give a UTF-8 file of prompts separated by blank lines")
    if threads:
        torch.set_num_threads(threads)
    return model if isinstance(model, CompiledModel) else compile_model(model, speculation=method)


def _torch():
    try:
        import torch
    except ImportError:
        raise InputError("train-heads trains with torch, which is not installed; install the export extra: "
                         "pip install 'infercc[export]'") from None
    return torch


def _prompts(compiled, texts: str | Path | None) -> list[list[int]]:
    """Token ids of each prompt (a one-turn chat when the tokenizer has a template)."""
    if texts is None:
        items = PROMPTS
    else:
        path = Path(texts)
        if path.stat().st_size > 64 << 20:
            raise InputError(f"train-heads: {path} is over 64 MiB; give fewer prompts (a few hundred are plenty)")
        items = [p.strip() for p in path.read_text(encoding="utf-8", errors="replace").split("\n\n") if p.strip()]
        if not items:
            raise InputError(f"train-heads: {path} holds no text")
    try:
        tokenizer = compiled.tokenizer
    except ModelLoadError:  # a model without a tokenizer: seeded random prompts of its own ids
        if texts is not None:
            raise
        from .runtime.model_runner import ModelRunner

        vocab = ModelRunner(compiled.backend, compiled.model).vocab_size or 2
        rng = np.random.default_rng(len(PROMPTS))
        return [rng.integers(0, vocab, 8).tolist() for _ in PROMPTS]
    out = []
    for text in items:
        try:
            out.append(list(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True)))
        except Exception:  # no usable template: the text itself
            out.append(tokenizer.encode(text))
    return out


def _generate(compiled, prompts: list[list[int]], seq_len: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(prompt, continuation) pairs: each prompt once greedy and once sampled (temperature 0.8).
    A prompt longer than the model's context leaves room for the continuation keeps its end."""
    from .runtime.model_runner import ModelRunner

    context = ModelRunner(compiled.backend, compiled.model).max_context
    if context is not None:
        seq_len = min(seq_len, context // 2)
        prompts = [p[-(context - seq_len):] for p in prompts]
    out = []
    for options in ({}, {"temperature": 0.8, "top_p": 0.95, "seed": seed}):
        results = compiled.generate(prompts, max_new_tokens=seq_len, speculation="off", **options)
        out += [(p, list(r.token_ids)) for p, r in zip(prompts, results) if len(r.token_ids) > 2]
    return out


def hidden_states(compiled, sequences) -> list[tuple[np.ndarray, list[int]]]:
    """Per (prompt, continuation): the hidden state at every position from the prompt's last token
    on [n, hidden] and the tokens from that position on (n of them), from one run of the model."""
    from .runtime.model_runner import ModelRunner

    runner = ModelRunner(compiled.backend, compiled.model)
    out = []
    for prompt, output in sequences:
        tokens = prompt + output
        cache = runner.new_cache(1)
        try:
            hidden: list[np.ndarray] = []
            runner.step(cache, [tokens], all_logits=True, hidden=hidden)
        finally:
            cache.free()
        first = len(prompt) - 1
        out.append((hidden[0][0, first:].astype(np.float32), tokens[first:]))
    return out


def _collect(compiled, sequences, heads: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per sequence: the hidden state at every position from the prompt's last token on, and the
    label of head i for each (the token i + 2 ahead; -1 past the end)."""
    features, labels = [], []
    for states, tokens in hidden_states(compiled, sequences):
        y = np.full((len(states), heads), -1, np.int64)
        for i in range(heads):
            ahead = np.asarray(tokens[2 + i:], np.int64)
            y[:len(ahead), i] = ahead[:len(states)]
        keep = (y >= 0).any(axis=1)
        features.append(states[keep])
        labels.append(y[keep])
    return features, labels


def _forward(torch, weights, biases, x, projection):
    """Each head's logits over the draft vocabulary: (x + SiLU(x W^T + b)) P^T, [heads, n, V]."""
    hidden = x[None] + torch.nn.functional.silu(torch.einsum("nh,kgh->kng", x, weights) + biases[:, None])
    return hidden @ projection.T


def _fit(torch, x, y, projection, heads, steps, lr, batch, seed, progress):
    from tqdm import tqdm

    if len(x) == 0:
        raise InputError("train-heads: the model generated no text to train on; give prompts it answers at length")
    gen = torch.Generator().manual_seed(seed)
    size = x.shape[1]
    weights = torch.zeros((heads, size, size), requires_grad=True)  # Medusa: a ResBlock starts as identity
    biases = torch.zeros((heads, size), requires_grad=True)
    xs, ys, proj = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(np.ascontiguousarray(projection))
    optimizer = torch.optim.AdamW([weights, biases], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    scale = torch.tensor([DECAY ** i for i in range(heads)])
    bar = tqdm(range(steps), desc="training heads", unit="step", file=sys.stderr, disable=None if progress else True)
    for _ in bar:
        pick = torch.randint(0, len(xs), (min(batch, len(xs)),), generator=gen)
        logits = _forward(torch, weights, biases, xs[pick], proj)
        target = ys[pick].T  # [heads, n]
        losses = torch.stack([torch.nn.functional.cross_entropy(logits[i], target[i], ignore_index=-1)
                              if (target[i] >= 0).any() else logits[i].sum() * 0 for i in range(heads)])
        loss = (losses * scale).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    w, b = weights.detach().numpy(), biases.detach().numpy()
    return [[(np.ascontiguousarray(w[i]), np.ascontiguousarray(b[i]))] for i in range(heads)]


def _accuracy(torch, blocks, x, y, projection, vocab_ids) -> tuple[list[float], float]:
    """Top-1 accuracy of each head on (x, y) (labels outside the draft vocabulary count as misses),
    and the ``min_confidence`` that pays best there (``best_threshold``)."""
    heads = len(blocks)
    if len(x) == 0:
        return [0.0] * heads, 0.0
    weights = torch.from_numpy(np.stack([b[0][0] for b in blocks]))
    biases = torch.from_numpy(np.stack([b[0][1] for b in blocks]))
    with torch.no_grad():
        logits = _forward(torch, weights, biases, torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(projection)))
        probs, best = torch.softmax(logits, -1).max(-1)
    guesses, probs = vocab_ids[best.numpy()].T, probs.numpy().T  # [n, heads]
    right = (guesses == y) & (y >= 0)
    accuracy = [float(right[y[:, i] >= 0, i].mean()) if (y[:, i] >= 0).any() else 0.0 for i in range(heads)]
    return accuracy, best_threshold(right, probs)


def best_threshold(right: np.ndarray, probs: np.ndarray) -> float:
    """The ``min_confidence`` that pays best on held-out guesses (``right`` and ``probs`` [n, k]:
    whether the guess i ahead was right, its probability): the chain of guesses is cut at the first
    one less sure than it, and a step verifying n guesses is taken to cost 1 + WIDE_COST * n steps."""
    best_rate, best_threshold = 1.0, 1.0
    leading = np.cumprod(right, axis=1).sum(axis=1)  # guesses verification would keep
    for threshold in np.linspace(0.0, 0.95, 20):
        proposed = np.cumprod(probs >= threshold, axis=1).sum(axis=1)
        accepted = np.minimum(leading, proposed)
        rate = (1 + accepted).sum() / (1 + WIDE_COST * proposed).sum()
        if rate > best_rate:
            best_rate, best_threshold = float(rate), float(threshold)
    return round(best_threshold, 3)


def add_parser(sub) -> None:
    """The ``train-heads`` subcommand (registered by cli.build_parser)."""
    p = sub.add_parser("train-heads", help="train Medusa heads or an EAGLE draft layer for speculative decoding on "
                                           "text the model writes itself")
    p.add_argument("model", help="a model infercc compiles (.gguf, Hugging Face folder, .onnx)")
    p.add_argument("-o", "--output", required=True, help="folder to write the weights (medusa_lm_head.safetensors or "
                                                          "eagle_draft.safetensors) and config.json into")
    p.add_argument("--kind", choices=("medusa", "eagle"), default="medusa",
                   help="medusa: heads on the last hidden state (speculation='medusa'); eagle: one draft decoder "
                        "layer on the model's features (speculation='eagle'). Default medusa")
    p.add_argument("--heads", type=int, default=3, help="medusa: heads to train (head i guesses the token i + 2 "
                                                        "ahead; default 3)")
    p.add_argument("--unroll", type=int, default=3, help="eagle: draft steps trained as they run, each on the "
                                                         "draft's own features (default 3)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--lr", type=float, help="learning rate (AdamW, cosine decay; default 3e-3 medusa, 1e-3 eagle)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens generated per prompt (default 128)")
    p.add_argument("--batch", type=int, help="medusa: hidden states per step (default 256); eagle: sequences per "
                                             "step (default 8)")
    p.add_argument("--draft-vocab", type=int, default=4096,
                   help="the heads guess among this many most frequent generated tokens (default 4096)")
    p.add_argument("--texts", help="prompts to generate from: a UTF-8 file, prompts separated by blank lines "
                                   "(default: built-in chat prompts)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and training (default 0)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.set_defaults(fn=_command)


def _command(args) -> int:
    common = {"steps": args.steps, "seq_len": args.seq_len, "draft_vocab": args.draft_vocab, "texts": args.texts,
              "seed": args.seed, "threads": args.threads, "log": lambda line: print(line, file=sys.stderr)}
    common.update({name: value for name, value in (("lr", args.lr), ("batch", args.batch)) if value is not None})
    if args.kind == "eagle":
        from .train_eagle import train_eagle

        train_eagle(args.model, args.output, unroll=args.unroll, **common)
    else:
        train_heads(args.model, args.output, heads=args.heads, **common)
    return 0
