"""Tree attention on ONNX Runtime: the portable form of verifying a tree of candidates in one row
(Medusa's / EAGLE's trees, issue 13), for the paged runner's "ort-gather" form and the
single-prompt speculative loop on the contiguous cache.

The graph ONNX Runtime runs is already lowered (passes/kv_cache/lower.py): each cached attention
is a ``com.microsoft`` MultiHeadAttention or GroupQueryAttention whose additive
``attention_bias`` [B|1, 1, S(*g), T] was built from the canonical mask -- a bool [B, 1, 1, T]
"this key column is a real token" computed from ``attention_mask`` -- as ``Where(mask [And
causal triangle], 0, fill)``. The tree variant (built once per compiled model, lazily, when a tree
is first wanted; the plain graph is untouched) is a clone in which:

* the canonical mask, where the bias is built from it, is the new input ``kv_tree_mask`` [B, 1,
  S, T] bool (``tree_attention.tree_feeds``: a node sees the past, its ancestors and itself). The
  causal triangle ANDed with it changes nothing (ancestors come first in the row); the bias
  broadcasts it over the heads (and over the query rows MultiHeadAttention's grouped-head fold
  repeats), so each node's scores are those of a chain along its own path;
* positions: a MultiHeadAttention graph rotates with ``RotaryEmbedding`` fed by the running count
  of ``attention_mask`` (cumsum - 1), which ``tree_feeds`` makes start + depth; a
  GroupQueryAttention that rotates inside (``do_rotary``) would count positions by cache slot, so
  the variant feeds it ``position_ids`` (its input 9, which the CPU kernel honours) = start + depth.
  GroupQueryAttention's CPU kernel does take an arbitrary ``attention_bias`` (this ORT version),
  so GQA layers keep GQA, grouped heads and the in-place shared cache buffer included.

Refused (trees stay off, chains verify, the reason is kept): a bias that is not that pattern (a
float mask such as ALiBi, a sliding window -- its band counts rows, not depths), a mask that
varies per query, the mask's values read elsewhere than through the running count, positions that
come neither from the running count nor from ``position_ids``. The last gate is a probe (see
``probe``) on a short random prefix: the variant fed a chain gives the plain graph's logits, and
each tree node's first attention output is a chain's along its path, within ``PROBE_TOLERANCE``
(which also catches a positions scheme the static checks do not know).

What the tree logits are: not bit-identical to a chain's (ORT's kernels reduce a row of S queries
in another order than a row of fewer): float weights, within 5e-6 relative (tests/runtime/
test_tree_ort.py), which is ORT's own spread between a chain run and the same tokens decoded one
by one (1.3e-5). On quantized weights (MatMulNBits with int8 activations) such float differences
grow to ~0.1 of the logits (SmolLM2-135M Q4_1: a chain verify row against one-token decoding
already differs by 0.11 relative, a tree row against chains by up to 0.37): greedy verification
there is as exact as ORT's chain verification, which already takes the verify row's argmax.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InferccError, ModelLoadError
from ..ir import DType, Model, Node, Value
from .model_runner import ModelRunner
from .tree_attention import TREE_MASK, tree_feeds

if TYPE_CHECKING:
    from ..compiled import CompiledModel

log = logging.getLogger(__name__)
MS = "com.microsoft"
#: attention_bias input of each kernel; GroupQueryAttention's position_ids.
BIAS_SLOT = {"MultiHeadAttention": 5, "GroupQueryAttention": 10}
GQA_POSITIONS = 9
#: The variant's extra output for the probe: the first attention's output.
PROBE_OUTPUT = "tree_probe_attention"
#: Largest |variant - reference| / (1 + |reference|) in the probe's two checks (float32 sums in
#: another order stay ~1e-6; a wrong mask or position moves attention outputs by > 1e-2).
PROBE_TOLERANCE = 1e-4
#: The probe's tree: node 1 and 2 are siblings (children of the row's first token), 3 a child of
#: 1, 4 of 2: any scheme that gives a node its row index as position, or lets it see a sibling,
#: changes some node's logits.
PROBE_TREE = [-1, 0, 0, 1, 2]
#: Ops that carry the bias from the Where to the kernel, data input 0 (broadcasts, repeats).
_CARRIERS = {"Expand", "Reshape", "Unsqueeze", "Squeeze", "Identity"}
#: Ops that pass the mask's values on unchanged before the running count (a Cast, a broadcast).
_PASSING = {"Cast", "Expand", "Unsqueeze", "Reshape", "Squeeze", "Identity"}


@dataclasses.dataclass
class OrtTree:
    """The built tree variant: its backend, whether it takes ``position_ids``, and a line saying
    how it verifies trees (for the notes and diagnostics)."""

    backend: object
    positions: bool
    form: str


def tree_variant(compiled: CompiledModel) -> tuple[OrtTree | None, str | None]:
    """The ONNX Runtime tree variant of ``compiled`` (built and probed on first call, then kept
    with the model), or (None, why trees stay off)."""
    memo = compiled.__dict__
    if "_ort_tree" not in memo:
        memo["_ort_tree"] = _build(compiled)
        tree, why = memo["_ort_tree"]
        compiled.diagnostics.facts["speculation_trees"] = tree.form if tree is not None else f"chains only: {why}"
        log.info("trees of candidates on ONNX Runtime: %s", tree.form if tree is not None else f"off ({why})")
    return memo["_ort_tree"]


def _build(compiled: CompiledModel) -> tuple[OrtTree | None, str | None]:
    from .ort_backend import OrtBackend

    backend = compiled.backend
    if not isinstance(backend, OrtBackend):
        return None, "the model runs on the generated-C runtime: trees need the C paged form there (form='auto')"
    made = tree_model(backend.model)
    if isinstance(made, str):
        return None, made
    model, kernels = made
    config = compiled.config
    try:
        variant = OrtBackend(model, backend.providers, intra_op_threads=config.intra_op_threads,
                             inter_op_threads=config.inter_op_threads)
    except ModelLoadError as exc:
        return None, f"ONNX Runtime cannot load the tree variant ({exc})"
    positions = any(v.name == "position_ids" for v in model.graph.inputs)
    tree = OrtTree(variant, positions, f"ONNX Runtime tree variant ({', '.join(kernels)} with a tree attention_bias"
                                       f"{', position_ids by depth' if positions else ''})")
    try:
        why = probe(compiled, tree)
    except InferccError as exc:
        why = f"the tree variant failed its probe run ({exc})"
    return (None, why) if why is not None else (tree, None)


def tree_model(lowered: Model) -> tuple[Model, list[str]] | str:
    """A clone of the ORT-lowered cached graph whose attention biases read ``kv_tree_mask`` (and
    whose in-kernel rotaries read ``position_ids``), with the kernels it found; or why not."""
    model = lowered.clone()
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    mask_in, ids = inputs.get("attention_mask"), inputs.get("input_ids")
    if mask_in is None or ids is None:
        return "the graph lacks 'attention_mask' or 'input_ids'"
    kernels = [n for n in graph.nodes if n.domain == MS and n.op_type in BIAS_SLOT]
    if not kernels:
        return "no MultiHeadAttention or GroupQueryAttention in the lowered graph (attention decomposed to standard ONNX)"
    uses: list[tuple[Node, int]] = []
    for node in kernels:
        if node.op_type == "GroupQueryAttention" and (node.attr("local_window_size", -1) or -1) > 0:
            return f"GroupQueryAttention {node.name!r} slides a window, which counts rows, not a tree's depths"
        slot = BIAS_SLOT[node.op_type]
        bias = node.inputs[slot] if len(node.inputs) > slot else None
        if bias is None:
            return f"{node.op_type} {node.name!r} takes no attention_bias to carry the tree mask"
        found = _mask_uses(bias, mask_in)
        if isinstance(found, str):
            return f"{node.op_type} {node.name!r}: {found}"
        uses += found
    batch, seq = ids.shape if ids.shape is not None else ("batch", "sequence")
    total = mask_in.shape[1] if mask_in.shape is not None else "total_sequence"
    tree = graph.add_input(TREE_MASK, DType.BOOL, (batch, 1, seq, total))
    for node, index in uses:
        node.set_input(index, tree)
    positions = inputs.get("position_ids")
    for node in kernels:
        if node.op_type == "GroupQueryAttention" and node.attr("do_rotary", 0):
            if positions is None:
                positions = graph.add_input("position_ids", DType.INT64, (batch, seq))
            node.set_input(GQA_POSITIONS, positions)
    graph.remove_dead()
    problem = _mask_read_elsewhere(mask_in) or _rotary_positions(graph, positions)
    if problem:
        return problem
    first = kernels[0].outputs[0]  # (nodes are in topological order: the first layer's attention)
    first.dtype = first.dtype or kernels[0].inputs[0].dtype
    probe_out = graph.make_node("Identity", [first], output_names=[PROBE_OUTPUT]).outputs[0]
    probe_out.dtype = first.dtype
    graph.outputs.append(probe_out)
    return model, sorted({n.op_type for n in kernels})


def _mask_uses(bias: Value, mask_in: Value) -> list[tuple[Node, int]] | str:
    """Where the canonical key mask enters the bias ``Where(mask [And triangle], 0, fill)`` (node,
    input index), or why the bias is not that pattern."""
    v = bias
    while v.producer is not None and v.producer.op_type in _CARRIERS and not v.producer.domain:
        v = v.producer.inputs[0]
    where = v.producer
    if where is None or where.op_type != "Where" or where.domain:
        return (f"its attention_bias is not Where(mask, 0, fill) (it comes from {where.op_type if where else 'an input'}: "
                "a float mask such as ALiBi cannot take the tree mask)")
    if any(_reads(x, mask_in) for x in where.inputs[1:]):
        return "its bias values (not only which keys are allowed) are computed from the mask"
    cond = where.inputs[0]
    parts = [(where, 0)]
    if cond.producer is not None and cond.producer.op_type == "And" and not cond.producer.domain:
        parts = [(cond.producer, i) for i in range(2)]
    found = [(node, i) for node, i in parts if _reads(node.inputs[i], mask_in)]
    if len(found) != 1:
        return "no single operand of its bias carries the key mask"
    mask = found[0][0].inputs[found[0][1]]
    if mask.dtype != DType.BOOL or mask.shape is None or len(mask.shape) != 4 or mask.shape[2] != 1:
        return f"the key mask %{mask.name} is not a bool [B, 1, 1, T] (it varies per query: {mask.shape})"
    for node, i in parts:
        if (node, i) != found[0]:
            tri = node.inputs[i].producer
            if tri is None or tri.op_type != "LessOrEqual":
                return ("its bias carries more than the causal triangle (a sliding window?), counted by row, "
                        "not by a tree node's depth")
    return found


def _reads(value: Value, mask_in: Value) -> bool:
    """Whether ``value`` is computed from ``mask_in``'s values (Shape/Size read none)."""
    from .tree_attention import _reads_values

    return _reads_values(value, mask_in, [])


def _mask_read_elsewhere(mask_in: Value) -> str | None:
    """After the rewrite, the mask's values may reach only a running count (CumSum, possibly
    after a Cast): its other readers would see a tree row's mask as a chain's."""
    stack = [mask_in]
    while stack:
        v = stack.pop()
        for node, _ in v.uses:
            if not node.domain and node.op_type in ("Shape", "Size"):
                continue
            if not node.domain and node.op_type == "CumSum":
                if node.attr("exclusive") or node.attr("reverse"):
                    return f"CumSum {node.name!r} is exclusive or reversed: not the running count of the mask"
                continue
            if not node.domain and node.op_type in _PASSING:
                stack.extend(node.outputs)
                continue
            return (f"{node.op_type} {node.name!r} reads 'attention_mask''s values other than through a running "
                    "count, so a tree row's mask would reach it")
    return None


def _rotary_positions(graph, positions: Value | None) -> str | None:
    from .paged_runner import positions_from_mask_or_ids

    for node in graph.nodes:  # (the ORT lowering gathers the cos/sin rows by position: inputs 2, 3)
        if node.domain == MS and node.op_type == "RotaryEmbedding":
            if not any(positions_from_mask_or_ids(x, positions) for x in node.inputs[1:4] if x is not None):
                return (f"RotaryEmbedding {node.name!r} counts positions over the sequence's length, not from the "
                        "mask's running count or 'position_ids': a tree's nodes would get consecutive positions")
    return None


def probe(compiled: CompiledModel, tree: OrtTree) -> str | None:
    """Why the variant does not verify trees as chains (None when it does), on a short random
    prefix, in two checks that each compare computations of the same shape (ORT's quantized
    MatMulNBits computes a one-row product by another kernel than a wider one, and quantizes its
    activations to int8, which turns float rounding differences of ~1e-6 into logits ~0.1 apart,
    so tree and chain logits are compared where no such amplification exists):

    * chains: the variant fed a chain's mask and positions gives the plain graph's logits;
    * trees: each tree node's first attention output (the first layer: before any quantized
      product reads a result of attention) equals the variant's for a chain along its path."""
    runner = ModelRunner(compiled.backend, compiled.model)
    vocab = runner.vocab_size or 2
    rng = np.random.default_rng(0)
    prefix = rng.integers(0, vocab, 6).tolist()
    row = rng.integers(0, vocab, len(PROBE_TREE)).tolist()
    cache = runner.new_cache(1)
    try:
        runner.step(cache, [prefix])
        start = cache.length
        pasts = {name: np.ascontiguousarray(x[:, :, :start]) for name, x in cache.past().items()}
    finally:
        cache.free()

    def run(backend, tokens: list[int], parents: list[int]) -> dict[str, np.ndarray]:
        feeds = {"input_ids": np.asarray([tokens], np.int64), **pasts,
                 **tree_feeds([parents], np.asarray([start]), start, True)}
        names = {x.name for x in backend.model.graph.inputs}
        if "logits_to_keep" in names:
            feeds["logits_to_keep"] = np.asarray(0, np.int64)
        return backend.run({k: v for k, v in feeds.items() if k in names})

    chain = list(range(-1, len(row) - 1))
    worst = _gap(run(tree.backend, row, chain)["logits"], run(compiled.backend, row, chain)["logits"])
    if not worst <= PROBE_TOLERANCE:
        return (f"the tree variant fed a chain differs from the plain graph by {worst:.3g} (relative) on a probe: "
                "the rewrite changed more than the mask")
    got = run(tree.backend, row, PROBE_TREE)[PROBE_OUTPUT]
    got = got.reshape(len(row), -1)
    for i in range(len(row)):
        path = [i]
        while PROBE_TREE[path[0]] >= 0:
            path.insert(0, PROBE_TREE[path[0]])
        padded = [row[j] for j in path] + [row[0]]  # (a trailing token changes no earlier row)
        want = run(tree.backend, padded, list(range(-1, len(padded) - 1)))[PROBE_OUTPUT]
        worst = max(worst, _gap(got[i], want.reshape(len(padded), -1)[len(path) - 1]))
    if not worst <= PROBE_TOLERANCE:
        return (f"a tree node's attention differs from a chain's along its path by {worst:.3g} (relative) on a probe: "
                "the graph's positions or masks are not the ones the variant rewrites")
    return None


def _gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b) / (1 + np.abs(b))))
