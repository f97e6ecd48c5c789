"""Lowering the canonical Attention (see attention_op.py) to what a runtime executes.

``"ort"``: ONNX Runtime's com.microsoft MultiHeadAttention (K/V with as many heads as Q) or
GroupQueryAttention (fewer K/V heads, self-attention only). ``"onnx"``: the standard Attention
op of opset 23 when the model imports it. Otherwise a lowering returns why not and the canonical
op is decomposed.

Both kernels reproduce the canonical semantics exactly, which the tests check, with two facts
learned by running ONNX Runtime (1.32, CPU): their bias input must have a full query axis
([B|1, H|1, S, Skv]), and a row whose bias is -inf everywhere comes out NaN (so the output gets a
NaN -> 0 guard), while ONNX Attention returns 0 for it but also treats float32 min as -inf (so a
finite fill of float32 min, the dynamo exports' choice, is passed as -1e30, which absorbs every
score in the same way).
"""

from __future__ import annotations

import dataclasses
import math

from ...ir import DType, Node, Value
from ..rewrite import Builder
from .attention_op import AttentionSpec, bias, inputs, may_be_nan, past, same_length
from .build_util import i64, scalar_like

MS = "com.microsoft"
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
#: Element types with kernels, per provider (CPU: run in the tests; CUDA: ORT's registrations).
KERNELS: dict[str, dict[str, frozenset[DType]]] = {
    "MultiHeadAttention": {CPU: frozenset({DType.FLOAT, DType.FLOAT16}), CUDA: frozenset({DType.FLOAT, DType.FLOAT16})},
    "GroupQueryAttention": {
        CPU: frozenset({DType.FLOAT, DType.FLOAT16}), CUDA: frozenset({DType.FLOAT16, DType.BFLOAT16}),
    },
}
#: The smallest finite fill ONNX Attention does not mistake for -inf.
ABSORBING_FILL = -1e30
STANDARD_ATTENTION_OPSET = 23


def _context(op: Builder) -> tuple[str, int | None]:
    """(primary provider, model opset) from the lowering context when the lowering pass gives one."""
    ctx = getattr(op, "lowering", None)
    provider = getattr(ctx, "provider", CPU) if ctx is not None else CPU
    opset = getattr(ctx, "opset", None) if ctx is not None else None
    return provider, opset


def _kernel_missing(op: Builder, op_type: str, dtype: DType | None) -> str | None:
    provider, _ = _context(op)
    if dtype is None:
        return f"the query type is unknown, so no {op_type} kernel can be chosen"
    if dtype not in KERNELS[op_type].get(provider, frozenset()):
        return f"ONNX Runtime's {provider.replace('ExecutionProvider', '')} provider has no {op_type} kernel for {dtype}"
    return None


def _nan_guard(op: Builder, out: Value, dtype: DType | None) -> Value:
    return op.Where(op.IsNaN(out), scalar_like(op, 0.0, dtype, "zero"), out)


def _only_causal(spec: AttentionSpec, mask: Value | None, q: Value, k: Value) -> bool:
    """Plain causal attention the kernels do natively (top-left = bottom-right when S == Skv)."""
    return spec.causal and mask is None and same_length(q, k)


def _softcap_refusal(node: Node) -> str | None:
    """Neither ORT's MultiHeadAttention nor the lowerings here cap scores: a soft-capped attention
    is decomposed (exact; still one fused, cacheable node until lowering)."""
    cap = AttentionSpec.of(node).softcap
    return f"no kernel here applies the score soft-cap {cap:g} (tanh)" if cap else None


def lower_ort(op: Builder, node: Node) -> list[Value] | str:
    refusal = _softcap_refusal(node)
    if refusal:
        return refusal
    if past(node) is not None:  # a KV cache (passes/kv_cache) has its own kernel choice
        from ..kv_cache.lower import lower_cached_ort

        return lower_cached_ort(op, node)
    q, k, v, mask = inputs(node)
    spec = AttentionSpec.of(node)
    if spec.kv_num_heads == spec.num_heads:
        return _mha(op, node, spec, q, k, v, mask)
    result = _gqa(op, node, spec, q, k, v, mask)
    if not isinstance(result, str) or spec.num_heads % spec.kv_num_heads:
        return result
    # No GroupQueryAttention here (cross-attention, or no kernel for the type): repeat K/V heads
    # for MultiHeadAttention, still better than the decomposition.
    rep = spec.num_heads // spec.kv_num_heads
    k, v = _repeat_heads(op, k, spec.kv_num_heads, spec.head_size, rep), _repeat_heads(
        op, v, spec.kv_num_heads, spec.v_head_size, rep)
    wide = dataclasses.replace(spec, kv_num_heads=spec.num_heads)
    fallback = _mha(op, node, wide, q, k, v, mask)
    return f"{result}; {fallback}" if isinstance(fallback, str) else fallback


def _repeat_heads(op: Builder, x: Value, heads: int, size: int, rep: int) -> Value:
    """[B, S, Hkv*D] -> [B, S, Hkv*rep*D], each head repeated ``rep`` times in place (repeat_kv)."""
    split = op.Reshape(x, i64(op, [0, 0, heads, 1, size]))
    return op.Reshape(op.Expand(split, i64(op, [1, 1, 1, rep, 1])), i64(op, [0, 0, heads * rep * size]))


def _mha(op: Builder, node: Node, spec: AttentionSpec, q: Value, k: Value, v: Value, mask: Value | None):
    missing = _kernel_missing(op, "MultiHeadAttention", q.dtype)
    if missing:
        return missing
    if spec.head_size != spec.v_head_size:
        return "MultiHeadAttention needs the same head size for K and V"
    attrs = {"num_heads": spec.num_heads, "scale": spec.scale}
    if _only_causal(spec, mask, q, k) and spec.left_window < 0:
        return [op.MultiHeadAttention(q, k, v, _domain=MS, unidirectional=1, **attrs)]
    added = bias(op, node, full_rows=True)
    if added is None:
        return [op.MultiHeadAttention(q, k, v, _domain=MS, **attrs)]
    out = op.MultiHeadAttention(q, k, v, None, None, added, _domain=MS, **attrs)
    return [_nan_guard(op, out, q.dtype) if may_be_nan(spec, mask) else out]


def _gqa(op: Builder, node: Node, spec: AttentionSpec, q: Value, k: Value, v: Value, mask: Value | None):
    missing = _kernel_missing(op, "GroupQueryAttention", q.dtype)
    if missing:
        return missing
    if spec.num_heads % spec.kv_num_heads:
        return f"{spec.num_heads} query heads are not a multiple of {spec.kv_num_heads} key/value heads"
    if spec.head_size != spec.v_head_size:
        return "GroupQueryAttention needs the same head size for K and V"
    if not same_length(q, k):
        return "GroupQueryAttention computes self-attention, and the query and key lengths are not provably equal"
    # Without a cache every key is new: seqlens_k = Skv - 1 for each row, total length Skv.
    total = op.Shape(k, start=1, end=2)
    seqlens = op.Expand(op.Cast(op.Sub(total, i64(op, [1])), to=int(DType.INT32)), op.Shape(q, start=0, end=1))
    total32 = op.Cast(op.Squeeze(total, i64(op, [0])), to=int(DType.INT32))
    attrs = {"num_heads": spec.num_heads, "kv_num_heads": spec.kv_num_heads, "scale": spec.scale}
    if _only_causal(spec, mask, q, k):
        if spec.left_window >= 0:  # ORT's local_window_size counts the query's own key
            attrs["local_window_size"] = spec.left_window + 1
        return [op.GroupQueryAttention(q, k, v, None, None, seqlens, total32, _domain=MS, **attrs)]
    added = bias(op, node, full_rows=True)
    ins = [q, k, v, None, None, seqlens, total32]
    if added is not None:
        ins += [None, None, None, added]
    out = op.GroupQueryAttention(*ins, _domain=MS, causal=0, **attrs)
    return [_nan_guard(op, out, q.dtype) if may_be_nan(spec, mask) else out]


def lower_onnx(op: Builder, node: Node) -> list[Value] | str:
    refusal = _softcap_refusal(node)
    if refusal:
        return refusal
    if past(node) is not None:
        from ..kv_cache.lower import lower_cached_onnx

        return lower_cached_onnx(op, node)
    q, k, v, mask = inputs(node)
    spec = AttentionSpec.of(node)
    _, opset = _context(op)
    if opset is None or opset < STANDARD_ATTENTION_OPSET:
        found = "an unknown opset" if opset is None else f"opset {opset}"
        return f"standard Attention needs opset {STANDARD_ATTENTION_OPSET}; the model imports {found}"
    fill = spec.mask_value
    if not math.isinf(fill):
        if fill > ABSORBING_FILL:
            return f"ONNX Attention treats fully masked rows differently for a finite mask value {fill:g}"
        fill = ABSORBING_FILL
    if spec.num_heads % spec.kv_num_heads:
        return f"{spec.num_heads} query heads are not a multiple of {spec.kv_num_heads} key/value heads"
    attrs = {"q_num_heads": spec.num_heads, "kv_num_heads": spec.kv_num_heads, "scale": spec.scale}
    if spec.softmax_precision:
        attrs["softmax_precision"] = spec.softmax_precision
    if _only_causal(spec, mask, q, k) and spec.left_window < 0:
        return [op.Attention(q, k, v, is_causal=1, **attrs)]
    added = bias(op, node, fill=fill, full_rows=True)
    ins = [q, k, v] + ([added] if added is not None else [])
    return [op.Attention(*ins, **attrs)]

