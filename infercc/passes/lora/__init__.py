"""The LoRA graph variant: after each adapted projection ``y = x @ W``, every row's low-rank delta
``y += (x @ A) @ B`` from its own adapter's factors (the segmented form of Punica / S-LoRA, grouped
by adapter).

It is a separate graph, made from a copy of the compiled one only when adapters are used: batches
without an adapter row keep running the unmodified base graph and pay nothing. Its extra inputs,
per site i (fed each step, so adding an adapter changes feeds, not the graph):

* ``lora.{i}.a`` [in, C] and ``lora.{i}.b`` [C, out] float32: the factors of every loaded adapter
  that targets the site side by side, adapter k on its own C_k = rank_k columns (scaling folded
  into B): each adapter's factors are read once per step, whatever number of rows use it;
* ``lora.{i}.mask`` [batch, C] float32: 1 on the columns of the row's adapter, 0 elsewhere.

So ``delta = ((x @ A) * mask) @ B``: row b's product keeps only its own adapter's rank columns,
and the zeros of the others add nothing (exactly: 0 * finite = 0), so a row's result does not
depend on what else is in the batch. Compared with gathering each row's factors (``Gather`` of
[slots, in, r] stacks by slot, then batched matmuls), the factors are neither copied per row nor
multiplied row by row: two plain GEMMs per site.

A site is one projection node of the graph (``passes/provenance.py`` says which checkpoint weights
it multiplies by). A packed one (q/k/v or gate/up concatenated by projection packing) is one site
whose factors are block-shaped: the pieces' A's side by side, each B on its own column slice, so
each module's delta lands on its own output columns. A quantized projection (MatMulNBits,
MatMulQuant) gets its delta in float32 beside the quantized product.
"""

from __future__ import annotations

import dataclasses

from ...errors import InputError
from ...ir import DType, Model, Node
from ..provenance import weight_sources
from ..rewrite import Builder

#: Checkpoint weights never adapted here (the LM head is an output layer PEFT leaves alone by default).
_SKIP = ("lm_head.weight",)


def a_input(site: int) -> str:
    return f"lora.{site}.a"


def b_input(site: int) -> str:
    return f"lora.{site}.b"


def mask_input(site: int) -> str:
    return f"lora.{site}.mask"


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
        if not sources or node.outputs[0].is_graph_output or any(
                name in _SKIP or not name.endswith(".weight") for name, _ in sources):
            continue  # (a checkpoint's projection weights are named "<module>.weight"; internal constants are not)
        x = node.inputs[0]
        k = node.attr("K") if node.op_type != "MatMul" else node.inputs[1].shape[0]
        if x is None or x.rank != 3 or not isinstance(k, int) or x.dtype not in (None, DType.FLOAT):
            continue  # not a [batch, seq, in] float32 activation: a per-row adapter slot cannot apply
        sites.append(Site(len(sites), node.name, int(k), tuple(sources)))
    return sites


def insert_lora(model: Model, sites: list[Site]) -> Model:
    """A copy of ``model`` with the grouped delta after each of ``sites`` (by node name)."""
    out = model.clone()
    graph = out.graph
    by_name: dict[str, Node] = {n.name: n for n in graph.nodes}
    for site in sites:
        node = by_name.get(site.node)
        if node is None:
            raise InputError(f"internal error: projection {site.node!r} is not in the graph it was found in")
        y = node.outputs[0]
        if y.is_graph_output:
            raise InputError(f"internal error: projection {site.node!r} is a graph output")
        cols = f"lora_cols_{site.index}"
        a = graph.add_input(a_input(site.index), DType.FLOAT, (site.in_features, cols))
        b = graph.add_input(b_input(site.index), DType.FLOAT, (cols, site.out_features))
        mask = graph.add_input(mask_input(site.index), DType.FLOAT, ("batch", cols))
        consumers = list(y.uses)
        before = {id(n) for n in graph.nodes}
        op = Builder(graph, node, f"{node.name}/lora")
        x = node.inputs[0]
        batch, seq = (x.shape or ("batch", "sequence"))[:2]
        rows = op.Unsqueeze(mask, op.const([1], "int64", hint="axis1"))      # [batch, 1, C]
        low = op.MatMul(x, a)                                               # [batch, seq, C]
        picked = op.Mul(low, rows)                                          # the row's own columns
        delta = op.MatMul(picked, b)                                        # [batch, seq, out]
        total = op.Add(y, delta)
        for value, shape in ((rows, (batch, 1, cols)), (low, (batch, seq, cols)), (picked, (batch, seq, cols)),
                             (delta, (batch, seq, site.out_features)), (total, y.shape)):
            value.dtype, value.shape = DType.FLOAT, shape
        for consumer, index in consumers:
            consumer.set_input(index, total)
        # the delta runs right after its projection (the builder put it before): the generated C
        # fuses it into one kernel there (codegen/fuse.py), which reads the projection's output
        added = [n for n in graph.nodes if id(n) not in before]
        rest = [n for n in graph.nodes if id(n) in before]
        at = rest.index(node) + 1
        graph.nodes = rest[:at] + added + rest[at:]
    graph.sort()
    return out
