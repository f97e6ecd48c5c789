"""Lowering a cached canonical Attention (past/present inputs and outputs) to runtime kernels.

``"ort"``: ONNX Runtime's GroupQueryAttention where it fits (``gqa.py``: packed q/k/v, rotary
fused with a compile-time cos/sin table, lengths read once per model from the mask, grouped heads
natively: one node per layer), else MultiHeadAttention for that layer, with the reason in the
diagnostics. Each reason GroupQueryAttention was once passed over for is now a check in
``gqa._refusal`` with this fallback kept: a cache stored in another type than the query (int8 /
float16 K/V on a float32 model: the kernel reads the cache in the query's type), K and V head
sizes that differ, a head size the CPU kernel does not vectorize (not a multiple of 16), a
softmax in another precision, a mask that is not [B|1, 1|heads, S|1, total], no ``attention_mask``
/ ``input_ids`` inputs to read the lengths from, or no kernel for the provider and type
(capabilities). Its refusal of several new tokens on a batch with a past is lifted by
``query_seqlens`` (chunked prefill); rows with no allowed key at all (left padding of a batch
prompt) are padding and unspecified there, the canonical op's value only under the fallback.

MultiHeadAttention takes ``past_key``/``past_value`` and returns ``present`` itself, accepts every
call of the contract (prompt, one token, several tokens on a batch with a past), and with the
mask, causal triangle and window given as one ``attention_bias`` [B, 1, S, P+S] it reproduces the
canonical semantics exactly, fully padded rows included (its ``unidirectional`` triangle, bottom-
right aligned with the past, is used when there is no mask). Grouped heads: the query heads that
share a K/V head are folded into query rows of that head ([B, S, H*D] -> [B, S*g, Hkv*D]), so the
kernel attends with the Hkv heads, reads each cached head once and its present keeps Hkv heads.

``"onnx"``: ONNX Attention (opset 23) takes past/present itself; the mask, causal triangle and
window go in as one bias (its ``is_causal`` is top-left aligned, wrong with a past).

Shared buffers: a layer lowered to GroupQueryAttention reads and writes one max-length buffer
(past and present bound to the same memory, ``seqlens_k`` giving each row's length), so a step
copies nothing of the past: the runtime does this where every cache tensor is read and written by
GroupQueryAttention alone (``runtime/kv_cache.shared_in_place``) and keeps its ping-pong pair for
MultiHeadAttention layers (present = a new past+seq tensor, the portable contract).
"""

from __future__ import annotations

import math

from ...ir import DType, Node, Value
from ..fusion.attention_lower import (
    ABSORBING_FILL,
    STANDARD_ATTENTION_OPSET,
    _context,
    _kernel_missing,
    _nan_guard,
)
from ..fusion.attention_op import AttentionSpec, bias, inputs, may_be_nan, past
from ..fusion.build_util import i64
from ..rewrite import Builder
from .gqa import lower_gqa

MS = "com.microsoft"


def lower_cached_ort(op: Builder, node: Node) -> list[Value] | str:
    spec = AttentionSpec.of(node)
    if not spec.causal:
        return "a cached attention without the causal mask has no kernel mapping"
    if spec.head_size != spec.v_head_size:
        return "MultiHeadAttention needs the same head size for K and V"
    if spec.num_heads % spec.kv_num_heads:
        return f"{spec.num_heads} query heads are not a multiple of {spec.kv_num_heads} key/value heads"
    _, _, _, mask = inputs(node)
    grouped = spec.num_heads // spec.kv_num_heads
    if grouped > 1 and mask is not None and (mask.shape is None or mask.shape[1] != 1):
        return "a mask that differs per head cannot be shared by the query heads of one key/value head"
    q = node.inputs[0]
    fused = lower_gqa(op, node)
    if not isinstance(fused, str):
        return fused
    if hasattr(op, "notes"):
        op.notes.append(f"MultiHeadAttention, not GroupQueryAttention: {fused}")
    missing = _kernel_missing(op, "MultiHeadAttention", q.dtype)
    return missing or _mha(op, node, spec, grouped)


def _cast(op: Builder, x: Value, dtype: DType | None) -> Value:
    return x if dtype is None else op.Cast(x, to=int(dtype))


def _mha(op: Builder, node: Node, spec: AttentionSpec, grouped: int) -> list[Value]:
    """MultiHeadAttention over the cache. Grouped heads: the ``grouped`` query heads that share a
    key/value head become ``grouped`` query rows of it, so the kernel runs with the key/value
    heads and reads each cached head once (no repeated K/V), and its present keeps kv_heads."""
    q, k, v, mask = inputs(node)
    pk, pv = past(node)
    stored = pk.dtype if pk.dtype != q.dtype else None  # the kernel has one float type
    heads, size = spec.kv_num_heads, spec.head_size
    attrs: dict[str, object] = {"num_heads": heads, "scale": spec.scale}
    native = grouped == 1 and spec.left_window < 0 and mask is None  # its own triangle is bottom-right aligned
    if native:
        attrs["unidirectional"] = 1
    added = bias(op, node, full_rows=True, positions=not native)
    query = q
    if grouped > 1:  # [B, S, Hkv*g*D] -> [B, S*g, Hkv*D], rows (s, r) hold query heads h*g + r
        split = op.Reshape(q, i64(op, [0, 0, heads, grouped, size]))
        query = op.Reshape(op.Transpose(split, perm=[0, 1, 3, 2, 4]), i64(op, [0, -1, heads * size]))
        added = _repeat_rows(op, added, grouped)
    out, present_k, present_v = op.MultiHeadAttention(
        query, k, v, None, None, added, _cast(op, pk, q.dtype if stored else None),
        _cast(op, pv, q.dtype if stored else None), _domain=MS, _outputs=3, **attrs)
    if may_be_nan(spec, mask):
        out = _nan_guard(op, out, q.dtype)
    if grouped > 1:
        split = op.Reshape(out, i64(op, [0, -1, grouped, heads, size]))
        out = op.Reshape(op.Transpose(split, perm=[0, 1, 3, 2, 4]), i64(op, [0, 0, spec.num_heads * size]))
    return [out, _cast(op, present_k, stored), _cast(op, present_v, stored)]


def _repeat_rows(op: Builder, added: Value | None, times: int) -> Value | None:
    """A [B|1, 1, S, T] bias with each query row repeated ``times`` times: [B|1, 1, S*times, T]."""
    if added is None:
        return None
    wide = op.Expand(op.Unsqueeze(added, i64(op, [3])), op.Concat(op.Shape(added, start=0, end=3),
                                                                    i64(op, [times, 1]), axis=0))
    return op.Reshape(wide, op.Concat(op.Shape(added, start=0, end=2), i64(op, [-1]),
                                      op.Shape(added, start=3, end=4), axis=0))


def lower_cached_onnx(op: Builder, node: Node) -> list[Value] | str:
    q, _, _, _ = inputs(node)
    k = node.inputs[1]
    pk, pv = past(node)
    spec = AttentionSpec.of(node)
    _, opset = _context(op)
    if opset is None or opset < STANDARD_ATTENTION_OPSET:
        found = "an unknown opset" if opset is None else f"opset {opset}"
        return f"standard Attention needs opset {STANDARD_ATTENTION_OPSET}; the model imports {found}"
    if spec.num_heads % spec.kv_num_heads:
        return f"{spec.num_heads} query heads are not a multiple of {spec.kv_num_heads} key/value heads"
    fill = spec.mask_value
    if not math.isinf(fill):  # as the uncached lowering: ONNX Attention reads float32 min as -inf
        if fill > ABSORBING_FILL:
            return f"ONNX Attention treats fully masked rows differently for a finite mask value {fill:g}"
        fill = ABSORBING_FILL
    stored = pk.dtype if pk.dtype != q.dtype else None
    kv_type = k.dtype if stored else None
    attrs: dict[str, object] = {"q_num_heads": spec.num_heads, "kv_num_heads": spec.kv_num_heads, "scale": spec.scale}
    if spec.softmax_precision:
        attrs["softmax_precision"] = spec.softmax_precision
    added = bias(op, node, fill=fill, full_rows=True)
    out, present_k, present_v = op.Attention(q, k, node.inputs[2], added, _cast(op, pk, kv_type), _cast(op, pv, kv_type),
                                             _outputs=3, **attrs)
    return [out, _cast(op, present_k, stored), _cast(op, present_v, stored)]
