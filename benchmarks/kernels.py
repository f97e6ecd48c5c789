"""Matmul kernels of the generated-C runtime (codegen/kernels/gemm.h, qgemm.h) against ONNX Runtime's
MatMul / MatMulNBits on the same weights, shapes of the models the runtime is judged on:

    python -m benchmarks.kernels [--threads 2] [--rounds 7] [--shapes llama smollm] [--march native]
    python -m benchmarks.kernels --rows [--against main] [--threads 1 2] [--m 1 2 3 4 5 8 16] [--kinds int4 int8]

Per configuration: GFLOP/s and GB/s of weight streamed (each side's own weight bytes), median over
``--rounds`` interleaved rounds (ours, ORT, ours, ORT, ...), and ours / ORT. Not a test.

Fairness: each side runs in its own process (two spinning thread pools in one process, libgomp's
and ORT's, slow each other down by orders of magnitude on two cores) and pauses after its timed
call so its pool stops spinning before the other side's; a timed call lasts ~50 ms after an untimed
warm-up (an idle core wakes up slowly). Both sides run their matmuls with no Python in between --
ours in a C loop, ORT as one session of that many independent nodes (its per-node dispatch is part
of what a model pays) with distinct weights (ORT merges identical initializers and nodes). Small
weights are cycled through several copies (>= 32 MB in all) so that neither side reads them from L2
as a decode step, streaming every layer once, never does. A shared machine still adds noise: the
OpenMP kernels suffer more than ORT's pool from a competing process (see the report in issue 11).

``--rows``: how the quantized matmul's cost grows with the rows of one call (a speculative verify
step of k + 1 rows against a decode step of one), ours only, on SmolLM2-135M's shapes: ms per call
and the ratio to one row; ``--against REV`` builds the kernels of a git revision too and alternates
the two builds call by call in one process (ratios old / new from the same rounds); ``--resident``
keeps one copy of the weight (cache-resident where it fits) to tell memory-bound from
instruction-bound.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from infercc.codegen.packing import pack_f32, pack_quant
from infercc.passes.quantize.methods import quantize_rows
from infercc.passes.quantize.pack import to_nbits, unpack_zero_points

from .machine import machine_info

KERNELS = Path(__file__).resolve().parents[1] / "infercc" / "codegen" / "kernels"
SHAPES = {  # name -> (K, N, block)
    "llama": [(768, 768, 32), (768, 2048, 32), (768, 32000, 32)],
    "smollm": [(576, 1536, 32)],
}
STREAM_BYTES = 32 << 20
#: Pause after each timed call: a thread pool spins a while after its last work (ORT's for longer
#: than libgomp's), and a spinning pool in one process takes a core from the other's barrier.
SETTLE_S = 0.1
TIMED_S = 0.05
DRIVER = r"""
#include <time.h>
#include "gemm.h"
#include "qgemm.h"
void b_threads(int n) { omp_set_num_threads(n); }
double b_f32(int reps, int copies, int64_t M, int64_t N, int64_t K, const float *x, const void **w, float *y) {
    struct timespec a, b; clock_gettime(CLOCK_MONOTONIC, &a);
    for (int r = 0; r < reps; r++) for (int c = 0; c < copies; c++) icc_gemm_f32(M, N, K, x, w[c], 0, y);
    clock_gettime(CLOCK_MONOTONIC, &b); return (b.tv_sec - a.tv_sec) + 1e-9 * (b.tv_nsec - a.tv_nsec);
}
double b_q(int reps, int copies, int64_t M, int64_t N, int64_t K, int bits, int64_t block, const float *x,
           const void **w, float *y) {
    struct timespec a, b; clock_gettime(CLOCK_MONOTONIC, &a);
    for (int r = 0; r < reps; r++) for (int c = 0; c < copies; c++) icc_matmul_q(M, N, K, bits, block, x, w[c], y);
    clock_gettime(CLOCK_MONOTONIC, &b); return (b.tv_sec - a.tv_sec) + 1e-9 * (b.tv_nsec - a.tv_nsec);
}
"""


def build(march: str, out: Path, side: str = "", kernels: Path = KERNELS) -> ctypes.CDLL:
    src = out / f"bench_kernels{side}.c"
    src.write_text(DRIVER)
    so = src.with_suffix(".so")
    subprocess.run(["gcc", "-O3", "-fopenmp", "-shared", "-fPIC", f"-march={march}", f"-I{kernels}", str(src), "-o", str(so)],
                   check=True)
    lib = ctypes.CDLL(str(so))
    _setup_lib(lib)
    return lib


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _aligned(a: np.ndarray) -> np.ndarray:
    raw = np.empty(a.nbytes + 64, np.uint8)
    start = (-raw.ctypes.data) % 64
    out = raw[start : start + a.nbytes].view(a.dtype)
    out[...] = a.reshape(-1)
    return out


def _ort_session(nodes: list, inits: list, k: int, n: int, m: int, threads: int) -> ort.InferenceSession:
    graph = helper.make_graph(
        nodes, "bench", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, [m, n]) for node in nodes], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _weights(kind: str, k: int, n: int, block: int) -> tuple[np.ndarray, list[np.ndarray], int]:
    """(our packed weight, ORT's initializers, bits) for a seeded random [K, N] weight: both
    processes derive the same one."""
    w = (np.random.default_rng(0).standard_normal((k, n)) * 0.05).astype(np.float32)
    if kind == "fp32":
        return pack_f32(w), [w], 32
    bits = 8 if kind == "int8" else 4
    q = quantize_rows(w.T, bits, block, symmetric=False, method="rtn")
    if kind in ("int4h", "q4_1"):  # steps that are float16 values, as GGUF's are: our layout stores them as such
        q.scales = q.scales.astype(np.float16).astype(np.float32)
    b, s, z = to_nbits(q, False, np.float32)
    if kind == "q4_1":  # GGUF Q4_1's d * c + m, m a float16: packed with float16 minimums (flag 16)
        zeros = unpack_zero_points(z, bits, s.shape[1]).astype(np.float32)
        rests = (-s * zeros).astype(np.float16).astype(np.float32) + s * zeros
        return pack_quant(b, s, z, rests, k, n, bits, block), [b, s, z], bits
    return pack_quant(b, s, z, None, k, n, bits, block), [b, s, z], bits


class Side:
    """One contender of one (precision, M, K, N) configuration, set up in its own process."""

    def __init__(self, side: str, kind: str, m: int, k: int, n: int, block: int, threads: int, march: str, tmp: str) -> None:
        self.side, self.kind, self.m, self.k, self.n, self.block = side, kind, m, k, n, block
        ours, theirs, self.bits = _weights(kind, k, n, block)
        self.bytes = ours.nbytes if side == "ours" else sum(a.nbytes for a in theirs)
        self.copies = max(1, min(16, -(-STREAM_BYTES // ours.nbytes)))
        self.x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
        self.y = np.empty((m, n), np.float32)
        self.reps = 1
        if side == "ours":
            self.lib = build(march, Path(tmp), side=str(os.getpid()))
            self.lib.b_threads(threads)
            self.blobs = [_aligned(ours) for _ in range(self.copies)]
            self.table = (ctypes.c_void_p * self.copies)(*[_ptr(b) for b in self.blobs])
            return
        nodes, inits = [], []
        for c in range(self.copies):
            names = [f"{t}{c}" for t in ("W", "S", "Z")][: len(theirs)]
            # distinct bytes per copy: ORT would merge identical initializers and then the
            # identical nodes reading them (constant sharing + common subexpression elimination)
            arrays = [np.roll(a, c) for a in theirs]
            inits += [numpy_helper.from_array(a, nm) for a, nm in zip(arrays, names)]
            if kind == "fp32":
                nodes.append(helper.make_node("MatMul", ["X", names[0]], [f"Y{c}"]))
            else:
                nodes.append(helper.make_node("MatMulNBits", ["X", *names], [f"Y{c}"], domain="com.microsoft", K=k, N=n,
                                              bits=self.bits, block_size=block, accuracy_level=4))
        self.session = _ort_session(nodes, inits, k, n, m, threads)

    def calibrate(self) -> None:
        """Enough repetitions for a timed call of ~TIMED_S: shorter ones measure how fast an idle
        core wakes up (the first few milliseconds after a pause run measurably slower)."""
        self._timed()
        self.reps = max(1, int(TIMED_S / max(self._timed() * self.copies, 1e-9)))

    def run(self) -> float:
        """Seconds per matmul over one timed call, after an untimed one (the pause before it let
        the cores idle)."""
        saved, self.reps = self.reps, max(1, self.reps // 10)
        self._timed()
        self.reps = saved
        return self._timed()

    def _timed(self) -> float:
        if self.side == "theirs":
            feeds = {"X": self.x}
            start = time.perf_counter()
            for _ in range(self.reps):
                self.session.run(None, feeds)
            return (time.perf_counter() - start) / (self.reps * self.copies)
        args = (self.reps, self.copies, self.m, self.n, self.k)
        x, y = ctypes.c_void_p(_ptr(self.x)), ctypes.c_void_p(_ptr(self.y))
        if self.kind == "fp32":
            t = self.lib.b_f32(*args, x, self.table, y)
        else:
            t = self.lib.b_q(*args, self.bits, self.block, x, self.table, y)
        return t / (self.reps * self.copies)


def _worker(conn, *config) -> None:
    side = Side(*config)
    side.calibrate()
    conn.send(side.bytes)
    while conn.recv():
        t = side.run()
        time.sleep(SETTLE_S)  # let this side's pool stop spinning before the other side runs
        conn.send(t)


def measure(kind: str, m: int, k: int, n: int, block: int, args, threads: int, tmp: str) -> dict[str, tuple[float, int]]:
    """Median seconds per matmul and weight bytes of each side, interleaved round by round. Each
    side runs in its own process: two thread pools spinning in one process (libgomp's and ORT's)
    slow each other down by orders of magnitude on two cores."""
    ctx = mp.get_context("spawn")
    procs, conns, sizes = {}, {}, {}
    for side in ("ours", "theirs"):
        parent, child = ctx.Pipe()
        procs[side] = ctx.Process(target=_worker, args=(child, side, kind, m, k, n, block, threads, args.march, tmp))
        procs[side].start()
        conns[side] = parent
        sizes[side] = parent.recv()
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    for r in range(args.rounds + 1):  # round 0 warms up
        for side in ("ours", "theirs"):
            conns[side].send(True)
            t = conns[side].recv()
            if r:
                times[side].append(t)
    for side in ("ours", "theirs"):
        conns[side].send(False)
        procs[side].join()
    return {side: (statistics.median(times[side]), sizes[side]) for side in times}


def _setup_lib(lib: ctypes.CDLL) -> None:
    lib.b_threads.argtypes = [ctypes.c_int]
    lib.b_f32.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                          ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.b_q.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                        ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.b_f32.restype = lib.b_q.restype = ctypes.c_double


#: SmolLM2-135M's matmuls (K, N): q / o, k / v, gate / up, down, the LM head.
ROW_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]


def kernels_at(rev: str, tmp: str) -> Path:
    """The kernel headers as of git revision ``rev``, extracted under ``tmp``."""
    out = Path(tmp) / f"kernels-{rev.replace('/', '_')}"
    out.mkdir(exist_ok=True)
    tree = subprocess.run(["git", "-C", str(KERNELS.parents[2]), "archive", f"{rev}:infercc/codegen/kernels"],
                          check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=tree, check=True)
    return out


class RowSide:
    """One build of the kernels timing one weight at M = 1..max rows (C loop, no Python per call)."""

    def __init__(self, lib: ctypes.CDLL, blobs: list[np.ndarray], k: int, n: int, bits: int, block: int, m_max: int) -> None:
        self.lib, self.k, self.n, self.bits, self.block = lib, k, n, bits, block
        self.table = (ctypes.c_void_p * len(blobs))(*[_ptr(b) for b in blobs])
        self.copies = len(blobs)
        self.x = np.random.default_rng(1).standard_normal((m_max, k)).astype(np.float32)
        self.y = np.empty((m_max, n), np.float32)

    def seconds(self, m: int, reps: int) -> float:
        x, y = ctypes.c_void_p(_ptr(self.x)), ctypes.c_void_p(_ptr(self.y))
        t = self.lib.b_q(reps, self.copies, m, self.n, self.k, self.bits, self.block, x, self.table, y)
        return t / (reps * self.copies)


def rows_table(args, tmp: str) -> None:
    """Per (shape, kind, threads): ms per call for each M and its ratio to M = 1, this tree's
    kernels and (``--against``) a revision's, alternated call by call; medians of ``--rounds``."""
    libs = {"new": build(args.march, Path(tmp), "new")}
    if args.against:
        libs["old"] = build(args.march, Path(tmp), "old", kernels_at(args.against, tmp))
    old = " | old ms  x1row  old/new  outputs" if args.against else ""
    for k, n in ROW_SHAPES:
        for kind in args.kinds:
            packed, _, bits = _weights(kind, k, n, 32)
            copies = 1 if args.resident else max(1, min(16, -(-STREAM_BYTES // packed.nbytes)))
            blobs = [_aligned(packed) for _ in range(copies)]
            for threads in args.threads:
                sides = {name: RowSide(lib, blobs, k, n, bits, 32, max(args.m)) for name, lib in libs.items()}
                libs["new"].b_threads(threads)
                print(f"# K={k} N={n} {kind} threads={threads} weight {packed.nbytes / 2**20:.2f} MiB x {copies}"
                      f"\n{'M':>3} | new ms  x1row  GB/s{old}", flush=True)
                base: dict[str, float] = {}
                for m in args.m:
                    reps = max(1, int(TIMED_S / max(sides["new"].seconds(m, 1) * copies, 1e-9)))
                    times: dict[str, list[float]] = {name: [] for name in sides}
                    for _ in range(args.rounds):
                        for name, side in sides.items():
                            side.seconds(m, max(1, reps // 10))  # untimed: wake the pool
                            times[name].append(side.seconds(m, reps))
                    med = {name: statistics.median(t) for name, t in times.items()}
                    base = base or med
                    line = f"{m:>3} | {med['new'] * 1e3:6.3f} {med['new'] / base['new']:5.2f}x {packed.nbytes / med['new'] * 1e-9:5.1f}"
                    if "old" in med:
                        line += f" | {med['old'] * 1e3:6.3f} {med['old'] / base['old']:5.2f}x {med['old'] / med['new']:5.2f}x"
                        a, b = sides["new"].y[:m], sides["old"].y[:m]
                        line += "  same" if np.array_equal(a, b) else f"  differ: max {np.max(np.abs(a - b)):.2g}"
                    print(line, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", nargs="+", type=int, default=None, help="default 2 (--rows: 2 1)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--kinds", nargs="+", default=None, choices=["fp32", "int4", "int4h", "q4_1", "int8"],
                        help="int4h: int4 whose scales are float16 values (GGUF-like; ORT gets them as float32); "
                             "q4_1: GGUF Q4_1's form (float16 minimums; --rows only); default fp32 int4 int4h int8 (--rows: int4 int8)")
    parser.add_argument("--m", nargs="+", type=int, default=None, help="rows per call (default 1 128; --rows: 1 2 3 4 5 8 16)")
    parser.add_argument("--rows", action="store_true", help="cost against rows per call, ours only (module docstring)")
    parser.add_argument("--against", help="--rows: a git revision whose kernels are timed alternately with this tree's")
    parser.add_argument("--resident", action="store_true", help="--rows: one copy of each weight (cache-resident where it fits)")
    parser.add_argument("--march", default="native", help="gcc -march for our kernels (haswell: the AVX2 path)")
    args = parser.parse_args(argv)
    args.threads = args.threads or ([2, 1] if args.rows else [2])
    args.kinds = args.kinds or (["int4", "int8"] if args.rows else ["fp32", "int4", "int4h", "int8"])
    args.m = args.m or ([1, 2, 3, 4, 5, 8, 16] if args.rows else [1, 128])
    info = machine_info()
    print(f"# {info.get('cpu_model')} | threads {args.threads} | march {args.march} | onnxruntime {ort.__version__}")
    if args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            rows_table(args, tmp)
        return
    if "q4_1" in args.kinds:
        parser.error("--kinds q4_1 is for --rows only (ORT's MatMulNBits has no minimums)")
    if len(args.threads) > 1:
        parser.error("one --threads value at a time against ORT (several only with --rows)")
    results: dict[tuple[str, int, int, int], tuple[float, float]] = {}  # -> (our GF/s, ours/ORT)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'kind':5} {'M':>4} {'K':>5} {'N':>6} | {'ours GF/s':>9} {'GB/s':>6} | {'ORT GF/s':>9} {'GB/s':>6} | ours/ORT")
        for shape in args.shapes:
            for k, n, block in SHAPES[shape]:
                for m in args.m:
                    for kind in args.kinds:
                        got = measure(kind, m, k, n, block, args, args.threads[0], tmp)
                        (a, ab), (b, bb) = got["ours"], got["theirs"]
                        gf = 2e-9 * m * n * k
                        results[kind, m, k, n] = (gf / a, b / a)
                        print(f"{kind:5} {m:>4} {k:>5} {n:>6} | {gf / a:9.1f} {ab / a * 1e-9:6.1f} | "
                              f"{gf / b:9.1f} {bb / b * 1e-9:6.1f} | {b / a:6.2f}x", flush=True)
    for line in verdicts(results):
        print(line)


def verdicts(results: dict[tuple[str, int, int, int], tuple[float, float]]) -> list[str]:
    """The kernel targets of issue 11, met or missed, per shape measured."""
    lines = []
    for (kind, m, k, n), (gflops, ratio) in sorted(results.items()):
        shape = f"M={m} K={k} N={n}"
        if m == 1 and kind in ("int4", "int4h", "fp32"):
            need = 1.0 if kind == "fp32" else 1.3
            lines.append(f"{'MET ' if ratio >= need else 'MISS'} {kind} GEMV {shape}: {ratio:.2f}x ORT (target >= {need}x)")
        if m > 1 and kind in ("int4", "int4h") and ("fp32", m, k, n) in results:
            fp32 = results["fp32", m, k, n][0]
            lines.append(f"{'MET ' if gflops >= fp32 else 'MISS'} {kind} {shape}: {gflops:.0f} GFLOP/s vs our fp32 {fp32:.0f}")
    return lines


if __name__ == "__main__":
    main()
