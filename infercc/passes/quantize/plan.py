"""What each weight becomes, decided for all weights together: its bits (the role's setting, or
int8 where mixed precision keeps the most sensitive int4 weights), its form (the source's own grid
when the weight is already quantized, see ``native.py``) and its method (GPTQ where the weight has
calibration inputs, else the data-free ``mse`` or ``rtn``).

Order: native grids first (nothing to decide), then mixed precision (measured on the data-free
quantization, since which weights matter is a property of the model), then the quantization proper,
so the calibration Hessians are captured once, for the final bits.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from ...ir import Model, Value
from .blas import single_threaded_blas
from .calibrate import Calibration, NoCalibration, hessians, make_calibration, sensitivities
from .gptq import gptq_rows, output_error
from .methods import Quantized, quantize_rows, relative_error
from .native import Native, find_native

#: Column orders GPTQ tries per weight (see gptq.py); the lower calibration output error wins.
ACT_ORDERS = (False, True)


@dataclasses.dataclass
class Weight:
    """One distinct weight (sites with equal contents share it) and what it becomes."""

    rows: np.ndarray  # [N, K], as the sites read it
    bits: int
    sites: list  # weight_only.Site
    quantized: Quantized | None = None
    native: Native | None = None
    method: str = ""
    rel_error: float = 0.0
    output_error: float | None = None
    sensitivity: float | None = None
    fallback: str | None = None  # why the bits differ from the role's setting

    @property
    def linear(self) -> bool:
        """Read by MatMul/Gemm only (not by an embedding Gather): activation-aware methods apply."""
        return all(site.role != "embedding" for site in self.sites)

    @property
    def activation(self) -> Value | None:
        """The one activation every site multiplies this weight with, else None."""
        inputs = {id(site.node.inputs[0]): site.node.inputs[0] for site in self.sites}
        return next(iter(inputs.values())) if self.linear and len(inputs) == 1 else None


def quantize_weights(weights: list[Weight], model: Model, config, record) -> dict:
    """Fill in every weight's quantization; returns the pass-level report (calibration, timings,
    mixed precision)."""
    with single_threaded_blas():
        return _quantize_weights(weights, model, config, record)


def _quantize_weights(weights: list[Weight], model: Model, config, record) -> dict:
    info: dict = {"seconds": {}}
    pending = [w for w in weights if not keep_native(w, config)]
    calibration = None
    gptq_wanted = config.quant_method == "gptq" and any(w.activation is not None and w.bits == 4 for w in pending)
    if (config.quant_int8_fraction > 0 or gptq_wanted) and any(w.activation is not None for w in pending):
        calibration = _attempt(record, "no calibration inputs", lambda: make_calibration(model, config))
    if calibration is not None:
        info["calibration"] = {"inputs": calibration.description, "tokens": calibration.tokens}
        info["seconds"]["calibration"] = round(calibration.seconds, 2)
    if calibration is not None and config.quant_int8_fraction > 0:
        start = time.perf_counter()
        mixed = _attempt(record, "mixed precision not applied", lambda: _mixed_precision(pending, model, config, calibration))
        if mixed:
            info["mixed_precision"] = mixed
        info["seconds"]["sensitivity"] = round(time.perf_counter() - start, 2)
    # int8 weights stay data-free: at 255 levels their rounding is below MatMulNBits' int8 activation
    # rounding, and a per-channel range fixed before GPTQ's feedback can clip what the feedback moves
    # (measured: no gain on MiniLM or stories260K, +1.3% perplexity on SmolLM2 vs RTN's -0.4%).
    gptq = [w for w in pending if calibration is not None and config.quant_method == "gptq"
            and w.activation is not None and w.bits == 4]
    if gptq:
        start = time.perf_counter()
        if not _attempt(record, "GPTQ not applied", lambda: _gptq(gptq, model, config, calibration) or True):
            for w in gptq:  # no partial GPTQ: every weight takes the same (data-free) method
                w.quantized, w.output_error = None, None
        info["seconds"]["gptq"] = round(time.perf_counter() - start, 2)
    for w in pending:
        if w.quantized is None:
            w.method = "rtn" if config.quant_method == "rtn" else "mse"
            w.quantized = _data_free(w.rows, w.bits, config, w.method)
            w.rel_error = relative_error(w.rows, w.quantized)
    return info


def _attempt(record, what: str, step):
    """``step()``, or None with a warning: a model the activation-aware steps cannot handle is
    still quantized, data-free."""
    try:
        return step()
    except Exception as exc:  # noqa: BLE001
        reason = str(exc) if isinstance(exc, NoCalibration) else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        record.warn(f"{what} ({reason}); falling back to data-free quantization")
        return None


def block_of(bits: int, k: int, config) -> int:
    """int8 is per output channel (one block of K), int4 blockwise."""
    return k if bits == 8 else config.quant_block_size


def _data_free(rows: np.ndarray, bits: int, config, method: str) -> Quantized:
    return quantize_rows(rows, bits, block_of(bits, rows.shape[1], config), symmetric=config.quant_symmetric,
                         method=method, threads=config.intra_op_threads or None)


def keep_native(w: Weight, config) -> bool:
    """Carry the weight's own grid when it has one of at most the asked bits."""
    if not config.quant_native:
        return False
    for bits in (4, 8):
        if bits > w.bits:
            break
        native = find_native(w.rows, bits)
        if native is None:
            continue
        if native.offsets is not None and not w.linear:  # an embedding table is re-quantized
            w.fallback = f"on an int{bits} grid with per-block offsets (Q4_1-like), which GatherQuant cannot hold"
            return False
        if native.offsets is not None and any(site.node.inputs[0].rank is None for site in w.sites):
            w.fallback = f"on an int{bits} grid with per-block offsets, whose correction needs the activation's rank"
            return False
        w.native, w.quantized, w.bits, w.method = native, native.quantized, bits, "native"
        w.rel_error = relative_error(w.rows, native.quantized) if native.offsets is None else _offset_error(w.rows, native)
        return True
    return False


def _offset_error(rows: np.ndarray, native: Native) -> float:
    diff = native.dequantize() - rows
    return float(np.linalg.norm(diff) / (np.linalg.norm(rows) or 1.0))


def _mixed_precision(pending: list[Weight], model: Model, config, calibration: Calibration) -> dict:
    """Keep int8 the int4 weights whose quantization costs the model's output the most per
    parameter, within ``quant_int8_fraction`` of the int4 parameters (greedy by measured error per
    parameter: a knapsack heuristic)."""
    candidates = [w for w in pending if w.bits == 4 and w.linear]
    probe = "rtn" if config.quant_method == "rtn" else "mse"
    probes = {}
    for i, w in enumerate(candidates):
        deq = _data_free(w.rows, 4, config, probe).dequantize()
        probes[i] = {site.weight.name: site.layout(deq) for site in w.sites}
    measured = sensitivities(model, config, calibration, probes)
    total = sum(w.rows.size for w in candidates)
    budget = config.quant_int8_fraction * total
    order = sorted(range(len(candidates)), key=lambda i: -measured[i] / candidates[i].rows.size)
    used, chosen = 0, []
    for i in order:
        w = candidates[i]
        w.sensitivity = measured[i]
        if used + w.rows.size <= budget and measured[i] > 0:
            used += w.rows.size
            chosen.append(i)
    rank = {i: r for r, i in enumerate(sorted(range(len(candidates)), key=lambda i: -measured[i]), 1)}
    for i in chosen:
        w = candidates[i]
        w.bits, w.fallback = 8, f"int8: mixed precision, sensitivity rank {rank[i]} of {len(candidates)}"
    return {
        "int8_fraction": config.quant_int8_fraction, "candidates": len(candidates), "kept_int8": len(chosen),
        "int8_parameters": int(used), "int4_parameters": int(total - used), "probe": probe,
        "measured_on": f"{calibration.output} ({'KL divergence' if calibration.logits else '1 - cosine'}, first "
                       f"calibration tokens), each weight alone quantized to int4 by {probe}",
    }


def _gptq(weights: list[Weight], model: Model, config, calibration: Calibration) -> None:
    """GPTQ in both column orders, with the weights that read the same activation (q/k/v,
    gate/up) stacked into one matrix: the rows are independent given H, so one factorization of H
    serves them all; each weight then keeps the order with its lower output error."""
    groups: dict[tuple[str, int], list[Weight]] = {}
    for w in weights:
        groups.setdefault((w.activation.name, w.bits), []).append(w)
    taps = {w.activation.name: w.activation for w in weights}
    for found in hessians(model, config, calibration, taps):
        for (name, bits), group in groups.items():
            if name not in found:
                continue
            h = found[name]
            rows = np.concatenate([w.rows for w in group]) if len(group) > 1 else group[0].rows
            tried = [gptq_rows(rows, h, bits, block_of(bits, rows.shape[1], config), symmetric=config.quant_symmetric,
                               act_order=order) for order in ACT_ORDERS]
            start = 0
            for w in group:
                n = w.rows.shape[0]
                best = None
                for q in tried:
                    part = Quantized(q.codes[start:start + n], q.scales[start:start + n], q.zero_points[start:start + n],
                                     q.bits, q.block_size, q.k)
                    error = output_error(w.rows, part.dequantize(), h, max_rows=512)
                    if best is None or error < best[0]:
                        best = (error, part)
                w.output_error, w.quantized = best
                w.method, w.rel_error = "gptq", relative_error(w.rows, w.quantized)
                start += n
