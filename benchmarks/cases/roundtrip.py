"""Round-trip overhead: one ONNX file run by plain onnxruntime vs infercc (no-opt and default).

Why: infercc's import -> export path must cost nothing at run time (B should match A within
noise) before the gains of its optimizations (C vs A) mean anything.  The infercc setups also
compare their outputs with plain onnxruntime, because a fast but wrong model is no result.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks.harness import Case, ConfigSpec, SkipConfig

# Same execution conditions as config A: CPU EP, one inter-op thread (A runs sequentially).
PARITY_OPTIONS = {"provider": "cpu", "inter_op_threads": 1, "backend": "ort"}

ORT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
ORT_DTYPES = {
    "float": np.float32,
    "float16": np.float16,
    "double": np.float64,
    "int64": np.int64,
    "int32": np.int32,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("roundtrip case")
    g.add_argument("--model", help="ONNX file to run (default: a small transformer built on the fly)")
    g.add_argument("--feeds", help=".npz of input arrays (default: random feeds from the input signature)")
    g.add_argument("--batch", type=int, default=1, help="value for symbolic batch dims (default 1)")
    g.add_argument("--seq", type=int, default=128, help="value for other symbolic dims (default 128)")
    g.add_argument("--layers", type=int, default=4, help="layers of the built-in model (default 4)")
    g.add_argument("--hidden", type=int, default=256, help="hidden size of the built-in model (default 256)")
    g.add_argument("--seed", type=int, default=0, help="seed for built-in weights and random feeds")
    g.add_argument(
        "--ort-level",
        choices=list(ORT_LEVELS),
        default="all",
        help="graph optimization level of the plain onnxruntime config A (default: all, ORT's default)",
    )


def build_case(args: argparse.Namespace) -> Case:
    if args.model:
        model_path = Path(args.model).resolve()
    else:
        model_path = Path(args.out) / "model.onnx"
        model_path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(build_tiny_transformer(args.layers, args.hidden, seed=args.seed), model_path)
    common = {
        "model": str(model_path),
        "feeds": str(Path(args.feeds).resolve()) if args.feeds else None,
        "batch": args.batch,
        "seq": args.seq,
        "seed": args.seed,
    }
    configs = [
        ConfigSpec(
            "ort",
            f"{__name__}:setup_ort",
            {**common, "level": args.ort_level},
            "A: plain onnxruntime InferenceSession, CPU EP",
        ),
        ConfigSpec(
            "infercc-noopt",
            f"{__name__}:setup_infercc",
            {**common, "optimize": False},
            "B: infercc import -> export -> onnxruntime, no optimization",
        ),
        ConfigSpec(
            "infercc-opt",
            f"{__name__}:setup_infercc",
            {**common, "optimize": True},
            "C: infercc with default optimization",
        ),
    ]
    reason = infercc_unavailable()
    skipped = {c.name: reason for c in configs[1:]} if reason else {}
    return Case(
        name="roundtrip",
        description="round-trip overhead: plain onnxruntime vs infercc (no-opt, default opt)",
        configs=[c for c in configs if c.name not in skipped],
        baseline="ort",
        skipped=skipped,
        notes={
            "model": str(model_path),
            "built_in_model": not args.model,
            "feeds": common["feeds"] or "random",
            "batch": args.batch,
            "seq": args.seq,
        },
    )


def infercc_unavailable() -> str | None:
    """Why infercc cannot be benchmarked here, or None; checked up front so the run says so once."""
    try:
        import infercc
    except Exception as exc:  # any import-time breakage means: skip, and say why
        return f"import infercc failed: {type(exc).__name__}: {exc}"
    if not callable(getattr(infercc, "compile", None)):
        return "infercc.compile does not exist (yet)"
    return None


# ---------------------------------------------------------------- setup functions (run in the worker)


def _session(model: str, threads: int, level: str = "all") -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[level])
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def make_feeds(
    session: Any, batch: int, seq: int, seed: int = 0, feeds: str | None = None
) -> dict[str, np.ndarray]:
    """Inputs from an .npz (keys = input names, or 'feed:<name>' as in tests/fixtures), or random ones.

    Random feeds follow the input signature. Symbolic/unknown dims: named like '*batch*' or first
    axis -> batch, any other -> seq. Integer inputs are drawn in [0, 100) (valid token ids for any
    real vocabulary), except where that would be meaningless or out of range: '*mask*' -> ones,
    '*token_type*' -> zeros, '*position*' -> 0, 1, 2, ... along the last axis.
    """
    if feeds:
        with np.load(feeds) as data:
            tagged = any(k.startswith("feed:") for k in data.files)
            return {
                k.removeprefix("feed:"): data[k] for k in data.files if not tagged or k.startswith("feed:")
            }
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for inp in session.get_inputs():
        shape = [
            d if isinstance(d, int) and d > 0 else (batch if i == 0 or "batch" in str(d).lower() else seq)
            for i, d in enumerate(inp.shape)
        ]
        dtype = ORT_DTYPES.get(inp.type.removeprefix("tensor(").rstrip(")"))
        name = inp.name.lower()
        if dtype is None:
            raise ValueError(f"cannot generate feeds for input {inp.name!r} of type {inp.type}; pass --feeds")
        if "mask" in name:
            out[inp.name] = np.ones(shape, dtype=dtype)
        elif "token_type" in name:
            out[inp.name] = np.zeros(shape, dtype=dtype)
        elif "position" in name and shape:
            out[inp.name] = np.broadcast_to(np.arange(shape[-1]), shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer) or dtype == np.bool_:
            out[inp.name] = rng.integers(0, 2 if dtype == np.bool_ else 100, size=shape).astype(dtype)
        else:
            out[inp.name] = rng.standard_normal(shape).astype(dtype)
    return out


def _node_count(model: str | onnx.ModelProto) -> int:
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(model, load_external_data=False)
    return len(proto.graph.node)


def setup_ort(
    threads: int, model: str, feeds: str | None, batch: int, seq: int, seed: int, level: str = "all"
) -> tuple[Callable[[], Any], dict]:
    sess = _session(model, threads, level)
    inputs = make_feeds(sess, batch, seq, seed, feeds)
    return (lambda: sess.run(None, inputs)), {"nodes": _node_count(model), "ort_level": level}


def setup_infercc(
    threads: int, model: str, feeds: str | None, batch: int, seq: int, seed: int, optimize: bool
) -> tuple[Callable[[], Any], dict]:
    reason = infercc_unavailable()
    if reason:
        raise SkipConfig(reason)
    import infercc

    ref = _session(model, threads)
    inputs = make_feeds(ref, batch, seq, seed, feeds)
    expected = dict(zip([o.name for o in ref.get_outputs()], ref.run(None, inputs)))
    del ref
    t0 = time.perf_counter()
    compiled = infercc.compile(model, optimize=optimize, intra_op_threads=threads, **PARITY_OPTIONS)
    meta: dict[str, Any] = {"compile_s": time.perf_counter() - t0}
    got = compiled.run(inputs)  # also creates the backend session, so setup pays for it, not round 1
    graph = getattr(getattr(compiled, "model", None), "graph", None)  # infercc IR or a ModelProto
    nodes = getattr(graph, "nodes", None) or getattr(graph, "node", None)
    if nodes is not None:
        meta["nodes"] = len(nodes)
    records = getattr(getattr(compiled, "diagnostics", None), "records", None)
    if records is not None:
        meta["passes_applied"] = sum(getattr(r, "status", "") == "applied" for r in records)
    missing = sorted(set(expected) - set(got))
    if missing:
        meta["missing_outputs"] = missing
    diffs = [
        float(np.max(np.abs(np.asarray(got[k], np.float64) - np.asarray(v, np.float64)), initial=0.0))
        for k, v in expected.items()
        if k in got
    ]
    meta["max_abs_diff"] = max(diffs, default=float("nan"))
    return (lambda: compiled.run(inputs)), meta


# ---------------------------------------------------------------- built-in model


def build_tiny_transformer(
    layers: int = 4, hidden: int = 256, ffn: int | None = None, vocab: int = 1000, seed: int = 0
) -> onnx.ModelProto:
    """Pre-LN encoder: embedding, `layers` x (LayerNorm, MHA, residual, LayerNorm, erf-GELU MLP, residual), LM head.

    Written out op by op (as exporters emit it) so that fusion passes have real patterns to find.
    Input ``input_ids`` int64 [batch, seq]; output ``logits`` float [batch, seq, vocab].
    """
    rng = np.random.default_rng(seed)
    heads, ffn = max(1, hidden // 64), ffn or 4 * hidden
    head_dim = hidden // heads
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(name: str, *shape: int) -> str:
        return const(name, (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32))

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def layer_norm(x: str, p: str) -> str:
        g, b = const(f"{p}.g", np.ones(hidden, np.float32)), const(f"{p}.b", np.zeros(hidden, np.float32))
        return node("LayerNormalization", [x, g, b], f"{p}.out", axis=-1, epsilon=1e-5)

    def linear(x: str, p: str, n_in: int, n_out: int) -> str:
        mm = node("MatMul", [x, weight(f"{p}.w", n_in, n_out)], f"{p}.mm")
        return node("Add", [mm, const(f"{p}.bias", np.zeros(n_out, np.float32))], f"{p}.out")

    split = const("shape.heads", np.array([0, 0, heads, head_dim], np.int64))
    merge = const("shape.hidden", np.array([0, 0, hidden], np.int64))
    scale = const("attn.scale", np.array(1.0 / np.sqrt(head_dim), np.float32))
    half, one = const("half", np.array(0.5, np.float32)), const("one", np.array(1.0, np.float32))
    sqrt2 = const("sqrt2", np.array(np.sqrt(2.0), np.float32))
    x = node("Gather", [weight("embed", vocab, hidden), "input_ids"], "embed.out")
    for i in range(layers):
        p = f"l{i}"
        h = layer_norm(x, f"{p}.ln1")
        q, k, v = (
            node("Reshape", [linear(h, f"{p}.{n}", hidden, hidden), split], f"{p}.{n}.split") for n in "qkv"
        )
        q = node("Transpose", [q], f"{p}.q.t", perm=[0, 2, 1, 3])
        k = node("Transpose", [k], f"{p}.k.t", perm=[0, 2, 3, 1])
        v = node("Transpose", [v], f"{p}.v.t", perm=[0, 2, 1, 3])
        scores = node("Mul", [node("MatMul", [q, k], f"{p}.qk"), scale], f"{p}.scores")
        ctx = node("MatMul", [node("Softmax", [scores], f"{p}.probs", axis=-1), v], f"{p}.ctx")
        ctx = node(
            "Reshape", [node("Transpose", [ctx], f"{p}.ctx.t", perm=[0, 2, 1, 3]), merge], f"{p}.ctx.merge"
        )
        x = node("Add", [x, linear(ctx, f"{p}.o", hidden, hidden)], f"{p}.res1")
        u = linear(layer_norm(x, f"{p}.ln2"), f"{p}.up", hidden, ffn)
        erf = node("Erf", [node("Div", [u, sqrt2], f"{p}.gelu.div")], f"{p}.gelu.erf")
        gelu = node(
            "Mul",
            [node("Mul", [u, half], f"{p}.gelu.half"), node("Add", [erf, one], f"{p}.gelu.add")],
            f"{p}.gelu",
        )
        x = node("Add", [x, linear(gelu, f"{p}.down", ffn, hidden)], f"{p}.res2")
    logits = node("MatMul", [layer_norm(x, "final_ln"), weight("lm_head", hidden, vocab)], "logits")
    graph = helper.make_graph(
        nodes,
        "tiny_transformer",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", "seq", vocab])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="infercc-bench"
    )
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    onnx.checker.check_model(model, full_check=True)
    return model
