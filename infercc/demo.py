"""A built-in model for the demo and smoke tests: a small GPT-style decoder written the way the
exporters write one (decomposed attention, runtime shape arithmetic, Constant nodes), so the
pipeline has real work to do without any download or torch."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tiny_decoder(layers: int = 2, hidden: int = 64, heads: int = 4, vocab: int = 256, seed: int = 0) -> onnx.ModelProto:
    """input_ids [batch, seq] -> logits [batch, seq, vocab], causal self-attention."""
    rng = np.random.default_rng(seed)
    head = hidden // heads
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def w(name: str, *shape: int, scale: float = 0.05) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def const(name: str, value: np.ndarray) -> str:
        nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
        return name

    def op(op_type: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    x = op("Gather", [w("wte", vocab, hidden, scale=0.5), "input_ids"], "embed")
    shape = op("Shape", ["input_ids"], "ids_shape")
    seq = op("Gather", [shape, const("one_i", np.array(1, np.int64))], "seq_len")
    positions = op("Range", [const("zero_i", np.array(0, np.int64)), seq, "one_i"], "positions")
    x = op("Add", [x, op("Gather", [w("wpe", 512, hidden, scale=0.1), positions], "pos_embed")], "h0")
    causal = op("Trilu", [op("ConstantOfShape", [op("Concat", [op("Unsqueeze", [seq, const("ax0", np.array([0], np.int64))], "s1"), "s1"], "mask_shape", axis=0)], "ones", value=numpy_helper.from_array(np.array([1.0], np.float32)))], "tri", upper=0)
    bias = op("Mul", [op("Sub", [causal, const("one_f", np.array(1.0, np.float32))], "inv"), const("big", np.array(1e9, np.float32))], "mask_bias")
    for i in range(layers):
        p = f"l{i}"
        ln = op("LayerNormalization", [x, w(f"{p}.ln1.g", hidden, scale=0.0), w(f"{p}.ln1.b", hidden, scale=0.0)], f"{p}.ln1", axis=-1)
        inits[-2] = numpy_helper.from_array(np.ones(hidden, np.float32), f"{p}.ln1.g")
        split_shape = const(f"{p}.split", np.array([0, 0, heads, head], np.int64))
        qkv = []
        for name in "qkv":
            proj = op("Add", [op("MatMul", [ln, w(f"{p}.{name}.w", hidden, hidden)], f"{p}.{name}.mm"), w(f"{p}.{name}.b", hidden)], f"{p}.{name}")
            qkv.append(op("Transpose", [op("Reshape", [proj, split_shape], f"{p}.{name}.heads")], f"{p}.{name}.t", perm=[0, 2, 1, 3]))
        q, k, v = qkv
        scores = op("Div", [op("MatMul", [q, op("Transpose", [k], f"{p}.kT", perm=[0, 1, 3, 2])], f"{p}.qk"), const(f"{p}.scale", np.array(np.sqrt(head), np.float32))], f"{p}.scores")
        probs = op("Softmax", [op("Add", [scores, bias], f"{p}.masked")], f"{p}.probs", axis=-1)
        ctx = op("Transpose", [op("MatMul", [probs, v], f"{p}.ctx")], f"{p}.ctx.t", perm=[0, 2, 1, 3])
        merged = op("Reshape", [ctx, const(f"{p}.merge", np.array([0, 0, hidden], np.int64))], f"{p}.merged")
        x = op("Add", [x, op("MatMul", [merged, w(f"{p}.o.w", hidden, hidden)], f"{p}.o")], f"{p}.res1")
        ln2 = op("LayerNormalization", [x, w(f"{p}.ln2.g", hidden), w(f"{p}.ln2.b", hidden)], f"{p}.ln2", axis=-1)
        up = op("Add", [op("MatMul", [ln2, w(f"{p}.up.w", hidden, 4 * hidden)], f"{p}.up.mm"), w(f"{p}.up.b", 4 * hidden)], f"{p}.up")
        act = op("Mul", [op("Mul", [up, const(f"{p}.half", np.array(0.5, np.float32))], f"{p}.halfx"),
                         op("Add", [op("Erf", [op("Div", [up, const(f"{p}.sqrt2", np.array(np.sqrt(2), np.float32))], f"{p}.xs")], f"{p}.erf"), const(f"{p}.onef", np.array(1.0, np.float32))], f"{p}.erf1")], f"{p}.gelu")
        x = op("Add", [x, op("MatMul", [act, w(f"{p}.down.w", 4 * hidden, hidden)], f"{p}.down")], f"{p}.res2")
    final = op("LayerNormalization", [x, w("lnf.g", hidden), w("lnf.b", hidden)], "lnf", axis=-1)
    op("MatMul", [final, op("Transpose", ["wte"], "wte_t", perm=[1, 0])], "logits")
    graph = helper.make_graph(
        nodes, "tiny_decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="infercc.demo")
    onnx.checker.check_model(model)
    return model
