"""The LoRA graph variant: after each adapted projection ``y = x @ W``, the segmented low-rank
delta ``y += (x @ A[slot]) @ B[slot]`` of every row's adapter (Punica / S-LoRA's "segmented" form).

It is a separate graph, made from a copy of the compiled one only when adapters are used: batches
without an adapter row keep running the unmodified base graph and pay nothing. Its extra inputs:

* ``lora_slots`` [batch] int64: each row's adapter slot (0 = no adapter; slot 0's factors are zeros).
* per site ``lora.{i}.a`` [slots, in, rank] and ``lora.{i}.b`` [slots, rank, out] float32: the
  stacked factors of every loaded adapter (scaling folded into B), fed each step, so adding an
  adapter changes feeds, not the graph.

A site is one projection node of the graph (``passes/provenance.py`` says which checkpoint weights
it multiplies by). A packed one (q/k/v or gate/up concatenated by projection packing) is one site
whose factors are block-shaped: the pieces' A's side by side, each B on its own column slice, so
each module's delta lands on its own output columns. A quantized projection (MatMulNBits,
MatMulQuant) gets its delta in float32 beside the quantized product.

The portable form: ``Gather`` of each stack by the rows' slots and two batched MatMuls
[batch, seq, in] x [batch, in, rank] x [batch, rank, out]; every row's delta is computed from its
own slot's factors only, so a row's result does not depend on what else is in the batch.
"""

from __future__ import annotations

import dataclasses

from ...errors import InputError
from ...ir import DType, Model, Node
from ..provenance import weight_sources
from ..rewrite import Builder

SLOTS = "lora_slots"
#: Checkpoint weights never adapted here (the LM head is an output layer PEFT leaves alone by default).
_SKIP = ("lm_head.weight",)


def a_input(site: int) -> str:
    return f"lora.{site}.a"


def b_input(site: int) -> str:
    return f"lora.{site}.b"


@dataclasses.dataclass(frozen=True)
class Site:
    """One projection node an adapter can target."""

    index: int
    node: str
    in_features: int
    #: (checkpoint weight name, output columns) in column order; more than one when packed.
    sources: tuple[tuple[str, int], ...]

    @property
    def out_features(self) -> int:
        return sum(width for _, width in self.sources)

    def columns(self, weight: str) -> tuple[int, int]:
        """[begin, end) of ``weight``'s output columns in this site's output."""
        at = 0
        for name, width in self.sources:
            if name == weight:
                return at, at + width
            at += width
        raise KeyError(weight)


def find_sites(model: Model) -> list[Site]:
    """Every projection of ``model``'s main graph by a known checkpoint weight, in graph order."""
    sites: list[Site] = []
    for node in model.graph.nodes:
        sources = weight_sources(node)
        if not sources or any(name in _SKIP for name, _ in sources) or node.outputs[0].is_graph_output:
            continue
        x = node.inputs[0]
        k = node.attr("K") if node.op_type != "MatMul" else node.inputs[1].shape[0]
        if x is None or x.rank != 3 or not isinstance(k, int) or x.dtype not in (None, DType.FLOAT):
            continue  # not a [batch, seq, in] float32 activation: a per-row adapter slot cannot apply
        sites.append(Site(len(sites), node.name, int(k), tuple(sources)))
    return sites


def insert_lora(model: Model, sites: list[Site]) -> Model:
    """A copy of ``model`` with the segmented delta after each of ``sites`` (by node name)."""
    out = model.clone()
    graph = out.graph
    by_name: dict[str, Node] = {n.name: n for n in graph.nodes}
    slots = graph.add_input(SLOTS, DType.INT64, ("batch",))
    for site in sites:
        node = by_name.get(site.node)
        if node is None:
            raise InputError(f"internal error: projection {site.node!r} is not in the graph it was found in")
        y = node.outputs[0]
        a = graph.add_input(a_input(site.index), DType.FLOAT, ("lora_slots_total", site.in_features, f"lora_rank_{site.index}"))
        b = graph.add_input(b_input(site.index), DType.FLOAT, ("lora_slots_total", f"lora_rank_{site.index}", site.out_features))
        consumers = list(y.uses)
        op = Builder(graph, node, f"{node.name}/lora")
        row_a = op.Gather(a, slots, axis=0)                 # [batch, in, rank]
        row_b = op.Gather(b, slots, axis=0)                 # [batch, rank, out]
        delta = op.MatMul(op.MatMul(node.inputs[0], row_a), row_b)
        total = op.Add(y, delta)
        total.dtype, total.shape = y.dtype, y.shape
        for consumer, index in consumers:
            consumer.set_input(index, total)
        if y.is_graph_output:
            raise InputError(f"internal error: projection {site.node!r} is a graph output")
    graph.sort()
    return out
