"""What the profiler needs to know about a graph's steps: each node's op type (``domain::op``) and
the transformer layer it belongs to, for the per-op-type and per-layer tables of ``infercc bench
--profile`` (both runtimes: the generated C's steps are the graph's nodes; ONNX Runtime's profile
names the same nodes).

Layers come from names, because the graph has no other record of them: the node's own name
(``/model/h.3/attn/...``), else the weights and graph inputs it reads (``model.layers.3.q_proj``,
``past_key_values.3.key``), else the layers of the nodes that produce its inputs (an Attention
between layer 3's projections is layer 3). A node that reads a dotted checkpoint weight without a
layer index (the embedding, the final norm, the LM head) is outside the layers ("-"). These names
stay in Python: the C source sees them only as sanitized comments.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..ir import Node

#: ``layers.3``, ``layer_3``, ``/h.3/``, ``blocks_3``, ``blk.3``, ``past_key_values.3``, ``present.3``.
LAYER = re.compile(r"(?:^|[./_])(?:layers?|h|blocks?|blk|past_key_values|present)[._](\d+)(?=$|[./_])")
#: The layer column for a step outside every layer.
NO_LAYER = "-"


def layer_in(name: str) -> int | None:
    """The layer index a name spells, or None."""
    match = LAYER.search(name or "")
    return int(match.group(1)) if match else None


def op_name(node: Node) -> str:
    """``domain::op`` (custom domains) or the plain op type (the ONNX domain)."""
    return f"{node.domain}::{node.op_type}" if node.domain else node.op_type


def layer_table(nodes: Iterable[Node]) -> list[str]:
    """The layer of each node (in order), ``layers.N`` or ``NO_LAYER``; nodes must be in
    topological order (a graph's ``nodes`` are), so producers are decided before their readers."""
    produced: dict[int, int | None] = {}
    layers: list[str] = []
    for node in nodes:
        layer = layer_in(node.name)
        if layer is None:
            layer, outside = _from_inputs(node, produced)
        else:
            outside = False
        for v in node.outputs:
            if v is not None:
                produced[id(v)] = None if outside else layer
        layers.append(NO_LAYER if layer is None or outside else f"layers.{layer}")
    return layers


def _from_inputs(node: Node, produced: dict[int, int | None]) -> tuple[int | None, bool]:
    """(layer, outside) from what ``node`` reads: named weights and graph inputs first, then the
    highest layer among its inputs' producers."""
    read = [v for v in node.inputs if v is not None]
    weights = [v.name for v in read if v.const is not None and not v.is_graph_input]
    found = [n for n in (layer_in(v.name) for v in read if v.const is not None or v.is_graph_input) if n is not None]
    if found:
        return max(found), False
    if any("." in name for name in weights):
        return None, True  # a checkpoint weight outside the layers: embedding, final norm, LM head
    known = [n for n in (produced.get(id(v)) for v in read) if n is not None]
    return (max(known) if known else None), False
