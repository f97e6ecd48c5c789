"""A hand-built one-layer decoder that follows the cached-graph contract, and its uncached twin
with the same weights, so the runtime's cached path can be checked against plain recomputation.

Contract: input_ids [batch, seq], attention_mask [batch, past+seq] (positions derived inside from
cumsum(mask) - 1), past_key_values.0.key/value [batch, kv_heads, past, head_size] -> logits
[batch, seq, vocab], present.0.key/value [batch, kv_heads, past+seq, head_size].
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB, HIDDEN, HEADS, HEAD = 32, 16, 2, 8
CONTEXT = 48


def tiny_lm(cached: bool, kv_dtype: type = np.float32, seed: int = 1, context: int = CONTEXT) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def w(name: str, *shape: int, scale: float = 0.5) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def c(name: str, value, dtype=np.int64) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(op_type: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    wte = w("wte", VOCAB, HIDDEN, scale=1.0)
    x = op("Gather", [wte, "input_ids"], "embed")
    seq = op("Gather", [op("Shape", ["input_ids"], "ids_shape"), c("one", 1)], "seq")
    total = op("Gather", [op("Shape", ["attention_mask"], "mask_shape"), "one"], "total")
    start = op("Sub", [total, seq], "past_len")
    positions_all = op("Max", [op("Sub", [op("CumSum", ["attention_mask", "one"], "cum"), "one"], "cum1"), c("zero", 0)], "pos_all")
    positions = op("Slice", [positions_all, op("Unsqueeze", [start, c("ax0", [0])], "start1"),
                             op("Unsqueeze", [total, "ax0"], "total1"), c("ax1", [1])], "positions")
    x = op("Add", [x, op("Gather", [w("wpe", context, HIDDEN), positions], "pos_embed")], "h0")
    heads = c("split", [0, 0, HEADS, HEAD])
    q, k, v = (op("Transpose", [op("Reshape", [op("MatMul", [x, w(f"w{n}", HIDDEN, HIDDEN)], f"{n}_mm"), heads], f"{n}_h")],
                  f"{n}_t", perm=[0, 2, 1, 3]) for n in "qkv")
    if cached:
        kv = helper.np_dtype_to_tensor_dtype(np.dtype(kv_dtype))
        for name, new in (("key", k), ("value", v)):
            past = op("Cast", [f"past_key_values.0.{name}"], f"past_{name}_f", to=TensorProto.FLOAT)
            joined = op("Concat", [past, new], f"all_{name}", axis=2)
            op("Cast", [joined], f"present.0.{name}", to=kv)
        k, v = "all_key", "all_value"
    scores = op("Mul", [op("MatMul", [q, op("Transpose", [k], "kT", perm=[0, 1, 3, 2])], "qk"),
                        c("scale", HEAD ** -0.5, np.float32)], "scores")
    queries = op("Unsqueeze", [op("Range", [start, total, "one"], "q_idx"), c("ax_1", [1])], "q_col")
    keys = op("Unsqueeze", [op("Range", ["zero", total, "one"], "k_idx"), "ax0"], "k_row")
    padding = op("Cast", [op("Unsqueeze", ["attention_mask", c("ax12", [1, 2])], "mask4")], "mask_b", to=TensorProto.BOOL)
    allowed = op("And", [op("LessOrEqual", [keys, queries], "causal"), padding], "allowed")
    bias = op("Where", [allowed, c("zero_f", 0.0, np.float32), c("min_f", -1e9, np.float32)], "bias")
    probs = op("Softmax", [op("Add", [scores, bias], "masked")], "probs", axis=-1)
    ctx = op("Reshape", [op("Transpose", [op("MatMul", [probs, v], "ctx")], "ctx_t", perm=[0, 2, 1, 3]),
                         c("merge", [0, 0, HIDDEN])], "merged")
    x = op("Add", [x, op("MatMul", [ctx, w("wo", HIDDEN, HIDDEN)], "attn_out")], "h1")
    mlp = op("MatMul", [op("Relu", [op("MatMul", [x, w("w1", HIDDEN, 4 * HIDDEN)], "up")], "act"), w("w2", 4 * HIDDEN, HIDDEN)], "down")
    x = op("Add", [x, mlp], "h2")
    op("MatMul", [x, op("Transpose", [wte], "wte_t", perm=[1, 0])], "logits")

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", VOCAB])]
    if cached:
        kv = helper.np_dtype_to_tensor_dtype(np.dtype(kv_dtype))
        for name in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.0.{name}", kv, ["batch", HEADS, "past", HEAD]))
            outputs.append(helper.make_tensor_value_info(f"present.0.{name}", kv, ["batch", HEADS, "total", HEAD]))
    graph = helper.make_graph(nodes, "tiny_cached_lm" if cached else "tiny_lm", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    helper.set_model_props(model, {"infercc.context_length": str(context), "infercc.vocab_size": str(VOCAB)})
    onnx.checker.check_model(model)
    return model
