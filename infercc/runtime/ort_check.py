"""What onnxruntime would refuse, found at compile time; and onnxruntime's own errors as ours.

``check_ops`` asks the operator schema registry (onnxruntime's own, which is what its graph
resolution uses; onnx's when this build of onnxruntime does not expose it) about every node: is the
op known in its domain, at the imported opset version, with that many inputs and outputs, with its
required attributes. That costs milliseconds; creating a session to find out costs as much as loading
the model, so compile() does the former and the session stays lazy.

``ort_error`` turns an onnxruntime exception into one of ours, keeping the first line of its text
and naming the node (and its op) where onnxruntime names one.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Collection, Iterable

import onnxruntime as ort
from onnx import AttributeProto, defs
from onnxruntime.capi import onnxruntime_pybind11_state as _state

from ..errors import InferccError, ModelLoadError, RunError
from ..ir import DType, Model, Node

#: Every exception class onnxruntime's Python binding raises (Fail, InvalidArgument, InvalidGraph,
#: RuntimeException, NotImplemented, EPFail, ...), and UnicodeDecodeError: the binding raises that
#: instead when its message quotes bytes of the model that are not UTF-8.
ORT_ERRORS: tuple[type[Exception], ...] = tuple(
    c for c in vars(_state).values() if isinstance(c, type) and issubclass(c, Exception)
) + (UnicodeDecodeError,)
#: ... and what a run may raise besides: the binding's own failures to convert a feed (a numpy type
#: onnxruntime has no tensor type for, e.g. a float8 input fed from numpy) are plain RuntimeErrors.
ORT_RUN_ERRORS: tuple[type[Exception], ...] = (*ORT_ERRORS, RuntimeError)

#: infercc's canonical ops: the passes lower them before anything runs.
_CANONICAL = "ai.infercc"


@functools.lru_cache(maxsize=1)
def _registry() -> dict[tuple[str, str], list]:
    """(domain, op) -> schemas of every version, oldest first."""
    get = getattr(_state, "get_all_operator_schema", None)
    schemas = get() if get is not None else defs.get_all_schemas_with_history()
    found: dict[tuple[str, str], list] = {}
    for s in schemas:
        found.setdefault((s.domain, s.name), []).append(s)
    for versions in found.values():
        versions.sort(key=lambda s: s.since_version)
    return found


@functools.lru_cache(maxsize=1)
def _domains() -> dict[str, list[str]]:
    """Known domains -> their op names (onnx's preview domains included: known, not implemented)."""
    names: dict[str, list[str]] = {}
    for domain, op in _registry():
        names.setdefault(domain, []).append(op)
    for s in defs.get_all_schemas_with_history():
        names.setdefault(s.domain, [])
    return names


def check_ops(model: Model, skip: Collection[tuple[str, str]] = ()) -> None:
    """Raise ModelLoadError for the first node onnxruntime's schema check would refuse; ``skip``:
    (domain, op type) pairs not to check (custom ops with a C kernel, codegen/custom.py)."""
    functions = {(f.domain, f.name) for f in model.functions}
    imports = dict(model.opset_imports)
    if "ai.onnx" in imports:
        imports.setdefault("", imports["ai.onnx"])
    for node in model.graph.walk():
        if (node.domain, node.op_type) in functions or node.domain == _CANONICAL or (node.domain, node.op_type) in skip:
            continue
        domain = "" if node.domain == "ai.onnx" else node.domain
        found = _problem(node, domain, imports.get(domain))
        if found is not None:
            problem, fix = found
            shown = repr(domain) if domain else "ai.onnx"
            raise ModelLoadError(
                f"{_label(node)} in domain {shown}: {problem}, so onnxruntime {ort.__version__} would refuse the "
                f"model at its first run: {fix}."
            )


_MALFORMED = "the model is malformed; re-export it"


def _problem(node: Node, domain: str, version: int | None) -> tuple[str, str] | None:
    """(what is wrong, the fix) for a node the schema registry refuses, else None."""
    op = node.op_type
    known = _domains()
    if domain not in known:
        return (
            f"neither onnx nor onnxruntime knows operator domain {domain!r}",
            "replace the op with standard ONNX ops, or run the model with the runtime it was written for",
        )
    versions = _registry().get((domain, op))
    if not versions:
        near = difflib.get_close_matches(op, known[domain], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return f"there is no operator {op!r} in this domain{hint}", "fix the op type, or re-export the model"
    usable = [s for s in versions if version is None or s.since_version <= version]
    if not usable:
        return (
            f"{op} first appears in opset {versions[0].since_version} of this domain but the model imports "
            f"version {version}",
            f"re-export with opset >= {versions[0].since_version}",
        )
    schema = usable[-1]
    n_in, n_out = len(node.inputs), len(node.outputs)
    for what, n, low, high in (("inputs", n_in, schema.min_input, schema.max_input),
                               ("outputs", n_out, schema.min_output, schema.max_output)):
        if not low <= n <= high:
            expected = f"{low}" if low == high else f"{low} to {high}" if high < 2**31 - 1 else f"at least {low}"
            return f"{op}-{schema.since_version} takes {expected} {what} but the node has {n}", _MALFORMED
    for i, (formal, value) in enumerate(zip(schema.inputs, node.inputs)):
        if formal.option.name == "Variadic":
            break
        if value is None and formal.option.name == "Single":
            return f"input {i} ({formal.name}) of {op}-{schema.since_version} is required but left empty", _MALFORMED
    for attr in node.attrs.values():
        values = attr.value if isinstance(attr.value, list) else [attr.value]
        if any(isinstance(v, bytes) for v in values):
            return f"attribute {attr.name!r} holds bytes that are not UTF-8 text ({values[0]!r:.40})", _MALFORMED
    for attr in node.attrs.values():
        formal = schema.attributes.get(attr.name)
        if formal is not None and not attr.ref_attr_name and int(attr.type) != int(formal.type):
            expected = AttributeProto.AttributeType.Name(int(formal.type))
            return (f"attribute {attr.name!r} of {op}-{schema.since_version} must be {expected}, but the node "
                    f"holds type {int(attr.type)}"), _MALFORMED
        if attr.name in _DTYPE_ATTRS and isinstance(attr.value, int) and attr.value not in _DTYPES:
            return (f"attribute {attr.name!r} of {op}-{schema.since_version} is {attr.value}, which is no tensor "
                    f"data type (onnx.TensorProto.DataType)"), _MALFORMED
    missing = sorted(name for name, attr in schema.attributes.items() if attr.required and name not in node.attrs)
    if missing:
        return f"{op}-{schema.since_version} requires attribute(s) {', '.join(missing)}, which the node lacks", _MALFORMED
    return None


#: Attributes that hold an element type (Cast's ``to``, EyeLike's ``dtype``...) and the values they may take.
_DTYPE_ATTRS = ("to", "dtype", "output_dtype")
_DTYPES = frozenset(int(t) for t in DType)


def _label(node: Node) -> str:
    return f"node {node.name!r} ({node.op_type})" if node.name else f"an unnamed {node.op_type} node"


# ----------------------------------------------------------------------------- onnxruntime's errors
#: Ways onnxruntime's messages name a node.
_NODE_PATTERNS = [
    re.compile(p) for p in (
        r"Name:'([^']*)'", r"node with name '([^']*)'", r"In Node, \(\"([^\"]*)\"", r"Node \(([^)]*)\)",
        r"Node\(([^)]*)\)", r"in node \(([^)]*)\)",
    )
]
_OP_PATTERNS = [
    re.compile(p) for p in (
        r"Op \(([^)]*)\)", r"running (\w+) node", r"schema\(\w*::(\w+):", r"Optype \((\w+)\)", r"operator \((\w+)\)",
    )
]


def ort_error(exc: Exception, model: Model, *, loading: bool) -> InferccError:
    """``exc`` from onnxruntime as a ModelLoadError (session creation: the model is refused) or a
    RunError (a run failed), naming the node and its op where onnxruntime's text names a node."""
    text = str(exc)
    if isinstance(exc, UnicodeDecodeError):
        text = "onnxruntime's error message quotes text of the model that is not valid UTF-8"
    first = " ".join(text.strip().splitlines()[0].split()) if text.strip() else type(exc).__name__
    if len(first) > 600:
        first = first[:600] + "..."
    where = _node_in(text, model.graph.walk())
    if loading:
        return ModelLoadError(
            f"onnxruntime refused the model{where}: {first}. Fix that node or re-export the model; if the "
            "original file runs in onnxruntime, compile with optimize=False and report the difference as an infercc bug."
        )
    return RunError(
        f"onnxruntime failed running the model{where}: {first}. Check the inputs' shapes and values against "
        "the model's signature (CompiledModel.inputs); if they fit, the model itself is wrong there."
    )


def _node_in(text: str, nodes: Iterable[Node]) -> str:
    ops = {n.name: n.op_type for n in nodes if n.name}
    names = [m.group(1) for p in _NODE_PATTERNS for m in p.finditer(text)]
    op = next((m.group(1) for p in _OP_PATTERNS for m in [p.search(text)] if m), None)
    if not names:
        return f" at a node of type {op}" if op else ""
    name = next((n for n in names if n in ops), names[0])
    op = ops.get(name) or op
    return f" at node {name!r} ({op})" if op else f" at node {name!r}"
