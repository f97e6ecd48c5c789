"""One table from (domain, op type) to the C that computes it (tinygrad's renderer style).

An emitter gets the node and a ``Site`` (C expressions for its inputs and outputs, and the weight
blob) and returns C statements. Shapes are computed by the kernels at run time; attributes become
literals here. An op missing from the table, or an emitter that raises ``Unsupported``, makes the
model not covered: the diagnostics name it and ONNX Runtime runs the model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from ..ir import DType, Node, Value
from ..passes.canonical import DOMAIN
from .packing import PANEL, Blob, pack_f32, pack_quant, quant_nbytes


class Unsupported(Exception):
    """The node has no C kernel (the message says which op and why)."""


@dataclasses.dataclass
class Site:
    node: Node
    ins: list[str]       # C expression of each input tensor (``&V[i]``), "NULL" when absent
    outs: list[str]      # C expression of each output tensor
    blob: Blob

    def const(self, i: int) -> np.ndarray | None:
        """Input i's constant value (initializer), else None."""
        v = self.node.inputs[i] if i < len(self.node.inputs) else None
        return None if v is None or v.const is None or v.is_graph_input else v.const.numpy()

    def has(self, i: int) -> bool:
        return i < len(self.node.inputs) and self.node.inputs[i] is not None


DT = {DType.FLOAT: 1, DType.UINT8: 2, DType.INT8: 3, DType.INT32: 6, DType.INT64: 7, DType.BOOL: 9, DType.FLOAT16: 10}
Emitter = Callable[[Site], list[str]]
TABLE: dict[tuple[str, str], Emitter] = {}
#: Ops whose output is a view of input 0 (no buffer of their own): liveness extends the source.
ALIASES = {("", "Reshape"), ("", "Squeeze"), ("", "Unsqueeze"), ("", "Flatten"), ("", "Identity")}


def emits(*names: str, domain: str = "") -> Callable[[Emitter], Emitter]:
    def register(fn: Emitter) -> Emitter:
        for name in names:
            TABLE[(domain, name)] = fn
        return fn
    return register


def dtype_code(value: Value) -> int:
    if value.dtype not in DT:
        raise Unsupported(f"element type {value.dtype} of %{value.name}")
    return DT[value.dtype]


def lit(x: float) -> str:
    """A C float literal (infinities and NaN spelled out), written from the float32 value: the
    literal is a float in C anyway, and an attribute read back from a saved model.onnx (float32)
    must give the same source as the in-memory double it was saved from (the saved weight blob is
    trusted only when the regenerated source is byte-identical)."""
    with np.errstate(over="ignore"):
        x = float(np.float32(x))
    if math.isinf(x):
        return "INFINITY" if x > 0 else "-INFINITY"
    if math.isnan(x):
        return "NAN"
    return f"{x!r}f" if "e" in repr(x) or "." in repr(x) else f"{x!r}.0f"


def _float_only(site: Site, *indices: int) -> None:
    for i in indices:
        v = site.node.inputs[i]
        if v is not None and v.dtype != DType.FLOAT:
            raise Unsupported(f"{site.node.op_type} on {v.dtype} (float32 only)")


# -- elementwise -------------------------------------------------------------------------------
_BINARY = {"Add": "ICC_ADD", "Sub": "ICC_SUB", "Mul": "ICC_MUL", "Div": "ICC_DIV", "Pow": "ICC_POW", "Max": "ICC_MAX",
           "Min": "ICC_MIN", "Mod": "ICC_MOD", "Equal": "ICC_EQ", "Less": "ICC_LT", "LessOrEqual": "ICC_LE",
           "Greater": "ICC_GT", "GreaterOrEqual": "ICC_GE", "And": "ICC_AND", "Or": "ICC_OR", "Xor": "ICC_XOR"}
_UNARY = {"Neg": "ICC_NEG", "Sqrt": "ICC_SQRT", "Exp": "ICC_EXP", "Log": "ICC_LOG", "Tanh": "ICC_TANH", "Cos": "ICC_COS",
          "Sin": "ICC_SIN", "Erf": "ICC_ERF", "Relu": "ICC_RELU", "Sigmoid": "ICC_SIGMOID", "Abs": "ICC_ABS",
          "Reciprocal": "ICC_RECIP", "Not": "ICC_NOT", "Floor": "ICC_FLOOR", "Ceil": "ICC_CEIL",
          "Round": "ICC_ROUND"}


@emits(*_BINARY)
def _binary(site: Site) -> list[str]:
    n = site.node
    for v in n.inputs:
        if v is not None:
            dtype_code(v)  # an input type the kernels do not read is refused here, not at run time
    op = "ICC_FMOD" if n.op_type == "Mod" and n.attr("fmod", 0) else _BINARY[n.op_type]
    ins = [x for x in site.ins if x != "NULL"]
    if n.op_type in ("Max", "Min") and len(ins) != 2:
        return _variadic(site, ins, op)
    return [f"{site.outs[0]}->dt = {dtype_code(n.outputs[0])};",
            f"icc_binary({site.outs[0]}, {site.ins[0]}, {site.ins[1]}, {op});"]


def _variadic(site: Site, ins: list[str], op: str) -> list[str]:
    """Max / Min of one or of three and more inputs: folded pairwise through a temporary (one
    input: Max(x, x), which is x, NaN included)."""
    if not ins:
        raise Unsupported(f"{site.node.op_type} without inputs")
    o, dt = site.outs[0], dtype_code(site.node.outputs[0])
    if len(ins) == 1:
        return [f"{o}->dt = {dt};", f"icc_binary({o}, {ins[0]}, {ins[0]}, {op});"]
    lines = ["{", f"icc_t acc = {{.dt = {dt}}}, next = {{.dt = {dt}}};", f"icc_binary(&acc, {ins[0]}, {ins[1]}, {op});"]
    for x in ins[2:-1]:
        lines.append(f"icc_binary(&next, &acc, {x}, {op}); icc_release(&acc); acc = next; next = (icc_t){{.dt = {dt}}};")
    return lines + [f"{o}->dt = {dt}; icc_binary({o}, &acc, {ins[-1]}, {op}); icc_release(&acc);", "}"]


#: What the unary kernel computes on integer inputs (the rest are float math; Not is bool only).
_UNARY_INT = {"Neg", "Abs", "Relu"}


@emits(*_UNARY)
def _unary(site: Site) -> list[str]:
    n = site.node
    dt = n.inputs[0].dtype
    dtype_code(n.inputs[0])
    if (n.op_type == "Not") != (dt == DType.BOOL) or (dt not in (DType.FLOAT, DType.FLOAT16, DType.BOOL)
                                                      and n.op_type not in _UNARY_INT):
        raise Unsupported(f"{n.op_type} on {dt}")
    return [f"{site.outs[0]}->dt = {dtype_code(site.node.outputs[0])};",
            f"icc_unary({site.outs[0]}, {site.ins[0]}, {_UNARY[site.node.op_type]});"]


@emits("SiLU", domain=DOMAIN)
def _silu(site: Site) -> list[str]:
    _float_only(site, 0)
    if len(site.node.inputs) > 1:
        raise Unsupported("SiLU with more than one input")
    return [f"{site.outs[0]}->dt = ICC_F32;", f"icc_unary({site.outs[0]}, {site.ins[0]}, ICC_SILU);"]


@emits("Gelu", domain=DOMAIN)
def _gelu(site: Site) -> list[str]:
    _float_only(site, 0)
    kind = "ICC_GELU_TANH" if site.node.attr("approximate", "none") == "tanh" else "ICC_GELU"
    bias = site.ins[1] if site.has(1) else "NULL"
    if site.has(1) and len(site.node.inputs[1].shape or ()) != 1:
        raise Unsupported("Gelu with a bias that is not one row")
    return [f"{site.outs[0]}->dt = ICC_F32;", f"icc_unary_bias({site.outs[0]}, {site.ins[0]}, {bias}, {kind});"]


@emits("Cast")
def _cast(site: Site) -> list[str]:
    dtype_code(site.node.inputs[0])
    return [f"{site.outs[0]}->dt = {dtype_code(site.node.outputs[0])};", f"icc_cast({site.outs[0]}, {site.ins[0]});"]


@emits("Clip")
def _clip(site: Site) -> list[str]:
    n = site.node
    dtype_code(n.inputs[0])
    if n.attr("min", None) is not None or n.attr("max", None) is not None:
        raise Unsupported("Clip with min/max attributes (opset < 11)")
    lo = site.ins[1] if site.has(1) else "NULL"
    hi = site.ins[2] if site.has(2) else "NULL"
    return [_set_dt(site), f"icc_clip({site.outs[0]}, {site.ins[0]}, {lo}, {hi});"]


@emits("Where")
def _where(site: Site) -> list[str]:
    return [f"{site.outs[0]}->dt = {dtype_code(site.node.outputs[0])};",
            f"icc_where({site.outs[0]}, {site.ins[0]}, {site.ins[1]}, {site.ins[2]});"]


@emits("Identity")
def _identity(site: Site) -> list[str]:
    o, x = site.outs[0], site.ins[0]
    return [f"{o}->dt = {x}->dt; icc_set_shape({o}, {x}->r, {x}->d); icc_alias({o}, {x});"]


# -- shapes and data movement --------------------------------------------------------------------
def _set_dt(site: Site, i: int = 0) -> str:
    return f"{site.outs[i]}->dt = {dtype_code(site.node.outputs[i])};"


@emits("Shape")
def _shape(site: Site) -> list[str]:
    n = site.node
    end = n.attr("end", None)
    return [_set_dt(site), f"icc_shape_of({site.outs[0]}, {site.ins[0]}, {int(n.attr('start', 0))}, "
                           f"{ICC_BIG if end is None else int(end)});"]


ICC_BIG = 1 << 62


@emits("Reshape")
def _reshape(site: Site) -> list[str]:
    return [_set_dt(site), f"icc_reshape({site.outs[0]}, {site.ins[0]}, {site.ins[1]}, {int(site.node.attr('allowzero', 0))});"]


def _axes_input(site: Site, i: int, attr: str) -> tuple[list[str], str]:
    """An axes list from input i or (older opsets) an attribute, as a C tensor expression."""
    if site.has(i):
        return [], site.ins[i]
    axes = site.node.attr(attr, None)
    if axes is None:
        return [], "NULL"
    values = ", ".join(str(int(a)) for a in axes)
    return [f"static int64_t ax_{id(site) % 99991}[] = {{{values}}};",
            f"icc_t axt = {{.p = ax_{id(site) % 99991}, .r = 1, .d = {{{len(axes)}}}, .dt = ICC_I64}};"], "&axt"


@emits("Squeeze", "Unsqueeze")
def _squeeze(site: Site) -> list[str]:
    pre, axes = _axes_input(site, 1, "axes")
    fn = "icc_squeeze" if site.node.op_type == "Squeeze" else "icc_unsqueeze"
    if axes == "NULL" and fn == "icc_unsqueeze":
        raise Unsupported("Unsqueeze without axes")
    return ["{", *pre, _set_dt(site), f"{fn}({site.outs[0]}, {site.ins[0]}, {axes});", "}"]


@emits("Flatten")
def _flatten(site: Site) -> list[str]:
    return [_set_dt(site), f"icc_flatten({site.outs[0]}, {site.ins[0]}, {int(site.node.attr('axis', 1))});"]


@emits("Expand")
def _expand(site: Site) -> list[str]:
    return [_set_dt(site), f"icc_expand({site.outs[0]}, {site.ins[0]}, {site.ins[1]});"]


@emits("Tile")
def _tile(site: Site) -> list[str]:
    return [_set_dt(site), f"icc_tile({site.outs[0]}, {site.ins[0]}, {site.ins[1]});"]


@emits("Transpose")
def _transpose(site: Site) -> list[str]:
    y = site.node.outputs[0]
    if not y.is_graph_output and y.uses and _transposed_weight(y) is not None \
            and all(user.op_type == "MatMul" and not user.domain and i == 1 for user, i in y.uses):
        return []  # only MatMuls read it, each packing the transposed weight itself (_matmul)
    rank = len(site.node.inputs[0].shape or ())
    perm = site.node.attr("perm", None) or list(range(rank))[::-1]
    if not perm:
        raise Unsupported("Transpose of unknown rank without perm")
    return ["{", f"static const int64_t perm[] = {{{', '.join(str(int(p)) for p in perm)}}};", _set_dt(site),
            f"icc_transpose({site.outs[0]}, {site.ins[0]}, perm);", "}"]


@emits("Concat")
def _concat(site: Site) -> list[str]:
    ins = [x for x in site.ins if x != "NULL"]
    return ["{", f"const icc_t *xs[] = {{{', '.join(ins)}}};", _set_dt(site),
            f"icc_concat({site.outs[0]}, xs, {len(ins)}, {int(site.node.attr('axis'))});", "}"]


@emits("Split")
def _split(site: Site) -> list[str]:
    n = site.node
    count, axis = len(n.outputs), int(n.attr("axis", 0))
    sizes = n.attr("split", None)
    given = site.ins[1] if site.has(1) else "NULL"
    lines = ["{", "int64_t sizes[64];"]
    if count > 64:
        raise Unsupported("Split into more than 64 pieces")
    if sizes is not None:
        lines.append(f"static const int64_t fixed[] = {{{', '.join(str(int(s)) for s in sizes)}}}; memcpy(sizes, fixed, sizeof(fixed));")
    else:
        lines.append(f"icc_split_sizes({site.ins[0]}, {axis}, {count}, {given}, sizes);")
    for i, out in enumerate(site.outs):
        if out != "NULL":
            lines.append(f"{_set_dt(site, i)} icc_split({out}, {site.ins[0]}, {axis}, sizes, {i});")
    return lines + ["}"]


@emits("Slice")
def _slice(site: Site) -> list[str]:
    ins = site.ins + ["NULL"] * (5 - len(site.ins))
    return [_set_dt(site), f"icc_slice({site.outs[0]}, {ins[0]}, {ins[1]}, {ins[2]}, {ins[3]}, {ins[4]});"]


@emits("Gather")
def _gather(site: Site) -> list[str]:
    table = site.node.inputs[0]
    if int(site.node.attr("axis", 0)) == 0 and _tied_table(table):
        n, k = table.const.shape
        offset = _panels(site.blob, table, True)
        return [f"icc_gather_panels({site.outs[0]}, {site.ins[1]}, {n}, {k}, W + {offset});"]
    return [_set_dt(site), f"icc_gather({site.outs[0]}, {site.ins[0]}, {site.ins[1]}, {int(site.node.attr('axis', 0))});"]


@emits("GatherElements")
def _gather_elements(site: Site) -> list[str]:
    return [_set_dt(site), f"icc_gather_elements({site.outs[0]}, {site.ins[0]}, {site.ins[1]}, {int(site.node.attr('axis', 0))});"]


@emits("GatherND")
def _gather_nd(site: Site) -> list[str]:
    return [_set_dt(site), f"icc_gather_nd({site.outs[0]}, {site.ins[0]}, {site.ins[1]}, {int(site.node.attr('batch_dims', 0))});"]


@emits("Range")
def _range(site: Site) -> list[str]:
    return [_set_dt(site), f"icc_range({site.outs[0]}, {site.ins[0]}, {site.ins[1]}, {site.ins[2]});"]


@emits("ConstantOfShape")
def _constant_of_shape(site: Site) -> list[str]:
    value = site.node.attr("value", None)
    array = np.zeros(1, np.float32) if value is None else value.numpy()
    if array.size != 1:
        raise Unsupported(f"ConstantOfShape whose value holds {array.size} elements (ONNX asks for one)")
    v = array.reshape(-1)[0]
    fill = f"{int(v)}" if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_ else "0"
    return [_set_dt(site), f"icc_constant_of_shape({site.outs[0]}, {site.ins[0]}, {lit(float(v))}, (int64_t){fill}LL);"]


@emits("Trilu")
def _trilu(site: Site) -> list[str]:
    k = site.ins[1] if site.has(1) else "NULL"
    return [_set_dt(site), f"icc_trilu({site.outs[0]}, {site.ins[0]}, {k}, {int(site.node.attr('upper', 1))});"]


@emits("CumSum")
def _cumsum(site: Site) -> list[str]:
    n = site.node
    return [_set_dt(site), f"icc_cumsum({site.outs[0]}, {site.ins[0]}, {site.ins[1]}, {int(n.attr('exclusive', 0))}, "
                           f"{int(n.attr('reverse', 0))});"]


_REDUCE = {"ReduceSum": "ICC_RSUM", "ReduceMean": "ICC_RMEAN", "ReduceMax": "ICC_RMAX", "ReduceMin": "ICC_RMIN"}


@emits(*_REDUCE)
def _reduce(site: Site) -> list[str]:
    n = site.node
    dtype_code(n.inputs[0])
    pre, axes = _axes_input(site, 1, "axes")
    return ["{", *pre, _set_dt(site), f"icc_reduce({site.outs[0]}, {site.ins[0]}, {axes}, {int(n.attr('keepdims', 1))}, "
                                      f"{_REDUCE[n.op_type]}, {int(n.attr('noop_with_empty_axes', 0))});", "}"]


@emits("Softmax")
def _softmax(site: Site) -> list[str]:
    _float_only(site, 0)
    return [_set_dt(site), f"icc_softmax({site.outs[0]}, {site.ins[0]}, {int(site.node.attr('axis', -1))});"]


# -- matmuls ---------------------------------------------------------------------------------------
def _transposed_weight(b: Value | None) -> Value | None:
    """The constant W when ``b`` is Transpose(W) of a constant 2-D W (the MatMul packs W^T), else None. Torch exports of a tied
    embedding and LM head read the table as MatMul(x, Transpose(table)), and constant folding keeps
    the Transpose (folding would store the table twice in the model): a MatMul packs its weight
    into the blob anyway, so packing W^T there costs nothing more, where a run-time Transpose
    copied the whole table (94 MB for a 32k x 768 LLaMA) on every decode step."""
    node = None if b is None else b.producer
    if node is None or node.op_type != "Transpose" or node.domain:
        return None
    w = node.inputs[0]
    if w is None or w.const is None or w.is_graph_input or len(w.const.shape) != 2:
        return None
    if list(node.attr("perm", None) or [1, 0]) != [1, 0]:
        return None
    return w


def _packed_operand(node: Node) -> tuple[Value, bool] | None:
    """(constant, transposed) whose pack_f32 panels the MatMul/Gemm ``node`` multiplies by (the
    weight is the constant, or its transpose when ``transposed``), None when it takes another path."""
    b = node.inputs[1] if len(node.inputs) > 1 else None
    if b is None or node.domain or node.op_type not in ("MatMul", "Gemm"):
        return None
    if b.const is not None and not b.is_graph_input and len(b.const.shape) == 2:
        return b, node.op_type == "Gemm" and bool(node.attr("transB", 0))
    source = _transposed_weight(b) if node.op_type == "MatMul" else None
    return None if source is None else (source, True)


def _tied_table(table: Value | None) -> bool:
    """Whether ``table`` is a constant float [N, K] that a MatMul/Gemm also reads transposed (a
    tied embedding and LM head): its Gather then reads rows from the head's panels, one copy."""
    if table is None or table.const is None or table.is_graph_input or table.dtype != DType.FLOAT:
        return False
    if len(table.const.shape) != 2:
        return False
    readers = [c for c in table.consumers() if c.op_type != "Transpose"]
    readers += [r for c in table.consumers() if c.op_type == "Transpose" for r in c.outputs[0].consumers()]
    return any((op := _packed_operand(r)) is not None and op[0] is table and op[1] for r in readers)


def _panels(blob: Blob, value: Value, transposed: bool) -> int:
    """Offset of the constant's pack_f32 panels (of its transpose when ``transposed``) in the blob:
    one entry per (constant, orientation), whoever asks first (the tied Gather or the head)."""
    rows, cols = value.const.shape

    def make() -> np.ndarray:
        w = value.const.numpy()
        return pack_f32(np.asarray(w.T if transposed else w, np.float32))

    k, n = (cols, rows) if transposed else (rows, cols)
    return blob.add(("f32panels", value.const, transposed), make, nbytes=-(-n // PANEL) * PANEL * k * 4)


@emits("MatMul")
def _matmul(site: Site) -> list[str]:
    _float_only(site, 0, 1)
    operand = _packed_operand(site.node)
    if operand is None:
        return [_set_dt(site), f"icc_matmul({site.outs[0]}, {site.ins[0]}, {site.ins[1]});"]
    return _gemm_const(site, operand, None)


@emits("Gemm")
def _gemm(site: Site) -> list[str]:
    n = site.node
    _float_only(site, 0)
    w, c = site.const(1), site.const(2) if site.has(2) else None
    cols = None if w is None or w.ndim != 2 else w.shape[0 if n.attr("transB", 0) else 1]
    bias_row = c is None or (c.size in (1, cols) and c.shape[-1:] in ((), (c.size,)))  # C broadcast as one row
    if n.attr("transA", 0) or cols is None or float(n.attr("alpha", 1.0)) != 1.0 or (site.has(2) and c is None) \
            or not bias_row:
        return _gemm_general(site)
    bias = None
    if c is not None:
        bias = np.broadcast_to(c.reshape(-1).astype(np.float32) * float(n.attr("beta", 1.0)), (cols,))
    return _gemm_const(site, (n.inputs[1], bool(n.attr("transB", 0))), bias)


def _gemm_general(site: Site) -> list[str]:
    """Gemm with an activation B, transA, alpha or a C that is not a bias row: the reference kernel
    (the packed-weight path above is for the constant B that linear layers have)."""
    n = site.node
    _float_only(site, 0, 1, *([2] if site.has(2) else []))
    c = site.ins[2] if site.has(2) else "NULL"
    return [_set_dt(site), f"icc_gemm_ref({site.outs[0]}, {site.ins[0]}, {site.ins[1]}, {c}, {int(n.attr('transA', 0))}, "
                           f"{int(n.attr('transB', 0))}, {lit(float(n.attr('alpha', 1.0)))}, {lit(float(n.attr('beta', 1.0)))});"]


def _gemm_const(site: Site, operand: tuple[Value, bool], bias: np.ndarray | None) -> list[str]:
    value, transposed = operand
    k, n = value.const.shape[::-1] if transposed else value.const.shape
    weight = _panels(site.blob, value, transposed)
    b = "NULL"
    if bias is not None:  # Gemm's C times beta
        key = ("bias", site.node.inputs[2].const, float(site.node.attr("beta", 1.0)))
        b = f"(const float *)(W + {site.blob.add(key, lambda: bias)})"
    x, o = site.ins[0], site.outs[0]
    return ["{", f"{o}->dt = ICC_F32; {o}->r = {x}->r; memcpy({o}->d, {x}->d, sizeof({o}->d)); {o}->d[{o}->r - 1] = {n};",
            f"if ({x}->d[{x}->r - 1] != {k}) icc_fail(\"MatMul: the input's last dim is not {k}\");",
            f"icc_alloc({o}); icc_gemm_f32(icc_numel({x}) / {k}, {n}, {k}, (const float *){x}->p, W + {weight}, {b}, (float *){o}->p);",
            "}"]


def _quant_weight(site: Site, codes: int, scales: int, zero_points: int, rests: int | None) -> tuple[int, int, int, int, int]:
    n = site.node
    k, cols, bits, block = int(n.attr("K")), int(n.attr("N")), int(n.attr("bits")), int(n.attr("block_size"))
    b, s = site.const(codes), site.const(scales)
    zp = site.const(zero_points) if site.has(zero_points) else None
    r = site.const(rests) if rests is not None and site.has(rests) else None
    if b is None or s is None or (site.has(zero_points) and zp is None) or (rests is not None and site.has(rests) and r is None):
        raise Unsupported(f"{n.op_type} with a non-constant weight")
    if bits not in (4, 8) or block < 16 or block & (block - 1):
        raise Unsupported(f"{n.op_type} with {bits}-bit blocks of {block} (kernels: 4 or 8 bits, power-of-two blocks >= 16)")
    blocks = -(-k // block)
    key = ("quant",) + tuple(n.inputs[i].const if i is not None and site.has(i) else None
                          for i in (codes, scales, zero_points, rests))
    rests = None if r is None else r.reshape(cols, blocks)
    nbytes = None if site.blob.pack else quant_nbytes(s, zp, rests, k, cols, bits, block)  # (the codes stay unread)
    offset = site.blob.add(key, lambda: pack_quant(b.reshape(cols, blocks, -1), s.reshape(cols, blocks), zp, rests,
                                                   k, cols, bits, block), nbytes=nbytes)
    return offset, k, cols, bits, block


@emits("MatMulQuant", domain=DOMAIN)
def _matmul_quant(site: Site) -> list[str]:
    _float_only(site, 0)
    offset, k, n, bits, block = _quant_weight(site, 1, 2, 3, 4)
    x, o = site.ins[0], site.outs[0]
    return ["{", f"{o}->dt = ICC_F32; {o}->r = {x}->r; memcpy({o}->d, {x}->d, sizeof({o}->d)); {o}->d[{o}->r - 1] = {n};",
            f"if ({x}->d[{x}->r - 1] != {k}) icc_fail(\"MatMulQuant: the input's last dim is not {k}\");",
            f"icc_alloc({o}); icc_matmul_q(icc_numel({x}) / {k}, {n}, {k}, {bits}, {block}, (const float *){x}->p, W + {offset}, (float *){o}->p);",
            "}"]


@emits("GatherQuant", domain=DOMAIN)
def _gather_quant(site: Site) -> list[str]:
    if site.node.inputs[1].dtype != DType.INT64:
        raise Unsupported("GatherQuant with non-int64 indices")
    offset, k, n, bits, block = _quant_weight(site, 0, 2, 3, None)
    ids, o = site.ins[1], site.outs[0]
    return ["{", f"{o}->dt = ICC_F32; icc_set_shape({o}, {ids}->r, {ids}->d); {o}->d[{o}->r++] = {k}; icc_alloc({o});",
            f"icc_gather_q(icc_numel({ids}), (const int64_t *){ids}->p, {n}, {k}, {bits}, {block}, W + {offset}, (float *){o}->p);",
            "}"]
