"""The attention fusion report: one entry per candidate site (every Softmax, and every product with
V whose weights come from another normalization), fused or not and why, plus the number of layers
the model has, so that a model where some layers were missed says so as a warning.

The layer count comes from the parameter names exporters keep (``layers.3.``, ``h.3.``,
``layer.3.``, ``blocks.3.``); without them, from the sites that were attention-shaped (a product of
two activations normalized and multiplied by V), which is what the fusion should have caught.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ...ir import Graph, Node, Value
from ..diagnostics import PassRecord

_LAYER = re.compile(r"(?:^|[./_])(?:layers|layer|h|blocks|block)[._](\d+)(?=[./_])")
#: Ops that scale or mask scores rather than normalize them.
_MASKING = {"Mul", "Div", "Add", "Sub", "Where", "Cast", "Identity"}
#: Ops a hand-written normalization between Q·Kᵀ and ·V may use (the fusion needs Softmax).
_ELEMENTWISE = {"Mul", "Div", "Add", "Sub", "Where", "Sigmoid", "Relu", "Exp", "Cast", "Tanh", "Identity"}


@dataclasses.dataclass
class SiteEntry:
    where: str
    fused: bool
    reason: str = ""
    shaped: bool = False  #: attention-shaped (counts towards the expected number without names)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"where": self.where, "status": "fused" if self.fused else "not fused"}
        if self.reason:
            d["reason"] = self.reason
        d.update(self.details)
        return d


def layers_from_names(graph: Graph) -> int | None:
    """How many numbered layers the parameter and node names mention (None if none do)."""
    found: set[int] = set()
    for name in list(graph.initializers) + [n.name for n in graph.nodes]:
        for m in _LAYER.finditer(name):
            found.add(int(m.group(1)))
    return max(found) + 1 if found else None


def other_normalizations(graph: Graph) -> list[tuple[Node, str]]:
    """Products with V whose weights come from a product of two activations through something
    other than Softmax: attention the fusion cannot take, reported as such."""
    sites = []
    for node in graph.nodes:
        if node.op_type != "MatMul" or node.domain or not all(_activation(x) for x in node.inputs):
            continue
        chain, value = [], node.inputs[0]
        for _ in range(6):
            producer = value.producer
            if producer is None or producer.domain:
                break
            if producer.op_type == "Softmax":
                chain = []
                break
            if producer.op_type == "MatMul":
                if all(_activation(x) for x in producer.inputs) and chain:
                    norms = [op for op in reversed(chain) if op not in _MASKING]
                    how = f"normalized by {' -> '.join(norms)}" if norms else "not normalized"
                    sites.append((node, f"the attention weights are {how}, not Softmax"))
                break
            if producer.op_type not in _ELEMENTWISE:
                break
            chain.append(producer.op_type)
            value = next((x for x in producer.inputs if x is not None and _activation(x) and not _bool(x)),
                         producer.inputs[0])
    return sites


def projections(q: Value | None, k: Value | None, v: Value | None) -> str:
    """How Q, K and V were projected, for the report: "packed QKV MatMul + bias of one input",
    "separate MatMul of one input", "separate MatMul + bias, K/V from another input"..."""
    found = [_projection(x) for x in (q, k, v)]
    if any(f is None for f in found):
        return "not traced to projections"
    kinds = {kind for kind, _, _ in found}
    packed = {node for _, _, node in found if node is not None}
    inputs = [x for _, x, _ in found]
    if q is k is v:  # one projection split per head (GPT-NeoX's [B, S, H, 3*D])
        how = "packed QKV (per head)"
    elif len(packed) == 1 and all(f[2] is not None for f in found):
        how = "packed QKV"
    else:
        how = "separate"
    kind = " / ".join(sorted(kinds))
    if inputs[0] is inputs[1] is inputs[2]:
        src = "of one input"
    elif inputs[1] is inputs[2]:
        src = "K/V from another input"
    else:
        src = "of different inputs"
    return f"{how} {kind} {src}"


def _projection(value: Value | None) -> tuple[str, Value, Node | None] | None:
    """(kind, projected input, the Split/Slice node when packed) of a projection output."""
    packed = None
    for _ in range(4):
        if value is None or value.producer is None:
            return None
        node = value.producer
        if node.op_type in ("Split", "Slice") and packed is None:
            packed, value = node, node.inputs[0]
        elif node.op_type == "Reshape":
            value = node.inputs[0]
        elif node.op_type == "Add" and any(x.is_const for x in node.inputs):
            inner = _projection(next(x for x in node.inputs if not x.is_const))
            return None if inner is None else (f"{inner[0]} + bias", inner[1], packed or inner[2])
        elif node.op_type in ("MatMul", "Gemm") and node.inputs[1] is not None and node.inputs[1].is_const:
            bias = node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None
            return ("MatMul + bias" if bias else "MatMul", node.inputs[0], packed)
        else:
            return None
    return None


def _activation(value) -> bool:
    return value is not None and not value.is_const and not (
        value.producer is not None and value.producer.op_type == "Constant"
    )


def _bool(value) -> bool:
    from ...ir import DType

    return value.dtype == DType.BOOL


def finish(record: PassRecord, graph: Graph, entries: list[SiteEntry]) -> None:
    """Write the per-site report and the expected-vs-fused comparison into the pass record."""
    fused = sum(e.fused for e in entries)
    shaped = sum(e.fused or e.shaped for e in entries)
    # Layer names count layers only when the model has attention at all (a CNN has "blocks.3").
    named = layers_from_names(graph) if shaped else None
    expected = named if named is not None else shaped
    record.info["attention"] = {
        "expected": expected,
        "expected_from": "layer names" if named is not None else "attention-shaped sites",
        "fused": fused,
        "sites": [e.to_dict() for e in entries],
    }
    if entries:
        record.note(f"fused {fused} of {expected} expected attention layers (expected from the "
                    f"{record.info['attention']['expected_from']})")
    for e in entries:
        if e.fused:
            record.applied(e.where, "attention_fused")
        else:
            record.skipped(e.where, e.reason)
    if fused < expected:
        missing = [e for e in entries if not e.fused and e.shaped] or [e for e in entries if not e.fused]
        why = f"; first: {missing[0].where}: {missing[0].reason}" if missing else ""
        record.warn(f"fused {fused} of {expected} expected attention layers{why}")
