"""The EAGLE draft layer on the generated-C runtime, its weights in int8.

Why: the draft runs between the target's steps, several times per step (a chain of k guesses, and
the catch-up over the tokens the last step accepted), and at batch 1 a forward is bound by reading
its weights. In float32 NumPy SmolLM2-135M's draft reads 13 MB per forward, about a tenth of the
target's quantized weights, so a 4-guess chain cost a third of the verify step it fed; in int8
it reads 3.3 MB, on the kernels the target runs on. The draft is written as a small ONNX graph
(``draft_graph``: the same computation as ``EagleDraft.forward``, with the causal mask computed
inside from the shapes) and compiled by our own pipeline (fusions, int8 weights) for the C runtime;
its keys and values stay in the proposer's ``DraftCache`` and go in as inputs, so rollback is
still a length. Where the C runtime cannot be built, the NumPy layer runs (``c_draft`` says why).

The draft vocabulary's rows of the target's LM head go into the same graph (``logits``, the last
position's only), so they are read in int8 too: for SmolLM2-135M's 1,222-token draft vocabulary
they are 2.8 MB of float32, as many bytes per guess as the whole float32 layer's int8 form.

Only drafts of ``C_DRAFT_BYTES`` of float32 weights or more are built: below that a forward is
bound by per-call costs, not by reading weights, and NumPy is as fast without a compiler run.

Guesses may differ from the float32 layer's where int8 rounding moves a near-tie (max |f'|
difference about 1.5% of the feature's range): verification keeps the output exact either way.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...errors import InferccError
from .eagle_draft import DraftCache, EagleDraft, rotary
from .products import linear

#: Inputs and outputs of the draft graph, in order.
INPUTS = ("x", "past_k", "past_v", "cos", "sin")
OUTPUTS = ("feature", "k_new", "v_new")
#: The extra output of a graph built with the LM head's rows: the last position's logits [1, rows].
LOGITS = "logits"
QUANTIZE = "int8"
#: Smallest draft (float32 weight bytes, the LM head apart) worth its own C library.
C_DRAFT_BYTES = 1 << 20


class CDraft:
    """``EagleDraft``'s forward on a built C library (same door: ``forward``, ``new_cache``)."""

    def __init__(self, draft: EagleDraft, library, lm_head: np.ndarray | None = None) -> None:
        self.draft = draft
        self.library = library
        #: The LM head rows built into the library (None: the logits are NumPy's, from ``step``'s head).
        self.lm_head = lm_head
        #: Where the layer runs (the proposer's description says it).
        self.runs_on = "the draft layer runs on the generated-C runtime, int8 weights"

    @property
    def hidden(self) -> int:
        return self.draft.hidden

    @property
    def macs(self) -> int:
        return self.draft.macs

    def new_cache(self, base: int) -> DraftCache:
        return self.draft.new_cache(base)

    def forward(self, cache: DraftCache, features: np.ndarray, embeds: np.ndarray) -> np.ndarray:
        """As ``EagleDraft.forward``: f' [n, H] of the n positions after the cache's, their keys and
        values appended to ``cache``."""
        return self._run(cache, features, embeds)[0]

    def step(self, cache: DraftCache, features: np.ndarray, embeds: np.ndarray,
             lm_head: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """As ``EagleDraft.step``; the logits come from the library's int8 rows when it was built
        with them (``lm_head`` must then be those rows), else from ``lm_head`` in NumPy."""
        if self.lm_head is None:
            feature = self.forward(cache, features, embeds)
            return feature, linear(feature[-1:], lm_head)[0]
        feature, logits = self._run(cache, features, embeds)
        return feature, logits[0]

    def _run(self, cache: DraftCache, features: np.ndarray, embeds: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        d = self.draft
        n, width = len(features), d.heads * d.head_dim
        x = np.concatenate([embeds, features], axis=1).astype(np.float32, copy=False)
        positions = np.arange(cache.base + cache.length, cache.base + cache.length + n)
        cos, sin = rotary(positions, d.head_dim, d.rope_theta)
        past = cache.length
        feature, k, v, *logits = self.library.run([x, cache.k[:past].reshape(past, width),
                                                   cache.v[:past].reshape(past, width), cos[:, 0], sin[:, 0]])
        cache.append(k.reshape(n, d.heads, d.head_dim), v.reshape(n, d.heads, d.head_dim))
        return feature, (logits[0] if logits else None)


def c_draft(draft: EagleDraft, threads: int, lm_head: np.ndarray | None = None) -> tuple[CDraft | None, str]:
    """The draft compiled for the C runtime (with ``lm_head``'s rows [rows, H] when given), or
    (None, why not)."""
    from ...config import Config
    from ...ir import load_model
    from ...ir.shapes import infer_shapes
    from ...passes import PassManager, build_pipeline
    from ..c_backend import CBackend, CUnavailable

    config = Config(backend="c", quantize=QUANTIZE, kv_cache=False, strict=False, intra_op_threads=threads)
    try:
        model = load_model(draft_graph(draft, lm_head))
        infer_shapes(model)
        model, _ = PassManager(build_pipeline(config), config).run(model)
        backend = CBackend(model, intra_op_threads=threads)
    except (CUnavailable, InferccError) as exc:  # no compiler, a failed build, a pass that refused
        return None, f"the draft layer runs in NumPy: the generated-C runtime cannot build it ({exc})"
    built = CDraft(draft, backend.library, lm_head)
    if lm_head is not None:
        built.runs_on += ", the draft vocabulary's LM head rows with it"
    return built, built.runs_on


def draft_graph(draft: EagleDraft, lm_head: np.ndarray | None = None) -> onnx.ModelProto:
    """The ONNX graph of ``EagleDraft.forward`` for n new positions over p cached ones: inputs
    x [n, 2H] (embedding | feature), past_k / past_v [p, A], cos / sin [n, head_dim / 2]; outputs
    the features [n, H] and the new positions' rotated keys and values [n, A], and with
    ``lm_head`` [rows, H] the last position's logits [1, rows] (``EagleDraft.step``)."""
    w, heads, dim = draft.weights, draft.heads, draft.head_dim
    hidden, width = draft.hidden, heads * dim
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, array) -> str:
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(op_type: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op_type, inputs, [name], **attrs))
        return name

    def linear(x: str, weight: str, name: str) -> str:
        return op("MatMul", [x, const(f"{name}.w", np.ascontiguousarray(w[weight].T, np.float32))], name)

    def rms_norm(x: str, weight: str, name: str) -> str:
        mean = op("ReduceMean", [op("Mul", [x, x], f"{name}.sq"), "axis_last"], f"{name}.mean", keepdims=1)
        root = op("Sqrt", [op("Add", [mean, "eps"], f"{name}.var")], f"{name}.root")
        return op("Mul", [op("Div", [x, root], f"{name}.x"), const(f"{name}.g", w[weight].astype(np.float32))], name)

    def heads_of(x: str, name: str) -> str:
        return op("Reshape", [x, "shape3"], name)

    def rotate(x: str, name: str) -> str:
        nodes.append(helper.make_node("Split", [heads_of(x, f"{name}.3"), "halves"], [f"{name}.a", f"{name}.b"], axis=-1))
        a, b = f"{name}.a", f"{name}.b"
        first = op("Sub", [op("Mul", [a, "cos3"], f"{name}.ac"), op("Mul", [b, "sin3"], f"{name}.bs")], f"{name}.1")
        second = op("Add", [op("Mul", [b, "cos3"], f"{name}.bc"), op("Mul", [a, "sin3"], f"{name}.as")], f"{name}.2")
        return op("Concat", [first, second], name, axis=-1)

    const("axis_last", np.asarray([-1], np.int64))
    const("eps", np.asarray(draft.eps, np.float32))
    const("shape3", np.asarray([0, heads, dim], np.int64))
    const("shape2", np.asarray([0, width], np.int64))
    const("halves", np.asarray([dim // 2, dim // 2], np.int64))
    const("axis1", np.asarray([1], np.int64))
    const("scale", np.asarray(1.0 / np.sqrt(dim), np.float32))
    const("zero", np.asarray(0, np.int64))
    const("one", np.asarray(1, np.int64))
    const("masked", np.asarray(-np.inf, np.float32))
    const("open", np.asarray(0.0, np.float32))
    op("Unsqueeze", ["cos", "axis1"], "cos3")
    op("Unsqueeze", ["sin", "axis1"], "sin3")

    h = op("Add", [linear("x", "fc.weight", "fc"), const("fc.b", w["fc.bias"].astype(np.float32))], "h")
    a = rms_norm(h, "layer.input_layernorm.weight", "norm1")
    q = rotate(linear(a, "layer.self_attn.q_proj.weight", "q"), "q.rot")
    k = rotate(linear(a, "layer.self_attn.k_proj.weight", "k"), "k.rot")
    v = heads_of(linear(a, "layer.self_attn.v_proj.weight", "v"), "v.3")
    op("Reshape", [k, "shape2"], "k_new")
    op("Reshape", [v, "shape2"], "v_new")
    keys = op("Concat", [heads_of("past_k", "past_k.3"), k], "keys", axis=0)
    values = op("Concat", [heads_of("past_v", "past_v.3"), v], "values", axis=0)
    # causal among the new rows: row i sees key j when j <= p + i, p = keys - rows
    rows = op("Squeeze", [op("Slice", [op("Shape", ["x"], "x.shape"), "zero1", "one1"], "n1")], "n")
    total = op("Squeeze", [op("Slice", [op("Shape", [keys], "keys.shape"), "zero1", "one1"], "t1")], "t")
    const("zero1", np.asarray([0], np.int64))
    const("one1", np.asarray([1], np.int64))
    last = op("Add", [op("Unsqueeze", [op("Range", ["zero", rows, "one"], "i"), "axis1"], "i2"),
                      op("Sub", [total, rows], "p")], "last")
    allowed = op("LessOrEqual", [op("Range", ["zero", total, "one"], "j"), last], "allowed")
    mask = op("Where", [allowed, "open", "masked"], "mask")
    scores = op("MatMul", [op("Transpose", [q], "q.t", perm=[1, 0, 2]), op("Transpose", [keys], "k.t", perm=[1, 2, 0])],
                "scores")
    probs = op("Softmax", [op("Add", [op("Mul", [scores, "scale"], "scores.s"), mask], "scores.m")], "probs", axis=-1)
    attended = op("MatMul", [probs, op("Transpose", [values], "v.t", perm=[1, 0, 2])], "attended")
    o = op("Reshape", [op("Transpose", [attended], "attended.t", perm=[1, 0, 2]), "shape2"], "o")
    h = op("Add", [h, linear(o, "layer.self_attn.o_proj.weight", "o_proj")], "h2")
    m = rms_norm(h, "layer.post_attention_layernorm.weight", "norm2")
    gate = linear(m, "layer.mlp.gate_proj.weight", "gate")
    swish = op("Mul", [op("Mul", [gate, op("Sigmoid", [gate], "gate.s")], "silu"),
                       linear(m, "layer.mlp.up_proj.weight", "up")], "swiglu")
    op("Add", [h, linear(swish, "layer.mlp.down_proj.weight", "down")], "feature")
    outputs = []
    if lm_head is not None:
        const("minus_one", np.asarray([-1], np.int64))
        const("end", np.asarray([np.iinfo(np.int64).max], np.int64))
        last = op("Slice", ["feature", "minus_one", "end", "axis0"], "feature.last")
        const("axis0", np.asarray([0], np.int64))
        op("MatMul", [last, const("lm_head.w", np.ascontiguousarray(lm_head.T, np.float32))], LOGITS)
        outputs.append(helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, [1, len(lm_head)]))

    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "eagle_draft",
        [helper.make_tensor_value_info("x", f32, ["n", 2 * hidden]),
         helper.make_tensor_value_info("past_k", f32, ["p", width]),
         helper.make_tensor_value_info("past_v", f32, ["p", width]),
         helper.make_tensor_value_info("cos", f32, ["n", dim // 2]),
         helper.make_tensor_value_info("sin", f32, ["n", dim // 2])],
        [helper.make_tensor_value_info("feature", f32, ["n", hidden]),
         helper.make_tensor_value_info("k_new", f32, ["n", width]),
         helper.make_tensor_value_info("v_new", f32, ["n", width]), *outputs],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
