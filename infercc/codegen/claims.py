"""What the generated-C runtime claims: the standard ONNX ops with a C kernel, and the node-test
cases of those ops that it does not claim, each with its reason.

The claim is what the conformance suite (tests/codegen/test_conformance.py) holds us to: every
ONNX backend node test of a claimed op passes on the C runtime unless an exclusion below matches
it, and an excluded case must be refused cleanly (``Unsupported`` while emitting, so the model
runs on ONNX Runtime), never run wrong. Exclusions are whole categories (element types, value
kinds, input types of an op family), not individual failing tests: a bug in a claimed case is
fixed in the kernel, not listed here. ``infercc inspect --ops`` prints both tables.
"""

from __future__ import annotations

import dataclasses

import onnx

from ..passes.canonical import DOMAIN
from .emit import TABLE
from .ops import DT


def claimed_ops() -> list[str]:
    """Standard-domain (ai.onnx) op types with a C kernel, sorted."""
    return sorted(op for domain, op in TABLE if domain in ("", "ai.onnx"))


def kernel_ops() -> list[str]:
    """Canonical infercc-domain op types with a C kernel, sorted (what the fusion passes produce)."""
    return sorted(op for domain, op in TABLE if domain == DOMAIN)


#: ONNX element types the kernels read and write (the ``DT`` codes are the ONNX codes).
CLAIMED_DTYPES = frozenset(DT.values())
_ALL_DTYPES = frozenset(v for v in onnx.TensorProto.DataType.values() if v != onnx.TensorProto.UNDEFINED)


def dtype_names(codes: frozenset[int]) -> str:
    return ", ".join(onnx.TensorProto.DataType.Name(c).lower() for c in sorted(codes))


@dataclasses.dataclass(frozen=True)
class Exclusion:
    """A category of node-test cases outside the claim. A case matches when its op is in ``ops``
    ("*": any claimed op) and one of the set conditions holds."""

    ops: tuple[str, ...]
    what: str
    reason: str
    dtypes: frozenset[int] = frozenset()  # a graph input or output has one of these element types
    non_tensor: bool = False              # a graph input or output is a sequence / optional / map

    def matches(self, model: onnx.ModelProto) -> bool:
        graph = model.graph
        if "*" not in self.ops and not any(node.op_type in self.ops for node in graph.node):
            return False
        values = list(graph.input) + list(graph.output)
        if self.non_tensor and any(v.type.WhichOneof("value") != "tensor_type" for v in values):
            return True
        return bool(self.dtypes) and any(v.type.tensor_type.elem_type in self.dtypes for v in values
                                         if v.type.WhichOneof("value") == "tensor_type")


EXCLUSIONS: tuple[Exclusion, ...] = (
    Exclusion(("*",), f"element types other than {dtype_names(CLAIMED_DTYPES)}",
              "the kernels are written for the types transformer inference uses (float32 activations, "
              "float16 caches, int64/int32 indices and shapes, int8/uint8 codes, bool masks); a model with "
              "double, bfloat16, 16-bit, unsigned 32/64-bit, float8, 4/2-bit or string values runs on ONNX Runtime",
              dtypes=_ALL_DTYPES - CLAIMED_DTYPES),
    Exclusion(("*",), "sequence, optional and map values",
              "the runtime's values are dense tensors (pointer, dims, element type); no compiled transformer graph "
              "carries sequences or optionals", non_tensor=True),
)


def exclusion_for(model: onnx.ModelProto) -> Exclusion | None:
    """The first exclusion that matches a node-test model, None when the case is claimed."""
    return next((e for e in EXCLUSIONS if e.matches(model)), None)
