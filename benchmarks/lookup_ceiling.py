"""How many tokens per verify step prompt lookup could give at most on the speculative case's
prompts, whatever the verify step costs: the ceiling of its speedup.

    python -m benchmarks.lookup_ceiling [GGUF] [--new-tokens 64] [--depths 4 8 16] [--groups grounded,chat]

Why this exists: the issue's target for prompt lookup is 2x plain decoding on input-grounded
prompts. Its speedup is at most (tokens per step) / (cost of a verify step in single steps), so
before tuning the kernels or the policy, measure how much of the output the proposer could have
guessed. Each prompt is decoded plainly (greedy, the C runtime), then the real ``PromptLookup``
replays that output: at each step it proposes up to ``depth`` tokens from the text so far, the
step keeps the proposal's prefix that matches the plain output plus the target's own next token
(exactly what greedy verification keeps), and the replay moves on. tokens / steps is the speedup
a verify step as cheap as a single step would give; a dearer step divides it.
"""

from __future__ import annotations

import argparse

import infercc
from infercc.runtime.speculative.prompt_lookup import PromptLookup

from .cases.smollm2 import DEFAULT_GGUF
from .cases.speculative import PROMPTS, chat_ids


def replay(prompt: list[int], output: list[int], depth: int) -> int:
    """Verify steps prompt lookup at ``depth`` needs to emit ``output`` after ``prompt``."""
    lookup, tokens, done, steps = PromptLookup(), list(prompt), 0, 0
    while done < len(output):
        proposal = lookup.propose(0, tokens, depth).tokens
        kept = 0
        while kept < len(proposal) and done + kept < len(output) and proposal[kept] == output[done + kept]:
            kept += 1
        take = min(kept + 1, len(output) - done)
        tokens += output[done:done + take]
        done, steps = done + take, steps + 1
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", nargs="?", help="SmolLM2 GGUF (default: the shared model)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--groups", default="grounded,chat")
    args = parser.parse_args()
    gguf = args.gguf or str(DEFAULT_GGUF)
    compiled = infercc.compile(gguf, backend="auto")
    print(f"{'group':9} {'prompt':>6} {'tokens':>6} " + " ".join(f"{'k=' + str(d):>7}" for d in args.depths))
    for group in args.groups.split(","):
        totals = {d: 0 for d in args.depths}
        emitted = 0
        for i, prompt in enumerate(chat_ids(gguf, PROMPTS[group])):
            output = compiled.generate(prompt, max_new_tokens=args.new_tokens).token_ids
            steps = {d: replay(prompt, output, d) for d in args.depths}
            emitted += len(output)
            for d in args.depths:
                totals[d] += steps[d]
            print(f"{group:9} {i:>6} {len(output):>6} " + " ".join(f"{len(output) / steps[d]:>7.2f}" for d in args.depths))
        print(f"{group:9} {'all':>6} {emitted:>6} " + " ".join(f"{emitted / totals[d]:>7.2f}" for d in args.depths))


if __name__ == "__main__":
    main()
