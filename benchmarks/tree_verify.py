"""Verify-step cost of a tree of candidates against a chain on ONNX Runtime (runtime/tree_ort.py),
and, given an EAGLE draft, greedy decoding with chains against trees.

    python -m benchmarks.tree_verify MODEL [--threads 1] [--reps 30] [--eagle DIR] [--tree-width 3]

Per k, one row of k + 1 tokens after a 64-token prompt, alternated in one process (the machine may
be shared: CPU time of this process, 1 thread by default): the plain graph verifying a chain, the
tree variant verifying a tree of the same size (first level 3 wide, then a chain under the first
node), and a single-token decode step for scale. Medians in ms. ``--eagle``: tok/s, verify steps
and tokens per verify step of ``generate`` on short chat prompts, alternated per prompt: plain
greedy, ``speculation="eagle"`` at tree width 1 (chains) and at ``--tree-width``, and how many
outputs equal plain greedy (on a quantized model ONNX Runtime's verify rows are not bit-equal to its
one-token steps, chains included: see runtime/tree_ort.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import infercc
from infercc.runtime.model_runner import ModelRunner
from infercc.runtime.tree_ort import tree_variant

CHAT = ["Write a short poem about the sea.", "What is the capital of France? Explain briefly.",
        "Give three tips for staying focused while studying."]


def _tree(k: int) -> list[int]:
    """Parents of a row of k + 1 tokens: the first, 3 children, a chain under the first child."""
    parents = [-1] + [0] * min(3, k)
    while len(parents) < k + 1:
        parents.append(1 if len(parents) == 4 else len(parents) - 1)
    return parents


def verify_costs(compiled: infercc.CompiledModel, ks: list[int], reps: int) -> None:
    tree, why = tree_variant(compiled)
    if tree is None:
        raise SystemExit(f"no tree variant: {why}")
    print(f"tree form: {tree.form}")
    runner = ModelRunner(compiled.backend, compiled.model)
    vocab = runner.vocab_size or 1000
    rng = np.random.default_rng(0)
    cache = runner.new_cache(1)
    runner.step(cache, [rng.integers(0, vocab, 64).tolist()])
    start = cache.length

    def timed(run) -> float:
        t = time.process_time()
        run()
        spent = time.process_time() - t
        cache.truncate(start)
        return spent * 1e3

    for k in ks:
        tokens = rng.integers(0, vocab, k + 1).tolist()
        parents = _tree(k)
        runs = {"decode 1": lambda t=tokens: runner.step(cache, [t[:1]]),
                "chain": lambda t=tokens: runner.step(cache, [t], all_logits=True),
                "tree": lambda t=tokens, p=parents: runner.step_tree(cache, t, p, tree)}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(reps):
            for name, run in runs.items():
                times[name].append(timed(run))
        med = {name: statistics.median(v) for name, v in times.items()}
        print(f"k={k:2d} rows={k + 1:2d}: decode 1 token {med['decode 1']:.2f} ms, chain row {med['chain']:.2f} ms, "
              f"tree row {med['tree']:.2f} ms (tree/chain {med['tree'] / med['chain']:.3f})")


def eagle_runs(source: str, threads: int, heads: str, width: int, reps: int) -> None:
    """Plain greedy, EAGLE chains and EAGLE trees of ``width``, alternated per prompt."""
    models = {w: infercc.compile(source, backend="ort", intra_op_threads=threads, speculation="eagle",
                                 speculation_heads=heads, speculation_tree_width=w) for w in (1, width)}
    prompts = [models[1].tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True)
               for c in CHAT]
    runs = {"plain": (models[1], "off"), "eagle chains": (models[1], None), f"eagle trees w={width}": (models[width], None)}
    totals = {name: [0, 0.0, 0, 0, 0] for name in runs}  # tokens, cpu seconds, verify steps, accepted, = plain
    for _ in range(reps):
        for prompt in prompts:
            plain = None
            for name, (compiled, speculation) in runs.items():
                t = time.process_time()
                result = compiled.generate(prompt, max_new_tokens=64, **({"speculation": speculation} if speculation else {}))
                total = totals[name]
                total[1] += time.process_time() - t
                total[0] += len(result.token_ids)
                stats = result.speculation
                total[2] += stats.steps if stats else 0
                total[3] += stats.accepted if stats else 0
                plain = result.token_ids if plain is None else plain
                total[4] += result.token_ids == plain
                if result.speculation_reason:
                    print(f"{name}: {result.speculation_reason}")
    for name, (tokens, seconds, steps, accepted, same) in totals.items():
        print(f"{name}: {tokens / seconds:.1f} tok/s (CPU time, prefill included), {steps} verify steps, "
              f"{(accepted + steps) / max(steps, 1):.2f} tokens per verify step; output = plain greedy in "
              f"{same}/{reps * len(prompts)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8, 12])
    parser.add_argument("--eagle", help="an EAGLE draft (infercc train-heads --kind eagle)")
    parser.add_argument("--tree-width", type=int, default=3)
    args = parser.parse_args()
    compiled = infercc.compile(args.model, backend="ort", intra_op_threads=args.threads)
    verify_costs(compiled, args.k, args.reps)
    if args.eagle:
        eagle_runs(args.model, args.threads, args.eagle, args.tree_width, max(1, args.reps // 10))


if __name__ == "__main__":
    main()
