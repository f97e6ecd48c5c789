"""The weight-only quantization pass: every MatMul/Gemm with a constant 2-D weight (and, per
``Config.quant_embeddings``, every embedding Gather) becomes a canonical ``MatMulQuant`` /
``GatherQuant`` holding packed integer weights; the lowering pass turns them into what the target
runs. Activations stay float: the gain is memory and bandwidth (4-8x smaller weights), which is
what bounds decoding on CPU.

Roles: a projection is quantized to ``Config.quantize``; the LM head (a MatMul whose result reaches
a graph output through shape ops only) to ``quant_lm_head`` and embedding tables to
``quant_embeddings``, because the logits and the first hidden state are the most sensitive places
and the tied table is often the largest single weight. int8 is per output channel (one scale per
channel is enough at 255 levels); int4 is blockwise (``quant_block_size`` along K).

Weights with equal contents (a tied embedding and LM head, even when the exporter folded a
transposed copy) are quantized once and share one packed tensor. The float weights become dead and
dead-code elimination drops them, so a saved artifact holds the packed copy only.

What each weight becomes (GPTQ on calibration inputs generated from the model, the source's own
grid for an already-quantized checkpoint, int8 for the weights mixed precision keeps) is decided in
``plan.py``; this module finds the sites and rewrites the graph.

Only the main graph is quantized (weights inside If/Loop bodies stay float). Runs after the fusions
(they match float MatMuls) and before lowering. The pass changes numbers on purpose
(``rebaseline``): ``check_each_pass`` takes its result as the new reference, and the pass measures
its own end-to-end error (``info["end_to_end"]``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ...ir import DType, Graph, Model, Node, Tensor, Value
from ..base import Pass, PassContext
from ..canonical import DOMAIN, DOMAIN_VERSION
from ..rewrite import Builder
from . import ops
from .methods import quantize_rows, relative_error
from .native import Native, find_native
from .pack import channel_block, reblock, to_nbits
from .plan import Weight, fitted_summary, keep_native, quantize_weights
from .report import end_to_end, weight_bytes

#: Ops between an LM head's MatMul and the logits output that do not change values.
_SHAPE_OPS = {"Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Transpose", "Cast"}
_FLOATS = (DType.FLOAT, DType.FLOAT16)
_BITS = {"int8": 8, "int4": 4}
#: Rows of a weight :meth:`Site.may_be_native` checks.
_SAMPLE_ROWS = 8
#: How the per-weight kinds of native.Native read in the quantize='auto' summary.
_KINDS = {"zero_point": "zero point", "offset": "offset", "fitted": "offset -> zero point"}
_AUTO_FLOAT = "float weight stays float: quantize='auto' keeps the checkpoint's precision (set 'int8' or 'int4' to quantize it)"


@dataclasses.dataclass
class Site:
    """One weight use: the node, its role, the constant weight and how to read it as rows [N, K]."""

    node: Node
    role: str  # "linear", "lm_head" or "embedding"
    weight: Value
    transpose: bool  # rows = weight.T (a MatMul weight [K, N]); else rows = weight (a table [N, K])
    alpha: float = 1.0

    @property
    def where(self) -> str:
        return f"{self.node.op_type} {self.node.name!r}"

    def rows(self) -> np.ndarray:
        w = np.asarray(self.weight.const.numpy(), np.float32)
        rows = np.ascontiguousarray(w.T if self.transpose else w)
        return rows * np.float32(self.alpha) if self.alpha != 1.0 else rows

    def may_be_native(self) -> bool:
        """Whether the weight's first rows sit on a grid of at most 8 bits: a cheap test (no copy
        of the whole weight) that turns float weights away before :meth:`rows` reads them."""
        w = self.weight.const.numpy()
        sample = np.asarray(w[:, :_SAMPLE_ROWS].T if self.transpose else w[:_SAMPLE_ROWS], np.float32)
        return find_native(np.ascontiguousarray(sample) * np.float32(self.alpha), 8) is not None

    def layout(self, rows: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`rows`: [N, K] rows back in the weight's own layout."""
        if self.alpha != 1.0:
            rows = rows / np.float32(self.alpha)
        return np.ascontiguousarray(rows.T if self.transpose else rows)


@dataclasses.dataclass
class Packed:
    """A quantized weight as graph constants, shared by every site with the same contents."""

    b: Value
    scales: Value
    zero_points: Value | None
    bits: int
    block_size: int  # as stored (per-channel int8: the repeated block)
    logical_block: int  # K for per-channel
    k: int
    n: int
    rel_error: float
    first_site: str
    symmetric: bool


class QuantizeWeights(Pass):
    name = "quantize_weights"
    rebaseline = True  # changes numbers on purpose; reports its own end-to-end error

    def run(self, model: Model, ctx: PassContext) -> None:
        config, record = ctx.config, ctx.record
        if config.quantize is None:
            record.note("quantization is off (Config.quantize is None; set 'auto', 'int8' or 'int4')")
            return
        if (model.opset("") or 1) < 13:
            record.note(f"quantized ops need ai.onnx opset >= 13; the model imports opset {model.opset('')}")
            return
        graph = model.graph
        skipped: list[dict] = []
        floats: list[Site] = []  # quantize='auto': sites whose weight is on no grid
        order = self._weights(graph, config, record, skipped, floats)
        if not order:
            if config.quantize == "auto":
                record.note("no weight is on a quantized grid: the model stays float (quantize='auto' keeps the "
                            "checkpoint's precision; set quantize='int8' or 'int4' to quantize it)")
            return
        for site in floats:  # said per site only when some weights are kept: a float model is one note
            record.skipped(site.where, _AUTO_FLOAT)
            skipped.append({"node": site.node.name, "weight": site.weight.name, "role": site.role, "reason": _AUTO_FLOAT})
        before = None if config.quantize == "auto" else model.clone()  # the reference of the end-to-end error
        size_before = weight_bytes(graph)
        weights = list({id(w): w for _, w in order}.values())
        if config.quantize == "auto":
            summary = _keep_native(weights, config, record)
            refusals = {id(w): None if w.quantized is not None else f"{w.fallback}: stays float" if w.fallback
                        else _AUTO_FLOAT for w in weights}
        else:
            summary = quantize_weights(weights, model, config, record)
            refusals = {id(w): self._limit(w, config) for w in weights}
        layers = []
        packed: dict[int, Packed] = {}
        for site, w in order:
            refusal = refusals[id(w)]
            if refusal:
                record.skipped(site.where, refusal)
                skipped.append({"node": site.node.name, "weight": site.weight.name, "role": site.role, "reason": refusal})
                continue
            entry = packed.get(id(w)) or packed.setdefault(id(w), self._pack(graph, site, w, config))
            _replace(graph, site, entry, w.native)
            record.applied(site.where, "weights_quantized")
            layers.append(_layer(site, w, entry))
        if not layers:
            return
        model.require_opset(DOMAIN, DOMAIN_VERSION)
        graph.remove_dead()
        record.info.update({
            "quantize": config.quantize, "method": "native" if config.quantize == "auto" else config.quant_method, "block_size": config.quant_block_size,
            "symmetric": config.quant_symmetric, "lm_head": config.quant_lm_head, "embeddings": config.quant_embeddings,
            "native": config.quant_native, "native_exact": config.quant_native_exact, "int8_fraction": config.quant_int8_fraction,
            "size": {"weights_before": size_before, "weights_after": weight_bytes(graph)},
            **summary, "layers": layers, "skipped": skipped,
        })
        if before is None:
            # The grids are the checkpoint's own, exact: the output moves only by the kernel's int8
            # activation rounding, which quantize='int8'/'int4' measure. Two runtime sessions of the
            # float and the quantized model would triple a GGUF's compile time for that line.
            return
        try:
            record.info["end_to_end"] = end_to_end(before, model, config)
        except Exception as exc:  # noqa: BLE001 - the report must not cost the user the quantized model
            record.warn(f"end-to-end error not measured: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")

    @staticmethod
    def _weights(graph: Graph, config, record, skipped: list[dict], floats: list[Site]) -> list[tuple[Site, Weight]]:
        """Every site to quantize, in graph order, with its weight: sites whose rows are equal (a
        tied embedding and LM head, even when the exporter folded a transposed copy) share one."""
        weights: dict[tuple, Weight] = {}
        order: list[tuple[Site, Weight]] = []
        for site, refusal in find_sites(graph, config):
            if refusal:
                record.skipped(site.where, refusal)
                skipped.append({"node": site.node.name, "weight": site.weight.name, "role": site.role, "reason": refusal})
                continue
            if config.quantize == "auto" and not site.may_be_native():
                floats.append(site)
                continue
            rows = site.rows()
            bits = 8 if config.quantize == "auto" else _BITS[_setting(config, site.role)]
            key = (hashlib.blake2b(rows.tobytes(), digest_size=16).hexdigest(), rows.shape, bits, str(site.weight.dtype))
            if key in weights:
                weights[key].sites.append(site)
            else:
                weights[key] = Weight(rows, bits, [site])
            order.append((site, weights[key]))
        return order

    @staticmethod
    def _limit(w: Weight, config) -> str | None:
        """``quant_max_error``: an int4 weight above it falls back to int8 (data-free), one still
        above it stays float. Measured on the weight alone: see plan.py for what predicts the
        output error better (mixed precision)."""
        limit = config.quant_max_error
        if limit is None or w.rel_error <= limit:
            return None
        first = w.rel_error
        if w.bits == 4 and w.native is None:
            method = "rtn" if config.quant_method == "rtn" else "mse"
            q = quantize_rows(w.rows, 8, w.rows.shape[1], symmetric=config.quant_symmetric, method=method,
                              threads=config.intra_op_threads or None)
            error = relative_error(w.rows, q)
            if error <= limit:
                w.quantized, w.bits, w.rel_error, w.method, w.output_error = q, 8, error, method, None
                w.fallback = f"int8: int4 relative error {first:.4f} exceeds quant_max_error {limit}"
                return None
        return f"relative reconstruction error {w.rel_error:.4f} exceeds quant_max_error {limit}"

    @staticmethod
    def _pack(graph: Graph, site: Site, w: Weight, config) -> Packed:
        q = w.quantized
        dtype = site.weight.dtype.numpy
        per_channel = q.bits == 8 and q.block_size == q.k and w.native is None
        symmetric = config.quant_symmetric and w.native is None
        stored = reblock(q, channel_block(q.k)) if per_channel else q
        b, scales, zero_points = to_nbits(stored, symmetric, dtype)
        name = site.weight.name
        return Packed(
            graph.add_initializer(f"{name}_q{q.bits}", Tensor(b)),
            graph.add_initializer(f"{name}_scales", Tensor(scales)),
            None if zero_points is None else graph.add_initializer(f"{name}_zero_points", Tensor(zero_points)),
            q.bits, stored.block_size, q.block_size, q.k, w.rows.shape[0], w.rel_error, site.where, symmetric,
        )


def _keep_native(weights: list[Weight], config, record) -> dict:
    """quantize='auto': every weight that already sits on a grid keeps it exactly; the rest stay
    float (no calibration, no rounding of our own)."""
    workers = min(len(weights), config.intra_op_threads or os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # numpy releases the GIL: grids are checked in parallel
        # one thread per weight: the pool already keeps the cores busy
        found = list(pool.map(lambda w: keep_native(w, config, threads=1), weights))
    kept = [w for w, ok in zip(weights, found) if ok]
    kinds: dict[str, int] = {}
    for w in kept:
        key = f"int{w.bits} ({_KINDS[w.native.kind]})"
        kinds[key] = kinds.get(key, 0) + 1
    summary: dict = {"kept_native": kinds}
    if kept:
        held = sum(1 for w in weights if w.quantized is None and w.fallback)
        fitted = fitted_summary(kept)
        record.note(f"quantize='auto': {len(kept)} weight(s) kept on their source grids "
                    f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}); "
                    f"{len(weights) - len(kept) - held} float weight(s) stay float"
                    + (f"; {held} on a grid no kernel here holds stay float (exact)" if held else "")
                    + (f"; {fitted[0]}" if fitted else ""))
        if fitted:
            summary["native_fitted"] = fitted[1]
        offsets = sum(1 for w in kept if w.native.offsets is not None)
        if offsets:
            record.note(f"{offsets} weight(s) on offset grids (Q4_1-like) kept exact with a correction MatMul per "
                        "projection: no single ONNX Runtime kernel is exact and fast for them (MatMulNBits with float "
                        "zero points is exact but dequantizes the weight per call, 10-30x slower); "
                        "quant_native_exact=False (CLI --fast-grids) moves them to integer zero points: "
                        "one MatMulNBits each, faster, not exact (SmolLM2-135M Q4_1: ~1.3x decode, perplexity +27%)")
    return summary


def _layer(site: Site, w: Weight, entry: Packed) -> dict:
    """The per-layer report: what the weight became and what it cost."""
    layer = {
        "node": site.node.name, "op": site.node.op_type, "weight": site.weight.name, "role": site.role,
        "K": entry.k, "N": entry.n, "bits": entry.bits, "block_size": entry.logical_block,
        "method": w.method, "symmetric": entry.symmetric, "rel_error": round(w.rel_error, 6),
        "shared_with": entry.first_site if entry.first_site != site.where else None,
    }
    if w.output_error is not None:
        layer["output_error"] = round(w.output_error, 6)
    if w.sensitivity is not None:
        layer["sensitivity"] = float(f"{w.sensitivity:.4g}")
    if w.native is not None:
        layer["native"] = w.native.kind
    if w.fallback:
        layer["fallback"] = w.fallback
    return layer


def find_sites(graph: Graph, config) -> list[tuple[Site, str | None]]:
    """Every constant-weight MatMul/Gemm/Gather of the main graph, with a reason where it is left
    float. Weights of activations-times-activations MatMuls (attention) are not candidates."""
    found: list[tuple[Site, str | None]] = []
    for node in graph.nodes:
        if node.domain:
            continue
        if node.op_type == "MatMul" and len(node.inputs) == 2 and _const(node.inputs[1]):
            site = Site(node, "lm_head" if _feeds_output(node) else "linear", node.inputs[1], transpose=True)
            found.append((site, _matmul_refusal(node, node.inputs[1]) or _role_refusal(config, site.role)))
        elif node.op_type == "MatMul" and len(node.inputs) == 2 and (table := _transposed_const(node.inputs[1])):
            # x @ W^T with W [N, K] kept as a computation (constant folding will not copy a tied
            # embedding table): W's rows are already the packed layout's rows
            site = Site(node, "lm_head" if _feeds_output(node) else "linear", table, transpose=False)
            found.append((site, _matmul_refusal(node, node.inputs[1]) or _role_refusal(config, site.role)))
        elif node.op_type == "Gemm" and _const(node.inputs[1]):
            site = Site(node, "lm_head" if _feeds_output(node) else "linear", node.inputs[1],
                        transpose=not node.attr("transB", 0), alpha=float(node.attr("alpha", 1.0)))
            found.append((site, _gemm_refusal(node) or _role_refusal(config, site.role)))
        elif node.op_type == "Gather" and _const(node.inputs[0]) and int(node.attr("axis", 0)) == 0:
            table = node.inputs[0]
            if table.dtype in _FLOATS and table.rank == 2:
                site = Site(node, "embedding", table, transpose=False)
                found.append((site, _role_refusal(config, "embedding")))
    return found


def _setting(config, role: str) -> str:
    return {"linear": config.quantize, "lm_head": config.quant_lm_head, "embedding": config.quant_embeddings}[role]


def _role_refusal(config, role: str) -> str | None:
    if _setting(config, role) == "keep":
        field = "quant_lm_head" if role == "lm_head" else "quant_embeddings"
        return f"kept float: Config.{field} is 'keep'"
    return None


def _const(value: Value | None) -> bool:
    return value is not None and value.const is not None


def _transposed_const(value: Value) -> Value | None:
    """The constant 2-D W when ``value`` is Transpose(W) (perm [1, 0] or the default reversal)."""
    node = value.producer
    if node is None or node.op_type != "Transpose" or node.domain or not _const(node.inputs[0]):
        return None
    table = node.inputs[0]
    return table if table.rank == 2 and list(node.attr("perm", [1, 0])) == [1, 0] else None


def _matmul_refusal(node: Node, weight: Value) -> str | None:
    if weight.rank != 2:
        return f"the weight has rank {weight.rank}; only 2-D weights are quantized"
    if weight.dtype not in _FLOATS:
        return f"the weight is {weight.dtype}; only float and float16 weights are quantized"
    a = node.inputs[0]
    if a.rank is not None and a.rank < 2:
        return "the activation is 1-D; MatMulNBits needs [..., K]"
    if min(weight.shape) < 2:
        return f"the weight {list(weight.shape)} is a vector"
    return None


def _gemm_refusal(node: Node) -> str | None:
    if node.attr("transA", 0):
        return "Gemm with transA=1 is left float"
    c = node.inputs[2] if len(node.inputs) > 2 else None
    beta = float(node.attr("beta", 1.0))
    if c is not None and beta != 1.0 and c.const is None:
        return f"Gemm with beta={beta} on a computed bias is left float"
    return _matmul_refusal(node, node.inputs[1])


def _feeds_output(node: Node) -> bool:
    """Whether the node's result reaches a graph output through value-preserving shape ops only."""
    pending, seen = [node.outputs[0]], set()
    while pending:
        value = pending.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if value.is_graph_output:
            return True
        for user in value.consumers():
            if user.op_type in _SHAPE_OPS and not user.domain and user.inputs[0] is value:
                pending.extend(user.outputs)
    return False


def _replace(graph: Graph, site: Site, entry: Packed, native: Native | None) -> None:
    node = site.node
    op = Builder(graph, node, node.name or node.op_type)
    zp = [entry.zero_points] if entry.zero_points is not None else []
    attrs = {"K": entry.k, "N": entry.n, "bits": entry.bits, "block_size": entry.block_size,
             "symmetric": int(entry.symmetric)}
    if site.role == "embedding":
        new = getattr(op, ops.GATHER)(entry.b, node.inputs[1], entry.scales, *zp, _domain=DOMAIN, **attrs)
    else:
        rests = []
        if native is not None and native.offsets is not None:  # Q4_1-like: the per-block rests ride along
            dtype = node.inputs[0].dtype.numpy if node.inputs[0].dtype is not None else np.float32
            rests = [op.const(np.ascontiguousarray(native.offsets.astype(dtype)), hint="block_rests")]
            zp = zp or [None]
        new = getattr(op, ops.MATMUL)(node.inputs[0], entry.b, entry.scales, *zp, *rests, _domain=DOMAIN, **attrs)
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            bias, beta = node.inputs[2], float(node.attr("beta", 1.0))
            if beta != 1.0:
                bias = op.const(np.asarray(bias.const.numpy()) * np.asarray(beta, bias.dtype.numpy), hint="bias")
            if beta != 0.0:
                new = op.Add(new, bias)
    old = node.outputs[0]
    new.dtype, new.shape = old.dtype, old.shape
    old.replace_all_uses_with(new)
    graph.remove(node, force=True)


