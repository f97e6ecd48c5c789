"""Where a serving-engine step's time goes on the generated-C runtime, against the C decode loop.

``python -m benchmarks.engine_step [--gguf PATH] [--batch 1] [--rounds 7] [--new-tokens 48]``

One process, one thread (the library then runs every kernel on the calling thread, so the calling
thread's CPU time -- ``time.thread_time`` -- counts the forward and the Python around it, and time
the scheduler gives other processes on a shared machine is not counted). Each round, interleaved:

* ``engine step``: the median thread time of the engine's decode steps (``Engine.step``) for
  ``--batch`` greedy requests of one prompt;
* ``icc_run``: the part of it inside the paged library's forward run (the rest is Python:
  scheduler, block manager, feeds, ctypes, sampling, detokenizing);
* ``C loop``: thread time per token of the C decode loop (``generate`` of one prompt: n + 1 tokens
  minus 1 token, over n);
* ``overhead``: an engine step with the library's forward replaced by a no-op after a real
  prefill (pure Python per step; warmer caches than a real step, whose forward evicts them).

Medians over the rounds, in ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.cases.smollm2 import DEFAULT_GGUF


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=str(DEFAULT_GGUF))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()

    import infercc
    from infercc.runtime.engine import Engine
    from infercc.runtime.sampling import SamplingParams

    compiled = infercc.compile(args.gguf, backend="c", intra_op_threads=1)
    prompt = compiled.tokenizer.encode("Once upon a time, in a small village by the sea, there lived")
    n, inside = args.new_tokens, [0.0]

    def engine_steps(stub: bool) -> tuple[float, float]:
        engine = Engine(compiled, fit=[len(prompt) + n] * args.batch)
        lib = engine.runner.backend.library.lib
        real = lib.__dict__.setdefault("_real_run", lib.icc_run)

        def timed(*a):
            start = time.thread_time()
            status = 0 if stub else real(*a)
            inside[0] += time.thread_time() - start
            return status

        for i in range(args.batch):
            engine.add_request(str(i), prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))
        lib.icc_run = real
        engine.step()  # the prefill
        lib.icc_run, inside[0], steps = timed, 0.0, []
        while engine.has_unfinished():
            start = time.thread_time()
            engine.step()
            steps.append(time.thread_time() - start)
        lib.icc_run = real
        return statistics.median(steps) * 1e3, inside[0] / len(steps) * 1e3

    def loop_token() -> float:
        def run(tokens: int) -> float:
            start = time.thread_time()
            compiled.generate(prompt, max_new_tokens=tokens, ignore_eos=True)
            return time.thread_time() - start
        return (run(n + 1) - run(1)) / n * 1e3

    engine_steps(False), loop_token()  # warm up
    rows = {"engine step": [], "icc_run": [], "C loop": [], "overhead": []}
    for _ in range(args.rounds):
        step, run = engine_steps(False)
        rows["engine step"].append(step)
        rows["icc_run"].append(run)
        rows["C loop"].append(loop_token())
        rows["overhead"].append(engine_steps(True)[0])
    print(f"SmolLM2 engine step, batch {args.batch}, 1 thread, thread CPU time, median of {args.rounds} rounds (ms)")
    for name, values in rows.items():
        print(f"  {name:12s} {statistics.median(values):7.3f}   rounds: {' '.join(f'{v:.2f}' for v in values)}")


if __name__ == "__main__":
    main()
