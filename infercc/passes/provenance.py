"""Which checkpoint weights a projection node multiplies by, kept through the passes that rename
or pack them, so run-time additions keyed by the checkpoint's module names (LoRA adapters:
``model.layers.0.self_attn.q_proj``) find their projection in the optimized graph.

A plain MatMul keeps its weight initializer's name (the importers name it after the checkpoint's
tensor); in an ONNX export, whose weights have names like ``val_76`` or ``onnx::MatMul_707``, the
module comes from the node: torch.onnx's dynamo exporter records it (``pkg.torch.onnx.name_scopes``),
the TorchScript exporter names the node after it (``/model/layers.0/self_attn/q_proj/MatMul``); quantization names the packed codes ``<weight>_q4`` / ``_q8``; projection packing, which
concatenates several weights into one, records the pieces on the packed node
(``metadata_props["infercc.packed"]``: a JSON list of [weight name, output width]), and the ORT
lowering of a packed quantized matmul copies that record onto the MatMulNBits it emits.
"""

from __future__ import annotations

import ast
import json
import re

from ..ir import Node

PACKED = "infercc.packed"
_QUANT_SUFFIX = re.compile(r"_q(?:4|8)$")
_SCOPES = "pkg.torch.onnx.name_scopes"
_TORCHSCRIPT = re.compile(r"^/((?:[A-Za-z0-9_.]+/)*?[A-Za-z0-9_.]+)/(?:MatMul|Gemm)(?:_\d+)?(?:$|/)")
#: (op_type, domain) of the projection kinds: float MatMul, ours, ORT's.
PROJECTIONS = {("MatMul", ""), ("MatMulQuant", "ai.infercc"), ("MatMulNBits", "com.microsoft")}


def weight_sources(node: Node) -> list[tuple[str, int]] | None:
    """[(checkpoint weight name, output columns)] in output-column order, or None when ``node`` is
    not a projection by a constant weight."""
    if (node.op_type, node.domain) not in PROJECTIONS or len(node.inputs) < 2:
        return None
    recorded = node.metadata_props.get(PACKED)
    if recorded:
        try:
            return [(str(name), int(width)) for name, width in json.loads(recorded)]
        except (ValueError, TypeError):
            return None
    w = node.inputs[1]
    if w is None or w.const is None:
        return None
    if node.op_type == "MatMul":
        if w.rank != 2 or not isinstance(w.shape[1], int):
            return None
        module = None if w.name.endswith(".weight") else _exported_module(node)
        return [(f"{module}.weight" if module else w.name, int(w.shape[1]))]
    n = node.attr("N")
    return [(_QUANT_SUFFIX.sub("", w.name), int(n))] if n is not None else None


def record_packed(node: Node, parts: list[Node]) -> None:
    """Record on the packed ``node`` the weights of the ``parts`` it replaces (nothing when one of
    them has no known source)."""
    sources = []
    for part in parts:
        found = weight_sources(part)
        if found is None:
            return
        sources.extend(found)
    node.metadata_props[PACKED] = json.dumps(sources)


def _exported_module(node: Node) -> str | None:
    """The torch module path an exporter left on a projection node, if any."""
    scopes = node.metadata_props.get(_SCOPES)
    if scopes and len(scopes) < 4096:
        try:
            names = ast.literal_eval(scopes)
        except (ValueError, SyntaxError, RecursionError, MemoryError):
            names = None
        if isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names):
            return names[-2] or None  # the last is the op's own scope (``linear``)
    found = _TORCHSCRIPT.match(node.name)
    return found.group(1).replace("/", ".") if found else None
