"""The cache-insertion pass: an uncached causal LM graph becomes one that follows the cached-graph
contract (``contract.py``), every fused attention reading its layer's past and returning its
present.

How, in order (all on a copy, so a graph that turns out not to fit is left exactly as it was):

1. Checks: a causal LM with input_ids -> logits, no cache yet, every attention fused and causal
   (an encoder, or an unfused attention, leaves the model alone with the reason per layer).
2. The token/metadata split (``sequence``) and the places where metadata meets activations.
3. ``attention_mask`` becomes [batch, past+seq] (added if missing); what read it per token reads
   its last ``seq`` columns instead, so shapes and reshapes keep meaning "the new tokens".
4. Every per-position metadata value (rotary cos/sin, position embeddings, attention masks) is
   recomputed over the whole sequence and cut to the new tokens (``positions.FullContext``).
5. Each attention becomes a cached canonical Attention with the layer's past and present, in the
   cache's precision (``precision``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ...ir import DType, Graph, Model, Node, Value
from ..base import Pass, PassContext
from ..fusion.attention_op import AttentionSpec, inputs, make_cached_node
from ..rewrite import Builder
from . import contract as c
from .logits_keep import add_logits_to_keep
from .positions import INT64_MAX, FullContext
from .precision import KVFormat, dequantize, quantize, resolve, storage_for
from .sequence import MASK_NAME, Refusal, SequenceWorld, Sink


class KVCacheInsertion(Pass):
    name = "kv_cache_insertion"

    def run(self, model: Model, ctx: PassContext) -> None:
        record = ctx.record
        if not getattr(ctx.config, "kv_cache", True):
            record.note("off: Config.kv_cache is False")
            return
        reason = c.already_cached(model.graph) or c.not_a_causal_lm(model.graph)
        if reason:
            record.note(f"left alone: {reason}")
            for node in c.attention_nodes(model.graph):
                record.skipped(_where(node), f"not cached: {reason}")
            return
        work = model.clone()
        try:
            info = _insert(work, getattr(ctx.config, "kv_cache_dtype", "auto"))
        except Refusal as exc:
            record.note(f"left alone: {exc}")
            for node in c.attention_nodes(model.graph):
                record.skipped(_where(node), getattr(exc, "layers", {}).get(node.name, f"not cached: {exc}"))
            return
        for field in dataclasses.fields(Model):
            setattr(model, field.name, getattr(work, field.name))
        for layer in info["layers"]:
            record.applied(f"Attention {layer['attention']!r} (layer {layer['layer']})", "layers_cached")
        record.count("cache_inputs", len(info["inputs"]))
        record.info.update(info)
        record.note(f"cached {len(info['layers'])} layer(s), {info['kv_cache_dtype']} cache: "
                    f"{info['bytes_per_token']} bytes per token ({info['kv_cache_dtype_reason']})")
        record.note(f"logits_to_keep: {info['logits_to_keep']}")


def _where(node: Node) -> str:
    return f"Attention {node.name!r}"


def _refuse(message: str, layers: dict[str, str] | None = None) -> Refusal:
    exc = Refusal(message)
    exc.layers = layers or {}  # type: ignore[attr-defined] - per-layer reasons for the record
    return exc


def _check(graph: Graph, world: SequenceWorld, layers: list[Node]) -> None:
    problems = {n.name: p for n in layers if (p := c.layer_problem(n, world))}
    if problems:
        first = next(iter(problems.items()))
        detail = {n.name: problems.get(n.name, f"not cached: layer {first[0]!r} cannot be") for n in layers}
        raise _refuse(f"attention {first[0]!r}: {first[1]}", detail)
    missing = c.no_logits(graph)
    if missing:
        raise _refuse(missing)
    unfused = c.unfused_attention(graph, world)
    if unfused:
        raise _refuse(f"{len(unfused)} attention(s) were not fused (first: Softmax {unfused[0].name!r}, see "
                      "attention_fusion); every layer needs a canonical Attention to hold its cache")
    mixing = c.sequence_mixing(graph, world)
    if mixing:
        raise _refuse(mixing)
    extra = c.non_token_outputs(graph, world)
    if extra:
        raise _refuse(f"output(s) {extra} are not computed from the tokens; their meaning with a cache is unknown")


def _insert(model: Model, requested: str) -> dict:
    graph = model.graph
    world = SequenceWorld(graph)
    layers = c.attention_nodes(graph)
    _check(graph, world, layers)
    sinks = world.sinks()
    model_dtype = layers[0].inputs[0].dtype
    fmt = resolve(requested, model_dtype)
    op = Builder(graph, layers[0], "kv_cache")
    mask, added = _mask_input(graph, world)
    readers = [] if world.mask is None else list(world.mask.uses)
    seq = op.Shape(world.ids, start=1, end=2)
    new_mask = op.Slice(mask, op.Neg(seq), op.const(np.asarray([INT64_MAX], np.int64), hint="end"),
                        op.const(np.asarray([1], np.int64), hint="axis"))
    new_mask.dtype, new_mask.shape = DType.INT64, world.ids.shape
    for node, index in readers:  # what read the mask per token now reads the new tokens' columns
        node.set_input(index, new_mask)
    full = FullContext(world, op, mask, new_mask)  # maps new_mask back to the whole mask
    described: dict[str, int] = {}
    for sink in sinks:
        line = _recompute(full, world, sink, new_mask)
        if line:
            described[line] = described.get(line, 0) + 1
    batch = world.ids.shape[0] if isinstance(world.ids.shape[0], str) else c.BATCH_DIM
    mask.shape = (batch, c.TOTAL_DIM)
    cache = _Cache(graph, fmt, storage_for(fmt, model_dtype), batch, seq, model.opset("") or 17)
    layer_info = [cache.layer(i, node) for i, node in enumerate(layers)]
    kept = add_logits_to_keep(graph, world)
    graph.remove_dead()
    graph.sort()  # per-token readers of the mask may come before the nodes built here
    shapes = [(x["kv_heads"], x["head_size"], x["v_head_size"]) for x in layer_info]
    return {
        "layers": layer_info, "kv_cache_dtype": fmt.name, "kv_cache_dtype_reason": fmt.reason,
        "bytes_per_token": fmt.bytes_per_token(shapes), "inputs": cache.inputs, "outputs": cache.outputs,
        "attention_mask": ("added: the source had none; it must be all ones (it gives the total length)" if added
                           else "[batch, past+seq]; per-token readers read its last seq columns"),
        "metadata": [f"{line} ({n} readers)" if n > 1 else line for line, n in described.items()],
        "logits_to_keep": kept,
    }


def _mask_input(graph: Graph, world: SequenceWorld) -> tuple[Value, bool]:
    """The attention_mask input, made a required int64 input (added when the source had none)."""
    mask = world.mask
    if mask is None:
        return graph.add_input(MASK_NAME, DType.INT64, (c.BATCH_DIM, c.TOTAL_DIM)), True
    if mask.dtype != DType.INT64:
        raise _refuse(f"{MASK_NAME!r} is {mask.dtype}; the cached contract takes int64")
    if mask.const is not None:  # a default (an importer's "no padding"): the total length must be fed
        graph.initializers.pop(mask.name, None)
        mask.const = None
    return mask, False


def _recompute(full: FullContext, world: SequenceWorld, sink: Sink, new_mask: Value) -> str | None:
    """Point a metadata sink at its value over the whole sequence, cut to the new tokens."""
    if sink.kind == "shape" or sink.axis is None:
        return None
    x = sink.node.inputs[sink.index]
    if sink.kind == "mask" and world.positions is not None and _reads(x, world.positions):
        raise _refuse(f"the attention mask %{x.name} is computed from position_ids, which the cached graph has "
                      "for the new tokens only")
    try:
        new = full.take_last(full.value(x), sink.axis)
    except Refusal as exc:
        raise _refuse(f"{sink.kind} %{x.name} cannot be recomputed over past + new tokens: {exc}") from None
    sink.node.set_input(sink.index, new)
    what = {"mask": "attention mask", "rotary": "rotary factors", "positional": "per-position operand"}[sink.kind]
    return f"{what} %{x.name}: {_sources(x, world, new_mask)}, new rows kept"


def _reads(value: Value, target: Value) -> bool:
    seen, stack = set(), [value]
    while stack:
        v = stack.pop()
        if v is target:
            return True
        if id(v) in seen or v.producer is None:
            continue
        seen.add(id(v))
        stack.extend(x for x in v.producer.inputs if x is not None)
    return False


def _sources(value: Value, world: SequenceWorld, new_mask: Value) -> str:
    """What a metadata value is computed from, in words."""
    found: set[str] = set()
    seen, stack = set(), [(value, False)]
    while stack:
        v, via_shape = stack.pop()
        if (id(v), via_shape) in seen or v.is_const:
            continue
        seen.add((id(v), via_shape))
        if v is world.mask or v is new_mask:
            found.add("the length of attention_mask" if via_shape else "attention_mask")
        elif v is world.positions:
            found.add("position_ids")
        elif world.is_act(v) or v.is_graph_input:
            found.add("the sequence length")
        elif v.producer is not None:
            shape = v.producer.op_type in ("Shape", "Size")
            stack.extend((x, via_shape or shape) for x in v.producer.inputs if x is not None)
    return "recomputed over past + new tokens from " + (", ".join(sorted(found)) or "constants")


class _Cache:
    """Adds each layer's cache inputs and outputs and the cached attention node."""

    def __init__(self, graph: Graph, fmt: KVFormat, storage: DType, batch: str, seq: Value, opset: int) -> None:
        self.graph, self.fmt, self.storage, self.batch, self.seq, self.opset = graph, fmt, storage, batch, seq, opset
        self.inputs: list[str] = []
        self.outputs: list[str] = []

    def layer(self, i: int, node: Node) -> dict:
        spec = AttentionSpec.of(node)
        q, k, v, mask = inputs(node)
        op = Builder(self.graph, node, node.name or "attention")
        pasts = []
        for what, size in (("key", spec.head_size), ("value", spec.v_head_size)):
            dtype = DType.INT8 if self.fmt.scaled else self.storage
            pasts.append(self._input(c.past_name(i, what), dtype, (self.batch, spec.kv_num_heads, c.PAST_DIM, size)))
        if self.fmt.scaled:
            scales = [self._input(c.past_name(i, f"{w}_scale"), DType.FLOAT, (self.batch, spec.kv_num_heads, c.PAST_DIM, 1))
                      for w in ("key", "value")]
            attended = [dequantize(op, x, s, q.dtype) for x, s in zip(pasts, scales)]
        else:
            attended = pasts
        out, present_k, present_v = make_cached_node(op, q, k, v, mask, attended[0], attended[1], spec)
        out.dtype = node.outputs[0].dtype
        node.outputs[0].replace_all_uses_with(out)
        for what, present, size, past_x in (("key", present_k, spec.head_size, pasts[0]),
                                            ("value", present_v, spec.v_head_size, pasts[1])):
            shape = (self.batch, spec.kv_num_heads, c.TOTAL_DIM, size)
            if not self.fmt.scaled:
                present.dtype = self.storage
                self._output(c.present_name(i, what), present, self.storage, shape)
                continue
            new_rows = op.Slice(present, op.Neg(self.seq), op.const(np.asarray([INT64_MAX], np.int64), hint="end"),
                                op.const(np.asarray([2], np.int64), hint="axis"))
            codes, scale = quantize(op, new_rows, self.opset)
            scale_past = scales[0] if what == "key" else scales[1]
            self._output(c.present_name(i, what), op.Concat(past_x, codes, axis=2), DType.INT8, shape)
            self._output(c.present_name(i, f"{what}_scale"), op.Concat(scale_past, scale, axis=2), DType.FLOAT,
                         shape[:3] + (1,))
        self.graph.remove(node)
        return {"layer": i, "attention": node.name, "kv_heads": spec.kv_num_heads, "head_size": spec.head_size,
                "v_head_size": spec.v_head_size, "mask": "none" if mask is None else f"%{mask.name}"}

    def _input(self, name: str, dtype: DType, shape: tuple) -> Value:
        self.inputs.append(name)
        return self.graph.add_input(name, dtype, shape)

    def _output(self, name: str, value: Value, dtype: DType, shape: tuple) -> None:
        value.name = self.graph.names.claim(name)
        value.dtype, value.shape = dtype, shape
        self.graph.outputs.append(value)
        self.outputs.append(name)
