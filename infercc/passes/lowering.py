"""Lowering: canonical ops become what the chosen runtime executes.

Runs after the fusions. For ``Config.lowering == "ort"`` a canonical op becomes an ONNX Runtime
contrib op where its lowering says the provider has a kernel (see ``capabilities.py``); ``"onnx"``
targets standard ONNX only (a portable artifact). Whatever cannot be lowered is decomposed to
standard ONNX, and the diagnostics say which node fell back and why.
"""

from __future__ import annotations

from ..ir import Graph, Model, Node
from .base import Pass, PassContext
from .canonical import DOMAIN, REGISTRY
from .capabilities import MS, LoweringContext, resolve_providers
from .provenance import PACKED
from .rewrite import Builder


class LoweringBuilder(Builder):
    """A Builder that also carries the LoweringContext (read it with ``capabilities.context_of``),
    so lowerings and decompositions can depend on the opset and the provider's kernels."""

    def __init__(self, graph: Graph, anchor: Node, name_hint: str, lowering: LoweringContext) -> None:
        super().__init__(graph, anchor, name_hint)
        self.lowering = lowering
        #: What a lowering wants the diagnostics to say about its choice (a fallback and why).
        self.notes: list[str] = []


def lower_for_ort(model: Model, config) -> Model:
    """A copy of a graph compiled for the C runtime, lowered for ONNX Runtime (the fallback)."""
    import dataclasses

    from .cleanup.cse import PostLoweringCSE
    from .cleanup.dce import DeadCodeElimination
    from .manager import PassManager

    ort_config = dataclasses.replace(config, backend="ort")
    lowered, _ = PassManager([LowerCanonicalOps(), PostLoweringCSE(), DeadCodeElimination()], ort_config).run(model.clone())
    return lowered


def wants_c(config) -> bool:
    """Whether the compiled graph is meant for the generated-C runtime (keeps canonical ops).
    "auto" means C on a CPU, unless the config asks for a standard-ONNX graph (lowering="onnx":
    an artifact other runtimes load), which only ONNX Runtime runs here."""
    backend = getattr(config, "backend", "ort")
    if backend == "c":
        return True
    return (backend == "auto" and getattr(config, "lowering", "ort") == "ort"
            and resolve_providers(config.provider)[0] == "CPUExecutionProvider")


class LowerCanonicalOps(Pass):
    name = "lower_canonical_ops"

    def run(self, model: Model, ctx: PassContext) -> None:
        from ..importers import read_metadata

        target = ctx.config.lowering
        if wants_c(ctx.config):
            ctx.record.note(f"canonical ops kept for the generated-C runtime (backend={ctx.config.backend!r}); "
                            "lowered for ONNX Runtime only if the C runtime cannot run the model")
            return
        context = read_metadata(model).get("context_length")
        lowering = LoweringContext(target, model.opset("") or 1, tuple(resolve_providers(ctx.config.provider)),
                                   context if isinstance(context, int) and context > 0 else None)
        if target == "ort":
            ctx.record.info["provider"] = lowering.provider
        graph = model.graph
        decomposed: dict[tuple[str, str], list[str]] = {}  # (op, reason) -> where: one warning each
        # Attention first: its lowering may absorb the rotary embeddings that feed it.
        for node in sorted(graph.nodes, key=lambda n: n.op_type != "Attention"):
            if node.domain != DOMAIN or node.graph is not graph:  # absorbed by a lowering before it
                continue
            where = f"{node.op_type} {node.name!r}"
            op = REGISTRY.get(node.op_type)
            if op is None:
                ctx.record.skipped(where, f"no canonical op named {node.op_type} is registered")
                continue
            builder = LoweringBuilder(graph, node, node.name or node.op_type, lowering)
            lower = op.lower.get(target)
            result = lower(builder, node) if lower is not None else f"no {target} lowering for {node.op_type}"
            if isinstance(result, str):
                for made in reversed(builder.nodes):  # a lowering that gave up must leave nothing behind
                    graph.remove(made, force=True)
                builder = LoweringBuilder(graph, node, node.name or node.op_type, lowering)
                decomposed.setdefault((node.op_type, result), []).append(where)
                ctx.record.skipped(where, f"decomposed to standard ONNX: {result}")
                result = op.decompose(builder, node)
                ctx.record.count(f"{node.op_type}_decomposed")
            else:
                kernels = sorted({n.op_type for n in builder.nodes if n.domain == MS and n.op_type.endswith("Attention")})
                ctx.record.applied(where + (f" -> {', '.join(kernels)}" if kernels else ""),
                                   f"{node.op_type}_lowered_{target}")
                for kernel in kernels:
                    ctx.record.count(f"{node.op_type}_as_{kernel}")
            for note in builder.notes:
                ctx.record.skipped(where, note)
            for made in builder.nodes:
                if made.domain:
                    model.require_opset(made.domain, 1)
                if PACKED in node.metadata_props and made.inputs and made.inputs[0] is node.inputs[0]:
                    made.metadata_props[PACKED] = node.metadata_props[PACKED]  # (passes/provenance.py)
            for old, new in zip(node.outputs, result):
                if new.dtype is None:
                    new.dtype, new.shape = old.dtype, old.shape
                old.replace_all_uses_with(new)
            graph.remove_dead()
        for (op_type, reason), places in decomposed.items():
            which = places[0] if len(places) == 1 else f"{len(places)} {op_type} nodes (first: {places[0]})"
            ctx.record.warn(f"{which} decomposed to standard ONNX: {reason}")
        if DOMAIN in model.opset_imports and not any(n.domain == DOMAIN for n in graph.walk()):
            del model.opset_imports[DOMAIN]
