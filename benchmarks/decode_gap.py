"""Where an ONNX Runtime decode step's time goes, ours against onnxruntime-genai's, in one process.

``python -m benchmarks.decode_gap --artifact DIR [--artifact DIR ...] --genai DIR [--threads 1]``

Why this exists: a decode ratio against genai mixes three things, each of which needs its own fix:
the graph (kernels and nodes), the per-step loop around the session (Python for us, C++ for
genai), and the machine's noise. Each round therefore times, interleaved and on the same prompt:

* ``genai``: onnxruntime-genai's Generator on its model folder (its graph, its C++ loop);
* ``ours``: ``compiled.generate`` (our graph, our loop), and the time inside ORT's run of each step;
* ``bare <graph>``: the same ORT build running a graph through a minimal loop (IOBinding bound
  once, only the ids, mask and logits rebound, argmax in numpy), for each artifact and for genai's
  own model.onnx: the graph's cost with next to no loop around it.

``bare`` of genai's model.onnx against ``genai`` is genai's loop cost; ``ours`` against ``bare``
of the same artifact is ours; ``bare`` of ours against ``bare`` of genai's is the graph's. Ratios
are per-round paired medians (genai / x: > 1 = faster than genai), which cancel most drift of a
shared machine; the rounds' own medians in ms per token are shown too. ``--clock cpu`` (one
thread only: ORT then runs every kernel on the calling thread) times the calling thread's CPU
time instead of the wall: time the scheduler gives to other processes is not counted, which
steadies the figures on a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np

CACHE_IN, CACHE_OUT = "past_key_values.", "present."
#: The clock every figure is read from (``--clock``).
clock: Callable[[], float] = time.perf_counter


def genai_loop(folder: Path, threads: int, prompt: list[int], new: int) -> Callable[[], float]:
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    model = og.Model(config)

    def run() -> float:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + new, batch_size=1)
        gen = og.Generator(model, params)
        gen.append_tokens(prompt)
        gen.generate_next_token()
        start = clock()
        for _ in range(new - 1):
            gen.generate_next_token()
            gen.get_next_tokens()
        return (clock() - start) / (new - 1) * 1e3

    return run


def ours_loop(artifact: Path, threads: int, prompt: list[int], new: int) -> tuple[Callable[[], float], list[float]]:
    """``compiled.generate`` (ms per decode token) and the list each step's ORT run time goes into."""
    import infercc

    compiled = infercc.load(artifact)
    compiled.config = compiled.config.replace(intra_op_threads=threads, inter_op_threads=1)
    session, inside = compiled.backend.session, []
    real = session.run_with_iobinding

    def timed(binding, *args):
        start = clock()
        out = real(binding, *args)
        inside.append((clock() - start) * 1e3)
        return out

    session.run_with_iobinding = timed

    from infercc.runtime import generate

    def run() -> float:
        generate.time = types.SimpleNamespace(perf_counter=clock)  # its own prompt/decode split, on our clock
        try:
            result = compiled.generate(prompt, max_new_tokens=new, temperature=0, ignore_eos=True)
        finally:
            generate.time = time
        return result.decode_seconds / (new - 1) * 1e3

    return run, inside


def bare_loop(model: Path, threads: int, prompt: list[int], new: int, head_size: int) -> Callable[[], float]:
    """A graph of the cached contract with one shared past/present buffer per cache tensor."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    total = len(prompt) + new

    def run() -> float:
        binding = session.io_binding()
        buffers = []
        for name, value in inputs.items():
            if name.startswith(CACHE_IN):
                shape = [1, int(value.shape[1]), total, head_size]
                buffers.append(np.zeros(shape, np.float32))
                binding.bind_cpu_input(name, buffers[-1])
                binding.bind_output(name.replace(CACHE_IN, CACHE_OUT), "cpu", 0, np.float32, shape, buffers[-1].ctypes.data)
        if "logits_to_keep" in inputs:
            binding.bind_cpu_input("logits_to_keep", np.asarray(1, np.int64))
        mask, ids = np.ones((1, total), np.int64), np.asarray([prompt], np.int64)
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask[:, :len(prompt)])
        binding.bind_output("logits", "cpu")
        session.run_with_iobinding(binding)
        token = int(binding.get_outputs()[0].numpy()[0, -1].argmax())
        logits, one = np.empty((1, 1, session.get_outputs()[0].shape[-1]), np.float32), np.empty((1, 1), np.int64)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        start = clock()
        for step in range(new - 1):
            one[0, 0] = token
            binding.bind_cpu_input("input_ids", one)
            binding.bind_cpu_input("attention_mask", mask[:, :len(prompt) + step + 1])
            session.run_with_iobinding(binding)
            token = int(logits[0, 0].argmax())
        return (clock() - start) / (new - 1) * 1e3

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode_gap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, action="append", required=True, help="a saved infercc artifact (repeatable)")
    parser.add_argument("--genai", type=Path, required=True, help="onnxruntime-genai model folder (genai_config.json)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: the thread's CPU time (--threads 1)")
    args = parser.parse_args(argv)
    if args.clock == "cpu":
        if args.threads != 1:
            parser.error("--clock cpu needs --threads 1: other threads' work would not be counted")
        global clock
        clock = time.thread_time
    prompt = np.random.default_rng(0).integers(3, 32000, args.prompt_len).tolist()
    head_size = json.loads((args.genai / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    loops: dict[str, Callable[[], float]] = {"genai": genai_loop(args.genai, args.threads, prompt, args.new_tokens)}
    inside: dict[str, list[float]] = {}
    for artifact in args.artifact:
        loops[f"ours {artifact.name}"], inside[artifact.name] = ours_loop(artifact, args.threads, prompt, args.new_tokens)
        loops[f"bare {artifact.name}"] = bare_loop(artifact / "model.onnx", args.threads, prompt, args.new_tokens, head_size)
    loops["bare genai model.onnx"] = bare_loop(args.genai / "model.onnx", args.threads, prompt, args.new_tokens, head_size)
    times: dict[str, list[float]] = {name: [] for name in loops}
    for run in loops.values():  # warm-up: first-run allocations, prepacking
        run()
    for values in inside.values():
        values.clear()
    for _ in range(args.rounds):
        for name, run in loops.items():
            times[name].append(run())
    genai = times["genai"]
    print(f"threads={args.threads}, clock {args.clock}, prompt {args.prompt_len} + {args.new_tokens} new, {args.rounds} rounds")
    for name, values in times.items():
        paired = statistics.median(g / v for g, v in zip(genai, values))
        extra = ""
        if name.startswith("ours "):
            extra = f" (inside ORT's run: {statistics.median(inside[name[5:]]):.2f})"
        print(f"  {name:40s} {statistics.median(values):7.2f} ms/token{extra}   genai/x {paired:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
