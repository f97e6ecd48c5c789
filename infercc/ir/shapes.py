"""Shape and type inference: onnx's inference first, then our own rules where it gives up
(custom-domain ops, reshapes whose targets are computed at run time)."""

from __future__ import annotations

from collections.abc import Callable

import onnx

from .dtypes import DType
from .graph import Graph
from .model import Model
from .node import Node
from .onnx_export import sent_type, to_proto
from .symbolic import arith, broadcast, dim_values, range_length, reshape_dims
from .value import Shape

#: A rule returns (dtype, shape) per output, or None when it cannot tell.
ShapeRule = Callable[[Node], "list[tuple[DType | None, Shape]] | None"]
_RULES: dict[tuple[str, str], ShapeRule] = {}

_ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Relu", "Sigmoid", "Tanh", "Erf", "Sqrt",
    "Neg", "Exp", "Log", "Abs", "Reciprocal", "Softmax", "Gelu", "Cos", "Sin", "Identity", "Dropout",
}


def shape_rule(domain: str, *op_types: str) -> Callable[[ShapeRule], ShapeRule]:
    """Register how to infer the outputs of ops onnx does not know (passes register their own)."""

    def register(fn: ShapeRule) -> ShapeRule:
        for op in op_types:
            _RULES[(domain, op)] = fn
        return fn

    return register


def infer_shapes(model: Model) -> list[str]:
    """Fill in dtype/shape of every value we can. Returns notes about what could not be inferred
    (kept for diagnostics; missing shapes never make a model invalid)."""
    notes: list[str] = []
    # onnx's data propagation computes the values of shape subgraphs, materializing them: a Range
    # over a fixed input length of 2^31 hangs it. Beyond DATA_PROP_MAX_DIM it is left off (our own
    # rules still propagate symbolic lengths).
    largest = max((d for v in model.graph.inputs for d in (v.shape or ()) if isinstance(d, int)), default=0)
    data_prop = largest <= DATA_PROP_MAX_DIM
    if not data_prop:
        notes.append(f"an input declares an axis of {largest} entries: onnx's data propagation is off")
    # onnx's rules and ours alternate: a shape only our rules find (a Range over a symbolic length)
    # feeds ops only onnx's rules cover (the Unsqueeze after it), whose results feed ours again. So
    # onnx runs again, on our shapes, while our propagation still adds something (a few rounds).
    for _ in range(_MAX_ROUNDS):
        try:
            proto = to_proto(model, with_data=False)
            inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=data_prop)
            _merge(model.graph, inferred.graph)
        except Exception as exc:  # onnx inference is best effort; ours still runs
            notes.append(f"onnx shape inference failed: {str(exc).splitlines()[0][:200]}")
            _propagate(model.graph)
            break
        if not _propagate(model.graph):
            break
    unknown = [v.name for n in model.graph.nodes for v in n.outputs if v.dtype is None and v.uses]
    if unknown:
        notes.append(f"{len(unknown)} values have no inferred type (first: {unknown[0]})")
    return notes


_MAX_ROUNDS = 4
#: Fixed input lengths up to which onnx's data propagation runs (see infer_shapes).
DATA_PROP_MAX_DIM = 1 << 20


def _merge(graph: Graph, gp: onnx.GraphProto) -> None:
    infos = {i.name: i for i in list(gp.value_info) + list(gp.output) + list(gp.input)}
    for value in graph.values():
        info = infos.get(value.name)
        if info is None or not info.type.HasField("tensor_type"):
            continue
        sent = sent_type(value)  # what our export gave onnx: returned unchanged, it has nothing new
        if sent is not None and sent == info.type:
            continue
        tt = info.type.tensor_type
        if value.dtype is None and tt.elem_type:
            value.dtype = DType(tt.elem_type)
        if tt.HasField("shape"):
            new = tuple(
                d.dim_value if d.HasField("dim_value") else (_named(d.dim_param) if d.HasField("dim_param") else None)
                for d in tt.shape.dim
            )
            value.shape = _more_specific(value.shape, new)
    nodes = {n.name: n for n in gp.node if n.name}
    for node in graph.nodes:
        np_ = nodes.get(node.name)
        if np_ is None:
            continue
        subs = list(node.subgraphs())
        protos = [a.g for a in np_.attribute if a.type == onnx.AttributeProto.GRAPH]
        for sub, sp in zip(subs, protos):
            _merge(sub, sp)


def _named(param: str) -> str | None:
    """onnx invents 'unk__N' names for dims it could not infer: treat them as unknown so our own
    propagation may still find the real value."""
    return None if param.startswith("unk__") else param


def _more_specific(old: Shape, new: Shape) -> Shape:
    if old is None:
        return new
    if new is None or len(old) != len(new):
        return old
    return tuple(o if isinstance(o, int) or (isinstance(o, str) and not isinstance(n, int)) else n for o, n in zip(old, new))


def _propagate(graph: Graph) -> bool:
    """Apply our rules in graph order; True if they made any dtype or shape more specific."""
    memo: dict[int, object] = {}
    changed = False
    for node in graph.nodes:
        if all(v.dtype is not None and v.shape is not None and None not in v.shape for v in node.outputs):
            continue
        result = _infer_node(node, memo)
        if not result:
            continue
        for value, (dtype, shape) in zip(node.outputs, result):
            if value.dtype is None and dtype is not None:
                value.dtype, changed = dtype, True
            if shape is not None:
                new = _more_specific(value.shape, shape)
                changed = changed or new != value.shape
                value.shape = new
    return changed


def _infer_node(node: Node, memo: dict) -> list[tuple[DType | None, Shape]] | None:
    rule = _RULES.get((node.domain, node.op_type))
    if rule is not None:
        return rule(node)
    if node.domain:
        return None
    first = node.inputs[0] if node.inputs else None
    op = node.op_type
    if op in ("Reshape", "Expand") and first is not None:
        target = dim_values(node.inputs[1], memo)
        if target is None:
            return [(first.dtype, None)]
        if op == "Reshape":
            return [(first.dtype, reshape_dims(first.shape, target, node.attr("allowzero", 0)))]
        if first.shape is not None:
            return [(first.dtype, broadcast(first.shape, tuple(target)))]
    if op == "ConstantOfShape":
        target = dim_values(node.inputs[0], memo)
        value = node.attr("value")
        return [(value.dtype if value is not None else DType.FLOAT, tuple(target) if target is not None else None)]
    if op == "Shape" and first is not None:
        values = dim_values(node.outputs[0], memo)
        return [(DType.INT64, (len(values),) if values is not None else None)]
    if op == "Tile" and first is not None and first.shape is not None:
        # onnx's rule leaves a symbolic dim unknown even when it is repeated once
        reps = dim_values(node.inputs[1], memo)
        if reps is not None and len(reps) == len(first.shape):
            return [(first.dtype, tuple(arith("Mul", d, r) for d, r in zip(first.shape, reps)))]
    if op == "Slice" and len(node.inputs) >= 3 and first is not None and first.shape is not None:
        return [(first.dtype, _slice_shape(first.shape, node, memo))]
    if op == "Range" and len(node.inputs) == 3:
        # torch.arange(seq): onnx's rule needs constant bounds
        length = range_length(*(dim_values(v, memo) for v in node.inputs))
        return [(first.dtype if first is not None else None, (length,))]
    if op == "Cast" and first is not None:
        return [(DType(node.attr("to", 0)) or None, first.shape)]
    if op in _ELEMENTWISE:
        ins = [v for v in node.inputs if v is not None]
        dtype = next((v.dtype for v in ins[-2:] if v.dtype is not None), None) if op == "Where" else first.dtype
        shapes = [v.shape for v in ins]
        return [(dtype, broadcast(*shapes) if all(s is not None for s in shapes) else None)]
    return None


def _slice_shape(shape: tuple, node: Node, memo: dict) -> Shape:
    """Slice keeps every axis it does not slice: onnx's rule, when the starts or ends are computed
    (x[:, -seq:] with seq read from another input), leaves all dims unknown, the batch included.
    A sliced axis gets its size where the bounds and the dim are numbers, else stays unknown."""
    rank = len(shape)
    starts, ends = dim_values(node.inputs[1], memo), dim_values(node.inputs[2], memo)
    axes_in = node.inputs[3] if len(node.inputs) > 3 else None
    steps_in = node.inputs[4] if len(node.inputs) > 4 else None
    if axes_in is None:
        axes = list(range(len(starts))) if starts is not None else None
    else:
        axes = dim_values(axes_in, memo)
    if axes is None or not all(isinstance(a, int) and -rank <= a < rank for a in axes):
        return None
    axes = [a % rank for a in axes]
    steps = dim_values(steps_in, memo) if steps_in is not None else [1] * len(axes)
    out = list(shape)
    for k, axis in enumerate(axes):
        bounds = [v[k] if v is not None and len(v) == len(axes) else None for v in (starts, ends, steps)]
        dim = shape[axis]
        if isinstance(dim, int) and all(isinstance(b, int) for b in bounds) and bounds[2] != 0:
            out[axis] = len(range(*slice(*bounds).indices(dim)))
        else:
            out[axis] = None
    return tuple(out)
