"""Graphs: ordered nodes plus the values entering and leaving them, with an edit API that keeps
use-def links consistent so passes never hand-maintain them."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import networkx as nx

from .dtypes import DType
from .node import Node
from .tensor import Tensor
from .value import Shape, Value


class NameScope:
    """Model-wide set of value names: ONNX forbids a subgraph from reusing an outer name."""

    def __init__(self) -> None:
        self.used: set[str] = set()
        self._counter = itertools.count()

    def claim(self, name: str) -> str:
        self.used.add(name)
        return name

    def fresh(self, hint: str) -> str:
        hint = hint or "v"
        if hint not in self.used:
            return self.claim(hint)
        while True:
            name = f"{hint}__{next(self._counter)}"
            if name not in self.used:
                return self.claim(name)


class Graph:
    """A (sub)graph. ``parent`` is set for control-flow bodies, which may read outer values."""

    def __init__(self, name: str = "graph", *, parent: Graph | None = None, names: NameScope | None = None):
        self.name = name
        self.parent = parent
        self.names = names if names is not None else (parent.names if parent else NameScope())
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.nodes: list[Node] = []
        self.initializers: dict[str, Value] = {}
        self.doc_string = ""
        self.metadata_props: dict[str, str] = {}
        #: Proto fields no pass reads (sparse initializers, quantization annotations), kept verbatim.
        self.extras: dict[str, list[Any]] = {}
        #: Values the imported file declared in ``value_info``, in file order: export writes these
        #: first (then any other typed value) so that a round trip keeps the file byte for byte.
        self.value_info: list[Value] = []
        #: Sparse initializers (data kept verbatim in ``extras["sparse_initializer"]``), by name, so
        #: that nodes reading them have a defined Value.
        self.sparse_initializers: dict[str, Value] = {}

    # -- creation -----------------------------------------------------------------------------
    def add_input(self, name: str, dtype: DType | int | None, shape: Shape) -> Value:
        value = Value(self.names.claim(name), dtype, shape)
        value.graph = self
        self.inputs.append(value)
        return value

    def add_initializer(self, name: str, tensor: Tensor) -> Value:
        """A named constant. The name is made unique if taken."""
        value = Value(self.names.fresh(name), const=tensor)
        value.graph = self
        self.initializers[value.name] = value
        return value

    def add_const(self, tensor: Tensor, hint: str = "const") -> Value:
        return self.add_initializer(hint, tensor)

    def make_node(
        self,
        op_type: str,
        inputs: Sequence[Value | None],
        *,
        num_outputs: int = 1,
        output_names: Sequence[str] | None = None,
        domain: str = "",
        attrs: dict[str, Any] | None = None,
        name: str = "",
        before: Node | None = None,
    ) -> Node:
        """Create a node with fresh output values and insert it (at the end or before ``before``)."""
        names = list(output_names) if output_names else [f"{name or op_type}_out{i}" for i in range(num_outputs)]
        outputs = [Value(self.names.fresh(n)) for n in names]
        node = Node(op_type, inputs, outputs, domain=domain, attrs=attrs, name=name or self.names.fresh(op_type))
        self.insert(node, before=before)
        return node

    def insert(self, node: Node, *, before: Node | None = None) -> Node:
        node.graph = self
        for v in node.outputs:
            v.graph = self
            self.names.claim(v.name)
        if before is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(self._position(before), node)
        return node

    def _position(self, node: Node) -> int:
        for i, n in enumerate(self.nodes):
            if n is node:
                return i
        raise ValueError(f"{node!r} is not in graph {self.name!r}")

    # -- removal ------------------------------------------------------------------------------
    def remove(self, node: Node, *, force: bool = False) -> None:
        """Remove a node whose outputs nobody uses (``force`` skips that check)."""
        if not force:
            for v in node.outputs:
                if v.uses or v.is_graph_output:
                    raise ValueError(f"cannot remove {node!r}: output %{v.name} is still used")
        node.detach()
        self.nodes.pop(self._position(node))
        node.graph = None

    def remove_dead(self) -> int:
        """Remove nodes (recursively unused) and initializers nobody reads. Returns nodes removed."""
        live_outputs = {id(v) for v in self.outputs}
        removed = 0
        for node in reversed(list(self.nodes)):
            if any(v.uses or id(v) in live_outputs for v in node.outputs):
                continue
            node.detach()
            node.graph = None
            removed += 1
        if removed:
            self.nodes = [n for n in self.nodes if n.graph is self]
        for name, value in list(self.initializers.items()):
            if not value.uses and not value.is_graph_output and not value.is_graph_input:
                del self.initializers[name]
        return removed

    # -- rewiring -----------------------------------------------------------------------------
    def replace_subgraph(self, old_nodes: Iterable[Node], new_nodes: Sequence[Node], outputs: dict[Value, Value]) -> None:
        """Swap ``old_nodes`` for ``new_nodes``: each old value in ``outputs`` is replaced by its new
        value everywhere; then the old nodes are removed. New nodes are inserted before the first old
        node and the graph is re-sorted so order stays topological."""
        old = list(old_nodes)
        old_ids = {id(n) for n in old}
        # Refuse before touching anything: an unmapped old value must not be read outside ``old``.
        mapped = {id(v) for v in outputs}
        for node in old:
            for v in node.outputs:
                if id(v) not in mapped and (v.is_graph_output or any(id(u) not in old_ids for u, _ in v.uses)):
                    raise ValueError(f"replace_subgraph: %{v.name} is used outside the replaced nodes")
        anchor = min(old, key=self._position) if old else None
        for node in new_nodes:
            if node.graph is None:
                self.insert(node, before=anchor)
        for old_value, new_value in outputs.items():
            old_value.replace_all_uses_with(new_value)
        for node in old:
            for v in node.outputs:
                if any(id(user) not in old_ids for user, _ in v.uses) or v.is_graph_output:
                    raise ValueError(f"replace_subgraph: %{v.name} is used outside the replaced nodes")
        for node in old:
            node.detach()
            node.graph = None
        self.nodes = [n for n in self.nodes if n.graph is self]
        self.sort()

    # -- order --------------------------------------------------------------------------------
    def sort(self) -> None:
        """Stable topological sort: keeps the current order wherever dependencies allow."""
        position = {id(n): i for i, n in enumerate(self.nodes)}
        indegree: dict[int, int] = {}
        users: dict[int, list[Node]] = {id(n): [] for n in self.nodes}
        for node in self.nodes:
            deps = {id(p) for p in self._local_producers(node)}
            indegree[id(node)] = len(deps)
            for d in deps:
                users[d].append(node)
        import heapq

        ready = [(position[id(n)], n) for n in self.nodes if indegree[id(n)] == 0]
        heapq.heapify(ready)
        order: list[Node] = []
        while ready:
            _, node = heapq.heappop(ready)
            order.append(node)
            for user in users[id(node)]:
                indegree[id(user)] -= 1
                if indegree[id(user)] == 0:
                    heapq.heappush(ready, (position[id(user)], user))
        if len(order) != len(self.nodes):
            stuck = [n for n in self.nodes if indegree[id(n)] > 0]
            raise ValueError(f"graph {self.name!r} has a cycle through {stuck[0]!r}")
        self.nodes = order

    def _local_producers(self, node: Node) -> Iterator[Node]:
        """Nodes of this graph that ``node`` depends on, through inputs or through its subgraphs."""
        values = [v for v in node.inputs if v is not None]
        if any(True for _ in node.subgraphs()):
            values += node.outer_inputs()
        for v in values:
            if v.producer is not None and v.producer.graph is self:
                yield v.producer

    # -- queries ------------------------------------------------------------------------------
    def owns(self, value: Value) -> bool:
        """Whether ``value`` is defined in this graph or one nested inside it."""
        g = value.graph
        while g is not None:
            if g is self:
                return True
            g = g.parent
        return False

    def walk(self) -> Iterator[Node]:
        """Every node, nested subgraphs included (depth first, in order)."""
        for node in self.nodes:
            yield node
            for sub in node.subgraphs():
                yield from sub.walk()

    def values(self) -> Iterator[Value]:
        """Every value defined in this graph (not in subgraphs)."""
        yield from self.inputs
        yield from self.initializers.values()
        yield from self.sparse_initializers.values()
        for node in self.nodes:
            yield from node.outputs

    def value(self, name: str) -> Value:
        for v in self.values():
            if v.name == name:
                return v
        raise KeyError(f"no value named {name!r} in graph {self.name!r}")

    def op_histogram(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.walk():
            key = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def to_networkx(self) -> nx.MultiDiGraph:
        """A read-only view for analyses: nodes are Node objects, edges carry the Value."""
        g = nx.MultiDiGraph()
        for node in self.nodes:
            g.add_node(node)
        for node in self.nodes:
            for value in node.inputs:
                if value is not None and value.producer is not None and value.producer.graph is self:
                    g.add_edge(value.producer, node, value=value)
        return g

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, {len(self.nodes)} nodes, {len(self.inputs)} in, {len(self.outputs)} out)"
