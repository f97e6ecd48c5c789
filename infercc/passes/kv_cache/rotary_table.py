"""A cached decoder's rotary factors as one constant table per model, indexed by cache slot.

Why: GroupQueryAttention rotates q and k itself (``do_rotary``) from ``cos_cache``/``sin_cache``
[positions, R/2], which removes the two rotary nodes per layer and the per-step cos/sin plumbing.
The kernel indexes the table by the token's slot in the cache (past length + s, the same for every
row of a batch), not by the model's own position ids, which left padding shifts per row.

That is exact because a rotary embedding is relative: with factors ``A cos(p*theta)`` and ``A
sin(p*theta)`` the score of query position m and key position n depends on m - n alone, and left
padding shifts every real token of a row by the same count. So the table must be such a rotation,
and it is checked to be one numerically (``cos(a+b) = cos a cos b - sin a sin b`` on sampled pairs)
instead of assumed: learned or decaying factors fail the check and keep their own rotary nodes.

How the table is made: the factors' computation (a cone of metadata ops over ``input_ids``'s
shape, ``attention_mask``, ``position_ids``) is evaluated once at compile time by ONNX Runtime for
one row of ``length`` tokens with no padding, whose positions are 0..length-1. A second evaluation
at a shorter length must give the same leading rows, so factors that depend on the sequence length
(dynamic NTK scaling) are refused as well.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ...ir import Graph, Value
from ...ir.onnx_export import export_node, export_tensor
from .contract import PAST_PREFIX
from .sequence import IDS_NAME, MASK_NAME

#: Table length when the model does not say its context length: positions past it fail in the
#: kernel with a clear error rather than reading out of range (ORT checks the table's length).
DEFAULT_LENGTH = 8192
#: Tables longer than this are not built (memory and compile time); the rotary stays separate.
MAX_LENGTH = 1 << 17
_SHORT = 64


def rotary_table(graph: Graph, cos: Value, sin: Value, rotary_dim: int, interleaved: int, length: int,
                 opset: int) -> tuple[np.ndarray, np.ndarray] | str:
    """Half-width tables (``cos_cache``, ``sin_cache``) [length, rotary_dim / 2], or why not."""
    if length > MAX_LENGTH:
        return f"a {length}-position table is over the {MAX_LENGTH} limit"
    full = _evaluate(graph, [cos, sin], length, opset)
    if isinstance(full, str):
        return full
    short = _evaluate(graph, [cos, sin], min(_SHORT, length), opset)
    if isinstance(short, str):
        return short
    tables = []
    for long_f, short_f in zip(full, short):
        if long_f.shape[-1] != rotary_dim or long_f.size != length * rotary_dim:
            return f"the rotary factors evaluate to shape {list(long_f.shape)}, not [1, {length}, {rotary_dim}]"
        rows = long_f.reshape(length, rotary_dim).astype(np.float32)
        head = short_f.reshape(-1, rotary_dim)
        if not np.allclose(rows[: len(head)], head, rtol=1e-5, atol=1e-6):
            return "the rotary factors depend on the sequence length (dynamic scaling), not on the position alone"
        tables.append(rows[:, 0::2] if interleaved else rows[:, : rotary_dim // 2])
    cos_t, sin_t = tables
    return (cos_t, sin_t) if (reason := _not_a_rotation(cos_t, sin_t)) is None else reason


def _not_a_rotation(cos_t: np.ndarray, sin_t: np.ndarray) -> str | None:
    """Why the rows are not A*cos(p*theta), A*sin(p*theta) for one amplitude A and frequencies
    theta (the angle-sum identities on sampled position pairs), else None."""
    amplitude = cos_t[0].astype(np.float64)
    if np.any(np.abs(sin_t[0]) > 1e-6 * np.maximum(1.0, np.abs(amplitude))) or np.any(amplitude <= 0):
        return "the rotary factors at position 0 are not (A, 0): not a rotation by the position"
    n = len(cos_t)
    pairs = [(m, k) for m in (1, 2, 3, 7, 31, 100, 511) for k in (1, 5, 64, 333, 1000) if m + k < n]
    c, s = cos_t.astype(np.float64), sin_t.astype(np.float64)
    for m, k in pairs:
        # A cos(a+b) = (A cos a * A cos b - A sin a * A sin b) / A, likewise for sin
        want_c = (c[m] * c[k] - s[m] * s[k]) / amplitude
        want_s = (s[m] * c[k] + c[m] * s[k]) / amplitude
        tol = 1e-4 * amplitude * max(1.0, (m + k) / 64)  # float32 angle rounding grows with the position
        if np.any(np.abs(want_c - c[m + k]) > tol) or np.any(np.abs(want_s - s[m + k]) > tol):
            return f"the rotary factors are not a rotation by the position (angle sum fails at {m} + {k})"
    return None


def _evaluate(graph: Graph, values: list[Value], length: int, opset: int) -> list[np.ndarray] | str:
    """``values`` computed by ONNX Runtime for one unpadded row of ``length`` tokens."""
    nodes, inputs = [], {}
    seen: set[int] = set()
    stack = list(values)
    while stack:
        v = stack.pop()
        if id(v) in seen or v.is_const:
            continue
        seen.add(id(v))
        if v.is_graph_input:
            inputs[v.name] = v
            continue
        node = v.producer
        if node is None or node.graph is not graph or node.domain or any(True for _ in node.subgraphs()):
            return f"%{v.name} is not computed by standard ONNX ops of the main graph"
        nodes.append(node)
        stack.extend(x for x in node.inputs if x is not None)
    feeds = {}
    for name, v in inputs.items():
        array = _feed(name, v, length)
        if array is None:
            return f"the rotary factors read input {name!r}, whose values a position table cannot assume"
        feeds[name] = array
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    nodes.sort(key=lambda n: order[id(n)])
    consts = {id(x): x for n in nodes for x in n.inputs if x is not None and x.is_const}
    proto = helper.make_graph(
        [export_node(n, True) for n in nodes], "rotary_table",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in feeds.items()],
        [onnx.ValueInfoProto(name=v.name) for v in values],
        [export_tensor(x.const, x.name, True) for x in consts.values()],
    )
    model = helper.make_model(proto, opset_imports=[helper.make_opsetid("", opset)])
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failure is an answer here (no table): nothing for the user's console
    run_options = ort.RunOptions()
    run_options.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return [np.asarray(r) for r in session.run([v.name for v in values], feeds, run_options)]
    except Exception as exc:  # noqa: BLE001 - any failure means: no table, keep the rotary nodes
        return f"evaluating the rotary factors failed ({type(exc).__name__}: {str(exc)[:200]})"


def _feed(name: str, v: Value, length: int) -> np.ndarray | None:
    dtype = v.dtype.numpy if v.dtype is not None else np.int64
    if name in (IDS_NAME, MASK_NAME):
        return (np.zeros if name == IDS_NAME else np.ones)((1, length), dtype)
    if name == "position_ids":
        return np.arange(length, dtype=dtype)[None, :]
    if name.startswith(PAST_PREFIX) and v.shape is not None and len(v.shape) == 4 and all(
            isinstance(d, int) for d in (v.shape[1], v.shape[3])):
        return np.zeros((1, v.shape[1], 0, v.shape[3]), dtype)
    return None

