"""Nodes (operator applications) and their attributes."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from .tensor import Tensor
from .value import Value

if TYPE_CHECKING:
    from .graph import Graph

AttrType = onnx.AttributeProto.AttributeType
# Plain ints: each AttrType.X goes through protobuf's enum wrapper (__getattr__), and subgraphs()
# asks for them for every attribute of every node each time a graph is walked.
ATTR_GRAPH, ATTR_GRAPHS = int(AttrType.GRAPH), int(AttrType.GRAPHS)


@dataclasses.dataclass
class Attr:
    """One attribute. ``value`` is a plain Python value, a Tensor, a Graph, or a list of them;
    sparse tensors and type protos stay protos since no pass reads them."""

    name: str
    type: int
    value: Any
    doc_string: str = ""
    ref_attr_name: str = ""

    @staticmethod
    def infer(name: str, value: Any) -> Attr:
        """Pick the attribute type from a Python value, as onnx.helper.make_attribute does."""
        from .graph import Graph

        if isinstance(value, Attr):
            return value
        if isinstance(value, (bool, int, np.integer)):
            return Attr(name, AttrType.INT, int(value))
        if isinstance(value, (float, np.floating)):
            return Attr(name, AttrType.FLOAT, float(value))
        if isinstance(value, (str, bytes)):
            return Attr(name, AttrType.STRING, value)
        if isinstance(value, Tensor):
            return Attr(name, AttrType.TENSOR, value)
        if isinstance(value, np.ndarray):
            return Attr(name, AttrType.TENSOR, Tensor(value))
        if isinstance(value, Graph):
            return Attr(name, AttrType.GRAPH, value)
        if isinstance(value, Sequence):
            items = list(value)
            if all(isinstance(v, (bool, int, np.integer)) for v in items):
                return Attr(name, AttrType.INTS, [int(v) for v in items])
            if all(isinstance(v, (int, float, np.number)) for v in items):
                return Attr(name, AttrType.FLOATS, [float(v) for v in items])
            if all(isinstance(v, (str, bytes)) for v in items):
                return Attr(name, AttrType.STRINGS, items)
            if all(isinstance(v, Graph) for v in items):
                return Attr(name, AttrType.GRAPHS, items)
            if all(isinstance(v, Tensor) for v in items):
                return Attr(name, AttrType.TENSORS, items)
        raise TypeError(f"cannot infer the ONNX attribute type of {name}={value!r}")


class Node:
    """An operator application. Inputs may hold None for omitted optional inputs."""

    def __init__(
        self,
        op_type: str,
        inputs: Sequence[Value | None],
        outputs: Sequence[Value],
        *,
        domain: str = "",
        attrs: dict[str, Any] | None = None,
        name: str = "",
        overload: str = "",
    ) -> None:
        self.op_type = op_type
        self.domain = "" if domain == "ai.onnx" else domain
        self.name = name
        self.overload = overload
        self.doc_string = ""
        self.metadata_props: dict[str, str] = {}
        self.graph: Graph | None = None
        #: (what it was made from, NodeProto) of the last analysis export (ir/onnx_export.py).
        self._analysis_proto: tuple | None = None
        self.attrs: dict[str, Attr] = {k: Attr.infer(k, v) for k, v in (attrs or {}).items()}
        self.inputs: list[Value | None] = []
        for i, value in enumerate(inputs):
            self.inputs.append(value)
            if value is not None:
                value.uses.append((self, i))
        self.outputs: list[Value] = list(outputs)
        for i, value in enumerate(self.outputs):
            value.producer, value.index = self, i

    # -- attributes ---------------------------------------------------------------------------
    def attr(self, name: str, default: Any = None) -> Any:
        found = self.attrs.get(name)
        return default if found is None else found.value

    def set_attr(self, name: str, value: Any) -> None:
        self.attrs[name] = Attr.infer(name, value)

    # -- inputs -------------------------------------------------------------------------------
    def set_input(self, i: int, value: Value | None) -> None:
        old = self.inputs[i]
        if old is not None:
            for k, (n, j) in enumerate(old.uses):
                if n is self and j == i:
                    del old.uses[k]
                    break
        self.inputs[i] = value
        if value is not None:
            value.uses.append((self, i))

    def detach(self) -> None:
        """Drop this node's uses of its inputs (before removing it from its graph), including the
        reads of outer values by nodes inside its subgraphs, which would otherwise stay listed as
        uses and keep those values (and their producers) alive."""
        for i in range(len(self.inputs)):
            self.set_input(i, None)
        for sub in self.subgraphs():
            for inner in sub.walk():
                for i, v in enumerate(inner.inputs):
                    if v is not None and not sub.owns(v):
                        inner.set_input(i, None)

    # -- structure ----------------------------------------------------------------------------
    @property
    def key(self) -> tuple[str, str]:
        return (self.domain, self.op_type)

    def subgraphs(self) -> Iterator[Graph]:
        for attr in self.attrs.values():
            if attr.type == ATTR_GRAPH:
                yield attr.value
            elif attr.type == ATTR_GRAPHS:
                yield from attr.value

    def outer_inputs(self) -> list[Value]:
        """Values from enclosing scopes that this node's subgraphs read (implicit inputs)."""
        found: dict[int, Value] = {}
        for sub in self.subgraphs():
            for inner in sub.walk():
                for v in inner.inputs:
                    if v is not None and not sub.owns(v):
                        found.setdefault(id(v), v)
            for v in sub.outputs:
                if not sub.owns(v):
                    found.setdefault(id(v), v)
        return list(found.values())

    def __repr__(self) -> str:
        op = f"{self.domain}::{self.op_type}" if self.domain else self.op_type
        ins = ", ".join("None" if v is None else f"%{v.name}" for v in self.inputs)
        outs = ", ".join(f"%{v.name}" for v in self.outputs)
        return f"{outs} = {op}({ins})"
