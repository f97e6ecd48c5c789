"""The paged-cache lowering: a cached graph (``contract.py``) becomes one whose attention reads and
writes a block pool shared by every sequence (``paged_op.py``), for the generated-C runtime.

Not part of the compile pipeline: ``compile()`` results keep the contiguous cached contract (what
``Session``, ``generate`` and ONNX Runtime run). The paged runner (``runtime/paged_runner.py``)
applies this pass to a clone of ``CompiledModel.model`` when the model runs on the C runtime, and
builds a second library from the result.

What changes, per layer i (every layer or none: one graph cannot mix a pool and a contiguous past):

* the cached ``ai.infercc::Attention`` (inputs 4, 5 = ``past_key_values.{i}.key/value``; outputs
  1, 2 = ``present.{i}.key/value``) becomes ``ai.infercc::PagedAttention`` with the same query,
  key, value, mask and attributes, plus ``block_size``;
* inputs ``past_key_values.{i}.*`` and outputs ``present.{i}.*`` are removed; inputs
  ``kv_pool.{i}.key`` / ``kv_pool.{i}.value`` [num_blocks, kv_heads, block_size, head_size] (the
  cache's element type) are added, and once ``kv_block_tables`` [batch, max_blocks] int32 and
  ``kv_past_lens`` [batch] int32. ``input_ids``, ``attention_mask`` (left-padded to the longest
  row's past + new tokens), ``position_ids`` and ``logits_to_keep`` keep their meaning.

Refused, with the reason per layer (the runner then gathers blocks into the contiguous graph):
int8 caches (their scales and dequantization live in the graph around the attention), caches of
other float types, a past read or a present used by anything but its attention, and attention
that is not the contract's (no cache, a 16-bit softmax the C kernel lacks).
"""

from __future__ import annotations

from ...ir import DType, Model, Node, Value
from ..base import Pass, PassContext
from ..fusion.attention_op import AttentionSpec, inputs, past
from ..rewrite import Builder
from . import contract as c
from .paged_op import POOL_DTYPES, PagedSpec, make_node

POOL_PREFIX = "kv_pool."
BLOCK_TABLES = "kv_block_tables"
PAST_LENS = "kv_past_lens"
NUM_BLOCKS_DIM, MAX_BLOCKS_DIM = "num_blocks", "max_blocks"


def pool_name(layer: int, what: str) -> str:
    """The pool input of one layer's keys (``what`` = "key") or values ("value")."""
    return f"{POOL_PREFIX}{layer}.{what}"


def pool_for(past_input: str) -> str:
    """``past_key_values.{i}.key`` -> ``kv_pool.{i}.key`` (the pool that replaces that past)."""
    return POOL_PREFIX + past_input[len(c.PAST_PREFIX):]


class PagedCacheLowering(Pass):
    name = "paged_cache_lowering"
    #: The model's interface changes (pools instead of pasts and presents).
    rebaseline = True

    def __init__(self, block_size: int = 16) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size

    def run(self, model: Model, ctx: PassContext) -> None:
        record = ctx.record
        graph = model.graph
        layers = c.attention_nodes(graph)
        found = _layers(model, layers)
        if isinstance(found, str):
            record.note(f"left alone: {found}")
            for node in layers:
                record.skipped(_where(node), f"not paged: {found}")
            return
        problems = {node.name: p for node, (_, p) in zip(layers, found) if p}
        if problems:
            first = next(iter(problems.items()))
            record.note(f"left alone: attention {first[0]!r}: {first[1]}")
            for node in layers:
                record.skipped(_where(node), problems.get(node.name, f"not paged: layer {first[0]!r} cannot be"))
            return
        ids = next(v for v in graph.inputs if v.name == "input_ids")
        batch = ids.shape[0] if ids.shape and isinstance(ids.shape[0], str) else c.BATCH_DIM
        tables = graph.add_input(BLOCK_TABLES, DType.INT32, (batch, MAX_BLOCKS_DIM))
        lengths = graph.add_input(PAST_LENS, DType.INT32, (batch,))
        removed_inputs: list[Value] = []
        removed_outputs: list[Value] = []
        info = []
        for node, (layer, _) in zip(layers, found):
            attention = AttentionSpec.of(node)
            q, k, v, mask = inputs(node)
            past_k, past_v = past(node)
            pools = [graph.add_input(pool_name(layer, what), x.dtype, (NUM_BLOCKS_DIM, attention.kv_num_heads,
                                                                       self.block_size, size))
                     for what, x, size in (("key", past_k, attention.head_size), ("value", past_v, attention.v_head_size))]
            op = Builder(graph, node, node.name or "attention")
            out = make_node(op, q, k, v, mask, pools[0], pools[1], tables, lengths, PagedSpec(attention, self.block_size))
            out.dtype, out.shape = node.outputs[0].dtype, node.outputs[0].shape
            node.outputs[0].replace_all_uses_with(out)
            removed_inputs += [past_k, past_v]
            removed_outputs += [node.outputs[1], node.outputs[2]]
            graph.outputs = [o for o in graph.outputs if o is not node.outputs[1] and o is not node.outputs[2]]
            graph.remove(node)
            record.applied(f"{_where(node)} (layer {layer})", "layers_paged")
            info.append({"layer": layer, "attention": node.name, "pool_dtype": str(past_k.dtype),
                         "kv_heads": attention.kv_num_heads, "head_size": attention.head_size,
                         "v_head_size": attention.v_head_size})
        gone = {id(x) for x in removed_inputs}
        graph.inputs = [x for x in graph.inputs if id(x) not in gone]
        for x in removed_inputs + removed_outputs:
            x.graph = None
        graph.remove_dead()
        record.info.update({"block_size": self.block_size, "layers": info,
                            "inputs": [x.name for x in graph.inputs if x.name.startswith(POOL_PREFIX)]
                            + [BLOCK_TABLES, PAST_LENS]})
        record.note(f"paged {len(info)} layer(s): blocks of {self.block_size} tokens, pools "
                    f"[{NUM_BLOCKS_DIM}, kv_heads, {self.block_size}, head_size] written in place by PagedAttention")


def _where(node: Node) -> str:
    return f"Attention {node.name!r}"


def _layers(model: Model, layers: list[Node]) -> list[tuple[int, str | None]] | str:
    """(layer index, why it cannot be paged or None) per cached attention, or why the whole graph
    cannot be (no cache, an int8 cache, a cache input no attention takes)."""
    graph = model.graph
    if not layers:
        return "the model has no fused attention (ai.infercc::Attention), so there is no cache to page"
    pasts = [x for x in graph.inputs if x.name.startswith(c.PAST_PREFIX) and x.const is None]
    if not pasts:
        return "the model has no KV cache (past_key_values.* inputs): compile it with kv_cache=True"
    if any(x.dtype == DType.INT8 or x.name.endswith("_scale") for x in pasts):
        return ("an int8 cache: its per-token scales are dequantized and quantized by graph nodes around the "
                "attention, and the paged kernel reads float32 or float16 blocks (kv_cache_dtype='fp16' pages)")
    taken: set[int] = set()
    found = []
    for node in layers:
        layer, problem = _layer(graph, node)
        found.append((layer, problem))
        if problem is None:
            taken.update(id(x) for x in past(node))
    left = [x.name for x in pasts if id(x) not in taken]
    if left and all(p is None for _, p in found):
        return f"cache input(s) {left} are not the past of a cached attention this pass maps"
    return found


def _layer(graph, node: Node) -> tuple[int, str | None]:
    """(layer index, None) when this cached attention maps to PagedAttention, else (-1, why not)."""
    cache = past(node)
    if cache is None:
        return -1, "it reads no past (the graph was not cached by kv_cache_insertion)"
    spec = AttentionSpec.of(node)
    if spec.softmax_precision not in (0, int(DType.FLOAT)):
        return -1, "a 16-bit softmax, which the C paged kernel does not compute"
    if spec.kv_num_heads < 1 or spec.num_heads % spec.kv_num_heads:
        return -1, f"{spec.num_heads} query heads are not a multiple of {spec.kv_num_heads} key/value heads"
    if node.inputs[0].dtype != DType.FLOAT:
        return -1, f"queries of type {node.inputs[0].dtype} (the C kernel computes in float32)"
    names = []
    for x in cache:
        if not x.is_graph_input or not x.name.startswith(c.PAST_PREFIX):
            return -1, f"its past %{x.name} is computed in the graph, not a past_key_values input"
        if x.dtype not in POOL_DTYPES or x.dtype != cache[0].dtype:
            return -1, f"a {x.dtype} cache (pools hold float32 or float16)"
        if any(user is not node for user, _ in x.uses):
            return -1, f"its past %{x.name} is read by other nodes too"
        names.append(x.name)
    if len(node.outputs) < 3:
        return -1, "it returns no present"
    for x, name in zip(node.outputs[1:3], names):
        want = c.PRESENT_PREFIX + name[len(c.PAST_PREFIX):]
        if x.uses or not x.is_graph_output or x.name != want:
            return -1, f"its present %{x.name} is not just the output {want!r}"
    layer = names[0][len(c.PAST_PREFIX):].split(".")[0]
    if not layer.isdigit() or names != [c.past_name(int(layer), "key"), c.past_name(int(layer), "value")]:
        return -1, f"its pasts {names} are not one layer's key and value"
    return int(layer), None
