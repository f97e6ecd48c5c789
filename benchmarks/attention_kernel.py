"""The generated-C runtime's attention kernel (codegen/kernels/attention.h) against ONNX Runtime's
com.microsoft GroupQueryAttention and MultiHeadAttention on the same shapes, one process, interleaved.

    python -m benchmarks.attention_kernel [--threads 2] [--rounds 7] [--calls 50]

Shapes: LLaMA-100M (H=12, Hkv=4, D=64) and SmolLM2-135M (H=9, Hkv=3, D=64), batch 1; decode
(S=1) after P in {128, 512, 2048} cached tokens and a 128-token prefill (P=0, causal). Contenders:

* ``icc-f32`` / ``icc-f16``: icc_attention, fp32 or fp16 cache, appending in place (past = present,
  as the C runtime's cache does), built with -march=native.
* ``ort-gqa``: GroupQueryAttention with a past of P rows and a new present (the past is copied
  each call); ``ort-gqa-shared``: the same with past and present bound to one max-length buffer
  (I/O binding, no copy), ORT's fastest decode form.
* ``ort-mha``: MultiHeadAttention as infercc's ORT lowering uses it (kv_cache/lower.py): the query
  heads of a group folded into rows, num_heads = Hkv, past/present copied; a causal bias for the
  prefill.

Each round times ``--calls`` calls per contender (A B C A B C ...) and keeps the median; the table
gives the median over rounds in microseconds per call and the GB/s of K/V cache read (the P+S rows
of every kv head, at the cache's element size). Each block starts with 3 untimed calls, and
libgomp's spin after a parallel region is shortened (GOMP_SPINCOUNT=20000 unless set) so that one
contender's idle pool does not spin on the cores the next one runs on. ORT's pools spin too
(3 sessions, one worker each, on top of the kernel's): ``ICC_BENCH_ORT_SPIN=0`` turns their
spinning off, ``--only ort-gqa-shared`` measures one contender alone.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

KERNELS = Path(__file__).resolve().parents[1] / "infercc" / "codegen" / "kernels"
SHAPES = {"llama100m": (12, 4, 64), "smollm2": (9, 3, 64)}
CASES = [(1, 128), (1, 512), (1, 2048), (128, 0)]  # (S, P)
DRIVER = """#pragma GCC diagnostic ignored "-Wunused-function"
#include "attention.h"
#include <omp.h>
void bench_attention(const icc_attention_args *a, int calls) { for (int i = 0; i < calls; i++) icc_attention(a); }
void bench_threads(int n) { omp_set_num_threads(n); }
"""
SPIN = os.environ.get("ICC_BENCH_ORT_SPIN", "1") == "1"
P64, PF, VP = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class Args(ctypes.Structure):
    _fields_ = [(n, P64) for n in ("B", "S", "P", "H", "Hkv", "D", "Dv")] + [
        ("scale", PF), ("softcap", PF), ("mask_value", PF), ("causal", ctypes.c_int), ("left_window", P64),
        ("q", VP), ("k", VP), ("v", VP), ("mask_bool", VP), ("mask_float", VP), ("mask_stride", P64 * 4),
        ("cache_dtype", ctypes.c_int), ("past_k", VP), ("past_v", VP), ("past_cap", P64),
        ("present_k", VP), ("present_v", VP), ("present_cap", P64), ("out", VP)]


def build(folder: Path) -> ctypes.CDLL:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise SystemExit("gcc is not installed")
    (folder / "bench.c").write_text(DRIVER)
    subprocess.run([gcc, "-O3", "-fopenmp", "-march=native", "-Wall", "-Wextra", "-shared", "-fPIC", f"-I{KERNELS}",
                    str(folder / "bench.c"), "-o", str(folder / "bench.so"), "-lm"], check=True)
    return ctypes.CDLL(str(folder / "bench.so"))


def icc(lib: ctypes.CDLL, x: dict, H: int, Hkv: int, D: int, S: int, P: int, half: bool) -> Callable[[], None]:
    """A call appending S rows in place to a cache of capacity P+S holding P rows."""
    dtype = np.float16 if half else np.float32
    cache = {n: np.zeros((1, Hkv, P + S, D), dtype) for n in ("k", "v")}
    for n in "kv":
        cache[n][:, :, :P] = x["past_" + n]
    out = np.zeros((1, S, H * D), np.float32)
    a = Args(B=1, S=S, P=P, H=H, Hkv=Hkv, D=D, Dv=D, scale=D ** -0.5, mask_value=-np.inf, causal=1, left_window=-1,
             q=x["q"].ctypes.data, k=x["k"].ctypes.data, v=x["v"].ctypes.data, cache_dtype=int(half),
             past_k=cache["k"].ctypes.data if P else None, past_v=cache["v"].ctypes.data if P else None,
             past_cap=P + S, present_k=cache["k"].ctypes.data, present_v=cache["v"].ctypes.data,
             present_cap=P + S, out=out.ctypes.data)
    keep = (cache, out, a)

    def call(calls: int) -> None:
        lib.bench_attention(ctypes.byref(keep[2]), calls)

    return call


def session(node: helper.NodeProto, inputs: list, outputs: list, threads: int) -> ort.InferenceSession:
    graph = helper.make_graph([node], "attention", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    if not SPIN:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def vi(name: str, shape: list, elem: int = TensorProto.FLOAT) -> helper.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def ort_gqa(x: dict, H: int, Hkv: int, D: int, S: int, P: int, threads: int, shared: bool) -> Callable[[int], None]:
    cap = P + S if shared else P
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens", "total"], ["y", "ok", "ov"],
                            domain="com.microsoft", num_heads=H, kv_num_heads=Hkv, scale=D ** -0.5)
    ins = [vi("q", [1, S, H * D]), vi("k", [1, S, Hkv * D]), vi("v", [1, S, Hkv * D]), vi("pk", [1, Hkv, cap, D]),
           vi("pv", [1, Hkv, cap, D]), vi("seqlens", [1], TensorProto.INT32), vi("total", [], TensorProto.INT32)]
    sess = session(node, ins, [vi("y", None), vi("ok", None), vi("ov", None)], threads)
    pk, pv = (np.zeros((1, Hkv, cap, D), np.float32) for _ in range(2))
    pk[:, :, :P], pv[:, :, :P] = x["past_k"], x["past_v"]
    feeds = {"q": x["q"], "k": x["k"], "v": x["v"], "pk": pk, "pv": pv,
             "seqlens": np.array([P + S - 1], np.int32), "total": np.array(P + S, np.int32)}
    if not shared:
        return lambda calls: [sess.run(None, feeds) for _ in range(calls)] and None
    bind = sess.io_binding()
    values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in feeds.items()}
    for n, value in values.items():
        bind.bind_ortvalue_input(n, value)
    bind.bind_output("y")
    bind.bind_ortvalue_output("ok", values["pk"])
    bind.bind_ortvalue_output("ov", values["pv"])

    def call(calls: int) -> None:
        for _ in range(calls):
            sess.run_with_iobinding(bind)

    return call


def ort_mha(x: dict, H: int, Hkv: int, D: int, S: int, P: int, threads: int) -> Callable[[int], None]:
    g = H // Hkv
    query = x["q"].reshape(1, S, Hkv, g, D).transpose(0, 1, 3, 2, 4).reshape(1, S * g, Hkv * D).copy()
    names, ins = ["q", "k", "v", "", "", ""], [vi("q", [1, S * g, Hkv * D]), vi("k", [1, S, Hkv * D]),
                                              vi("v", [1, S, Hkv * D])]
    feeds = {"q": query, "k": x["k"], "v": x["v"]}
    if S > 1:  # the causal triangle as a bias, each query row repeated for the g heads it holds
        tri = np.where(np.arange(S)[None, :] <= np.arange(S)[:, None] + P, 0.0, -np.inf).astype(np.float32)
        names[5], feeds["bias"] = "bias", np.repeat(tri, g, axis=0)[None, None]
        ins.append(vi("bias", [1, 1, S * g, P + S]))
    if P:
        names += ["pk", "pv"]
        feeds["pk"], feeds["pv"] = x["past_k"], x["past_v"]
        ins += [vi("pk", [1, Hkv, P, D]), vi("pv", [1, Hkv, P, D])]
    node = helper.make_node("MultiHeadAttention", names, ["y", "ok", "ov"], domain="com.microsoft", num_heads=Hkv,
                            scale=D ** -0.5)
    sess = session(node, ins, [vi("y", None), vi("ok", None), vi("ov", None)], threads)
    return lambda calls: [sess.run(None, feeds) for _ in range(calls)] and None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--only", default="", help="comma-separated contenders to run (default: all)")
    args = ap.parse_args()
    # libgomp's workers spin ~300k iterations after a parallel region, long enough to steal the
    # cores from ORT's pool in the next contender's block (2 threads + 2 threads on 2 cores); a short
    # spin still covers back-to-back kernel calls (read when the library loads: set it before)
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(Path(tmp))
        lib.bench_threads(args.threads)
        print(f"onnxruntime {ort.__version__}, {args.threads} threads, {args.rounds} rounds x {args.calls} calls; "
              "us per call: median (min) of rounds; GB/s of K/V cache read at the median")
        for model, (H, Hkv, D) in SHAPES.items():
            for S, P in CASES:
                rng = np.random.default_rng(0)
                x = {"q": rng.standard_normal((1, S, H * D)).astype(np.float32),
                     "k": rng.standard_normal((1, S, Hkv * D)).astype(np.float32),
                     "v": rng.standard_normal((1, S, Hkv * D)).astype(np.float32),
                     "past_k": rng.standard_normal((1, Hkv, P, D)).astype(np.float32),
                     "past_v": rng.standard_normal((1, Hkv, P, D)).astype(np.float32)}
                runs = {"icc-f32": (icc(lib, x, H, Hkv, D, S, P, False), 4),
                        "icc-f16": (icc(lib, x, H, Hkv, D, S, P, True), 2),
                        "ort-gqa": (ort_gqa(x, H, Hkv, D, S, P, args.threads, False), 4),
                        "ort-gqa-shared": (ort_gqa(x, H, Hkv, D, S, P, args.threads, True), 4),
                        "ort-mha": (ort_mha(x, H, Hkv, D, S, P, args.threads), 4)}
                if args.only:
                    runs = {n: r for n, r in runs.items() if n in args.only.split(",")}
                times: dict[str, list[float]] = {n: [] for n in runs}
                for fn, _ in runs.values():
                    fn(5)  # warm-up
                for _ in range(args.rounds):
                    for name, (fn, _) in runs.items():
                        fn(3)  # the other pool's threads stop spinning, this one's wake up
                        t0 = time.perf_counter()
                        fn(args.calls)
                        times[name].append((time.perf_counter() - t0) / args.calls * 1e6)
                cells = []
                for name, (_, size) in runs.items():
                    us, best = statistics.median(times[name]), min(times[name])
                    gbs = Hkv * (P + S) * 2 * D * size / us / 1e3
                    cells.append(f"{name} {us:7.1f} ({best:7.1f}) us {gbs:5.1f} GB/s")
                print(f"{model:9s} S={S:<3d} P={P:<4d} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
