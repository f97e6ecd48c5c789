"""A cached canonical Attention as ONNX Runtime's GroupQueryAttention: one node per layer.

What the node absorbs (each only when it provably fits; otherwise that part stays a node of its
own and the diagnostics say why):

* the packed projection's Split: q, k and v that are the three parts of one matmul's output go in
  as one packed ``query`` [B, S, (H + 2 Hkv) D] (``key``/``value`` left out);
* the q and k rotary embeddings (``do_rotary``), with the cos/sin tables computed once per model
  at compile time (``rotary_table``), indexed by cache slot;
* grouped heads natively (no fold of query heads into rows, no repeat of K/V);
* the padding mask as an ``attention_bias`` with a finite fill (-1e30), the causal triangle and the
  sliding window by the kernel (``causal=1``, ``local_window_size``).

Lengths: ``seqlens_k`` = total - 1 for every row and ``total_sequence_length`` = total, from the
``attention_mask`` width (never from the past's shape: in the runtime's shared-buffer mode the past
is a whole max-length buffer); ``query_seqlens`` = S for every row, which lets the kernel take
several new tokens on a batch with a past (chunked prefill), which it otherwise refuses.

Semantics: every query row that may attend to some key gets exactly the canonical result (checked
against the uncached model by the tests). A row with no allowed key at all -- a left-padding token
of a batch prompt -- is padding and its output unspecified; the canonical op defines it (0 or the
mean of V, by the export's fill), this kernel gives the mean over the earlier padded keys. The
finite fill also keeps such rows from ever producing NaN, which would reach the cache.
"""

from __future__ import annotations

import weakref

import numpy as np

from ...ir import DType, Graph, Node, Value
from ..capabilities import CPU
from ..fusion.attention_lower import ABSORBING_FILL, _context, _kernel_missing
from ..fusion.attention_op import AttentionSpec, inputs, past
from ..fusion.build_util import i64, scalar_like, shared
from ..fusion.rotary_op import attrs_of, is_rotary
from ..rewrite import Builder
from .rotary_table import DEFAULT_LENGTH, rotary_table
from .sequence import IDS_NAME, MASK_NAME

MS = "com.microsoft"
#: The CPU kernel's constraint on the head size (its vectorized loops), learned by running it.
CPU_HEAD_MULTIPLE = 16
_TABLES: weakref.WeakKeyDictionary[Graph, dict] = weakref.WeakKeyDictionary()


def lower_gqa(op: Builder, node: Node) -> list[Value] | str:
    """GroupQueryAttention for a cached attention, or why it does not fit (the caller falls back)."""
    spec = AttentionSpec.of(node)
    q, k, v, mask = inputs(node)
    pk, pv = past(node)
    reason = _refusal(op, spec, q, pk, pv, mask)
    if reason:
        return reason
    lengths = _lengths(op)
    if lengths is None:
        return f"the graph lacks {MASK_NAME!r} or {IDS_NAME!r} to read the lengths from"
    attrs: dict[str, object] = {"num_heads": spec.num_heads, "kv_num_heads": spec.kv_num_heads, "scale": spec.scale}
    if spec.softcap:
        attrs["softcap"] = spec.softcap
    if spec.left_window >= 0:
        attrs["local_window_size"] = spec.left_window + 1
    rotary = _absorbed_rotary(op, spec, q, k)
    caches: tuple[Value | None, Value | None] = (None, None)
    if isinstance(rotary, str):
        _note(op, f"rotary kept as separate nodes: {rotary}")
    elif rotary is not None:
        q, k, caches, interleaved = rotary
        attrs.update(do_rotary=1, rotary_interleaved=interleaved)
    query, key, value = _packed(q, k, v, spec) or (q, k, v)
    seqlens, total_len, queries, seq = lengths
    added = None if mask is None else _bias(op, mask, q.dtype, seq)
    out, present_k, present_v = op.GroupQueryAttention(
        query, key, value, pk, pv, seqlens, total_len, caches[0], caches[1], None, added,
        None, None, None, None, None, queries, _domain=MS, _outputs=3, **attrs)
    return [out, present_k, present_v]


def _refusal(op: Builder, spec: AttentionSpec, q: Value, pk: Value, pv: Value, mask: Value | None) -> str | None:
    missing = _kernel_missing(op, "GroupQueryAttention", q.dtype)
    if missing:
        return missing
    if pk.dtype != q.dtype or pv.dtype != q.dtype:
        return f"the cache is stored as {pk.dtype}, and GroupQueryAttention reads it in the query's type {q.dtype}"
    if spec.head_size != spec.v_head_size:
        return "GroupQueryAttention needs the same head size for K and V"
    if spec.num_heads % spec.kv_num_heads:
        return f"{spec.num_heads} query heads are not a multiple of {spec.kv_num_heads} key/value heads"
    provider, _ = _context(op)
    if provider == CPU and spec.head_size % CPU_HEAD_MULTIPLE:
        return f"head size {spec.head_size} is not a multiple of {CPU_HEAD_MULTIPLE} (ONNX Runtime's CPU kernel)"
    if spec.softmax_precision and spec.softmax_precision != int(DType.FLOAT):
        return f"its softmax runs in element type {spec.softmax_precision}; the kernel's runs in float32"
    if mask is not None and (mask.shape is None or len(mask.shape) != 4 or mask.shape[1] not in (1, spec.num_heads)):
        return "its mask is not [B|1, 1|heads, S|1, total]"
    return None


def _lengths(op: Builder) -> tuple[Value, Value, Value, Value] | None:
    """seqlens_k [B] = total - 1, total_sequence_length (scalar) and query_seqlens [B] = S, int32,
    read from the graph's ``attention_mask`` and ``input_ids`` once per graph (every layer shares
    them), and S as [1]; None when the graph lacks those inputs."""
    found = {v.name: v for v in op.graph.inputs if v.name in (MASK_NAME, IDS_NAME)}
    if len(found) != 2:
        return None
    mask, ids = found[MASK_NAME], found[IDS_NAME]
    int32 = int(DType.INT32)

    def one(name: str, make) -> Value:
        return shared(op, ("gqa_lengths", name, id(mask), id(ids)), make)

    total = one("total", lambda: op.Shape(mask, start=1, end=2))
    batch = one("batch", lambda: op.Shape(mask, start=0, end=1))
    seq = one("seq", lambda: op.Shape(ids, start=1, end=2))
    return (one("seqlens", lambda: op.Cast(op.Expand(op.Sub(total, i64(op, [1])), batch), to=int32)),
            one("total32", lambda: op.Cast(op.Squeeze(total, i64(op, [0])), to=int32)),
            one("queries", lambda: op.Cast(op.Expand(seq, batch), to=int32)), seq)


def _bias(op: Builder, mask: Value, dtype: DType, seq: Value) -> Value:
    """The mask as the kernel's attention_bias [B|1, 1|H, S, total]: 0 where allowed, a finite
    -1e30 elsewhere (an additive float mask is clamped to it: -inf would turn a row with no
    allowed key into NaN, which the cache would carry), with a full query axis. Built from the
    mask and the ids' length only, so one bias serves every layer."""
    def make() -> Value:
        fill = scalar_like(op, ABSORBING_FILL, dtype, "fill")
        if mask.dtype == DType.BOOL:
            out = op.Where(mask, scalar_like(op, 0.0, dtype, "zero"), fill)
        else:
            out = op.Max(mask if mask.dtype == dtype else op.Cast(mask, to=int(dtype)), fill)
        return op.Expand(out, op.Concat(i64(op, [1, 1]), seq, i64(op, [1]), axis=0))

    return shared(op, ("gqa_bias", id(mask), dtype), make)


def _absorbed_rotary(op: Builder, spec: AttentionSpec, q: Value, k: Value):
    """(q before rotary, k before rotary, (cos_cache, sin_cache), interleaved) when both rotaries
    can move into the kernel; None when q and k are not rotated; else why not."""
    rq, rk = q.producer, k.producer
    if not is_rotary(rq) and not is_rotary(rk):
        return None
    if not (is_rotary(rq) and is_rotary(rk)):
        return "only one of q and k is rotated"
    if rq.inputs[1] is not rk.inputs[1] or rq.inputs[2] is not rk.inputs[2]:
        return "q and k rotate with different factors"
    (hq, rdim, inter), (hk, rdim_k, inter_k) = attrs_of(rq), attrs_of(rk)
    if (hq, hk) != (spec.num_heads, spec.kv_num_heads):
        return "the rotary runs on split heads, not on the projection's output"
    if (rdim, inter) != (rdim_k, inter_k):
        return "q and k rotate differently"
    if rdim != spec.head_size:
        return f"partial rotary ({rdim} of {spec.head_size} channels)"
    if len(q.uses) != 1 or len(k.uses) != 1 or q.is_graph_output or k.is_graph_output:
        return "the rotated q or k is also read elsewhere"
    ctx = getattr(op, "lowering", None)
    length = getattr(ctx, "context_length", None) or DEFAULT_LENGTH
    opset = getattr(ctx, "opset", None) or 17
    memo = _TABLES.setdefault(op.graph, {})
    key = (id(rq.inputs[1]), id(rq.inputs[2]), rdim, inter, length)
    found = memo.get(key)
    if isinstance(found, tuple) and not all(op.graph.initializers.get(t.name) is t for t in found):
        del memo[key]  # a lowering that gave up removed the tables it made: make them again
    if key not in memo:
        table = rotary_table(op.graph, rq.inputs[1], rq.inputs[2], rdim, inter, length, opset)
        if not isinstance(table, str):
            dtype = q.dtype.numpy
            table = tuple(op.const(np.ascontiguousarray(t.astype(dtype)), hint=h) for t, h in zip(table, ("cos_cache", "sin_cache")))
        memo[key] = table
    table = memo[key]
    if isinstance(table, str):
        return table
    return rq.inputs[0], rk.inputs[0], table, inter


def _packed(q: Value, k: Value, v: Value, spec: AttentionSpec) -> tuple[Value, None, None] | None:
    """(packed qkv, None, None) when q, k and v are the three parts of one Split of a projection."""
    split = q.producer
    if split is None or split.op_type != "Split" or split.domain or len(split.outputs) != 3:
        return None
    if (k.producer is not split or v.producer is not split or [q.index, k.index, v.index] != [0, 1, 2]):
        return None
    x = split.inputs[0]
    axis = int(split.attr("axis", 0))
    if x.shape is None or axis not in (-1, len(x.shape) - 1) or len(x.shape) != 3:
        return None
    given = split.inputs[1] if len(split.inputs) > 1 else None
    sizes = given.const.numpy().tolist() if given is not None and given.const is not None else None
    d = spec.head_size
    wanted = [spec.num_heads * d, spec.kv_num_heads * d, spec.kv_num_heads * d]
    equal = given is None  # no sizes: three equal parts
    if sizes != wanted and not (equal and x.shape[-1] == sum(wanted) and len(set(wanted)) == 1):
        return None
    if any(len(o.uses) != 1 or o.is_graph_output for o in (q, k, v)):
        return None
    return x, None, None


def _note(op: Builder, text: str) -> None:
    notes = getattr(op, "notes", None)
    if notes is not None:
        notes.append(text)
