"""Constant folding: evaluate nodes whose inputs are all constants, once, at compile time."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper
from onnx.reference import ReferenceEvaluator

from ...ir import DType, Graph, Model, Node, Tensor
from ..base import Pass, PassContext
from ..rewrite import const_value

#: Ops never folded: random ops differ per run, and folding (De)QuantizeLinear would undo
#: weight quantization on purpose kept in the graph.
_NEVER = {
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "If", "Loop", "Scan", "Constant",
}


#: A folded result derived from a weight at least this large, which stays in the model because
#: other nodes read it too, would duplicate that weight in the artifact.
_DUPLICATE_LIMIT = 1 << 20


def _shared_weight_bytes(node: Node) -> int:
    """Bytes of the largest constant input that other nodes also read (0 if none)."""
    sizes = [v.const.nbytes for v in node.inputs
             if v is not None and v.const is not None and any(user is not node for user, _ in v.uses)]
    return max(sizes, default=0)


class ConstantFolding(Pass):
    """Folded results larger than ``fold_limit_bytes`` are kept as computations when they are also
    larger than their inputs (an Expand to a huge tensor is cheaper to compute than to store)."""

    name = "constant_folding"

    def run(self, model: Model, ctx: PassContext) -> None:
        ctx.record.count("constant_nodes_lifted", _lift_constant_nodes(model.graph))
        ctx.record.count("nodes_folded", fold_constants(model, ctx))


def fold_constants(model: Model, ctx: PassContext) -> int:
    """Evaluate every node of the main graph whose inputs are all constants (in order, so chains
    fold in one sweep). Returns how many nodes were folded; refusals are recorded as sites."""
    limit = ctx.config.fold_limit_bytes
    opset = model.opset("") or 17
    folded_nodes = 0
    for node in list(model.graph.nodes):
        if node.graph is None or node.domain or node.op_type in _NEVER or any(True for _ in node.subgraphs()):
            continue
        inputs = [None if v is None else const_value(v) for v in node.inputs]
        if any(v is not None and a is None for v, a in zip(node.inputs, inputs)):
            continue
        if not any(v is not None for v in node.inputs) and node.op_type not in ("Range",):
            continue
        if not any(o.uses or o.is_graph_output for o in node.outputs):
            continue  # dead: DCE removes it, no need to compute it
        if node.op_type == "Identity" and node.outputs[0].is_graph_output and not node.outputs[0].uses:
            continue  # it only gives a constant output its name: folding would put it back
        in_bytes = sum(a.nbytes for a in inputs if a is not None)
        shared = _shared_weight_bytes(node)
        if shared >= _DUPLICATE_LIMIT:
            ctx.record.skipped(
                f"{node.op_type} {node.name!r}",
                f"folding would store a second copy of a {shared / 2**20:.1f} MiB weight that other nodes "
                "still read (e.g. a tied embedding and LM head); kept as a computation",
            )
            continue
        try:
            outputs = _evaluate(node, inputs, opset)
        except Exception as exc:  # noqa: BLE001 - unfoldable ops stay in the graph
            ctx.record.skipped(f"{node.op_type} {node.name!r}", f"evaluation failed: {str(exc)[:120]}")
            continue
        out_bytes = sum(o.nbytes for o in outputs)
        if out_bytes > limit and out_bytes > in_bytes:
            ctx.record.skipped(
                f"{node.op_type} {node.name!r}",
                f"folded result would be {out_bytes / 2**20:.1f} MiB, over fold_limit_bytes and larger than its inputs",
            )
            continue
        wrong = _type_mismatch(node, outputs)
        if wrong:
            ctx.record.skipped(f"{node.op_type} {node.name!r}", wrong)
            continue
        for value, array in zip(node.outputs, outputs):
            if not value.uses and not value.is_graph_output:
                continue
            folded = model.graph.add_const(Tensor(array), value.name + "_folded")
            value.replace_all_uses_with(folded)
        # Only the folded node goes; other dead code (and inputs left unused) is DCE's to count.
        try:
            model.graph.remove(node)
        except ValueError:
            pass  # an unused-looking output is returned directly by a subgraph: keep the node
        folded_nodes += 1
    return folded_nodes


def _type_mismatch(node: Node, outputs: list[np.ndarray]) -> str | None:
    """A folded result must have the element type the graph declares for the value it replaces."""
    for value, array in zip(node.outputs, outputs):
        if value.dtype is None:
            continue
        try:
            got = DType.from_numpy(array.dtype)
        except Exception:  # noqa: BLE001 - a numpy type ONNX has no number for
            got = None
        if got != value.dtype:
            return f"evaluation gave {array.dtype} for %{value.name}, which the graph declares {value.dtype}"
    return None


def _lift_constant_nodes(graph: Graph) -> int:
    """Constant nodes become initializers: one representation of constants for every later pass."""
    lifted = 0
    for node in list(graph.nodes):
        if node.op_type != "Constant" or node.domain:
            continue
        array = const_value(node.outputs[0])
        if array is None or node.outputs[0].is_graph_output:
            continue
        out = node.outputs[0]
        value = graph.add_const(Tensor(array), out.name)
        value.dtype = out.dtype or value.dtype
        out.replace_all_uses_with(value)
        graph.remove(node)
        lifted += 1
    return lifted


def _evaluate(node: Node, inputs: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    names = [f"i{k}" if a is not None else "" for k, a in enumerate(inputs)]
    proto_node = helper.make_node(node.op_type, names, [f"o{k}" for k in range(len(node.outputs))])
    from ...ir.onnx_export import export_attr

    proto_node.attribute.extend(export_attr(a, True) for a in node.attrs.values())
    graph = helper.make_graph(
        [proto_node], "fold",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
         for n, a in zip(names, inputs) if a is not None],
        [helper.make_tensor_value_info(f"o{k}", onnx.TensorProto.UNDEFINED, None) for k in range(len(node.outputs))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    feeds = {n: np.asarray(a) for n, a in zip(names, inputs) if a is not None}
    results = ReferenceEvaluator(model).run(None, feeds)
    return [np.asarray(r) for r in results]
