"""Tree attention for the paged runner: one verify row scores a whole tree of candidate tokens
(Medusa's / EAGLE's trees, issue 13), each token attending to the past, the row's first token and
its own ancestors only, at position start + its depth.

How a tree reaches the graph, without a second kind of graph input for positions:

* the mask: a variant of the paged graph (built once per compiled model and block size, only when
  a tree is first run) whose every ``PagedAttention`` reads its mask from a new input
  ``kv_tree_mask`` [batch, 1, sequence, total_sequence] bool instead of the mask the graph computed
  from ``attention_mask``. That is exact only when the replaced mask said nothing but "this key
  column is a real token" (a bool mask broadcast over the queries, or none): ``graph_problem``
  checks it on the cached graph; a float bias (ALiBi) or a per-query mask refuses trees;
* the positions: from ``position_ids`` when the graph takes them; else the graph's own
  ``cumsum(attention_mask) - 1`` gives them, since the mask's values now reach nothing else: a
  tree row's attention_mask has a 1 at a token whose depth is one more than the previous token's
  and a 0 at a sibling of it (breadth-first order: depths never fall, so the running count is
  start + depth). A graph reading the mask's values any other way (HF's ``masked_fill(mask == 0,
  1)`` of the positions, a Range over its length) refuses trees with the reason.

A refused tree is never wrong output: the engine's proposers fall back to chains and the reason is
kept in the speculation notes. ONNX Runtime's form (the gather runner, the single-prompt loop) is
``tree_ort.py``: the same feeds (``tree_feeds``) into a variant of the ORT-lowered graph.

After verification the accepted path's K/V sit at scattered slots of the row (node i at start + 1
+ i); ``compact_moves`` gives the moves that bring them to start + 1 .. start + a, which the runner
applies to its pools (numpy arrays the C kernel reads in place) before the block manager truncates
the rest, as for a chain.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..ir import DType, Model, Value

#: The tree variant's extra input: may query token i attend to key column j.
TREE_MASK = "kv_tree_mask"


def graph_problem(model: Model) -> str | None:
    """Why tree rows cannot be given to ``model`` (the compiled cached graph) exactly, else None
    (see the module docstring)."""
    from ..passes.kv_cache import contract as c
    from ..passes.kv_cache.sequence import MASK_NAME, POSITIONS_NAME, Refusal, SequenceWorld
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    mask = inputs.get(MASK_NAME)
    if mask is None:
        return f"the graph has no {MASK_NAME!r} input"
    for node in c.attention_nodes(graph):
        m = node.inputs[3] if len(node.inputs) > 3 else None
        if m is None:
            continue
        if m.dtype != DType.BOOL:
            return (f"attention {node.name!r} adds a {m.dtype} mask (a bias such as ALiBi), which the tree mask "
                    "cannot replace")
        if m.shape is None or len(m.shape) != 4 or m.shape[2] != 1:
            return f"attention {node.name!r} takes a mask that varies per query {m.shape}, not only per key column"
    try:
        sinks = SequenceWorld(graph).sinks()
    except (Refusal, KeyError) as exc:
        return f"how the graph derives positions could not be analysed ({exc})"
    from .paged_runner import positions_from_mask_or_ids

    positions = inputs.get(POSITIONS_NAME)
    for sink in sinks:
        if sink.kind in ("shape", "mask"):
            continue
        x = sink.node.inputs[sink.index]
        if not positions_from_mask_or_ids(x, positions):
            return (f"the {sink.kind} operand %{x.name} of {sink.node.op_type} {sink.node.name!r} counts positions "
                    f"over the sequence's length, not from {MASK_NAME!r}'s values or {POSITIONS_NAME!r}: a tree's "
                    "nodes would get consecutive positions")
        cumsums: list = []
        if _reads_values(x, mask, cumsums):
            return (f"the {sink.kind} operand %{x.name} of {sink.node.op_type} {sink.node.name!r} reads "
                    f"{MASK_NAME!r}'s values other than through a running count, so a tree's positions cannot "
                    f"be set through it" + ("" if POSITIONS_NAME in inputs else f" (and there is no {POSITIONS_NAME!r})"))
        for node in cumsums:
            if node.attr("exclusive") or node.attr("reverse"):
                return f"CumSum {node.name!r} is exclusive or reversed: not the running count of the mask"
    return None


def _reads_values(value: Value, mask: Value, cumsums: list) -> bool:
    """Whether ``value`` is computed from ``mask``'s values other than through a CumSum (the
    CumSums met are added to ``cumsums``; Shape and Size read no values)."""
    seen: set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if v is mask:
            return True
        node = v.producer
        if node is None or (node.op_type in ("Shape", "Size") and not node.domain):
            continue
        if node.op_type == "CumSum" and not node.domain:
            cumsums.append(node)
            continue
        stack.extend(node.inputs)
    return False


def tree_model(paged: Model) -> Model:
    """A clone of the paged graph whose attentions read ``kv_tree_mask`` as their mask."""
    from ..passes.kv_cache.paged_op import MASK, OP_NAME

    model = paged.clone()
    graph = model.graph
    ids = next(v for v in graph.inputs if v.name == "input_ids")
    mask_in = next(v for v in graph.inputs if v.name == "attention_mask")
    batch, seq = ids.shape if ids.shape is not None else ("batch", "sequence")
    total = mask_in.shape[1] if mask_in.shape is not None else "total_sequence"
    tree = graph.add_input(TREE_MASK, DType.BOOL, (batch, 1, seq, total))
    for node in graph.nodes:
        if node.op_type == OP_NAME:
            node.set_input(MASK, tree)
            node.set_attr("tree", 1)  # the kernel takes each row over its own keys: bit for bit a chain's
    graph.remove_dead()
    return model


def parents_problem(parents: Sequence[int], count: int) -> str | None:
    """Why ``parents`` is not a breadth-first tree over ``count`` tokens (each parent an earlier
    token's index or -1, depths non-decreasing), or None."""
    if len(parents) != count:
        return f"of {count} tokens has {len(parents)} parents"
    depth: list[int] = []
    for i, p in enumerate(parents):
        if not isinstance(p, (int, np.integer)) or isinstance(p, bool) or not -1 <= p < i:
            return f"gives token {i} the parent {p!r}; a parent is an earlier token's index or -1"
        depth.append(0 if p < 0 else depth[p] + 1)
        if i and depth[i] < depth[i - 1]:
            return f"is not in breadth-first order (token {i} at depth {depth[i]} follows depth {depth[i - 1]})"
    return None


def row_tree_problem(parents: Sequence[int], count: int) -> str | None:
    """Why ``parents`` is not the tree of a verify row of ``count`` tokens (``parents_problem``,
    and only the row's first token hangs from the past), or None."""
    problem = parents_problem(parents, count)
    if problem is None and (parents[0] != -1 or any(p < 0 for p in parents[1:])):
        problem = "has a token other than the first one without a parent in the row"
    return problem


def depths(parents: Sequence[int]) -> list[int]:
    """Depth of each token of a tree (0 for a child of what precedes the tokens)."""
    found: list[int] = []
    for p in parents:
        found.append(0 if p < 0 else found[p] + 1)
    return found


def row_parents(tree: Sequence[int] | None, length: int) -> list[int]:
    """Parents within a row of ``length`` tokens (-1: the past); None = a chain."""
    return list(range(-1, length - 1)) if tree is None else list(tree)


def tree_feeds(trees: list[list[int]], pasts: np.ndarray, width: int, positions: bool) -> dict[str, np.ndarray]:
    """attention_mask (left-padded; the running count gives each token start + depth),
    position_ids (when the graph takes them) and kv_tree_mask for rows of one length."""
    batch, s = len(trees), len(trees[0])
    total = width + s
    attention = np.zeros((batch, total), np.int64)
    mask = np.zeros((batch, 1, s, total), bool)
    depth = np.zeros((batch, s), np.int64)
    for b, parents in enumerate(trees):
        p = int(pasts[b])
        attention[b, width - p:width] = 1
        mask[b, 0, :, width - p:width] = True
        depth[b] = depths(parents)
        for i, parent in enumerate(parents):
            mask[b, 0, i, width + i] = True
            if parent >= 0:
                mask[b, 0, i, width:] |= mask[b, 0, parent, width:]
        attention[b, width] = 1
        attention[b, width + 1:] = depth[b, 1:] > depth[b, :-1]
    feeds = {"attention_mask": attention, TREE_MASK: mask}
    if positions:
        feeds["position_ids"] = pasts[:, None] + depth
    return feeds


def compact_moves(start: int, rows: Sequence[int]) -> list[tuple[int, int]]:
    """(from, to) token positions bringing the accepted path's K/V together: ``rows`` are the row
    indices of the kept tokens in order (row 0 = the row's first token, already in place), so row
    r moves from start + r to start + its place in the path. Moving in order never overwrites a
    source still to be read (each destination is at or before its own source and after the
    previous ones)."""
    return [(start + r, start + d) for d, r in enumerate(rows) if r != d]
