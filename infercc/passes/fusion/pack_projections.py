"""Projection packing: sibling matmuls that read the same activation with constant weights (an
attention layer's q/k/v, an MLP's gate/up) become one matmul over the weights concatenated along
N, followed by a Split.

Why: decoding multiplies one row by each weight, so a step is a chain of small, memory-bound
kernels whose fixed costs (the call, the thread-pool fork, MatMulNBits quantizing its input row to
int8 at accuracy_level 4) are paid once per weight. Packed, they are paid once per activation, and
the kernel gets one wider N to split between threads. onnxruntime-genai and llama.cpp's converters
pack the same way. The products are unchanged: every output column is the same dot product over K.

Two kinds of siblings, each packed only with its own kind:

* float ``MatMul(A, W)`` with a constant 2-D W [K, N_i] of one dtype: W's concatenated along axis 1;
* ``ai.infercc::MatMulQuant`` of equal K, bits, block size and zero-point form: the packed rows
  (output channels) concatenated, so each weight keeps its own grid, method and bits decision
  (a weight mixed precision kept int8 packs with its int8 siblings only).

Measured (``python -m benchmarks packing``, ~100M LLaMA, 2 cores): one decoding step after 128
cached tokens, 1 thread: float32 1.04x, int4 1.04x (where mixed precision leaves whole groups at
one bit width); prefill of 128 / 512 tokens, 2 threads: 0.99-1.02x, level within noise (the Split
copies what the separate matmuls would have written anyway).

Runs after quantization (which decides per weight) and before lowering. Only the main graph.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from ...ir import Model, Node, Value
from ..base import Pass, PassContext
from ..canonical import DOMAIN
from ..provenance import record_packed
from ..quantize.ops import MATMUL as MATMUL_QUANT
from ..rewrite import Builder


class PackProjections(Pass):
    name = "pack_projections"

    def run(self, model: Model, ctx: PassContext) -> None:
        graph = model.graph
        groups: dict[tuple, list[Node]] = defaultdict(list)
        for node in graph.nodes:
            key = _sibling_key(node)
            if key is not None:
                groups[key].append(node)
        for key, nodes in groups.items():
            if len(nodes) < 2:
                continue
            where = ", ".join(f"{n.op_type} {n.name!r}" for n in nodes)
            widths = _pack(graph, nodes, quantized=key[0] == MATMUL_QUANT)
            ctx.record.applied(f"{where} (N = {' + '.join(map(str, widths))})", "weights_packed")
            ctx.record.count("matmuls_removed", len(nodes) - 1)
        if not any(len(nodes) > 1 for nodes in groups.values()):
            ctx.record.note("no two matmuls with constant weights read the same activation")


def _sibling_key(node: Node) -> tuple | None:
    """Nodes with equal keys can share one packed weight; None for nodes that cannot pack."""
    if any(o.is_graph_output for o in node.outputs):
        return None
    if node.op_type == "MatMul" and not node.domain and len(node.inputs) == 2:
        w = node.inputs[1]
        if w is None or w.const is None or w.rank != 2 or node.inputs[0].rank is None or node.inputs[0].rank < 2:
            return None
        return ("MatMul", id(node.inputs[0]), int(w.dtype), int(w.shape[0]))
    if node.op_type == MATMUL_QUANT and node.domain == DOMAIN:
        if any(v is None or v.const is None for v in node.inputs[1:]):
            return None
        attrs = tuple(int(node.attr(a)) for a in ("K", "bits", "block_size", "symmetric"))
        dtypes = tuple(int(v.dtype) for v in node.inputs[1:])
        return (MATMUL_QUANT, id(node.inputs[0]), attrs, dtypes, len(node.inputs))
    return None


def _pack(graph, nodes: list[Node], *, quantized: bool) -> list[int]:
    """Replace ``nodes`` by one matmul and a Split; returns the widths N_i."""
    first = nodes[0]  # the earliest in graph order: its input exists, every consumer comes later
    op = Builder(graph, first, f"{first.name or first.op_type}/packed")
    if quantized:
        widths = [int(n.attr("N")) for n in nodes]
        packed = [_concat_rows([n.inputs[i].const.numpy() for n in nodes], widths) for i in range(1, len(first.inputs))]
        attrs = {name: a.value for name, a in first.attrs.items()}
        attrs["N"] = sum(widths)
        hints = ("packed_q", "packed_scales", "packed_zero_points", "packed_rests")
        consts = [op.const(array, hint=hint) for array, hint in zip(packed, hints)]
        out = getattr(op, MATMUL_QUANT)(first.inputs[0], *consts, _domain=DOMAIN, **attrs)
    else:
        weights = [n.inputs[1].const.numpy() for n in nodes]
        widths = [int(w.shape[1]) for w in weights]
        out = op.MatMul(first.inputs[0], op.const(np.concatenate(weights, axis=1), hint="packed_weight"))
    record_packed(out.producer, nodes)  # which checkpoint weights it holds (LoRA adapters find them)
    pieces = op.Split(out, op.const(np.array(widths, np.int64), hint="widths"), axis=-1, _outputs=len(nodes))
    pieces = pieces if isinstance(pieces, (list, tuple)) else [pieces]
    for node, piece in zip(nodes, pieces):
        old: Value = node.outputs[0]
        piece.dtype, piece.shape = old.dtype, old.shape
        old.replace_all_uses_with(piece)
    out.dtype = first.outputs[0].dtype
    for node in nodes:
        graph.remove(node, force=True)
    return widths


def _concat_rows(arrays: list[np.ndarray], widths: list[int]) -> np.ndarray:
    """MatMulNBits tensors hold one leading row per output channel (B [N, blocks, bytes], scales and
    zero points [N, ...] or flattened [N * ...]): concatenated per output channel, in the first's rank."""
    rows = [a.reshape(n, -1) for a, n in zip(arrays, widths)]
    joined = np.concatenate(rows, axis=0)
    first = arrays[0]
    return joined.reshape((-1,) if first.ndim == 1 else (sum(widths), *first.shape[1:]))
