"""The static memory plan (codegen/plan.py): no two values live at one step share a slot (checked
against liveness recomputed here from the emitted C over the fixtures' graphs), a node's outputs never
share a buffer with its inputs, slots are reused, and a planned library computes exactly what the
same source with every value on the heap computes (runs of growing and shrinking shapes, the C
decode loop), before and after its buffers are given back."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import infercc
from infercc.codegen.build import NATIVE, build
from infercc.codegen.decoding import Decoding
from infercc.codegen.emit import Program, emit
from infercc.codegen.library import Library
from infercc.codegen.plan import MemoryPlan, mentions, view_kind
from infercc.ir import Node, Value
from infercc.runtime.feeds import check_feeds
from tests.codegen.test_c_backend import pair  # (ORT, C) compiles, cached across the codegen tests
from tests.fixtures import catalog

_VIEWS = ("Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Split")


def _views_of(node: Node) -> bool:
    return not node.domain and (node.op_type in _VIEWS or node.op_type.startswith("Reduce"))


def _check(program: Program, model: infercc.CompiledModel) -> MemoryPlan:
    """Liveness recomputed from the emitted lines: a buffer is live from the first to the last step
    mentioning it or any value that may view it (outputs to the end); no step sees two live values of
    one slot, and no node's inputs share a slot with its outputs."""
    memory, graph = program.memory, model.model.graph
    index = {name: i for i, name in enumerate(memory.names) if name}
    n = len(program.steps)
    seen: dict[int, list[int]] = {}
    source = program.source[program.source.index("static int icc_forward"):]
    bodies = re.split(r"\n    /\* \d+: ", source)[1:]
    assert len(bodies) == n
    for step, body in enumerate(bodies):
        for i in mentions([body]):
            seen.setdefault(i, []).append(step)
    owner = {}  # a view's buffer is the one of its source
    for node in graph.nodes:
        if _views_of(node) and node.inputs and node.inputs[0] is not None:
            for v in node.outputs:
                if v is not None and v.name in index and node.inputs[0].name in index:
                    owner[index[v.name]] = owner.get(index[node.inputs[0].name], index[node.inputs[0].name])
    need: dict[int, set[int]] = {}
    for i, steps in seen.items():
        need.setdefault(owner.get(i, i), set()).update(steps)
    for v in graph.outputs:
        need.setdefault(owner.get(index[v.name], index[v.name]), set()).add(n)
    live_at: dict[int, dict[int, int]] = {}
    for i, slot in enumerate(memory.slots):
        if slot < 0:
            continue
        steps = need.get(owner.get(i, i), set())  # the steps its buffer (or its source's) is read or written
        lo, hi = memory.live[i]
        assert all(lo <= s <= hi for s in steps), f"V[{i}] is used outside its planned steps {lo}..{hi}"
        for s in range(lo, hi + 1):
            other = live_at.setdefault(s, {}).setdefault(slot, i)
            assert other == i, f"V[{other}] and V[{i}] share slot {slot} at step {s}"
    for node in graph.nodes:
        ins = {memory.slots[owner.get(index[v.name], index[v.name])] for v in node.inputs if v is not None and v.name in index}
        outs = {memory.slots[index[v.name]] for v in node.outputs if v is not None and v.name in index}
        assert not (ins & outs) - {-1}, f"{node.op_type} {node.name!r} writes a slot it reads"
    return memory


@pytest.mark.parametrize("name, options", [("llama_dynamo", {}), ("llama_dynamo", {"quantize": "int4"}),
                                           ("gpt2_dynamo", {}), ("bert_dynamo", {})])
def test_no_two_live_values_share_a_slot(name: str, options: dict) -> None:
    model = pair(str(catalog.fixture_path(name)), **options)[1]
    assert model.runtime == "c", model.runtime_reason
    memory = _check(model.backend.program, model)
    planned = sum(s >= 0 for s in memory.slots)
    assert 0 < memory.n_slots < planned  # buffers are shared
    assert emit(model.model).memory == memory  # deterministic


def _same_size_chain(path, length: int = 12) -> None:
    """Softmax(x + c), then ``length`` Sigmoid/Softmax nodes each reading the previous value
    (dead right after: the only reader) and writing one of the same size, then a residual Add."""
    nodes = [helper.make_node("Add", ["x", "c"], ["t0"])]
    for k in range(length):
        op = "Softmax" if k % 2 else "Sigmoid"
        nodes.append(helper.make_node(op, [f"t{k}"], [f"t{k + 1}"], **({"axis": -1} if op == "Softmax" else {})))
    nodes.append(helper.make_node("Add", [f"t{length}", "t0"], ["y"]))
    c = helper.make_tensor("c", TensorProto.FLOAT, [8], np.linspace(-1, 1, 8).tolist())
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], [c])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _reference(x: np.ndarray, length: int = 12) -> np.ndarray:
    t0 = x + np.linspace(-1, 1, 8, dtype=np.float32)
    t = t0
    for k in range(length):
        if k % 2:
            e = np.exp(t - t.max(-1, keepdims=True))
            t = e / e.sum(-1, keepdims=True)
        else:
            t = 1 / (1 + np.exp(-t))
    return t + t0


def test_a_value_never_shares_with_an_input_of_its_node(tmp_path) -> None:
    _same_size_chain(tmp_path / "chain.onnx")
    model = infercc.compile(tmp_path / "chain.onnx", backend="c")
    assert model.runtime == "c", model.runtime_reason
    memory = _check(model.backend.program, model)
    # x and y keep their own slots; t0 lives to the end; the chain alternates between two more
    assert memory.n_slots <= 5
    for n in (3, 40, 1):  # grown, then reused by a smaller run
        x = np.random.default_rng(n).standard_normal((n, 8)).astype(np.float32)
        np.testing.assert_allclose(model.run({"x": x})["y"], _reference(x), rtol=1e-5, atol=1e-6)


def _heap_library(model: infercc.CompiledModel, tmp_path) -> Library:
    """The same source with every value on the heap (the plan's slot table all -1)."""
    program = model.backend.program
    source, count = re.subn(r"(icc_slot\[ICC_NV\] = \{)[^}]*\}",
                            lambda m: m[1] + ", ".join(["-1"] * len(program.memory.slots)) + "}", program.source)
    assert count == 1 and source != program.source
    return Library(build(source, NATIVE), program, weights=model.backend.library.weights)


def test_planned_runs_equal_heap_runs_exactly(tmp_path) -> None:
    model = pair(str(catalog.fixture_path("llama_dynamo")))[1]
    planned, heap = model.backend.library, _heap_library(model, tmp_path)
    for batch, seq, seed in ((1, 9, 0), (2, 17, 1), (1, 3, 2), (3, 17, 3)):
        feeds = catalog.random_feeds("llama_dynamo", batch, seq, padding=batch > 1, seed=seed)
        arrays = model.backend._arrays(check_feeds(model.model.graph, feeds))  # an empty past, defaults
        for got, expected in zip(planned.run(arrays), heap.run(arrays)):
            np.testing.assert_array_equal(got, expected)
    assert planned.free_buffers() > 0 and planned.free_buffers() == 0
    for got, expected in zip(planned.run(arrays), heap.run(arrays)):  # allocated again after the give-back
        np.testing.assert_array_equal(got, expected)
    settings = {"max_new_tokens": 12, "stop_ids": [], "temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                "seed": 0}
    tokens = []
    for library in (planned, heap):
        decoding = Decoding(library, [5, 9, 13, 2, 7], **settings)
        decoding.next()
        tokens.append(decoding.tokens())
        decoding.close()
    assert tokens[0] == tokens[1] and len(tokens[0]) == 12


def test_a_user_kernel_for_a_view_op_may_allocate() -> None:
    reshape = Node("Reshape", [Value("x"), Value("s")], [Value("y")])
    assert view_kind(reshape, {}) == "always" and view_kind(reshape, {("", "Reshape"): object()}) == "maybe"
    assert view_kind(Node("Split", [Value("x")], [Value("a"), Value("b")]), {}) == "maybe"
    assert view_kind(Node("Relu", [Value("x")], [Value("y")]), {}) == ""
