"""The generated-C runtime's static memory plan: liveness over the emitted steps and a buffer slot
for every value a kernel produces, shared by values whose lifetimes do not overlap.

Why slots and not arena offsets: the batch and sequence lengths (and every shape a graph computes
from them) are known only at run time, so byte offsets cannot be fixed at code generation. What can
be fixed is which values may share a buffer; each slot's buffer then grows at run time to the
largest value it held and is kept across runs (kernels/tensor.h ``icc_alloc``), so after the first
run of a shape a run allocates nothing.

Lifetimes are counted in steps (one per graph node, the node order of ``icc_forward``): a value
lives from the first step that mentions it or whose node produces it to the last step that mentions
it or whose node reads it (a fused group's code reads and writes at its anchor's step, not at its
members' positions, hence both). The rules that keep a shared buffer correct:

* Views: Reshape, Squeeze, Unsqueeze, Flatten and Identity always alias input 0 (no buffer of
  their own), Split and Reduce* may (a contiguous piece, a reduction over no axes). A buffer lives
  until the last reader of any value viewing it, and a value that may be a view keeps a slot of its
  own for when it is not, alive as long as its source's buffer.
* Intervals are closed: a node's outputs never share a buffer with its inputs (kernels read their
  inputs while writing their outputs), nor with each other.
* Graph outputs live to the end of the run (valid until the next run), graph inputs for the whole
  run (bound before the first step; the decode loop allocates its step inputs into their slots).
* ``heap`` values get no slot: a buffer of their own from the heap that a caller may take (the
  decode loop moves each step's present KV-cache tensor into its state instead of copying it).
* ``own`` values (the graph outputs) get a slot each, shared with no other value and *fitted*: its
  buffer is kept across runs like any slot's, but given back and taken again at the run's size
  when it holds more than twice what the run needs, so a prompt's full logits do not stay beside
  the activations for the decode steps that follow, and a decode step allocates no output.

The assignment is interval colouring in order of first step, best fit by a size estimate (static
dims as they are, a run-time dim counted as ``NOMINAL``): a value takes the free slot whose largest
estimate fits it most closely, else the largest free slot (which grows least), else a new slot.
Deterministic: the same IR gives the same plan (ties broken by value index).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence

from ..ir import Model, Node, Value
from .ops import ALIASES

#: What a run-time dim (batch, sequence) counts for in the size estimate of the best fit.
NOMINAL = 16
_MENTION = re.compile(r"\(&V\[(\d+)\]\)")


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per value index: its slot (-1: none: a constant, an always-view, a heap value, a value no
    step writes) and, for planned values, the closed interval of steps its buffer must hold
    (-1 = bound before the first step, ``n_steps`` = kept after the last)."""

    slots: tuple[int, ...]
    live: tuple[tuple[int, int] | None, ...]
    n_slots: int
    n_steps: int
    #: Per value index: the value's name in the IR (for diagnostics; never written into the C).
    names: tuple[str, ...] = ()
    #: The fitted slots (one ``own`` value each), trimmed when far larger than a run needs.
    fitted: tuple[int, ...] = ()

    def sharing(self) -> dict[int, list[int]]:
        """Slot -> the values planned into it, in index order."""
        out: dict[int, list[int]] = {}
        for value, slot in enumerate(self.slots):
            if slot >= 0:
                out.setdefault(slot, []).append(value)
        return out


def mentions(lines: Iterable[str]) -> set[int]:
    """The value indices a step's C statements refer to (``(&V[i])``, the only form emitters use)."""
    return {int(k) for k in _MENTION.findall("\n".join(lines))}


def view_kind(node: Node, custom: Mapping[tuple[str, str], object]) -> str:
    """"always" when the node's outputs are views of its input 0, "maybe" when they may be, else ""."""
    key = (node.domain or "", node.op_type)
    if key in ALIASES:
        return "maybe" if key in custom else "always"  # a user kernel for Reshape may allocate
    if not node.domain and (node.op_type == "Split" or node.op_type.startswith("Reduce")):
        return "maybe"
    return ""


def _estimate(v: Value) -> float:
    """Bytes the value would take with every run-time dim at NOMINAL (the best fit's size key)."""
    dims = v.shape if v.shape is not None else (NOMINAL, NOMINAL)
    size = v.dtype.itemsize if v.dtype is not None else 4.0
    return size * math.prod(d if isinstance(d, int) and d >= 0 else NOMINAL for d in dims)


def plan(model: Model, steps: Sequence[Iterable[str]], index: Mapping[int, int], *, heap: Iterable[int] = (),
         own: Iterable[int] = (), custom: Mapping[tuple[str, str], object] | None = None) -> MemoryPlan:
    """The plan of ``model``'s values: ``steps`` are the C lines of each graph node's step (fused
    members emit none), ``index`` maps id(value) to its V index, ``heap`` lists value indices to
    leave on the heap, ``own`` those to give a fitted slot of their own, ``custom`` the user kernels
    (a user kernel for a view op may allocate)."""
    graph, custom = model.graph, custom or {}
    n, nv = len(steps), max(index.values(), default=-1) + 1
    by_index: dict[int, Value] = {}
    start: dict[int, int] = {}
    end: dict[int, int] = {}

    def touch(i: int, step: int) -> None:
        start[i] = min(start.get(i, step), step)
        end[i] = max(end.get(i, step), step)

    for step, lines in enumerate(steps):
        for i in mentions(lines):
            touch(i, step)
    written = set(start)
    root: dict[int, int] = {}
    always: set[int] = set()
    for position, node in enumerate(graph.nodes):
        for v in node.inputs:
            if v is not None and id(v) in index:
                by_index[index[id(v)]] = v
                touch(index[id(v)], position)
        kind = view_kind(node, custom)
        source = node.inputs[0] if kind and node.inputs and node.inputs[0] is not None else None
        for v in node.outputs:
            if v is None or id(v) not in index:
                continue
            i = index[id(v)]
            by_index[i] = v
            touch(i, position)
            if source is not None and id(source) in index:
                s = index[id(source)]
                root[i] = root.get(s, s)
                if kind == "always":
                    always.add(i)
    for v in graph.inputs:
        if id(v) in index:
            by_index[index[id(v)]] = v
            touch(index[id(v)], -1)
            touch(index[id(v)], n)
            written.add(index[id(v)])
    for v in graph.outputs:
        if id(v) in index:
            touch(index[id(v)], n)
    hull: dict[int, tuple[int, int]] = {}
    for i in start:
        r = root.get(i, i)
        lo, hi = hull.get(r, (start[i], end[i]))
        hull[r] = (min(lo, start[i]), max(hi, end[i]))
    consts = {index[id(v)] for v in by_index.values() if v.const is not None and not v.is_graph_input}
    heap = set(heap)
    alone = {i for i in own if i in written and i not in always and i not in consts and i not in heap}
    planned = sorted((i for i in written if i not in always and i not in consts and i not in heap | alone),
                     key=lambda i: (hull[root.get(i, i)][0], i))
    slots = [-1] * nv
    live: list[tuple[int, int] | None] = [None] * nv
    free_after: list[int] = []   # per slot: the last step its current occupant holds it
    biggest: list[float] = []    # per slot: the largest estimate it was given
    for i in planned:
        lo, hi = hull[root.get(i, i)]
        size = _estimate(by_index[i]) if i in by_index else NOMINAL * NOMINAL * 4.0
        free = [k for k, last in enumerate(free_after) if last < lo]
        fits = [k for k in free if biggest[k] >= size]
        if fits:
            k = min(fits, key=lambda k: (biggest[k], k))
        elif free:
            k = max(free, key=lambda k: (biggest[k], -k))
        else:
            k = len(free_after)
            free_after.append(hi)
            biggest.append(0.0)
        free_after[k], biggest[k] = hi, max(biggest[k], size)
        slots[i], live[i] = k, (lo, hi)
    fitted = []
    for i in sorted(alone):
        fitted.append(len(free_after))
        free_after.append(n)
        slots[i], live[i] = fitted[-1], hull[root.get(i, i)]
    names = tuple(by_index[i].name if i in by_index else "" for i in range(nv))
    return MemoryPlan(tuple(slots), tuple(live), len(free_after), n, names, tuple(fitted))
