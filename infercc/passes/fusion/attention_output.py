"""After attention: merging the heads of ``P·V`` [B, N, S, Dv] back into [B, S, N*Dv].

Exporters merge with ``Reshape(Transpose(out, [0, 2, 1, 3]), [B, S, N*Dv])``, TorchScript with a
no-op Reshape before the transpose, GPT-2's dynamo export straight to [B*S, N*Dv] for a Gemm. A
Reshape only reads its input's elements in order, and the transposed [B, S, N, Dv] has the same
order as the canonical [B, S, N*Dv] output, so every such Reshape can read the canonical output
directly (when its target copies no dim by index past the first two). Readers of anything else get
the per-head tensor rebuilt from the canonical output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ...ir import Node, Value
from ..rewrite import Builder, node_attr
from .build_util import i64
from .dims import DimOracle

Apply = Callable[[Builder, Value], None]


@dataclasses.dataclass
class OutputPlan:
    apply: Apply
    how: str


def plan_output(pv: Node, oracle: DimOracle, heads: int, v_size: int, rank: int) -> OutputPlan:
    out4 = pv.outputs[0]
    if rank == 3:
        return OutputPlan(lambda op, out: out4.replace_all_uses_with(out), "single head")
    value = out4
    users = _readers(value)
    if len(users) == 1 and not value.is_graph_output and _identity_reshape(users[0], value, oracle, heads, v_size):
        value = users[0].outputs[0]
        users = _readers(value)
    transposes = [u for u in users if u.op_type == "Transpose" and not u.domain and node_attr(u, "perm") == [0, 2, 1, 3]]
    if value.is_graph_output or len(transposes) != 1 or len(users) != 1:
        return OutputPlan(_rebuild(out4, heads, v_size), "heads split again for other readers")
    merged = transposes[0].outputs[0]
    readers = _readers(merged)
    if merged.is_graph_output or not readers or not all(_order_only(r, merged, oracle) for r in readers):
        return OutputPlan(_rebuild(out4, heads, v_size), "heads split again for other readers")

    def apply(op: Builder, out: Value) -> None:
        for reader in readers:
            if _is_packed(reader, merged, oracle, heads * v_size) and not reader.outputs[0].is_graph_output:
                reader.outputs[0].replace_all_uses_with(out)
            else:
                reader.set_input(0, out)

    return OutputPlan(apply, "merged heads read directly")


def _readers(value: Value) -> list[Node]:
    """Consumers other than Shape: those only need sizes, which the fusion recomputes from the
    canonical node's inputs and output (see reroute_shapes)."""
    return [n for n in value.consumers() if n.op_type != "Shape" or n.domain]


def _rebuild(out4: Value, heads: int, v_size: int) -> Apply:
    def apply(op: Builder, out: Value) -> None:
        per_head = op.Transpose(op.Reshape(out, i64(op, [0, 0, heads, v_size])), perm=[0, 2, 1, 3])
        per_head.dtype = out4.dtype
        out4.replace_all_uses_with(per_head)

    return apply


def _identity_reshape(node: Node, x: Value, oracle: DimOracle, heads: int, v_size: int) -> bool:
    """A Reshape of [B, N, S, Dv] to the same shape (TorchScript's ``view(B, -1, S, Dv)``)."""
    if node.op_type != "Reshape" or node.domain or node.inputs[0] is not x:
        return False
    elems = oracle.elements(node.inputs[1])
    if elems is None or len(elems) != 4 or elems.count(-1) > 1:
        return False
    known = {1: heads, 3: v_size}
    for axis, e in enumerate(elems):
        if e == -1 or (axis in known and e == known[axis]) or oracle.is_dim(e, x, axis):
            continue
        if e == 0 and not node_attr(node, "allowzero", 99):
            continue
        return False
    return True


def _order_only(node: Node, merged: Value, oracle: DimOracle) -> bool:
    """A Reshape of the merged heads whose target does not copy dims 2 and 3 by index."""
    if node.op_type != "Reshape" or node.domain or node.inputs[0] is not merged:
        return False
    elems = oracle.elements(node.inputs[1])
    if elems is None:
        return False
    copies = not node_attr(node, "allowzero", 99)
    return not (copies and any(e == 0 for e in elems[2:]))


def _is_packed(node: Node, merged: Value, oracle: DimOracle, hidden: int) -> bool:
    """Its target is exactly [B, S, N*Dv]: the reshape is the canonical output itself."""
    elems = oracle.elements(node.inputs[1])
    if elems is None or len(elems) != 3:
        return False
    zero = not node_attr(node, "allowzero", 99)
    lead = all(e == 0 and zero or oracle.is_dim(e, merged, i) for i, e in enumerate(elems[:2]))
    return lead and (elems[2] == hidden or elems[2] == -1)
