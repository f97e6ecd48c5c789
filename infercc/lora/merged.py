"""The merged-weight cache: for an adapter that serves whole batches alone, a copy of the base
graph whose projection weights are ``W + s B A`` at the base weight's precision (float weights
summed; int4/int8 MatMulNBits weights dequantized, summed and quantized again on the same grid:
bits, block size, zero points or not, round to nearest). A batch whose rows all use that adapter
then runs at the base model's speed: no delta matmuls at all.

Sized by ``Config.lora_merged_cache_bytes`` (0 = off, the default): each merged copy costs the
model's weight bytes (its ONNX Runtime session holds its own weights); the least recently used
copy goes when a new one would not fit. A copy is made once an adapter has run ``BUILD_AFTER``
whole batches (the adapters that serve most traffic), synchronously in the step that decides it
(it costs about one session creation).

Numerics: merged weights round differently from the base + delta sum (and a quantized base is
rounded again), so a sequence that moves between merged batches and mixed batches may differ from
its run alone by rounding; hence off by default. Not mergeable (reported in ``stats()["refused"]``):
a projection with float block offsets (a GGUF Q4_1 grid kept exact, ``Config.quant_native_exact``).
On the generated-C runtime a merged copy is a paged C library of its own, like the base model's.
"""

from __future__ import annotations

import collections
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from ..ir import Model, Tensor
from ..ir.onnx_save import weight_bytes
from ..passes.quantize.methods import quantize_rows
from ..passes.quantize.ops import dequantized_weight
from ..passes.quantize.pack import to_nbits

if TYPE_CHECKING:
    from .registry import AdapterRegistry, _Entry

#: Whole batches an adapter runs before its merged copy is made.
BUILD_AFTER = 4


class MergedCache:
    def __init__(self, registry: AdapterRegistry, budget: int) -> None:
        self.registry = registry
        self.budget = budget
        self._lock = threading.Lock()
        self._copies: collections.OrderedDict[tuple, tuple[Any, int]] = collections.OrderedDict()
        self._runs: collections.Counter[tuple] = collections.Counter()
        self.counts = {"hits": 0, "misses": 0, "builds": 0, "evictions": 0}
        self.refused: dict[str, str] = {}

    def backend(self, entry: _Entry, paged: int | None = None) -> Any | None:
        """The merged backend of ``entry`` for a batch of its rows alone, or None (a miss);
        ``paged``: its paged-attention form for KV blocks of that size (generated C)."""
        if self.budget <= 0:
            return None
        key = (entry.ref.key, paged)
        with self._lock:
            found = self._copies.get(key)
            if found is not None:
                self._copies.move_to_end(key)
                self.counts["hits"] += 1
                return found[0]
            self.counts["misses"] += 1
            self._runs[key] += 1
            if self._runs[key] < BUILD_AFTER or entry.ref.label in self.refused:
                return None
            try:
                model = merge(self.registry, entry)
            except _NotMergeable as exc:
                self.refused[entry.ref.label] = str(exc)
                return None
            cost = weight_bytes(model)
            if cost > self.budget:
                self.refused[entry.ref.label] = (f"a merged copy takes {cost} bytes, more than "
                                                 f"Config.lora_merged_cache_bytes={self.budget}")
                return None
            while self._copies and sum(c for _, c in self._copies.values()) + cost > self.budget:
                self._copies.popitem(last=False)
                self.counts["evictions"] += 1
            backend = self.registry._paged(model, paged) if paged else self.registry._session(model)
            if backend is None:
                self.refused[entry.ref.label] = "the paged lowering or the C build refused the merged copy"
                return None
            self._copies[key] = (backend, cost)
            self.counts["builds"] += 1
            return backend

    def drop(self, names: set[str]) -> None:
        """Forget the copies of compositions or adapters involving ``names`` (removed)."""
        with self._lock:
            for key in [k for k in self._copies if names & set(_names(k))]:
                del self._copies[key]
            self.refused = {k: v for k, v in self.refused.items() if not names & set(k.split("+"))}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counts, "cached": [("+".join(_names(k))) for k in self._copies],
                    "bytes": sum(c for _, c in self._copies.values()), "budget": self.budget,
                    "refused": dict(self.refused)}


class _NotMergeable(Exception):
    pass


def _names(key: tuple) -> tuple[str, ...]:
    ref_key = key[0]  # (the adapter's key, paged block size)
    return ref_key if len(ref_key) == 1 else ref_key[1]


def merge(registry: AdapterRegistry, entry: _Entry) -> Model:
    """A copy of the registry's base graph with ``entry``'s deltas merged into its weights."""
    model = registry._base.clone()  # type: ignore[union-attr]
    graph = model.graph
    nodes = {n.name: n for n in graph.nodes}
    for index, (a, b) in entry.factors.items():
        site = registry._sites[index]  # type: ignore[index]
        node = nodes[site.node]
        delta = a @ b  # [in, out], scaling folded into b
        if node.op_type == "MatMul":
            w = node.inputs[1]
            merged = (w.const.numpy().astype(np.float32) + delta).astype(w.dtype.numpy)
            node.set_input(1, graph.add_initializer(f"{w.name}/merged", Tensor(merged)))
        elif node.op_type in ("MatMulNBits", "MatMulQuant"):
            if len(node.inputs) > 4 and node.inputs[4] is not None:
                raise _NotMergeable(f"{node.name!r} carries float block offsets (an exact GGUF Q4_1 grid); merging would "
                                    "round them away: compile with quant_native_exact=False to cache merged weights")
            _merge_nbits(graph, node, delta)
        else:
            raise _NotMergeable(f"projection {site.node!r} ({node.op_type}) cannot hold merged weights")
    for name in [n for n, v in graph.initializers.items() if not v.uses and not v.is_graph_input]:
        del graph.initializers[name]  # the replaced weights (a copy's cost is its own weights only)
    return model


def _merge_nbits(graph, node, delta: np.ndarray) -> None:
    """Dequantize, add ``delta`` [K, N], quantize again on the node's own grid (MatMulNBits, or
    our MatMulQuant: the same layout; one with block offsets, its fifth input, is refused before)."""
    if any(c.op_type == "Add" and any(i is not None and i.producer is not None and i.producer.op_type == "MatMul"
                                      and any("block_rests" in (x.name if x is not None else "")
                                              for x in i.producer.inputs) for i in c.inputs)
           for c in node.outputs[0].consumers()):
        raise _NotMergeable(f"{node.name!r} carries float block offsets (an exact GGUF Q4_1 grid); merging would "
                            "round them away: compile with quant_native_exact=False to cache merged weights")
    bits, block = int(node.attr("bits")), int(node.attr("block_size"))
    packed, scales_v = node.inputs[1].const.numpy(), node.inputs[2].const.numpy()
    zp_v = node.inputs[3] if len(node.inputs) == 4 and node.inputs[3] is not None else None
    rows = dequantized_weight(node) + delta.T
    q = quantize_rows(rows, bits, block, symmetric=zp_v is None, method="rtn")
    new_b, new_scales, new_zp = to_nbits(q, zp_v is None, scales_v.dtype)
    node.set_input(1, graph.add_initializer(f"{node.inputs[1].name}/merged", Tensor(new_b.reshape(packed.shape))))
    node.set_input(2, graph.add_initializer(f"{node.inputs[2].name}/merged", Tensor(new_scales.reshape(scales_v.shape))))
    if zp_v is not None:
        zp = zp_v.const.numpy()
        node.set_input(3, graph.add_initializer(f"{zp_v.name}/merged", Tensor(new_zp.reshape(zp.shape))))
