"""Values: the edges of the graph, each produced once and used by any number of nodes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

import onnx

from .dtypes import DType
from .tensor import Tensor

if TYPE_CHECKING:
    from .graph import Graph
    from .node import Node

#: A dimension: a fixed size, a symbolic name shared by dims that are equal, or unknown (None).
Dim = Union[int, str, None]  # noqa: UP007 - a runtime alias, valid on Python 3.10
#: A shape; None means the rank itself is unknown, () is a scalar.
Shape = Union[tuple[Dim, ...], None]  # noqa: UP007


class Value:
    """A tensor flowing through the graph, with links to its producer and consumers (use-def)."""

    __slots__ = (
        "name", "dtype", "shape", "type_proto", "const", "producer", "index", "uses", "graph",
        "doc_string", "metadata_props", "_src_type", "_info",
    )

    def __init__(
        self,
        name: str,
        dtype: DType | int | None = None,
        shape: Shape = None,
        *,
        const: Tensor | None = None,
        type_proto: onnx.TypeProto | None = None,
    ) -> None:
        self.name = name
        self.dtype = DType(dtype) if dtype is not None else None
        self.shape = tuple(shape) if shape is not None else None
        #: Only for non-tensor types (sequence, optional, map), which we carry through untouched.
        self.type_proto = type_proto
        #: Set for initializers: the constant this value always holds.
        self.const = const
        self.producer: Node | None = None
        self.index = 0
        self.uses: list[tuple[Node, int]] = []
        self.graph: Graph | None = None
        self.doc_string = ""
        self.metadata_props: dict[str, str] = {}
        #: (dtype, shape, TypeProto) as imported: export reuses the proto while dtype and shape are
        #: unchanged, keeping what the IR does not model (dim denotations, explicit empty fields).
        self._src_type: tuple | None = None
        #: (what it was made from, ValueInfoProto) of the last export (ir/onnx_export.py).
        self._info: tuple | None = None
        if const is not None:
            self.dtype = const.dtype
            self.shape = const.shape

    @property
    def is_const(self) -> bool:
        return self.const is not None

    @property
    def is_graph_input(self) -> bool:
        return self.graph is not None and any(v is self for v in self.graph.inputs)

    @property
    def is_graph_output(self) -> bool:
        return self.graph is not None and any(v is self for v in self.graph.outputs)

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)

    def consumers(self) -> list[Node]:
        seen: dict[int, Node] = {}
        for node, _ in self.uses:
            seen.setdefault(id(node), node)
        return list(seen.values())

    def replace_all_uses_with(self, other: Value) -> None:
        """Point every consumer (and graph-output slot) at ``other``.

        Graph outputs keep their public names: if ``self`` is a graph output, ``other`` takes over
        the name when it can, else an Identity carries it, so rewrites never change a model's
        interface. A graph input or initializer that is also a graph output stays that output.
        """
        if other is self:
            return
        for node, i in list(self.uses):
            node.set_input(i, other)
        graph = self.graph
        if graph is None:
            return
        for slot, out in enumerate(graph.outputs):
            if out is not self:
                continue
            if self.producer is None:
                # A graph input or initializer returned as it is: it still holds the same value, and
                # renaming it would change the model's inputs or break the initializer table.
                continue
            if other.producer is not None and not other.is_graph_output and other.graph is graph:
                old_name = self.name
                self.name = graph.names.fresh(old_name + "_replaced")
                other.name = old_name
                graph.outputs[slot] = other
            else:
                ident = graph.make_node("Identity", [other])
                carried = ident.outputs[0]
                old_name = self.name
                self.name = graph.names.fresh(old_name + "_replaced")
                carried.name = old_name
                carried.dtype, carried.shape = self.dtype or other.dtype, self.shape or other.shape
                graph.outputs[slot] = carried

    def __repr__(self) -> str:
        shape = "?" if self.shape is None else "[" + ",".join(str(d) for d in self.shape) + "]"
        return f"%{self.name}:{self.dtype or '?'}{shape}"
