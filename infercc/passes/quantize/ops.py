"""Canonical weight-only quantized ops (domain ai.infercc) and how each becomes ONNX Runtime or
standard ONNX. Both hold their weight in MatMulNBits layout (see ``pack.py``):

* ``MatMulQuant(A, B, scales, zero_points?, rests?)``: A [..., K] @ dequant(B) [K, N] -> [..., N].
  Attributes ``K``, ``N``, ``bits`` (4/8), ``block_size``, ``symmetric`` (no zero points: the
  codes' middle is zero). ``rests`` [N, K / block] (float, optional): a float added to every weight
  of a block, w = scale * (code - zero_point) + rest -- how a GGUF Q4_1 grid (d * q + m) is held
  exactly (native.py). It is part of the weight, so packed siblings concatenate it like scales; on
  ORT it becomes MatMulNBits plus ``blocksum(A) @ rests^T`` (block sums computed once per A). ORT: ``com.microsoft::MatMulNBits`` (accuracy_level 4 on CPU: int8
  activations, int32 accumulation, the fast path). ONNX opset >= 21: ``DequantizeLinear`` with a
  blocked axis + ``MatMul``; older opsets: the dequantization written out (unpack nibbles, subtract,
  scale), which keeps the packed bytes as the only copy of the weight.
* ``GatherQuant(B, indices, scales, zero_points?)``: rows ``indices`` of the [N, K] table whose
  packed rows B holds -> [..., K]. ORT: ``com.microsoft::GatherBlockQuantized``; otherwise Gather of
  the packed rows then the same dequantization, so only the looked-up rows are ever expanded.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

import numpy as np

from ...ir import DType, Graph, Node, Value
from ...ir.shapes import shape_rule
from ..canonical import CanonicalOp, register
from ..capabilities import CPU, CUDA, MS, context_of
from ..rewrite import Builder
from .pack import unpack_codes, unpack_zero_points

MATMUL, GATHER = "MatMulQuant", "GatherQuant"
#: Activation types MatMulNBits / GatherBlockQuantized have kernels for on the providers we target.
ORT_TYPES = {CPU: frozenset({DType.FLOAT, DType.FLOAT16}), CUDA: frozenset({DType.FLOAT, DType.FLOAT16})}
#: ORT's accuracy_level per provider: 4 = int8 compute on CPU (MLAS), 0 = the provider's default.
ACCURACY_LEVEL = {CPU: 4, CUDA: 0}
#: Block sums of a Q4_1 correction are a MatMul with a 0/1 matrix when blocks * this <= N.
_SUM_BY_MATMUL = 16


class Spec:
    """The attributes of a quantized op, read once."""

    def __init__(self, node: Node) -> None:
        self.k, self.n = int(node.attr("K")), int(node.attr("N"))
        self.bits, self.block = int(node.attr("bits")), int(node.attr("block_size"))
        self.blocks = -(-self.k // self.block)
        self.padded = self.blocks * self.block != self.k


def _opt(node: Node, i: int) -> Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


# -- shapes -------------------------------------------------------------------------------------
@shape_rule(MS, "MatMulNBits")
def _infer_matmul(node: Node):
    a, n = node.inputs[0], int(node.attr("N"))
    return [(a.dtype, None if a.shape is None else tuple(a.shape[:-1]) + (n,))]


def _infer_gather(node: Node):
    ids, scales = node.inputs[1], node.inputs[2]
    return [(scales.dtype, None if ids.shape is None else tuple(ids.shape) + (int(node.attr("K")),))]


@shape_rule(MS, "GatherBlockQuantized")
def _infer_ort_gather(node: Node):
    ids, scales = node.inputs[1], node.inputs[2]
    data = node.inputs[0]
    width = None if data.shape is None else int(data.shape[-1]) * 8 // int(node.attr("bits", 4))
    return [(scales.dtype, None if ids.shape is None else tuple(ids.shape) + (width,))]


# -- ONNX Runtime ---------------------------------------------------------------------------------
def _ort_refusal(op: Builder, dtype: DType | None) -> str | None:
    provider = context_of(op).provider
    types = ORT_TYPES.get(provider)
    if types is None:
        return f"ONNX Runtime's {provider} has no weight-only quantized kernels registered here"
    if dtype not in types:
        return f"ONNX Runtime's quantized kernels take float or float16 activations, not {dtype}"
    return None


def _lower_matmul_ort(op: Builder, node: Node) -> list[Value] | str:
    reason = _ort_refusal(op, node.inputs[0].dtype)
    if reason:
        return reason
    s = Spec(node)
    inputs = list(node.inputs[:3]) + ([node.inputs[3]] if _opt(node, 3) is not None else [])
    level = ACCURACY_LEVEL.get(context_of(op).provider, 0)
    out = op.MatMulNBits(*inputs, _domain=MS, K=s.k, N=s.n, bits=s.bits, block_size=s.block, accuracy_level=level)
    rests = _opt(node, 4)
    return [out if rests is None else op.Add(out, _rest_correction(op, node, rests, s))]


def _rest_correction(op: Builder, node: Node, rests: Value, s: Spec) -> Value:
    """blocksum(A) @ rests^T [..., N]: A summed over each block of K (once per activation, shared by
    every weight that reads it) times each output channel's per-block rest.

    The block sums are one MatMul with a constant 0/1 matrix [K, blocks] (one per width, shared)
    where that product is small beside the weight's (blocks <= N / 16: q/k/v, o, gate/up), which
    saves a node per projection (the executor's per-node cost is most of a decode step's side
    path: SmolLM2-135M Q4_1 decode step 1.16x faster, paired); else Reshape + ReduceSum (a wide K
    into a narrow N, as a down projection, where that MatMul would add ~8% to the prefill's)."""
    x = node.inputs[0]
    dtype = x.dtype.numpy if x.dtype is not None else np.float32

    def ones() -> Value:
        table = np.zeros((s.k, s.blocks), dtype)
        table[np.arange(s.k), np.arange(s.k) // s.block] = 1
        return op.const(table, hint=f"block_ones{s.block}")

    def block_sums() -> Value:
        if s.blocks * _SUM_BY_MATMUL <= s.n:
            return op.MatMul(x, _memo(op, ("block_ones", s.k, s.block, str(dtype)), ones))
        if x.shape is not None:  # leading dims copied by 0s: one constant shape, no shape arithmetic
            blocks = op.Reshape(x, _i64(op, [0] * (len(x.shape) - 1) + [s.blocks, s.block]))
            return op.ReduceSum(blocks, _i64(op, [-1]), keepdims=0)
        head = op.Shape(x, start=0, end=-1)
        blocks = op.Reshape(x, op.Concat(head, _i64(op, [s.blocks, s.block]), axis=0))
        return op.ReduceSum(blocks, _i64(op, [-1]), keepdims=0)

    sums = _cached(op, x, f"blocksum{s.block}", block_sums)
    table = op.const(np.ascontiguousarray(rests.const.numpy().reshape(s.n, s.blocks).T), hint="block_rests")
    return op.MatMul(sums, table)


def _lower_gather_ort(op: Builder, node: Node) -> list[Value] | str:
    reason = _ort_refusal(op, node.inputs[2].dtype)
    if reason:
        return reason
    s = Spec(node)
    rows = _cached(op, node.inputs[0], "rows2d", lambda: op.Reshape(node.inputs[0], _i64(op, [s.n, -1])))
    inputs = [rows, node.inputs[1], node.inputs[2]] + ([node.inputs[3]] if _opt(node, 3) is not None else [])
    out = op.GatherBlockQuantized(*inputs, _domain=MS, gather_axis=0, quantize_axis=1, block_size=s.block, bits=s.bits)
    return [op.Slice(out, _i64(op, [0]), _i64(op, [s.k]), _i64(op, [-1])) if s.padded else out]


# -- standard ONNX --------------------------------------------------------------------------------
def _lower_matmul_onnx(op: Builder, node: Node) -> list[Value] | str:
    """Blocked DequantizeLinear (opset 21) when the model has it, else the written-out form."""
    if context_of(op).opset < 21 or node.inputs[1].const is None or _opt(node, 4) is not None:
        return decompose_matmul(op, node)
    s = Spec(node)
    dtype = node.inputs[2].dtype.numpy
    codes = unpack_codes(node.inputs[1].const.numpy(), s.bits).reshape(s.n, -1)[:, : s.k].T  # [K, N]
    scales = np.ascontiguousarray(node.inputs[2].const.numpy().reshape(s.n, s.blocks).T.astype(dtype))
    zp = _opt(node, 3)
    import ml_dtypes

    if zp is None:  # symmetric: signed codes, no zero point (DequantizeLinear's default is 0)
        signed = codes.astype(np.int16) - (1 << (s.bits - 1))
        x = op.const(signed.astype(ml_dtypes.int4 if s.bits == 4 else np.int8), hint="qweight")
        w = op.DequantizeLinear(x, op.const(scales, hint="scales"), axis=0, block_size=s.block)
    else:
        kind = ml_dtypes.uint4 if s.bits == 4 else np.uint8
        zeros = unpack_zero_points(zp.const.numpy().reshape(s.n, -1), s.bits, s.blocks).T
        x = op.const(np.ascontiguousarray(codes).astype(kind), hint="qweight")
        z = op.const(np.ascontiguousarray(zeros).astype(kind), hint="zero_points")
        w = op.DequantizeLinear(x, op.const(scales, hint="scales"), z, axis=0, block_size=s.block)
    return [op.MatMul(node.inputs[0], w)]


def decompose_matmul(op: Builder, node: Node) -> list[Value]:
    """Any opset >= 13: dequantize the packed rows in the graph, transpose, MatMul."""
    s = Spec(node)
    rows = _dequantized_rows(op, node, node.inputs[1], node.inputs[2], _opt(node, 3), s, rests=_opt(node, 4))
    if s.padded:
        rows = op.Slice(rows, _i64(op, [0]), _i64(op, [s.k]), _i64(op, [-1]))
    return [op.MatMul(node.inputs[0], op.Transpose(rows, perm=[1, 0]))]


def decompose_gather(op: Builder, node: Node) -> list[Value]:
    """Gather the packed rows, scales and offsets first, then dequantize only those rows."""
    s = Spec(node)
    ids = node.inputs[1]
    flat = op.Reshape(ids, _i64(op, [-1]))
    packed = op.Gather(node.inputs[0], flat, axis=0)
    rows = _dequantized_rows(op, node, packed, node.inputs[2], _opt(node, 3), s, ids=flat)
    if s.padded:
        rows = op.Slice(rows, _i64(op, [0]), _i64(op, [s.k]), _i64(op, [-1]))
    shape = op.Concat(op.Shape(ids), _i64(op, [s.k]), axis=0)
    return [op.Reshape(rows, shape)]


def _dequantized_rows(
    op: Builder, node: Node, packed: Value, scales: Value, zero_points: Value | None, s: Spec, ids: Value | None = None,
    rests: Value | None = None,
) -> Value:
    """(codes - zero_point) * scale as codes * scale + offset, rows [M, blocks * block]. The offset
    (-zero_point * scale, one per block) is folded at compile time from the constant inputs; with
    ``ids`` the per-block tables are gathered like the packed rows."""
    dtype = scales.dtype.numpy if scales.dtype is not None else np.float32
    codes = packed
    if s.bits == 4:
        shift = op.const(np.array(4, np.uint8), hint="four")
        high = op.BitShift(packed, shift, direction="RIGHT")
        low = op.Sub(packed, op.BitShift(high, shift, direction="LEFT"))
        axis = _i64(op, [-1])
        codes = op.Concat(op.Unsqueeze(low, axis), op.Unsqueeze(high, axis), axis=-1)
    codes = op.Cast(op.Reshape(codes, _i64(op, [-1, s.blocks, s.block])), to=int(DType.from_numpy(dtype)))
    scale_table = _cached(op, scales, "scale3d", lambda: op.const(_scales(scales, s).astype(dtype)[..., None], hint="scales"))
    offset_table = _cached(
        op, rests or zero_points or scales, f"offset{s.bits}",
        lambda: op.const(_offsets(scales, zero_points, s, rests).astype(dtype)[..., None], hint="offsets"),
    )
    if ids is not None:
        scale_table = op.Gather(scale_table, ids, axis=0)
        offset_table = op.Gather(offset_table, ids, axis=0)
    values = op.Add(op.Mul(codes, scale_table), offset_table)
    return op.Reshape(values, _i64(op, [-1, s.blocks * s.block]))


def dequantized_weight(node: Node, rows: np.ndarray | None = None) -> np.ndarray:
    """The float32 weight a MatMulNBits / MatMulQuant node multiplies by, or the table a
    GatherQuant node looks rows up in, [N, K] (only ``rows`` of its N when given): codes * scale +
    offset per block, block offsets included."""
    s = Spec(node)
    pick = slice(None) if rows is None else rows
    packed = node.inputs[0 if node.op_type == GATHER else 1].const.numpy().reshape(s.n, s.blocks, -1)[pick]
    codes = unpack_codes(packed, s.bits).astype(np.float32)
    offsets = _offsets(node.inputs[2], _opt(node, 3), s, _opt(node, 4))[pick]
    weight = codes * _scales(node.inputs[2], s)[pick][..., None] + offsets[..., None]
    return np.ascontiguousarray(weight.reshape(len(codes), s.blocks * s.block)[:, :s.k])


def _scales(scales: Value, s: Spec) -> np.ndarray:
    return scales.const.numpy().reshape(s.n, s.blocks).astype(np.float32)


def _offsets(scales: Value, zero_points: Value | None, s: Spec, rests: Value | None = None) -> np.ndarray:
    if zero_points is None:
        zeros = np.full((s.n, s.blocks), 1 << (s.bits - 1), np.float32)
    else:
        zeros = unpack_zero_points(zero_points.const.numpy().reshape(s.n, -1), s.bits, s.blocks).astype(np.float32)
    offsets = -zeros * _scales(scales, s)
    if rests is not None:  # exact in float64, rounded once
        offsets = (offsets.astype(np.float64) + rests.const.numpy().reshape(s.n, s.blocks)).astype(np.float32)
    return offsets


# -- helpers --------------------------------------------------------------------------------------
_CACHE: weakref.WeakKeyDictionary[Graph, dict[Hashable, Value]] = weakref.WeakKeyDictionary()


def _cached(op: Builder, source: Value, kind: str, make: Callable[[], Value]) -> Value:
    """One derived value per (source value, kind) and graph, so two ops reading one packed weight
    (a tied embedding and LM head) still share what their lowerings derive from it."""
    return _memo(op, (id(source), source.name, kind), make)


def _memo(op: Builder, key: Hashable, make: Callable[[], Value]) -> Value:
    """The value ``make`` built for ``key`` in this graph earlier, while it is still in the graph."""
    cache = _CACHE.setdefault(op.graph, {})
    found = cache.get(key)
    if found is not None and (
        op.graph.initializers.get(found.name) is found or (found.producer is not None and found.producer.graph is op.graph)
    ):
        return found
    cache[key] = value = make()
    return value


def _i64(op: Builder, values) -> Value:
    return op.const(np.asarray(values, np.int64), hint="i64")


MATMUL_QUANT = register(CanonicalOp(MATMUL, _infer_matmul, decompose_matmul, {"ort": _lower_matmul_ort, "onnx": _lower_matmul_onnx}))
GATHER_QUANT = register(CanonicalOp(GATHER, _infer_gather, decompose_gather, {"ort": _lower_gather_ort, "onnx": decompose_gather}))
