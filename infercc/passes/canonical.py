"""Canonical ops: infercc's own operators (domain ``ai.infercc``) that fusions produce.

Every later pass (cache insertion, paging, quantization, C codegen) sees one form of attention,
norm or rotary, whatever the exporter wrote. A canonical op carries three things:

* ``infer``: its output types and shapes (registered as a shape rule);
* ``lower``: per target ("ort" for ONNX Runtime contrib ops, "onnx" for standard ONNX), either
  builds the replacement and returns its outputs, or returns a reason why it cannot, in which case
* ``decompose``: builds the same computation from standard ONNX ops. Always possible, so a
  lowering that cannot apply never leaves a node nobody can run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..ir import DType, Node, Shape, Value
from ..ir.shapes import shape_rule
from .rewrite import Builder

DOMAIN = "ai.infercc"
DOMAIN_VERSION = 1

#: Builds a replacement for ``node`` with ``op`` and returns its outputs, or returns a reason (str).
Lowering = Callable[[Builder, Node], "list[Value] | str"]


@dataclasses.dataclass
class CanonicalOp:
    name: str
    infer: Callable[[Node], list[tuple[DType | None, Shape]] | None]
    decompose: Callable[[Builder, Node], list[Value]]
    lower: dict[str, Lowering] = dataclasses.field(default_factory=dict)


REGISTRY: dict[str, CanonicalOp] = {}


def register(op: CanonicalOp) -> CanonicalOp:
    REGISTRY[op.name] = op
    shape_rule(DOMAIN, op.name)(op.infer)
    return op
