"""Building blocks shared by the decoder graph builders: a small op-emitting helper over
``Graph.make_node`` and the pieces every causal LM has (text inputs, position ids, the additive
causal+padding mask, multi-head attention with grouped KV heads).

Everything is written in standard ONNX ops the way torch exporters write transformers, so the pass
pipeline sees the same patterns it sees in any imported ONNX model and fuses them the same way.
"""

from __future__ import annotations

import numpy as np

from ..ir import DType, Graph, Model, Tensor, Value

#: Default opset of imported checkpoints: ReduceMean with axes as an input, LayerNormalization.
OPSET = 18
#: Additive mask value for blocked positions (what HF uses): finite, so a fully masked row (a
#: padding query) softmaxes to a uniform row instead of NaN.
MASK_MIN = float(np.finfo(np.float32).min)


class GraphBuilder:
    """Emits single-output nodes by op name; small constants are shared by value so a 30-layer
    model does not carry thousands of identical shape constants."""

    def __init__(self, name: str) -> None:
        self.graph = Graph(name)
        self._consts: dict[tuple, Value] = {}

    def op(self, op_type: str, *inputs: Value | None, out: str | None = None, **attrs) -> Value:
        node = self.graph.make_node(op_type, list(inputs), attrs=attrs, output_names=[out] if out else None)
        return node.outputs[0]

    def const(self, values, dtype=np.int64, hint: str = "const") -> Value:
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.graph.add_initializer(hint, Tensor(array))
        return self._consts[key]

    def ints(self, *values: int) -> Value:
        """A 1-D int64 constant (axes, shapes, slice bounds)."""
        return self.const(list(values), np.int64, "ints")

    def scalar(self, value: float) -> Value:
        return self.const(value, np.float32, "scalar")

    def weight(self, name: str, array: np.ndarray) -> Value:
        """A named float32 initializer. ``array`` may be a view (a transpose): the tensor keeps it
        as is and only materializes it when the model is serialized."""
        if array.dtype != np.float32:
            array = array.astype(np.float32)
        return self.graph.add_initializer(name, Tensor(array))

    def linear(self, x: Value, weight: Value, bias: Value | None = None, out: str | None = None) -> Value:
        """x @ W (+ b) with W stored [in, out], as exporters emit nn.Linear."""
        y = self.op("MatMul", x, weight, out=None if bias is not None else out)
        return self.op("Add", y, bias, out=out) if bias is not None else y


def declare(value: Value, dtype: DType, shape: tuple) -> Value:
    """State a value's type as exporters do in value_info, where ONNX shape inference cannot derive
    it (a Range's length, an Expand to a computed shape), so passes see [batch, sequence] dims."""
    value.dtype, value.shape = dtype, shape
    return value


def text_inputs(b: GraphBuilder) -> tuple[Value, Value]:
    """``input_ids`` [batch, sequence] and ``attention_mask`` [batch, sequence] (1 = token,
    0 = padding). The mask is optional: its default is a single 1 that the graph expands to the
    ids' shape, so the declared shape uses its own dim names (a fed mask must match the ids)."""
    ids = b.graph.add_input("input_ids", DType.INT64, ("batch", "sequence"))
    mask = b.graph.add_input("attention_mask", DType.INT64, ("mask_batch", "mask_sequence"))
    mask.const = Tensor(np.ones((1, 1), np.int64))
    b.graph.initializers[mask.name] = mask
    full_mask = b.op("Expand", mask, b.op("Shape", ids), out="attention_mask_full")
    return ids, declare(full_mask, DType.INT64, ("batch", "sequence"))


def position_ids(b: GraphBuilder, mask: Value) -> Value:
    """cumsum(mask) - 1, clamped at 0, as HF generate computes them: left-padded rows start their
    real tokens at position 0 (padding positions get 0; their outputs are never read)."""
    counted = b.op("CumSum", mask, b.const(1, hint="axis1"))
    return b.op("Max", b.op("Sub", counted, b.const(1, hint="one")), b.const(0, hint="zero"), out="position_ids")


def attention_bias(b: GraphBuilder, mask: Value, window: int | None = None) -> Value:
    """Additive mask [batch, 1, sequence, sequence]: 0 where query i may attend key j (j <= i,
    key j is not padding, and i - j < window when sliding), MASK_MIN elsewhere."""
    seq = b.op("Gather", b.op("Shape", mask), b.const(1), axis=0)
    steps = declare(b.op("Range", b.const(0), seq, b.const(1)), DType.INT64, ("sequence",))
    keys = b.op("Unsqueeze", steps, b.ints(0))  # [1, s]: j
    queries = b.op("Unsqueeze", steps, b.ints(1))  # [s, 1]: i
    allowed = b.op("LessOrEqual", keys, queries)
    if window is not None:
        recent = b.op("Greater", keys, b.op("Sub", queries, b.const(window)))
        allowed = b.op("And", allowed, recent)
    not_padding = b.op("Cast", b.op("Unsqueeze", mask, b.ints(1, 2)), to=int(DType.BOOL))  # [b, 1, 1, s]
    allowed = b.op("And", b.op("Unsqueeze", allowed, b.ints(0, 1)), not_padding)
    name = "attention_bias" if window is None else f"attention_bias_window{window}"
    bias = b.op("Where", allowed, b.scalar(0.0), b.scalar(MASK_MIN), out=name)
    return declare(bias, DType.FLOAT, ("batch", 1, "sequence", "sequence"))


def split_heads(b: GraphBuilder, x: Value, heads: int, head_dim: int) -> Value:
    """[batch, seq, heads * head_dim] -> [batch, heads, seq, head_dim]."""
    return b.op("Transpose", b.op("Reshape", x, b.ints(0, 0, heads, head_dim)), perm=[0, 2, 1, 3])


def repeat_kv(b: GraphBuilder, x: Value, kv_heads: int, repeats: int, head_dim: int) -> Value:
    """GQA: [batch, kv_heads, seq, d] -> [batch, kv_heads * repeats, seq, d], as HF's repeat_kv
    exports (Unsqueeze, Expand, Reshape)."""
    if repeats == 1:
        return x
    expanded = b.op("Expand", b.op("Unsqueeze", x, b.ints(2)), b.ints(1, 1, repeats, 1, 1))
    # The target shape comes from Shape(x), not a -1, so shape inference keeps batch and sequence.
    target = b.op("Concat", b.op("Shape", x, start=0, end=1), b.ints(kv_heads * repeats), b.op("Shape", x, start=2), axis=0)
    return b.op("Reshape", expanded, target)


def attention(b: GraphBuilder, q: Value, k: Value, v: Value, bias: Value, heads: int, head_dim: int) -> Value:
    """softmax(q k^T / sqrt(d) + bias) v on [batch, heads, seq, d]; returns [batch, seq, heads * d].
    The scale is split as d^-1/4 on q and on k^T before the product, as torch.onnx exports
    scaled_dot_product_attention (transformers' default attention)."""
    root_scale = b.scalar(head_dim ** -0.25)
    key_t = b.op("Mul", b.op("Transpose", k, perm=[0, 1, 3, 2]), root_scale)
    scores = b.op("MatMul", b.op("Mul", q, root_scale), key_t)
    probs = b.op("Softmax", b.op("Add", scores, bias), axis=-1)
    context = b.op("Transpose", b.op("MatMul", probs, v), perm=[0, 2, 1, 3])
    return b.op("Reshape", context, b.ints(0, 0, heads * head_dim))


def tied_lm_head(b: GraphBuilder, hidden: Value, table: Value, ids: Value) -> Value:
    """logits = hidden @ table^T reading the embedding table itself (Gemm with transB), so a
    tied head costs no second [hidden, vocab] copy of the largest weight."""
    rows = b.op("Reshape", hidden, b.ints(-1, table.shape[1]))
    logits = b.op("Gemm", rows, table, transB=1)
    shape = b.op("Concat", b.op("Shape", ids), b.ints(table.shape[0]), axis=0)
    return b.op("Reshape", logits, shape, out="logits")


def finish(b: GraphBuilder, logits: Value, vocab_size: int, metadata: dict[str, str]) -> Model:
    """Declare ``logits`` the output and wrap the graph in a Model carrying ``metadata``."""
    logits.dtype, logits.shape = DType.FLOAT, ("batch", "sequence", vocab_size)
    b.graph.outputs.append(logits)
    return Model(
        graph=b.graph, opset_imports={"": OPSET}, producer_name="infercc.importers",
        metadata_props=dict(metadata),
    )
