"""IR -> one C translation unit (templates/model.c.j2) plus its weight blob.

Every value of the graph becomes a tensor ``V[i]`` (generated index; model names appear only in
sanitized comments). Inputs are bound per call, constants once at load (pointers into the weight
blob), every other value is allocated by the kernel that produces it into the buffer slot the
static memory plan (plan.py) gave it: values whose lifetimes do not overlap share a slot, and the
slots' buffers are kept across runs. Same IR -> byte-identical source.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

import jinja2
import numpy as np

from ..ir import Model, Value
from ..passes.canonical import DOMAIN
from . import custom, fuse, ops_transformer  # noqa: F401 - registers the canonical ops' emitters
from .custom import Kernel
from .decode import DecodePlan
from .decode import plan as decode_plan
from .ops import TABLE, Site, Unsupported, dtype_code
from .packing import Blob
from .plan import MemoryPlan
from .plan import plan as memory_plan
from .profile import layer_table, op_name

HERE = Path(__file__).parent
#: Kernel headers in include order; inlined so a saved artifact's source builds on its own.
HEADERS = ("common.h", "tensor.h", "argmax.h", "elementwise.h", "layout.h", "api.h", "gemm.h", "qgemm.h", "attention.h", "rotary.h",
           "transformer.h", "paged_attention.h", "lora.h")
#: Headers only a model with one of these ops needs (the rest of the models compile without them).
OPTIONAL_HEADERS = {"paged_attention.h": "PagedAttention"}
#: Parts of a header that it includes where they belong (inlined there, not in HEADERS' order).
NESTED_HEADERS = ("qgemm_avx2.h",)
#: Ops a fusion of fuse.py replaces: a user kernel for one of them turns fusions off (theirs wins).
_FUSED_OPS = {("", "Split"), (DOMAIN, "SiLU"), ("", "Mul"), ("", "MatMul"), ("", "Add")}
#: A quantized matmul in generated lines: its bits and block (q_tiles).
_QCALL = re.compile(r"icc_matmul_q\([^;]*?, (\d+), (\d+), \(const float \*\)")
_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), keep_trailing_newline=True,
                          undefined=jinja2.StrictUndefined, autoescape=False)


@dataclasses.dataclass
class Program:
    source: str
    blob: Blob
    inputs: list[tuple[str, np.dtype]]   # graph inputs in order: name, element type
    outputs: list[str]
    #: One entry per step of ``icc_run`` (graph node order): {"name", "op", "layer"}, for the
    #: profiler's tables (the timers of a -DICC_PROFILE build are indexed the same way).
    steps: list[dict[str, str]] = dataclasses.field(default_factory=list)
    #: Why the library has no decode loop (codegen/decode.py); "" when it has one.
    decode_reason: str = ""
    #: The static memory plan: the buffer slot of each value ``V[i]`` (plan.py).
    memory: MemoryPlan | None = None
    #: The decode loop's bindings (codegen/decode.py), None without a loop.
    decode: DecodePlan | None = None
    #: Positions (in ``inputs``) of the past caches ``icc_run`` takes with room to grow: their
    #: attention appends the new rows in place and the present output is the same buffer
    #: (ops_transformer.grows_in_place), so a Python-stepped decode copies no past rows.
    rooms: frozenset[int] = frozenset()

    @property
    def has_decode(self) -> bool:
        return not self.decode_reason


def sanitize(text: str, limit: int = 60) -> str:
    """A model-provided name made safe for a C comment: [A-Za-z0-9_ .-] only, no comment end."""
    return re.sub(r"[^A-Za-z0-9_ .\-]", "_", str(text))[:limit]


def kernels_source(ops: set[str] | None = None) -> str:
    """The kernel headers inlined; ``ops`` (op types of the model) leaves out the optional headers
    no op of the model needs (None: all of them)."""
    parts = []
    for name in HEADERS:
        if ops is not None and name in OPTIONAL_HEADERS and OPTIONAL_HEADERS[name] not in ops:
            continue
        parts.append(_strip_includes((HERE / "kernels" / name).read_text()))
    return "\n".join(parts)


def q_tiles(steps: list[dict], custom_ops: bool) -> int:
    """qgemm.h's ICC_Q_USED: the (bits, block) tiles the steps' quantized matmuls call, so the
    library compiles those alone (each is 8 row-count instantiations, fully unrolled: SmolLM2's
    library built in 26 s of gcc with all ten, about half with its two). All of them where a user
    kernel runs (its C may call any)."""
    if custom_ops:
        return 0x3FF
    mask = 0
    for step in steps:
        for bits, block in _QCALL.findall("\n".join(step["lines"])):
            mask |= 1 << ((int(bits) == 8) * 5 + {16: 0, 32: 1, 64: 2, 128: 3}.get(int(block), 4))
    return mask


def _strip_includes(text: str) -> str:
    """A header without its includes of other headers (inlined before it), a nested part inlined
    in the include's place."""
    def part(match: re.Match) -> str:
        name = match[1]
        return _strip_includes((HERE / "kernels" / name).read_text()) if name in NESTED_HEADERS else ""

    return re.sub(r'^#include "([^"]+)"\n', part, text, flags=re.M)


def emit(model: Model, kernels: Mapping[tuple[str, str], Kernel] | None = None, *, pack: bool = True,
         base: Blob | None = None) -> Program:
    """The C program for ``model``; raises Unsupported naming the first op without a kernel.

    ``kernels``: user kernels (``custom.register_kernel``) that come before the built-in table;
    None means the registry as it is now. ``pack=False`` plans the weight blob's layout without
    keeping its data (loading a saved artifact whose weights.bin is memory-mapped); ``base``: the
    blob of a loaded program of the same model, whose parts keep their offsets (packing.Blob)."""
    graph = model.graph
    kernels = custom.snapshot() if kernels is None else kernels
    custom.annotate(model, kernels)  # shape inference knows nothing of custom ops: their outputs' types
    table = {**TABLE, **custom.emitters(kernels)}
    index: dict[int, int] = {}

    def slot(v: Value) -> int:
        if id(v) not in index:
            index[id(v)] = len(index)
        return index[id(v)]

    inputs = list(graph.inputs)
    for v in inputs:
        slot(v)
    blob = Blob(pack=pack and base is None, base=base)
    consts: dict[int, dict] = {}

    def bind(node, i: int) -> None:
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is None or v.const is None or v.is_graph_input or id(v) in consts:
            return
        array = v.const.numpy()
        code = dtype_code(v)
        data = np.asarray(array, order="C")  # (ascontiguousarray would make a scalar 1-D)
        offset = blob.add(("const", v.const), lambda: data, nbytes=data.nbytes)
        dims = ", ".join(str(int(d)) for d in data.shape) or "0"
        consts[id(v)] = {"index": slot(v), "offset": offset, "rank": data.ndim, "dims": dims, "dt": code}

    steps = []
    fused = fuse.plan(graph) if not any(k in kernels for k in _FUSED_OPS) else {}
    for position, node in enumerate(graph.nodes):
        emitter = table.get((node.domain or "", node.op_type))
        where = f"{node.domain + '::' if node.domain else ''}{node.op_type} {sanitize(node.name)!r}"
        if emitter is None:
            raise Unsupported(f"no C kernel for {where}")
        ins = [f"(&V[{slot(v)}])" if v is not None else "NULL" for v in node.inputs]
        outs = [f"(&V[{slot(v)}])" if v is not None else "NULL" for v in node.outputs]
        site = Site(node, ins, outs, blob)
        group = fused.get(id(node))
        try:
            if group is None:
                lines = emitter(site)
            elif group.anchor is node:
                lines = group.emit(lambda v: f"(&V[{slot(v)}])")
                where += f" + {len(group.members)} node(s): {group.name}"
            else:
                lines, where = [], where + f" (fused into {group.name} at {sanitize(group.anchor.name)!r})"
        except Unsupported as exc:
            raise Unsupported(f"{where}: {exc}") from None
        used = {int(k) for k in re.findall(r"\(&V\[(\d+)\]\)", "\n".join(lines))}
        for i, v in enumerate(node.inputs):  # constants the C reads as tensors go into the blob
            if v is not None and slot(v) in used:
                bind(node, i)
        steps.append({"comment": f"{position}: {where}", "lines": lines})
    outputs = [slot(v) for v in graph.outputs]
    decode, decode_reason = decode_plan(model, index)
    # the decode loop takes each step's present cache buffers (moved into its state, not copied)
    heap = [c["present"] for c in decode.caches] if decode else []
    # Graph outputs get fitted slots of their own: a shared slot keeps its largest occupant between
    # runs, and would keep a prompt's full logits (25 MB for 128 tokens of a 49k vocabulary) beside
    # the largest activations; a fitted one is trimmed by the next, smaller run (a decode step's
    # logits reuse one buffer, no allocation per token).
    own_attention = (DOMAIN, "Attention") not in kernels  # a user's Attention kernel may not append in place
    rooms = frozenset(i for i, v in enumerate(inputs) if own_attention and ops_transformer.grows_in_place(v))
    memory = memory_plan(model, [step["lines"] for step in steps], index, heap=heap, own=outputs, custom=kernels)
    source = _ENV.get_template("model.c.j2").render(
        summary=sanitize(f"{len(graph.nodes)} nodes, {len(graph.inputs)} inputs, {len(graph.outputs)} outputs", 120),
        kernels=kernels_source({n.op_type for n in graph.nodes}) + custom.helpers_for(model, kernels), nv=max(len(index), 1),
        q_tiles=f"{q_tiles(steps, any((n.domain or '', n.op_type) in kernels for n in graph.nodes)):#x}",
        consts=sorted(consts.values(), key=lambda c: c["index"]),
        inputs=[{"index": index[id(v)], "dt": dtype_code(v), "room": i in rooms} for i, v in enumerate(inputs)],
        steps=steps, outputs=outputs,
        slots=", ".join(str(memory.slots[i]) if i < len(memory.slots) else "-1" for i in range(max(len(index), 1))),
        nslots=max(memory.n_slots, 1),
        fitted=", ".join("1" if s in memory.fitted else "0" for s in range(max(memory.n_slots, 1))),
        decode=decode, sampler=_strip_includes((HERE / "kernels" / "sample.h").read_text()) if decode else "")
    table = [{"name": n.name, "op": op_name(n), "layer": layer}
             for n, layer in zip(graph.nodes, layer_table(graph.nodes))]
    return Program(source, blob, [(v.name, np.dtype(v.dtype.numpy)) for v in inputs], [v.name for v in graph.outputs],
                   table, decode_reason, memory, decode, rooms)

