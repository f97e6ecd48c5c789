"""Expose the target's final hidden state as a graph output, for speculation heads (Medusa, EAGLE).

Medusa's heads read the hidden state the LM head reads (after the final norm): the speculative
engine needs it at every verified position, from the same forward run that produced the logits,
or each step would pay for a second pass. So when ``Config.speculation`` is a heads method, this
pass (the last of the pipeline) adds ``hidden_states`` [batch, kept_sequence, hidden]: an
Identity of the LM head's data input. It is found walking back from ``logits`` along the single
non-constant float input of each node (reshapes, casts, softcaps, the LM head itself) to the final
norm; the LM head is the last node before the norm that is not a pure view (Slice: the
``logits_to_keep`` slice stays on the hidden side, so the output has the logits' positions).

Nothing on the logits path changes; graphs where the walk finds no norm keep their outputs and the
pass records why (the heads proposer then falls back to plain decoding with that reason).
"""

from __future__ import annotations

from ..ir import Model, Node, Value
from .base import Pass, PassContext

#: The added output's name (runners look it up by this name).
HIDDEN = "hidden_states"
#: Methods whose proposer reads the hidden state.
HEAD_METHODS = ("medusa", "eagle")
#: Ops that only view or slice their data input (the hidden state passes through them unchanged
#: in meaning): the LM head is the last node on the path that is none of these.
_VIEWS = {"Slice", "Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze", "Flatten", "Gather"}
_NORMS = {"RMSNorm", "SimplifiedLayerNormalization", "RMSNormalization", "LayerNorm", "LayerNormalization",
          "SkipRMSNorm", "SkipSimplifiedLayerNormalization", "SkipLayerNorm", "SkipLayerNormalization"}


class ExposeHiddenState(Pass):
    name = "expose_hidden_state"
    rebaseline = True  # the interface gains an output (the logits are untouched)

    def run(self, model: Model, ctx: PassContext) -> None:
        if ctx.config.speculation not in HEAD_METHODS:
            ctx.record.note(f"Config.speculation={ctx.config.speculation!r} reads no hidden state")
            return
        graph = model.graph
        if any(v.name == HIDDEN for v in graph.outputs):
            ctx.record.note(f"the graph already has a {HIDDEN!r} output")
            return
        try:
            hidden = lm_head_input(model)
        except LookupError as exc:
            ctx.record.skipped("logits", str(exc))
            return
        if HIDDEN in graph.names.used:
            ctx.record.skipped("logits", f"the name {HIDDEN!r} is taken by another value of the graph")
            return
        node = graph.make_node("Identity", [hidden], output_names=[HIDDEN], name=graph.names.fresh("expose_hidden"))
        out = node.outputs[0]
        out.dtype, out.shape = hidden.dtype, hidden.shape
        graph.outputs.append(out)
        ctx.record.applied("logits")


def lm_head_input(model: Model) -> Value:
    """The value the LM head reads (the final norm's output after any slice of positions), or
    LookupError saying what the walk back from ``logits`` found instead."""
    value = next((v for v in model.graph.outputs if v.name == "logits"), None)
    if value is None:
        raise LookupError("the graph has no 'logits' output")
    head: Node | None = None
    for _ in range(24):
        node = value.producer
        if node is None:
            break
        if node.op_type in _NORMS:
            if head is None:
                raise LookupError("the logits are the final norm's output: no LM head found")
            return next(v for v in head.inputs if v is not None and not v.is_const)
        data = [v for v in node.inputs if v is not None and not v.is_const and (v.dtype is None or v.dtype.is_float)]
        if len(data) != 1:
            break
        if node.op_type not in _VIEWS:
            head = node
        value = data[0]
    raise LookupError("no final norm found walking back from 'logits' along single float inputs")
