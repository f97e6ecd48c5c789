"""Attention fusion: every scaled-dot-product attention becomes one canonical Attention node.

Anchored on Softmax. A site qualifies when the softmax reads ``scale * Q·Kᵀ`` plus masks and its
output (through the NaN guard) multiplies V; the fusion then finds the packed Q/K/V the heads were
split from (attention_layout), folds every scaling into one ``scale``, drops grouped-query
repeats, and reads the mask's structure (attention_mask): causal triangle, sliding window,
padding. The config's ``masking`` policy may override what the structure says ("causal" forces a
causal mask, "none" removes it), with a warning since outputs then change. Each candidate ends up
in the report with the first check that failed (attention_report).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ...ir import DType, Model, Node, Value
from ..base import Pass, PassContext
from ..canonical import DOMAIN, DOMAIN_VERSION
from ..rewrite import Builder
from .attention_layout import Layout, Packed
from .attention_mask import Literal, MaskAnalysis, MaskInfo, activation_set
from .attention_op import AttentionSpec, make_node
from .attention_output import OutputPlan, plan_output
from .attention_report import SiteEntry, finish, other_normalizations, projections
from .attention_scores import attention_shaped, probability_matmul, scores_of
from .build_util import i64, scalar_like, shared
from .dims import DimOracle, dim_of
from .match_util import Mismatch, peel_scale
from .shape_reroute import reroute_shapes


@dataclasses.dataclass
class Site:
    """A matched attention, ready to build."""

    anchor: Node
    q: Packed
    k: Packed
    v: Packed
    spec: AttentionSpec
    mask: MaskInfo
    rank: int
    output: OutputPlan


class AttentionFusion(Pass):
    name = "attention_fusion"

    def run(self, model: Model, ctx: PassContext) -> None:
        graph = model.graph
        opset = model.opset("") or 99
        policy = getattr(ctx.config, "masking", "auto")
        oracle = DimOracle()
        entries: list[SiteEntry] = []
        keepers: list[Value] = []
        for node in list(graph.nodes):
            if node.op_type != "Softmax" or node.domain or node.graph is not graph:
                continue
            where = f"Softmax {node.name or node.outputs[0].name!r}"
            try:
                site = match(node, oracle, opset)
                notes = apply_policy(site, policy)
            except Mismatch as exc:
                entries.append(SiteEntry(where, False, str(exc), shaped=attention_shaped(node)))
                continue
            for note in notes:
                ctx.record.warn(note)
            keepers += build(site, Builder(graph, site.anchor, node.name or "attention"))
            entries.append(SiteEntry(where, True, details=_details(site)))
        for node, reason in other_normalizations(graph):
            entries.append(SiteEntry(f"MatMul {node.name or node.outputs[0].name!r}", False, reason, shaped=True))
        if any(e.fused for e in entries):
            model.require_opset(DOMAIN, DOMAIN_VERSION)
            ctx.record.count("nodes_removed", graph.remove_dead())
            ctx.record.count("shapes_recomputed", reroute_shapes(graph, oracle, keepers))
        finish(ctx.record, graph, entries)


def match(softmax: Node, oracle: DimOracle, opset: int) -> Site:
    """Recognise the attention around ``softmax`` (raises Mismatch with the reason it is not one)."""
    pv = probability_matmul(softmax, opset)
    scores = scores_of(softmax)
    qk = scores.qk
    q_side, q_scale, _ = peel_scale(qk.inputs[0], "Q")
    k_side, k_scale, _ = peel_scale(qk.inputs[1], "K")
    v_side = pv.inputs[1]
    rank = _rank(qk, q_side, k_side, v_side)
    layout = Layout(oracle)
    if rank == 4:
        q = layout.packed(q_side, "Q")
        kind, k_read = layout.untranspose_key(k_side)
        if kind == "bhsd":
            k_heads, k_rep = layout.unrepeat(k_read, "K")
            k = layout.packed(k_heads, "K")
        else:
            k, k_rep = layout.packed_bshd(k_read, "K"), 1
        v_heads, v_rep = layout.unrepeat(v_side, "V")
        v = layout.packed(v_heads, "V")
    else:
        q, k, v, k_rep, v_rep = _single_head(q_side, k_side, v_side)
    kv_heads = _check_heads(q, k, v, k_rep, v_rep)
    scale = q_scale * k_scale * scores.scale
    if not math.isfinite(scale) or scale == 0.0:
        raise Mismatch(f"the folded scale {scale} is not a usable number")
    activations = activation_set([q_side, k_side, v_side])
    analysis = MaskAnalysis(oracle, q.seq, k.seq, activations)
    info = analysis.analyse(scores.where_terms, scores.floats)
    for lit in info.residual + [Literal(f) for f in info.floats]:
        if lit.value.shape is None or not 2 <= len(lit.value.shape) <= rank:
            raise Mismatch(f"the rank of the mask %{lit.value.name} is not known or does not fit the scores")
    output = plan_output(pv, oracle, q.heads, v.size, rank)
    spec = AttentionSpec(q.heads, kv_heads, q.size, v.size, scale, info.causal, info.left_window, info.mask_value,
                         _softmax_precision(softmax, qk), scores.softcap)
    return Site(pv, q, k, v, spec, info, rank, output)


def _softmax_precision(softmax: Node, qk: Node) -> int:
    """The type the softmax runs in when the exporter cast the scores up for it (16-bit models)."""
    work, io = softmax.inputs[0].dtype, qk.outputs[0].dtype or qk.inputs[0].dtype
    if work is None or io is None or work == io:
        return 0
    return int(work)


def _rank(qk: Node, q_side: Value, k_side: Value, v_side: Value) -> int:
    ranks = {len(x.shape) for x in (qk.outputs[0], q_side, k_side, v_side) if x.shape is not None}
    if len(ranks) > 1:
        raise Mismatch(f"Q, Kᵀ, V and their product have ranks {sorted(ranks)}: heads are broadcast")
    if not ranks:
        raise Mismatch("the rank of Q·Kᵀ is not known")
    rank = ranks.pop()
    if rank not in (3, 4):
        raise Mismatch(f"Q·Kᵀ has rank {rank}; attention is [B, S, D] or [B, H, S, D]")
    return rank


def _single_head(q3: Value, kt: Value, v3: Value):
    """[B, S, D] attention without heads: the multi-head form with one head."""
    node = kt.producer
    if node is None or node.op_type != "Transpose" or list(node.attr("perm") or []) != [0, 2, 1]:
        raise Mismatch("Kᵀ of a single-head attention is not a transpose of K")
    k3 = node.inputs[0]
    sizes = [dim_of(q3, 2), dim_of(k3, 2), dim_of(v3, 2)]
    if not all(isinstance(s, int) for s in sizes):
        raise Mismatch("the head size of a single-head attention is not known")
    make = [Packed(lambda op, x=x: x, 1, s, "single head", (x, 1), x) for x, s in zip((q3, k3, v3), sizes)]
    return make[0], make[1], make[2], 1, 1


def _check_heads(q: Packed, k: Packed, v: Packed, k_rep: int, v_rep: int) -> int:
    if q.size != k.size:
        raise Mismatch(f"Q and K have different head sizes ({q.size} and {k.size})")
    if k.heads != v.heads or k_rep != v_rep:
        raise Mismatch(f"K and V have different numbers of heads ({k.heads}x{k_rep} and {v.heads}x{v_rep})")
    if k.heads * k_rep not in (q.heads, 1) or q.heads % k.heads:
        raise Mismatch(f"Q has {q.heads} heads but K and V have {k.heads} (repeated {k_rep} times)")
    return k.heads


def apply_policy(site: Site, policy: str) -> list[str]:
    """The config's masking policy; returns warnings for a policy that contradicts the structure."""
    notes = []
    spec = site.spec
    if policy == "causal" and not spec.causal:
        notes.append("masking='causal' applies a causal mask to attention whose mask is not causal "
                     "(an encoder?): outputs change")
        site.spec = dataclasses.replace(spec, causal=True)
    elif policy == "none" and (spec.causal or spec.left_window >= 0):
        notes.append("masking='none' removes the causal mask the model applies: outputs change")
        site.spec = dataclasses.replace(spec, causal=False, left_window=-1)
    return notes


def build(site: Site, op: Builder) -> list[Value]:
    """Replace the site by a canonical Attention node; returns the values that stay (the node's
    inputs and output, and what they are computed from), whose sizes replace Shape readers."""
    q3, k3, v3 = site.q.plan(op), site.k.plan(op), site.v.plan(op)
    spec = site.spec
    mask = _build_mask(op, site, q3.dtype or DType.FLOAT)
    out = make_node(op, q3, k3, v3, mask, spec)
    anchor_out = site.anchor.outputs[0]
    out.dtype = anchor_out.dtype
    if q3.shape is not None and len(q3.shape) == 3:
        out.shape = (q3.shape[0], q3.shape[1], spec.num_heads * spec.v_head_size)
    site.output.apply(op, out)
    keepers = [q3, k3, v3, out]
    for value in (q3, k3, v3):
        made = value.producer
        if made is not None and made in op.nodes and made.inputs and made.inputs[0] is not None:
            keepers.append(made.inputs[0])
    return keepers


def _build_mask(op: Builder, site: Site, dtype: DType) -> Value | None:
    info = site.mask
    if not info.residual and not info.floats:
        return None
    key = ("attention_mask", tuple((id(lit.value), lit.negated) for lit in info.residual),
           tuple(id(f) for f in info.floats), info.mask_value, site.rank, dtype)

    def make() -> Value:
        parts = [op.Not(lit.value) if lit.negated else lit.value for lit in info.residual]
        mask = parts[0] if len(parts) == 1 else (op.And(*parts[:2]) if parts else None)
        for extra in parts[2:]:
            mask = op.And(mask, extra)
        if info.floats:
            total = info.floats[0]
            for f in info.floats[1:]:
                total = op.Add(total, f)
            if mask is not None:
                bias = op.Where(mask, scalar_like(op, 0.0, dtype), scalar_like(op, info.mask_value, dtype))
                total = op.Add(bias, total)
            mask = total
        rank = max(len(lit.value.shape) for lit in info.residual + [Literal(f) for f in info.floats])
        if site.rank == 3:
            mask = op.Unsqueeze(mask, i64(op, [1] if rank == 3 else [0, 1]))
        elif rank < 4:
            mask = op.Unsqueeze(mask, i64(op, list(range(4 - rank))))
        return mask

    return shared(op, key, make)


def _details(site: Site) -> dict[str, object]:
    spec = site.spec
    return {
        "num_heads": spec.num_heads, "kv_num_heads": spec.kv_num_heads, "head_size": spec.head_size,
        "scale": float(np.float32(spec.scale)), "causal": spec.causal, "left_window": spec.left_window,
        "mask": site.mask.describe(), "mask_value": spec.mask_value, "softmax_precision": spec.softmax_precision,
        **({"softcap": spec.softcap} if spec.softcap else {}),
        "q": site.q.how, "k": site.k.how, "v": site.v.how,
        "rotary": site.q.rotary or "none", "projections": projections(site.q.source, site.k.source, site.v.source),
    }
