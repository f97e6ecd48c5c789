"""What quantization cost and saved: weight bytes before/after, per-layer reconstruction error, and
the end-to-end output error against the float model on a fixed input.

The end-to-end figure is measured by the pass itself (a lowered copy of the model before and after
it, run by onnxruntime on CPU on seeded random feeds) because no per-layer number predicts it: errors
compound through the layers and the norms, and a user deciding between int8 and int4 needs the
output-level figure. Per float output: the largest absolute difference relative to the reference's
value range, the mean absolute difference, the cosine similarity and, for outputs whose last axis is
a distribution (logits), how often the arg-max agrees.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...ir import Graph, Model
from ..base import PassContext
from ..diagnostics import PassRecord
from ..kv_cache.contract import PAST_PREFIX, PRESENT_PREFIX


def weight_bytes(graph: Graph) -> int:
    """Bytes of the constants of ``graph`` as ONNX stores them."""
    return int(sum(v.const.nbytes for v in graph.initializers.values()))


def runnable(model: Model, config) -> Model:
    """A copy with the canonical ops lowered for onnxruntime on CPU (as the manager's check does)."""
    from ..canonical import DOMAIN
    from ..lowering import LowerCanonicalOps

    copy = model.clone()
    if any(n.domain == DOMAIN for n in copy.graph.walk()):
        ort_cpu = config.replace(provider="cpu", backend="ort")  # whatever runtime the model is compiled for
        LowerCanonicalOps().run(copy, PassContext(ort_cpu, PassRecord(LowerCanonicalOps.name)))
    return copy


def end_to_end(before: Model, after: Model, config, *, seed: int = 0) -> dict[str, Any]:
    """Run both models on the same seeded random feeds and compare every float output."""
    from ...runtime.feeds import random_feeds
    from ...runtime.ort_backend import OrtBackend

    feeds = random_feeds(before.graph, np.random.default_rng(seed))
    threads = config.intra_op_threads
    expected = OrtBackend(runnable(before, config), ["CPUExecutionProvider"], intra_op_threads=threads).run(feeds)
    actual = OrtBackend(runnable(after, config), ["CPUExecutionProvider"], intra_op_threads=threads).run(feeds)
    outputs = {name: compare(ref, actual[name]) for name, ref in expected.items() if ref.dtype.kind == "f"}
    return {"feeds": {k: list(v.shape) for k, v in feeds.items()}, "seed": seed, "outputs": outputs}


def compare(reference: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    ref, got = reference.astype(np.float64), actual.astype(np.float64)
    diff = np.abs(got - ref)
    span = float(ref.max() - ref.min()) if ref.size else 0.0
    norms = float(np.linalg.norm(ref) * np.linalg.norm(got))
    out = {
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "max_abs_rel_range": float(diff.max() / span) if span else 0.0,
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "cosine": float(np.dot(ref.ravel(), got.ravel()) / norms) if norms else 1.0,
    }
    if ref.ndim >= 2 and ref.shape[-1] > 1:
        out["top1_agreement"] = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
    return {k: round(v, 6) for k, v in out.items()}


def format_report(info: dict[str, Any], top: int = 10) -> str:
    """The text ``infercc convert --quantize`` prints: sizes, the worst layers, end-to-end error."""
    if not info.get("layers"):
        return "quantization: no weight was quantized"
    size = info["size"]
    before, after = size["weights_before"], size["weights_after"]
    if info["quantize"] == "auto":
        header = ("quantization: auto (weights on a quantized grid keep it "
                  f"{'(offset grids: moved to integer zero points)' if info.get('native_fitted') else 'exactly'}; "
                  "float weights stay float)")
    else:
        header = (f"quantization: {info['quantize']} ({info['method']}, "
                  f"{'symmetric' if info['symmetric'] else 'asymmetric'}, int4 block {info['block_size']}, "
                  f"int8 per channel; lm_head {info['lm_head']}, embeddings {info['embeddings']})")
    lines = [
        header,
        f"  weights    {_mb(before)} -> {_mb(after)} ({after / before:.3f}x)" if before else "",
        f"  layers     {len(info['layers'])} quantized, {len(info.get('skipped', []))} kept float",
    ]
    if info.get("calibration"):
        seconds = ", ".join(f"{k} {v:.1f} s" for k, v in info.get("seconds", {}).items())
        lines.append(f"  calibration {info['calibration']['inputs']} ({seconds})")
    methods: dict[str, int] = {}
    for layer in info["layers"]:
        kind = f"{layer['method']}{'/' + layer['native'] if layer.get('native') else ''} int{layer['bits']}"
        methods[kind] = methods.get(kind, 0) + 1
    lines.append("  methods    " + ", ".join(f"{n} {k}" for k, n in sorted(methods.items())))
    fitted = info.get("native_fitted")
    if fitted:
        lines.append(f"  fitted     {fitted['weights']} offset-grid (Q4_1-like) weights moved to integer zero points "
                     f"for MatMulNBits' fast kernel: relative error median {fitted['rel_error_median']:.4f}, max "
                     f"{fitted['rel_error_max']:.4f} (quant_native_exact=True keeps them exact, slower)")
    mixed = info.get("mixed_precision")
    if mixed:
        lines.append(f"  mixed      {mixed['kept_int8']} of {mixed['candidates']} int4 weights kept int8 "
                     f"({mixed['int8_parameters']} parameters, limit {mixed['int8_fraction']:.0%}), by measured sensitivity")
    worst = sorted(info["layers"], key=lambda layer: -layer["rel_error"])[:top]
    lines.append(f"  worst {len(worst)} layers by relative reconstruction error ||W - Q(W)|| / ||W||"
                 f"{' (output error on calibration inputs)' if any('output_error' in x for x in worst) else ''}:")
    for layer in worst:
        extra = f" ({layer['output_error']:.5f})" if "output_error" in layer else ""
        note = f"  [{layer['fallback']}]" if layer.get("fallback") else ""
        lines.append(
            f"    {layer['rel_error']:.5f}{extra}  int{layer['bits']} {layer['method']:<6} {layer['role']:<9} "
            f"{layer['K']}x{layer['N']}  {layer['node']}{note}"
        )
    for skip in info.get("skipped", [])[:top]:
        lines.append(f"  kept float: {skip['node']}: {skip['reason']}")
    e2e = info.get("end_to_end")
    if e2e:
        feeds = [f"{k}{v}" for k, v in e2e["feeds"].items() if not k.startswith(PAST_PREFIX)]
        past = [v for k, v in e2e["feeds"].items() if k.startswith(PAST_PREFIX)]
        if past:
            feeds.append(f"{len(past)} cache inputs like {past[0]}")
        lines.append(f"  end-to-end vs the float model (seeded random feeds {', '.join(feeds)}):")
        cache = {k: m for k, m in e2e["outputs"].items() if k.startswith(PRESENT_PREFIX)}
        for name, m in e2e["outputs"].items():
            if name in cache:
                continue
            top1 = f", top-1 agreement {m['top1_agreement']:.4f}" if "top1_agreement" in m else ""
            lines.append(
                f"    {name}: max |diff| {m['max_abs']:.4g} ({m['max_abs_rel_range']:.4f} of its range), "
                f"mean |diff| {m['mean_abs']:.4g}, cosine {m['cosine']:.6f}{top1}"
            )
        if cache:  # keys and values written to the cache: their worst, not a row each
            worst = min(cache, key=lambda k: cache[k]["cosine"])
            lines.append(f"    {len(cache)} cache outputs (present.*): lowest cosine {cache[worst]['cosine']:.6f} "
                         f"({worst}), largest max |diff| {max(m['max_abs_rel_range'] for m in cache.values()):.4f} "
                         "of its range")
    return "\n".join(line for line in lines if line)



def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def source_bytes(source) -> int:
    """Bytes of what the user compiled: an .onnx file with its external data, a .gguf file, or
    every file of a checkpoint folder."""
    from pathlib import Path

    import onnx

    path = Path(source)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    total = path.stat().st_size
    if path.suffix.lower() == ".onnx":
        proto = onnx.load(str(path), load_external_data=False)
        files = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        total += sum((path.parent / f).stat().st_size for f in files if (path.parent / f).is_file())
    return total


def print_convert_report(compiled, source, folder) -> None:
    """What ``infercc convert --quantize`` adds to its output: the report and file sizes."""
    from pathlib import Path

    print()
    try:
        record = compiled.diagnostics["quantize_weights"]
    except KeyError:
        print("quantization: the quantize_weights pass did not run (disabled?)")
        return
    print(format_report(record.info) if record.info else f"quantization: nothing quantized ({'; '.join(record.reasons)})")
    before = source_bytes(source)
    after = sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())
    print(f"  artifact   {_mb(before)} ({Path(source).name}) -> {_mb(after)} ({after / before:.3f}x)")
