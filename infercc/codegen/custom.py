"""User C kernels: ``register_kernel(op_type, domain, template)`` gives an op (a custom-domain op of
the user's own, or a standard one) a C implementation in the generated-C runtime.

Why a jinja2 template and not a C function pointer: the generated runtime is one translation unit
built per model, so a user kernel must be C source the code generator can place into it, exactly
like ours (``ops.py``). The template is rendered once per node into C statements placed inside
``icc_run``, wrapped in their own ``{ ... }`` block (locals do not clash between nodes).

The template's context (all of it generated, none of it text taken from the model):

* ``inputs`` / ``outputs``: C expressions of type ``icc_t *`` (``(&V[3])``), or ``NULL`` for an
  input or output the node leaves empty; ``n_inputs`` / ``n_outputs`` their counts.
* ``attrs``: the node's numeric attributes (with ``attributes=`` defaults for the ones it omits)
  as C literals: an int renders as an integer, a float as a float literal (``2.5f``, ``INFINITY``),
  a list as a brace initializer (``{1, 2, 3}``) that can also be iterated and indexed in the
  template. String, tensor and graph attributes are never given to the template: model text cannot
  reach the C source.
* ``input_dtypes``: the element-type codes of the inputs as far as the compiler knows them
  (``ICC_F32`` = 1, ``ICC_I64`` = 7, ...; 0 unknown), for specializing at generation time.

The C contract (``kernels/tensor.h``): an ``icc_t`` is ``{void *p; int64_t d[8]; int r; int dt;
int owned; int64_t cap}``; read an input's rank ``x->r``, dims ``x->d[i]``, element type ``x->dt``
(``ICC_F32``, ``ICC_F16``, ``ICC_I64``, ``ICC_I32``, ``ICC_I8``, ``ICC_U8``, ``ICC_BOOL``) and data
``x->p``; ``icc_numel(x)`` counts elements. Produce an output by setting ``y->dt``, ``y->r`` and
``y->d`` then calling ``icc_alloc(y)`` (64-byte aligned: the buffer slot the static memory plan
gave the output, which other values reuse after the output's last reader; never free it). A
temporary of the kernel's own (a local ``icc_t``) gets a heap buffer from ``icc_alloc``:
``icc_release`` it. Report a problem with ``icc_fail("message")``: the run stops after this node
and the message reaches Python as the run's error. Weights (constant inputs) are read-only: never write
through an input's pointer. ``helpers`` is C source (functions, macros) placed once in the
translation unit before ``icc_run``, for code several nodes share.

A registration applies to graphs compiled after it (``CompiledModel`` keeps a snapshot of the
registry), and overrides the built-in kernel of a standard op. A custom-domain op that has a kernel
here is kept in the graph and counts as covered for ``backend="auto"``; if the model still ends up
on ONNX Runtime (no compiler, a build failure), running it fails with an error naming the op.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import jinja2
import numpy as np

from ..errors import ConfigError
from ..ir import DType, Model
from .ops import DT, Site, Unsupported, lit

#: An op type is a C-like identifier; a domain a dotted name (``com.example.ops``).
_OP_TYPE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")
_DOMAIN = re.compile(r"([A-Za-z_][A-Za-z0-9_\-]{0,63}(\.[A-Za-z_][A-Za-z0-9_\-]{0,63}){0,7})?")
#: Domains whose ops are not the user's to define here.
_RESERVED = {"ai.onnx": "use domain='' for standard ONNX ops", "ai.infercc": "infercc's canonical ops are internal"}
_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False)

Number = int | float


class CInt(int):
    """An int attribute: renders as a C integer literal."""

    def __str__(self) -> str:
        return str(int(self)) + ("LL" if not -2**31 <= self < 2**31 else "")


class CFloat(float):
    """A float attribute: renders as a C float literal (``lit``), infinities and NaN spelled out."""

    def __str__(self) -> str:
        return lit(float(self))


class CList(list):
    """A list attribute: iterable and indexable in the template, renders as ``{a, b, c}``."""

    def __str__(self) -> str:
        return "{" + ", ".join(str(v) for v in self) + "}"


def _literal(value: object, what: str) -> CInt | CFloat | CList:
    """``value`` as a C literal, or ConfigError when it is not a number or a list of numbers."""
    if isinstance(value, (bool, np.bool_)):
        return CInt(int(value))
    if isinstance(value, (int, np.integer)):
        return CInt(int(value))
    if isinstance(value, (float, np.floating)):
        return CFloat(float(value))
    if isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float, np.number)) and not isinstance(v, np.complexfloating) for v in value):
        return CList(_literal(v, what) for v in value)
    raise ConfigError(f"{what} is a {type(value).__name__}: kernel attributes are numbers or lists of numbers only "
                      "(text never reaches the C source); give a number")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One registered kernel: what ``register_kernel`` was given, the template compiled."""

    op_type: str
    domain: str
    template: str
    helpers: str
    attributes: tuple[tuple[str, CInt | CFloat | CList], ...]
    like_input: int | None
    compiled: jinja2.Template = dataclasses.field(compare=False, repr=False)

    @property
    def label(self) -> str:
        return f"{self.domain}::{self.op_type}" if self.domain else self.op_type

    def render(self, ins: list[str], outs: list[str], attrs: Mapping[str, object], dtypes: list[int]) -> list[str]:
        """The C statements for one node (inside a block of their own)."""
        text = self.compiled.render(inputs=ins, outputs=outs, n_inputs=len(ins), n_outputs=len(outs),
                                    attrs=dict(attrs), input_dtypes=dtypes)
        return ["{", *(line for line in text.splitlines() if line.strip()), "}"]

    def emitter(self, site: Site) -> list[str]:
        """The ``ops.TABLE`` emitter signature: the node's numeric attributes, validated."""
        attrs: dict[str, object] = dict(self.attributes)
        skipped = []
        for name, attr in site.node.attrs.items():
            if not _OP_TYPE.fullmatch(name):
                continue  # not a name a template can refer to: skipped, never rendered
            try:
                attrs[name] = _literal(attr.value, f"attribute {name!r}")
            except ConfigError:
                skipped.append(name)
        dtypes = [DT.get(v.dtype, 0) if v is not None else 0 for v in site.node.inputs]
        try:
            return self.render(site.ins, site.outs, attrs, dtypes)
        except jinja2.UndefinedError as exc:
            why = f" ({', '.join(skipped)}: not numeric, so not given to templates)" if skipped else ""
            raise Unsupported(f"the {self.label} kernel's template failed: {exc}{why}") from None
        except Exception as exc:  # a template's own error ({{ 1/0 }}, a bad filter) is the kernel's fault
            raise Unsupported(f"the {self.label} kernel's template failed: {type(exc).__name__}: {exc}") from None


_LOCK = threading.Lock()
_KERNELS: dict[tuple[str, str], Kernel] = {}


def register_kernel(op_type: str, domain: str = "", template: str = "", *, helpers: str | None = None,
                    attributes: Mapping[str, Number | Sequence[Number]] | None = None, like_input: int | None = 0,
                    n_inputs: int = 1, n_outputs: int = 1, check: bool = True) -> Kernel:
    """Register a C kernel for ``domain::op_type`` (see the module docstring for the template's
    context and the C contract). Returns the registered Kernel.

    ``attributes``: default values of numeric attributes a node may omit (the template may use
    ``attrs.NAME`` for these always). ``like_input``: a custom-domain op's outputs get this
    input's element type and shape at compile time (so the ops after it know their types); None
    leaves them unknown. ``n_inputs`` / ``n_outputs``: the arity used to check the template;
    ``check``: render the template and compile it with the kernels (about a second) so a mistake
    is reported now, naming the op, instead of when a model runs.
    """
    if not isinstance(op_type, str) or not _OP_TYPE.fullmatch(op_type):
        raise ConfigError(f"register_kernel: op_type {op_type!r} is not an identifier ([A-Za-z_][A-Za-z0-9_]*, at most "
                          "100 characters); pass the op type exactly as the model's nodes spell it")
    if not isinstance(domain, str) or not _DOMAIN.fullmatch(domain):
        raise ConfigError(f"register_kernel({op_type!r}): domain {domain!r} is not a dotted name like 'com.example'; "
                          "pass '' for standard ONNX ops or the domain the model's nodes use")
    if domain in _RESERVED:
        raise ConfigError(f"register_kernel({op_type!r}): domain {domain!r} is not allowed: {_RESERVED[domain]}")
    label = f"{domain}::{op_type}" if domain else op_type
    if not isinstance(template, str) or not template.strip():
        raise ConfigError(f"register_kernel({label}): template must be a non-empty jinja2 string of C statements")
    if helpers is not None and not isinstance(helpers, str):
        raise ConfigError(f"register_kernel({label}): helpers must be C source text or None, not {type(helpers).__name__}")
    if like_input is not None and (not isinstance(like_input, int) or like_input < 0):
        raise ConfigError(f"register_kernel({label}): like_input must be an input index >= 0 or None")
    defaults = []
    for name, value in (attributes or {}).items():
        if not isinstance(name, str) or not _OP_TYPE.fullmatch(name):
            raise ConfigError(f"register_kernel({label}): attribute name {name!r} is not an identifier")
        defaults.append((name, _literal(value, f"register_kernel({label}): attribute {name!r}")))
    try:
        compiled = _ENV.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"register_kernel({label}): the template is not valid jinja2 (line {exc.lineno}: "
                          f"{exc.message}); fix the template") from None
    kernel = Kernel(op_type, domain, template, helpers or "", tuple(defaults), like_input, compiled)
    if check:
        _check(kernel, n_inputs, n_outputs)
    with _LOCK:
        _KERNELS[(domain, op_type)] = kernel
    return kernel


def unregister_kernel(op_type: str, domain: str = "") -> bool:
    """Remove a registration (graphs compiled before keep it); whether there was one."""
    with _LOCK:
        return _KERNELS.pop((domain, op_type), None) is not None


def snapshot() -> dict[tuple[str, str], Kernel]:
    """The registry now: what a model compiled now runs with."""
    with _LOCK:
        return dict(_KERNELS)


def emitters(kernels: Mapping[tuple[str, str], Kernel]) -> dict[tuple[str, str], object]:
    return {key: kernel.emitter for key, kernel in kernels.items()}


def helpers_for(model: Model, kernels: Mapping[tuple[str, str], Kernel]) -> str:
    """The helpers of the kernels ``model`` uses, once each, in a fixed order."""
    used = sorted({(n.domain or "", n.op_type) for n in model.graph.nodes} & set(kernels))
    return "\n".join(f"/* helpers of the {kernels[k].label} kernel */\n{kernels[k].helpers}"
                     for k in used if kernels[k].helpers)


def custom_ops(model: Model, kernels: Mapping[tuple[str, str], Kernel]) -> set[tuple[str, str]]:
    """The registered non-standard ops (domain not ''), which onnxruntime's schema check must skip."""
    return {key for key in kernels if key[0]} & {(n.domain or "", n.op_type) for n in model.graph.walk()}


def annotate(model: Model, kernels: Mapping[tuple[str, str], Kernel]) -> None:
    """Give custom-domain ops' untyped outputs the type and shape of input ``like_input``."""
    for node in model.graph.walk():
        kernel = kernels.get((node.domain or "", node.op_type))
        if kernel is None or not node.domain or kernel.like_input is None:
            continue
        if kernel.like_input >= len(node.inputs) or node.inputs[kernel.like_input] is None:
            continue
        like = node.inputs[kernel.like_input]
        for out in node.outputs:
            if out is not None and out.dtype is None and like.dtype is not None:
                out.dtype, out.shape = like.dtype, like.shape


def _check(kernel: Kernel, n_inputs: int, n_outputs: int) -> None:
    """ConfigError naming the op when the template does not render or the C does not compile."""
    from .build import NATIVE, BuildError, compiler
    from .emit import kernels_source

    ins = [f"(&V[{i}])" for i in range(n_inputs)]
    outs = [f"(&V[{n_inputs + i}])" for i in range(n_outputs)]
    try:
        lines = kernel.render(ins, outs, dict(kernel.attributes), [DT[DType.FLOAT]] * n_inputs)
    except Exception as exc:
        hint = (" (declare the attributes the template uses, with a default, in attributes=)"
                if isinstance(exc, jinja2.UndefinedError) else "")
        raise ConfigError(f"register_kernel({kernel.label}): the template does not render with {n_inputs} input(s), "
                          f"{n_outputs} output(s): {type(exc).__name__}: {exc}{hint}") from None
    body = "\n".join("    " + line for line in lines)
    source = (f"{kernels_source()}\n{kernel.helpers}\nstatic icc_t V[{n_inputs + n_outputs}];\n"
              f"static const char *W;\nvoid icc_kernel_check(void) {{\n    (void)W;\n{body}\n}}\n")
    try:
        cc = compiler()
    except BuildError:
        return  # no compiler: nothing can be checked, and no model will run on the C runtime anyway
    # an undeclared function is only a warning in C, then an unresolved symbol when the library loads
    flags = [f for f in NATIVE if f not in ("-shared", "-O3")] + ["-Werror=implicit-function-declaration"]
    with tempfile.TemporaryDirectory(prefix="infercc-kernel-") as tmp:
        path = Path(tmp) / "kernel.c"
        path.write_text(source)
        done = subprocess.run([cc, *flags, "-fsyntax-only", str(path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        errors = [line.split("error:", 1)[1].strip() for line in done.stderr.splitlines() if "error:" in line][:3]
        raise ConfigError(f"register_kernel({kernel.label}): the kernel does not compile: "
                          f"{' | '.join(errors) or done.stderr.strip()[:300]}; fix the C in template= or helpers= "
                          "(inputs/outputs are icc_t *; see infercc.codegen.custom)")

