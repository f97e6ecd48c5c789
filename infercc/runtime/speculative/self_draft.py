"""The self-speculative draft: the target's first L layers, its final norm and its LM head, cut
from the compiled graph itself, so every cached decoder has a draft without a second download.

How the cut is found, for any graph that follows the cached-graph contract (whichever importer or
exporter made it, before or after lowering):

* the layers are numbered by the cache inputs ``past_key_values.{i}.*``; layer L's attention is
  the node reading ``past_key_values.{L}.key`` (through casts);
* layer L's input norm is the one norm reached walking back from that attention over non-constant
  inputs; it computes the residual stream entering layer L (a plain norm from its input, a skip
  norm from the sum of its first two inputs);
* the final norm is the norm reached walking back from ``logits`` along single non-constant
  float inputs (the LM head, reshapes, logits_to_keep's slice);
* a copy of layer L's input norm (plain or skip: it computes the stream it normalizes) with the
  final norm's weights feeds the LM head instead, and everything the logits no longer need is
  removed, with the cache inputs and outputs of layers L.. .

A graph where any step finds something else (no norm, two norms, a stream that reaches a later
layer) gets no self-draft: (None, reason) and plain decoding -- a wrong cut would only cost
acceptance, never correctness (verification decides every token), but it would be a slow draft.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ...ir import Model, Node, Value
from ...passes.diagnostics import Diagnostics
from .draft import DraftProposer, weight_bytes

if TYPE_CHECKING:
    from ...compiled import CompiledModel
    from ...config import Config
    from .proposer import Proposer

#: Each norm op (canonical, ONNX Runtime's, standard ONNX) and the input slots of its weights:
#: (scale,) for RMS norms, (scale, bias) for layer norms. A skip norm's other inputs are the
#: residual stream and the layer output added to it (and that output's bias).
WEIGHTS = {
    "RMSNorm": (1,), "SimplifiedLayerNormalization": (1,), "RMSNormalization": (1,),
    "LayerNorm": (1, 2), "LayerNormalization": (1, 2),
    "SkipRMSNorm": (2,), "SkipSimplifiedLayerNormalization": (2,),
    "SkipLayerNorm": (2, 3), "SkipLayerNormalization": (2, 3),
}
SKIP_NORMS = {name for name in WEIGHTS if name.startswith("Skip")}
NORMS = set(WEIGHTS)
_CACHE_NAME = re.compile(r"^(?:past_key_values|present)\.(\d+)\.")


class CutError(Exception):
    """The graph has no cut the self-draft recognizes (the message says what was found)."""


def make_self_draft(compiled: CompiledModel, config: Config) -> tuple[Proposer | None, str]:
    """The self-draft proposer of ``compiled`` (``config.draft_layers`` layers, 0 = a quarter), or
    (None, why not)."""
    from ...compiled import CompiledModel as Compiled

    layers = num_layers(compiled.model)
    if layers < 2:
        return None, f"self_draft: the model has {layers} cached layer(s); a draft needs fewer layers than the model"
    keep = config.draft_layers or max(1, layers // 4)
    if keep >= layers:
        return None, (f"self_draft: Config.draft_layers={keep} is not below the model's {layers} layers; "
                      f"choose 1..{layers - 1} (0 = a quarter)")
    try:
        model = cut_layers(compiled.model, keep)
    except CutError as exc:
        return None, f"self_draft: {exc}"
    diagnostics = Diagnostics()
    diagnostics.facts["self_draft"] = f"the first {keep} of {layers} layers"
    draft = Compiled(model, compiled.config, diagnostics, compiled.kernels)
    cost = weight_bytes(model) / max(weight_bytes(compiled.model), 1)
    return (DraftProposer("self_draft", draft, cost=cost),
            f"self_draft: the first {keep} of {layers} layers + the final norm and LM head")


def num_layers(model: Model) -> int:
    found = {int(m.group(1)) for v in model.graph.inputs if (m := _CACHE_NAME.match(v.name))}
    return len(found)


def cut_layers(source: Model, keep: int) -> Model:
    """A copy of ``source`` computing the logits from the residual stream after ``keep`` layers."""
    model = source.clone()
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    norm = _input_norm(_attention(inputs, keep))
    final = _final_norm(graph)
    if final is norm:
        raise CutError("the final norm is a layer's input norm: no layers between them to cut")
    if _family(norm) != _family(final):
        raise CutError(f"layer {keep}'s input norm is a {norm.op_type} but the final norm a {final.op_type}")
    later = {id(_attention(inputs, i)) for i in range(keep, num_layers(model))}
    if any(_reaches(v, later) for v in norm.inputs if v is not None):
        raise CutError(f"the stream into layer {keep} depends on a later layer's attention")
    # Layer ``keep``'s input norm again, with the final norm's weights: it normalizes the stream
    # entering layer ``keep`` as the final norm would, and the LM head reads it.
    operands = list(norm.inputs)
    for mine, theirs in zip(WEIGHTS[norm.op_type], WEIGHTS[final.op_type]):
        operands += [None] * (mine + 1 - len(operands))
        operands[mine] = final.inputs[theirs] if theirs < len(final.inputs) else None
    while operands and operands[-1] is None:
        operands.pop()
    attrs = {name: attr.value for name, attr in norm.attrs.items()}
    if "epsilon" in final.attrs:
        attrs["epsilon"] = final.attr("epsilon")
    head_in = graph.make_node(norm.op_type, operands, num_outputs=len(norm.outputs), domain=norm.domain,
                              attrs=attrs, name=graph.names.fresh("self_draft_norm"))
    for new, old in zip(head_in.outputs, norm.outputs):
        new.metadata_props = dict(old.metadata_props)
        new.dtype, new.shape = old.dtype, old.shape
    final.outputs[0].replace_all_uses_with(head_in.outputs[0])
    graph.outputs = [v for v in graph.outputs if not _dropped(v, keep)]
    graph.remove_dead()
    used = [v.name for v in graph.inputs if _dropped(v, keep) and v.uses]
    if used:
        raise CutError(f"{used[0]} is still read after the cut: the layers do not separate at layer {keep}")
    graph.inputs = [v for v in graph.inputs if not _dropped(v, keep)]
    graph.sort()
    return model


def _family(node: Node) -> str:
    return "rms" if len(WEIGHTS[node.op_type]) == 1 else "layer"


def _dropped(value: Value, keep: int) -> bool:
    m = _CACHE_NAME.match(value.name)
    return m is not None and int(m.group(1)) >= keep


def _attention(inputs: dict[str, Value], layer: int) -> Node:
    """The node reading layer ``layer``'s past keys (through casts and reshapes of them)."""
    value = inputs.get(f"past_key_values.{layer}.key")
    if value is None:
        raise CutError(f"the graph has no input past_key_values.{layer}.key")
    for _ in range(8):
        users = [n for n in value.consumers() if n.op_type not in ("Shape", "Size")]  # (lengths, not data)
        if len(users) != 1:
            raise CutError(f"past_key_values.{layer}.key is read by {len(users)} nodes, not one attention")
        node = users[0]
        if node.op_type not in ("Cast", "Reshape", "Identity", "Transpose"):
            return node
        value = node.outputs[0]
    raise CutError(f"no attention found behind past_key_values.{layer}.key")


def _input_norm(attention: Node) -> Node:
    """The one norm found walking back from ``attention`` over non-constant inputs."""
    found: dict[int, Node] = {}
    seen: set[int] = set()
    stack = [v for v in attention.inputs if v is not None]
    while stack:
        value = stack.pop()
        node = value.producer
        if node is None or value.is_const or id(node) in seen or node.op_type in ("Shape", "Size"):
            continue  # (a shape is not data: reshapes size themselves from other layers' tensors)
        seen.add(id(node))
        if node.op_type in NORMS:
            found[id(node)] = node
            continue
        stack.extend(v for v in node.inputs if v is not None and not v.is_const)
    if len(found) != 1:
        raise CutError(f"{len(found)} norms feed the attention {attention.name!r}; expected its one input norm")
    return next(iter(found.values()))


def _final_norm(graph) -> Node:
    """The norm before the LM head: back from ``logits`` along single non-constant float inputs."""
    value = next((v for v in graph.outputs if v.name == "logits"), None)
    for _ in range(16):
        node = value.producer if value is not None else None
        if node is None:
            break
        if node.op_type in NORMS:
            return node
        data = [v for v in node.inputs if v is not None and not v.is_const and (v.dtype is None or v.dtype.is_float)]
        if len(data) != 1:  # (integer inputs are indices and lengths: logits_to_keep's slice)
            break
        value = data[0]
    raise CutError("no norm found right before the LM head")


def _reaches(value: Value, targets: set[int]) -> bool:
    """Whether ``value`` is computed from (the outputs of) any node in ``targets``."""
    seen: set[int] = set()
    stack = [value]
    while stack:
        node = stack.pop().producer
        if node is None or id(node) in seen:
            continue
        if id(node) in targets:
            return True
        seen.add(id(node))
        stack.extend(v for v in node.inputs if v is not None)
    return False
