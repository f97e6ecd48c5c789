"""Emitters of the canonical transformer ops: norms, rotary, attention (with its KV cache)."""

from __future__ import annotations

from ..ir import DType
from ..passes.canonical import DOMAIN
from ..passes.fusion.attention_op import AttentionSpec
from .ops import Site, Unsupported, _float_only, emits, lit


def _ptr(site: Site, i: int) -> str:
    return f"(const float *){site.ins[i]}->p" if site.has(i) else "NULL"


def _norm(site: Site, skip: bool, rms: bool) -> list[str]:
    n = site.node
    _float_only(site, *range(len(n.inputs)))
    eps = lit(float(n.attr("epsilon", 1e-5)))
    x, o = site.ins[0], site.outs[0]
    if skip:  # SkipLayerNorm(x, skip, scale, bias?, skip_bias?) / SkipRMSNorm(x, skip, scale, skip_bias?)
        scale, bias = _ptr(site, 2), ("NULL" if rms else _ptr(site, 3))
        skip_bias = _ptr(site, 3) if rms else _ptr(site, 4)
        total = site.outs[1] if len(site.outs) > 1 and site.outs[1] != "NULL" else None
        skip_in = site.ins[1]
        lines = ["{", (f"icc_t *sum = {total};" if total else "icc_t sum_tmp = {0}; icc_t *sum = &sum_tmp;"),
                 "const float *xin, *skp; sum->dt = ICC_F32;",
                 f"if (icc_numel({x}) == icc_numel({skip_in})) {{ icc_set_shape(sum, {x}->r, {x}->d); icc_alloc(sum); "
                 f"xin = (const float *){x}->p; skp = (const float *){skip_in}->p; }}",
                 f"else {{ icc_binary(sum, {x}, {skip_in}, ICC_ADD); xin = (const float *)sum->p; skp = NULL; }}",
                 f"{o}->dt = ICC_F32; icc_set_shape({o}, sum->r, sum->d); icc_alloc({o});",
                 f"if (!icc_err) icc_norm(icc_numel(sum) / sum->d[sum->r - 1], sum->d[sum->r - 1], xin, skp, {skip_bias}, "
                 f"{scale}, {bias}, {eps}, {int(rms)}, (float *){o}->p, (float *)sum->p);"]
        if total is None:
            lines.append("icc_release(&sum_tmp);")
        return lines + ["}"]
    scale, bias = _ptr(site, 1), ("NULL" if rms else _ptr(site, 2))
    return [f"{o}->dt = ICC_F32; icc_set_shape({o}, {x}->r, {x}->d); icc_alloc({o});",
            f"icc_norm(icc_numel({x}) / {x}->d[{x}->r - 1], {x}->d[{x}->r - 1], (const float *){x}->p, NULL, NULL, "
            f"{scale}, {bias}, {eps}, {int(rms)}, (float *){o}->p, NULL);"]


@emits("RMSNorm", domain=DOMAIN)
def _rms(site: Site) -> list[str]:
    return _norm(site, skip=False, rms=True)


@emits("LayerNorm", domain=DOMAIN)
def _layer(site: Site) -> list[str]:
    return _norm(site, skip=False, rms=False)


@emits("SkipRMSNorm", domain=DOMAIN)
def _skip_rms(site: Site) -> list[str]:
    return _norm(site, skip=True, rms=True)


@emits("SkipLayerNorm", domain=DOMAIN)
def _skip_layer(site: Site) -> list[str]:
    return _norm(site, skip=True, rms=False)


@emits("RotaryEmbedding", domain=DOMAIN)
def _rotary(site: Site) -> list[str]:
    n = site.node
    _float_only(site, 0, 1, 2)
    heads, rdim, interleaved = int(n.attr("num_heads", 0)), int(n.attr("rotary_dim")), int(n.attr("interleaved", 0))
    x = site.ins[0]
    return [f"{site.outs[0]}->dt = ICC_F32;",
            f"if ({x}->r != {3 if heads else 4} || {site.ins[1]}->r != 3) icc_fail(\"RotaryEmbedding: unexpected ranks\");",
            f"icc_rotary_op({site.outs[0]}, {x}, {site.ins[1]}, {site.ins[2]}, {heads}, {rdim}, {interleaved});"]


def cache_in_place(node) -> bool:
    """Whether a cached Attention may write its new K/V rows into the past's own buffer: nothing
    else reads the past, and the presents are graph outputs nothing in the graph reads."""
    return (len(node.inputs) > 5 and len(node.outputs) > 2
            and all(v is not None and len(v.uses) == 1 for v in node.inputs[4:6])
            and all(v is not None and not v.uses and v.is_graph_output for v in node.outputs[1:3]))


def grows_in_place(value) -> bool:
    """Whether graph input ``value`` is a past cache its one reader, a cached Attention, appends to
    in place when the caller gives it room (``icc_run``'s rooms; the decode loop's own caches)."""
    if len(value.uses) != 1:
        return False
    node, slot = value.uses[0]
    return node.op_type == "Attention" and node.domain == DOMAIN and slot in (4, 5) and cache_in_place(node)


def _attention_args(site: Site, struct: str) -> tuple[AttentionSpec, list[str]]:
    """The attention kernels' shared arguments (Attention and PagedAttention): the spec's attributes
    and q, k, v, opening a C block that declares ``A`` of type ``struct``."""
    spec = AttentionSpec.of(site.node)
    if spec.softmax_precision not in (0, 1):
        raise Unsupported(f"{site.node.op_type} with a 16-bit softmax")
    _float_only(site, 0, 1, 2)
    q, k, v = site.ins[:3]
    return spec, ["{", f"{struct} A = {{0}};",
                  f"A.B = {q}->d[0]; A.S = {q}->d[1]; A.H = {spec.num_heads}; A.Hkv = {spec.kv_num_heads};",
                  f"A.D = {spec.head_size}; A.Dv = {spec.v_head_size}; A.scale = {lit(spec.scale)}; A.softcap = {lit(spec.softcap)};",
                  f"A.mask_value = {lit(spec.mask_value)}; A.causal = {int(spec.causal)}; A.left_window = {spec.left_window};",
                  f"A.q = (const float *){q}->p; A.k = (const float *){k}->p; A.v = (const float *){v}->p;"]


def _mask_field(site: Site) -> str:
    """The kernel argument a mask input fills: bool (may attend) or float (added)."""
    if site.node.inputs[3].dtype not in (DType.BOOL, DType.FLOAT):
        raise Unsupported(f"{site.node.op_type} mask that is neither bool nor float")
    return "mask_bool = (const uint8_t *)" if site.node.inputs[3].dtype == DType.BOOL else "mask_float = (const float *)"


@emits("Attention", domain=DOMAIN)
def _attention(site: Site) -> list[str]:
    n = site.node
    spec, lines = _attention_args(site, "icc_attention_args")
    q, k = site.ins[:2]
    mask = site.ins[3] if site.has(3) else None
    cached = site.has(4) and site.has(5)
    lines.append(f"if ({q}->r != 3 || {k}->r != 3) icc_fail(\"Attention: q and k must be [batch, sequence, hidden]\");")
    if cached:
        past_k, past_v = site.ins[4], site.ins[5]
        storage = n.inputs[4].dtype
        if storage not in (DType.FLOAT, DType.FLOAT16) or n.inputs[5].dtype != storage:
            raise Unsupported(f"Attention with a {storage} cache")
        code = 1 if storage == DType.FLOAT16 else 0
        lines += [f"A.P = {past_k}->d[2]; A.cache_dtype = {code}; A.past_k = {past_k}->p; A.past_v = {past_v}->p;",
                  f"A.past_cap = {past_k}->cap ? {past_k}->cap : A.P; A.present_cap = A.P + A.S;",
                  f"if ({past_k}->cap != {past_v}->cap) icc_fail(\"Attention: past key and value differ in room\");"]
        for out in site.outs[1:3]:
            if out == "NULL":
                raise Unsupported("Attention whose present key/value is not used")
        allocate = []
        for out, width in ((site.outs[1], "A.D"), (site.outs[2], "A.Dv")):
            allocate.append(f"{out}->dt = {10 if code else 1}; {out}->r = 4; {out}->d[0] = A.B; {out}->d[1] = A.Hkv; "
                            f"{out}->d[2] = A.P + A.S; {out}->d[3] = {width};")
        if cache_in_place(n):
            # The decode loop binds its caches with room to grow: the new rows are written into the
            # past's buffer and the present is that buffer, so a step copies no past rows.
            lines.append(f"if ({past_k}->cap >= A.P + A.S) {{ A.present_cap = A.past_cap;")
            for out, past, shape in ((site.outs[1], past_k, allocate[0]), (site.outs[2], past_v, allocate[1])):
                lines.append(f"  {shape} {out}->p = {past}->p; {out}->owned = 0; {out}->cap = {past}->cap;")
            lines.append("} else { " + " ".join(f"{a} icc_alloc({o});" for a, o in zip(allocate, site.outs[1:3])) + " }")
        else:
            lines += [f"{a} icc_alloc({o});" for a, o in zip(allocate, site.outs[1:3])]
        lines.append(f"A.present_k = {site.outs[1]}->p; A.present_v = {site.outs[2]}->p;")
    if mask is not None:
        field = _mask_field(site)
        lines += ["{ icc_t full = {.r = 4, .d = {A.B, A.H, A.S, A.P + A.S}};",
                  f"  if ({mask}->r != 4) icc_fail(\"Attention: the mask must have rank 4\");",
                  f"  icc_bstrides({mask}, &full, A.mask_stride); A.{field}{mask}->p; }}"]
    o = site.outs[0]
    lines += [f"{o}->dt = ICC_F32; {o}->r = 3; {o}->d[0] = A.B; {o}->d[1] = A.S; {o}->d[2] = A.H * A.Dv; icc_alloc({o});",
              f"A.out = (float *){o}->p;", "if (!icc_err) icc_attention(&A);", "}"]
    return lines


@emits("PagedAttention", domain=DOMAIN)
def _paged_attention(site: Site) -> list[str]:
    """passes/kv_cache/paged_op.py: the pools (inputs 4, 5) are written in place by the kernel."""
    n = site.node
    pools = n.inputs[4].dtype, n.inputs[5].dtype
    if pools[0] not in (DType.FLOAT, DType.FLOAT16) or pools[1] != pools[0]:
        raise Unsupported(f"PagedAttention with {pools[0]} / {pools[1]} pools (float32 or float16, both alike)")
    for i in (6, 7):
        if n.inputs[i].dtype != DType.INT32:
            raise Unsupported(f"PagedAttention with {n.inputs[i].dtype} block tables / lengths (int32)")
    spec, lines = _attention_args(site, "icc_paged_attention_args")
    q, k, v = site.ins[:3]
    kp, vp, tables, lens = site.ins[4:8]
    mask = site.ins[3] if site.has(3) else None
    block = int(n.attr("block_size"))
    lines += [f"if ({q}->r != 3 || {k}->r != 3 || {v}->r != 3 || {k}->d[0] != A.B || {k}->d[1] != A.S) "
             "icc_fail(\"PagedAttention: q, k and v must be [batch, sequence, hidden] alike\");",
             f"if ({kp}->r != 4 || {vp}->r != 4 || {kp}->d[1] != A.Hkv || {kp}->d[2] != {block} || {kp}->d[3] != A.D "
             f"|| {vp}->d[0] != {kp}->d[0] || {vp}->d[1] != A.Hkv || {vp}->d[2] != {block} || {vp}->d[3] != A.Dv) "
             f"icc_fail(\"PagedAttention: the pools must be [num_blocks, {spec.kv_num_heads}, {block}, head_size]\");",
             f"if ({tables}->r != 2 || {tables}->d[0] != A.B || {lens}->r != 1 || {lens}->d[0] != A.B) "
             "icc_fail(\"PagedAttention: kv_block_tables must be [batch, max_blocks] and kv_past_lens [batch]\");",
             f"A.cache_dtype = {1 if pools[0] == DType.FLOAT16 else 0}; A.key_pool = {kp}->p; A.value_pool = {vp}->p;",
             f"A.num_blocks = {kp}->d[0]; A.block_size = {block}; A.block_tables = (const int32_t *){tables}->p;",
             f"A.max_blocks = {tables}->d[1]; A.past_lens = (const int32_t *){lens}->p;"]
    if mask is not None:
        field = _mask_field(site)
        lines += [f"if ({mask}->r != 4) icc_fail(\"PagedAttention: the mask must have rank 4\");",
                  f"else {{ icc_t full = {{.r = 4, .d = {{A.B, A.H, A.S, {mask}->d[3]}}}};",
                  f"  icc_bstrides({mask}, &full, A.mask_stride); A.mask_len = {mask}->d[3]; A.{field}{mask}->p; }}"]
        if int(n.attr("tree", 0)):  # a tree's mask (runtime/tree_attention.py): each row over its own keys
            lines.append("A.tree = 1;")
    o = site.outs[0]
    lines += [f"{o}->dt = ICC_F32; {o}->r = 3; {o}->d[0] = A.B; {o}->d[1] = A.S; {o}->d[2] = A.H * A.Dv; icc_alloc({o});",
              f"A.out = (float *){o}->p;", "if (!icc_err) icc_paged_attention(&A);", "}"]
    return lines
