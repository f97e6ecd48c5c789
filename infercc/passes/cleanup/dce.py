"""Dead-code elimination, in the main graph and every control-flow body."""

from __future__ import annotations

from ...ir import Graph, Model
from ..base import Pass, PassContext


class DeadCodeElimination(Pass):
    name = "dead_code_elimination"

    def run(self, model: Model, ctx: PassContext) -> None:
        before_inits = _count_initializers(model.graph)
        ctx.record.count("nodes_removed", _sweep(model.graph))
        ctx.record.count("initializers_removed", before_inits - _count_initializers(model.graph))


def _sweep(graph: Graph) -> int:
    """Bodies first: a body's dead nodes may be the only readers of an outer value, which then dies
    too (removing a node drops its bodies' reads of outer values, see Node.detach)."""
    removed = 0
    for node in graph.nodes:
        for sub in node.subgraphs():
            removed += _sweep(sub)
    return removed + graph.remove_dead()


def _count_initializers(graph: Graph) -> int:
    return len(graph.initializers) + sum(_count_initializers(s) for n in graph.nodes for s in n.subgraphs())
