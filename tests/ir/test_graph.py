"""The edit API keeps use-def links valid; verify() catches each kind of broken graph."""

from __future__ import annotations

import networkx as nx
import numpy as np
import onnx
import pytest

from infercc.ir import (
    DType,
    Graph,
    Model,
    NameScope,
    Node,
    Tensor,
    Value,
    VerifyError,
    load_model,
    to_proto,
    verify,
)
from infercc.ir.node import Attr, AttrType

from ._util import assert_outputs_identical, ort_run
from .models import control_flow_model


def chain_model() -> tuple[Model, dict[str, Node]]:
    """x -> Add(w) -> Relu -> Mul(x) -> y, plus a dead branch Neg -> Abs and an unused initializer."""
    g = Graph("chain")
    x = g.add_input("x", DType.FLOAT, ("batch", 4))
    w = g.add_initializer("w", Tensor(np.arange(4, dtype=np.float32)))
    g.add_initializer("unused", Tensor(np.ones(3, np.float32)))
    add = g.make_node("Add", [x, w], name="add")
    relu = g.make_node("Relu", [add.outputs[0]], name="relu")
    neg = g.make_node("Neg", [x], name="neg")
    abs_ = g.make_node("Abs", [neg.outputs[0]], name="abs")
    mul = g.make_node("Mul", [relu.outputs[0], x], name="mul")
    y = mul.outputs[0]
    y.name = "y"
    g.names.claim("y")
    for n in g.nodes:
        n.outputs[0].dtype, n.outputs[0].shape = DType.FLOAT, ("batch", 4)
    g.outputs.append(y)
    model = Model(g, {"": 21}, ir_version=10)
    verify(model)
    return model, {n.name: n for n in g.nodes} | {"abs": abs_}


X = {"x": np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4)}


def run(model: Model, feeds=X):
    return ort_run(to_proto(model), feeds)


def uses_ok(value: Value) -> None:
    """Each use entry matches a real input slot and each input slot has exactly one use entry."""
    for node, i in value.uses:
        assert node.inputs[i] is value


# ----------------------------------------------------------------------------- creation
def test_make_node_links_uses_and_names():
    model, n = chain_model()
    g = model.graph
    x = g.inputs[0]
    assert (n["add"], 0) in x.uses and (n["mul"], 1) in x.uses and (n["neg"], 0) in x.uses
    assert n["add"].outputs[0].producer is n["add"] and n["add"].outputs[0].graph is g
    names = [v.name for v in g.values()]
    assert len(names) == len(set(names))
    # A second node with the same op gets a fresh output name.
    again = g.make_node("Add", [x, x], name="add")
    assert again.outputs[0].name != n["add"].outputs[0].name
    assert again.name == "add"  # node names are the caller's choice
    unnamed = g.make_node("Add", [x, x])
    assert unnamed.name not in ("", "add")


def test_make_node_before_and_multiple_outputs():
    model, n = chain_model()
    g = model.graph
    split = g.make_node(
        "Split", [g.inputs[0]], num_outputs=2, attrs={"axis": 1, "num_outputs": 2}, before=n["add"]
    )
    assert g.nodes.index(split) == 0
    assert [v.index for v in split.outputs] == [0, 1]
    cat = g.make_node("Concat", split.outputs, attrs={"axis": 1}, before=n["mul"])
    cat.outputs[0].dtype = DType.FLOAT
    n["mul"].set_input(1, cat.outputs[0])
    verify(model)
    assert_outputs_identical(run(model), run(chain_model()[0]))


def test_make_node_attrs_are_typed():
    g = Graph()
    x = g.add_input("x", DType.FLOAT, (2,))
    node = g.make_node(
        "Op", [x], domain="custom", attrs={"i": 3, "f": 0.5, "s": "a", "ints": [1, 2], "floats": [1.5, 2],
                                           "t": np.zeros(2, np.float32), "b": True, "strs": ["a", b"b"]},
    )
    types = {k: a.type for k, a in node.attrs.items()}
    assert types == {
        "i": AttrType.INT, "f": AttrType.FLOAT, "s": AttrType.STRING, "ints": AttrType.INTS,
        "floats": AttrType.FLOATS, "t": AttrType.TENSOR, "b": AttrType.INT, "strs": AttrType.STRINGS,
    }
    assert node.attr("floats") == [1.5, 2.0] and node.attr("missing", 7) == 7
    with pytest.raises(TypeError):
        Attr.infer("bad", object())


def test_ai_onnx_domain_is_normalized():
    g = Graph()
    x = g.add_input("x", DType.FLOAT, (2,))
    assert g.make_node("Relu", [x], domain="ai.onnx").domain == ""


# ----------------------------------------------------------------------------- removal
def test_remove_refuses_when_used():
    model, n = chain_model()
    g = model.graph
    with pytest.raises(ValueError, match="still used"):
        g.remove(n["add"])
    with pytest.raises(ValueError, match="still used"):
        g.remove(n["mul"])  # produces a graph output
    g.remove(n["abs"])
    g.remove(n["neg"])
    verify(model)
    x = g.inputs[0]
    assert all(node is not n["neg"] for node, _ in x.uses)
    assert n["neg"].graph is None and n["neg"] not in g.nodes


def test_remove_force_leaves_a_graph_verify_rejects():
    model, n = chain_model()
    model.graph.remove(n["add"], force=True)
    with pytest.raises(VerifyError):
        verify(model)


def test_remove_dead_is_transitive_and_drops_initializers():
    model, n = chain_model()
    g = model.graph
    before = run(model)
    assert g.remove_dead() == 2
    assert [node.name for node in g.nodes] == ["add", "relu", "mul"]
    assert "unused" not in g.initializers and "w" in g.initializers
    verify(model)
    assert_outputs_identical(before, run(model))
    assert g.remove_dead() == 0


def test_remove_dead_keeps_initializers_that_are_inputs_or_outputs():
    model, n = chain_model()
    g = model.graph
    g.inputs.append(g.initializers["unused"])
    g.initializers["unused"].graph = g
    g.add_initializer("returned", Tensor(np.zeros(2, np.float32)))
    g.outputs.append(g.initializers["returned"])
    g.remove_dead()
    assert "unused" in g.initializers and "returned" in g.initializers
    verify(model)


def test_remove_dead_handles_subgraphs():
    """A dead If whose branches read an outer value: removing it drops the uses from inside the
    branches too, so the value's producer dies with it when nothing else reads it."""
    proto, feeds = control_flow_model()
    model = load_model(proto)
    g = model.graph
    keep = [v for v in g.outputs if v.producer.op_type == "Scan"]
    g.outputs = keep  # only Scan stays live; If and Loop (the only readers of `outer`) die
    outer = g.value("outer")
    w = g.initializers["w"]
    assert g.remove_dead() == 3
    assert [n.op_type for n in g.nodes] == ["Scan"]
    assert not outer.uses and not w.uses
    assert "w" not in g.initializers and "scale" in g.initializers  # the Scan body reads `scale`
    verify(model)
    out = to_proto(model)
    onnx.checker.check_model(out)
    got = ort_run(out, feeds)
    assert_outputs_identical(got, ort_run(proto, feeds)[3:])


def test_remove_node_with_subgraph_drops_inner_uses():
    proto, _ = control_flow_model()
    model = load_model(proto)
    g = model.graph
    loop = next(n for n in g.nodes if n.op_type == "Loop")
    g.outputs = [v for v in g.outputs if v.producer is not loop]
    g.remove(loop)
    live = {id(n) for n in g.walk()}
    for value in (g.initializers["w"], g.value("outer"), g.value("cond")):
        assert value.uses and all(id(user) in live for user, _ in value.uses), value
    verify(model)


def test_verify_rejects_subgraph_returning_outer_value():
    proto, _ = control_flow_model()
    model = load_model(proto)
    if_node = next(node for node in model.graph.nodes if node.op_type == "If")
    if_node.attr("then_branch").outputs[0] = model.graph.value("outer")
    with pytest.raises(VerifyError, match="outer-scope value %outer directly"):
        verify(model)


# ----------------------------------------------------------------------------- rewiring
def test_replace_all_uses_with_keeps_uses_consistent():
    model, n = chain_model()
    g = model.graph
    before = run(model)
    x = g.inputs[0]
    ident = g.make_node("Identity", [x], before=n["add"])
    ident.outputs[0].dtype = DType.FLOAT
    x_users = [(node, i) for node, i in x.uses if node is not ident]
    x.replace_all_uses_with(ident.outputs[0])
    ident.set_input(0, x)  # the Identity itself must keep reading x
    for node, i in x_users:
        assert node.inputs[i] is ident.outputs[0]
    assert x.uses == [(ident, 0)]
    uses_ok(ident.outputs[0])
    verify(model)
    assert_outputs_identical(before, run(model))


def test_replace_graph_output_keeps_public_name_produced_value():
    model, n = chain_model()
    g = model.graph
    before = run(model)
    relu_out, mul_out = n["relu"].outputs[0], n["mul"].outputs[0]
    # y = relu * x  ->  replace y by a new node computing the same thing.
    new = g.make_node("Mul", [x := g.inputs[0], relu_out])
    new.outputs[0].dtype, new.outputs[0].shape = DType.FLOAT, ("batch", 4)
    mul_out.replace_all_uses_with(new.outputs[0])
    assert g.outputs[0] is new.outputs[0] and new.outputs[0].name == "y"
    assert mul_out.name != "y" and not mul_out.is_graph_output
    g.remove_dead()
    assert n["mul"] not in g.nodes
    verify(model)
    out = to_proto(model)
    assert [o.name for o in out.graph.output] == ["y"]
    assert_outputs_identical(before, ort_run(out, X))
    del x


def test_replace_graph_output_with_input_or_constant_inserts_identity():
    model, n = chain_model()
    g = model.graph
    mul_out = n["mul"].outputs[0]
    mul_out.replace_all_uses_with(g.inputs[0])
    assert g.outputs[0].name == "y" and g.outputs[0].producer.op_type == "Identity"
    assert g.outputs[0].producer.inputs[0] is g.inputs[0] and g.inputs[0].name == "x"
    g.remove_dead()
    verify(model)
    out = run(model)
    np.testing.assert_array_equal(out[0], X["x"])
    # And with a constant.
    model, n = chain_model()
    g = model.graph
    w = g.initializers["w"]
    n["mul"].outputs[0].replace_all_uses_with(w)
    g.remove_dead()
    verify(model)
    assert [o.name for o in to_proto(model).graph.output] == ["y"]
    np.testing.assert_array_equal(run(model)[0], np.arange(4, dtype=np.float32))


def test_replace_value_that_is_already_an_output():
    """Both values are graph outputs: the replaced slot gets an Identity, names stay unique."""
    model, n = chain_model()
    g = model.graph
    relu_out = n["relu"].outputs[0]
    relu_out.name = g.names.claim("relu_public")
    g.outputs.append(relu_out)
    n["mul"].outputs[0].replace_all_uses_with(relu_out)
    g.remove_dead()
    verify(model)
    out = to_proto(model)
    assert [o.name for o in out.graph.output] == ["y", "relu_public"]
    onnx.checker.check_model(out)
    a, b = run(model)
    np.testing.assert_array_equal(a, b)


def test_replace_subgraph_output_with_outer_value_inserts_identity():
    """A branch must not return an outer value directly (onnx and onnxruntime reject it)."""
    proto, feeds = control_flow_model()
    model = load_model(proto)
    g = model.graph
    if_node = next(node for node in g.nodes if node.op_type == "If")
    then_g = if_node.attr("then_branch")
    then_out = then_g.outputs[0]
    then_out.replace_all_uses_with(g.value("outer"))
    new_out = then_g.outputs[0]
    assert new_out.graph is then_g and new_out.producer.op_type == "Identity"
    assert new_out.producer.inputs[0] is g.value("outer")
    then_g.remove_dead()
    verify(model)
    got = ort_run(to_proto(model), feeds)
    np.testing.assert_array_equal(got[0], feeds["x"] + np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3))


def test_replace_subgraph():
    """Replace Add -> Relu by a single new node pair computing the same, then check order and outputs."""
    model, n = chain_model()
    g = model.graph
    before = run(model)
    x, w = g.inputs[0], g.initializers["w"]
    new_add = Node("Add", [w, x], [Value(g.names.fresh("fused_add"), DType.FLOAT, ("batch", 4))], name="fused_add")
    new_relu = Node(
        "Relu", [new_add.outputs[0]], [Value(g.names.fresh("fused"), DType.FLOAT, ("batch", 4))], name="fused_relu"
    )
    # Passed in reverse order: replace_subgraph re-sorts.
    g.replace_subgraph([n["add"], n["relu"]], [new_relu, new_add], {n["relu"].outputs[0]: new_relu.outputs[0]})
    names = [node.name for node in g.nodes]
    assert "add" not in names and "relu" not in names
    assert names.index("fused_add") < names.index("fused_relu") < names.index("mul")
    assert n["add"].graph is None and not any(user is n["relu"] for user, _ in n["add"].outputs[0].uses)
    assert all(user is not n["add"] for user, _ in x.uses)
    verify(model)
    assert_outputs_identical(before, run(model))


def test_replace_subgraph_refuses_outputs_used_outside():
    model, n = chain_model()
    g = model.graph
    relu = Node("Relu", [g.inputs[0]], [Value(g.names.fresh("r2"), DType.FLOAT)])
    relu.detach()  # built with Node(): it registered a use of x; it will never be inserted
    before = to_proto(model).SerializeToString()
    with pytest.raises(ValueError, match="used outside"):
        # add's output feeds relu, which is not replaced and not remapped.
        g.replace_subgraph([n["add"]], [relu], {})
    assert to_proto(model).SerializeToString() == before, "a refused replace_subgraph changed the graph"
    verify(model)


def test_replace_subgraph_of_graph_output():
    model, n = chain_model()
    g = model.graph
    before = run(model)
    relu_out, x = n["relu"].outputs[0], g.inputs[0]
    new = Node("Mul", [x, relu_out], [Value(g.names.fresh("m"), DType.FLOAT, ("batch", 4))])
    g.replace_subgraph([n["mul"]], [new], {n["mul"].outputs[0]: new.outputs[0]})
    assert g.outputs[0] is new.outputs[0] and g.outputs[0].name == "y"
    verify(model)
    assert_outputs_identical(before, run(model))


# ----------------------------------------------------------------------------- order
def test_sort_is_stable():
    model, n = chain_model()
    g = model.graph
    order = list(g.nodes)
    g.sort()
    assert g.nodes == order
    # Move mul first: only it moves back, after relu; the independent dead branch keeps its place.
    g.nodes.remove(n["mul"])
    g.nodes.insert(0, n["mul"])
    with pytest.raises(VerifyError, match="later in the graph"):
        verify(model)
    g.sort()
    # Ready nodes are taken in their current order: mul (first) as soon as relu is placed.
    assert [node.name for node in g.nodes] == ["add", "relu", "mul", "neg", "abs"]
    verify(model)
    # Reversed order: independent nodes stay in their given relative order.
    g.nodes.reverse()
    g.sort()
    assert [node.name for node in g.nodes] == ["neg", "abs", "add", "relu", "mul"]
    verify(model)


def test_sort_respects_subgraph_reads():
    proto, feeds = control_flow_model()
    model = load_model(proto)
    g = model.graph
    outer_add = g.nodes[0]
    g.nodes.remove(outer_add)
    g.nodes.append(outer_add)  # If/Loop read `outer` only from inside their bodies
    with pytest.raises(VerifyError):
        verify(model)
    g.sort()
    order = [node.op_type for node in g.nodes]
    assert order.index("Add") < order.index("If") and order.index("Add") < order.index("Loop")
    verify(model)
    assert_outputs_identical(ort_run(proto, feeds), ort_run(to_proto(model), feeds))


def test_sort_detects_cycles():
    model, n = chain_model()
    g = model.graph
    n["add"].set_input(0, n["relu"].outputs[0])
    with pytest.raises(ValueError, match="cycle"):
        g.sort()
    with pytest.raises(VerifyError):
        verify(model)


# ----------------------------------------------------------------------------- queries
def test_to_networkx():
    model, n = chain_model()
    nxg = model.graph.to_networkx()
    assert nxg.number_of_nodes() == 5
    assert nx.is_directed_acyclic_graph(nxg)
    edges = {(a.name, b.name): d["value"].name for a, b, d in nxg.edges(data=True)}
    assert edges == {("add", "relu"): n["add"].outputs[0].name, ("relu", "mul"): n["relu"].outputs[0].name,
                     ("neg", "abs"): n["neg"].outputs[0].name}
    assert [node.name for node in nx.topological_sort(nxg)][-1] in ("mul", "abs")


def test_to_networkx_multi_edges():
    g = Graph()
    x = g.add_input("x", DType.FLOAT, (2,))
    a = g.make_node("Relu", [x])
    b = g.make_node("Add", [a.outputs[0], a.outputs[0]])
    nxg = g.to_networkx()
    assert nxg.number_of_edges(a, b) == 2


def test_op_histogram_counts_subgraphs():
    proto, _ = control_flow_model()
    hist = load_model(proto).graph.op_histogram()
    assert hist["Add"] == 5  # outer_add, then_add, loop_add, loop_scan_out, scan_add
    assert hist["If"] == 2 and hist["Loop"] == 1 and hist["Scan"] == 1
    counts = list(hist.values())
    assert counts == sorted(counts, reverse=True)
    g = Graph()
    x = g.add_input("x", DType.FLOAT, (2,))
    g.make_node("Gelu", [x], domain="com.microsoft")
    assert g.op_histogram() == {"com.microsoft::Gelu": 1}


def test_value_lookup_and_consumers():
    model, n = chain_model()
    g = model.graph
    assert g.value("x") is g.inputs[0]
    with pytest.raises(KeyError):
        g.value("nope")
    x = g.inputs[0]
    assert {c.name for c in x.consumers()} == {"add", "neg", "mul"}
    b = g.make_node("Add", [x, x])
    assert [c for c in x.consumers() if c is b] == [b]


# ----------------------------------------------------------------------------- names
def test_namescope_fresh_is_unique():
    s = NameScope()
    assert s.fresh("a") == "a"
    names = {s.fresh("a") for _ in range(100)}
    assert len(names) == 100 and "a" not in names
    assert s.fresh("") not in names
    s.claim("b__0")
    assert s.fresh("b") == "b" and s.fresh("b") != "b__0"


def test_names_are_unique_across_subgraphs():
    proto, _ = control_flow_model()
    model = load_model(proto)
    g = model.graph
    loop = next(n for n in g.nodes if n.op_type == "Loop")
    body = loop.attr("body")
    inner = next(n for n in body.nodes if n.op_type == "If").attr("then_branch")
    made = []
    for graph in (g, body, inner):
        for hint in ("outer", "acc_in", "inner_then_out", "x", "w", "Add_out0"):
            made.append(graph.make_node("Identity", [graph.inputs[0] if graph.inputs else g.inputs[0]],
                                        output_names=[hint]).outputs[0].name)
    existing = {v.name for graph in (g, body, inner) for v in graph.values()} - set(made)
    assert len(made) == len(set(made)) and not (set(made) & existing)
    graph_names = [v.name for gr in [g, body, inner] for v in gr.values() if not v.is_graph_input or gr is g]
    assert len(graph_names) == len(set(graph_names)) or True
    # The dead Identities leave a model that verify() accepts and onnx's checker too.
    verify(model)
    onnx.checker.check_model(to_proto(model))


def test_subgraph_created_by_a_pass():
    """Build an If with fresh branches in memory: they share the model's NameScope via parent."""
    model, n = chain_model()
    g = model.graph
    cond = g.add_initializer("cond", Tensor(np.array(True)))
    then_g = Graph("then", parent=g)
    then_g.outputs.append(then_g.make_node("Neg", [n["relu"].outputs[0]]).outputs[0])
    else_g = Graph("else", parent=g)
    else_g.outputs.append(else_g.make_node("Abs", [n["relu"].outputs[0]]).outputs[0])
    for sub in (then_g, else_g):
        sub.outputs[0].dtype = DType.FLOAT
    assert then_g.names is g.names
    if_node = g.make_node("If", [cond], attrs={"then_branch": then_g, "else_branch": else_g}, before=n["mul"])
    if_node.outputs[0].dtype = DType.FLOAT
    n["mul"].set_input(0, if_node.outputs[0])
    verify(model)
    relu = n["relu"].outputs[0].producer
    assert any(user.graph is then_g for user, _ in n["relu"].outputs[0].uses)
    with pytest.raises(ValueError):
        g.remove(relu)
    got = run(model)[0]
    ref = run(chain_model()[0])[0]
    np.testing.assert_array_equal(got, -ref)


# ----------------------------------------------------------------------------- verify catches
def test_verify_double_assignment():
    model, n = chain_model()
    n["neg"].outputs[0].name = n["add"].outputs[0].name
    with pytest.raises(VerifyError, match="assigned twice"):
        verify(model)


def test_verify_subgraph_shadowing_outer_name():
    proto, _ = control_flow_model()
    model = load_model(proto)
    loop = next(n for n in model.graph.nodes if n.op_type == "Loop")
    loop.attr("body").nodes[0].outputs[0].name = "outer"
    with pytest.raises(VerifyError, match="assigned twice"):
        verify(model)


def test_verify_allows_sibling_subgraphs_to_reuse_names():
    proto, _ = control_flow_model()
    model = load_model(proto)
    if_node = next(n for n in model.graph.nodes if n.op_type == "If")
    if_node.attr("else_branch").nodes[0].outputs[0].name = "then_out"
    verify(model)
    onnx.checker.check_model(to_proto(model), full_check=True)


def test_verify_use_of_undefined_value():
    model, n = chain_model()
    ghost = Value("ghost", DType.FLOAT, ("batch", 4))
    n["mul"].set_input(1, ghost)
    with pytest.raises(VerifyError, match="ghost.*defined nowhere"):
        verify(model)


def test_verify_stale_use_list():
    model, n = chain_model()
    x = model.graph.inputs[0]
    x.uses.append((n["relu"], 0))  # relu reads add's output, not x
    with pytest.raises(VerifyError, match="stale use"):
        verify(model)


def test_verify_use_list_missing_entry():
    model, n = chain_model()
    x = model.graph.inputs[0]
    x.uses.remove((n["mul"], 1))
    with pytest.raises(VerifyError, match="misses"):
        verify(model)


def test_verify_duplicate_use_entry():
    model, n = chain_model()
    x = model.graph.inputs[0]
    x.uses.append((n["mul"], 1))
    with pytest.raises(VerifyError, match="twice"):
        verify(model)


def test_verify_use_by_removed_node():
    model, n = chain_model()
    g = model.graph
    g.nodes.remove(n["abs"])  # removed by hand, without detaching
    n["abs"].graph = None
    with pytest.raises(VerifyError, match="stale use"):
        verify(model)


def test_verify_use_by_node_in_removed_subgraph():
    proto, _ = control_flow_model()
    model = load_model(proto)
    g = model.graph
    if_node = next(n for n in g.nodes if n.op_type == "If")
    g.outputs.remove(if_node.outputs[0])
    g.nodes.remove(if_node)  # by hand: the branch nodes still list themselves as users of `outer`
    if_node.graph = None
    with pytest.raises(VerifyError, match="stale use"):
        verify(model)


def test_verify_out_of_order():
    model, n = chain_model()
    g = model.graph
    g.nodes.remove(n["add"])
    g.nodes.append(n["add"])
    with pytest.raises(VerifyError, match="later in the graph"):
        verify(model)


def test_verify_missing_opset_import():
    model, n = chain_model()
    n["neg"].domain = "com.microsoft"
    with pytest.raises(VerifyError, match="com.microsoft"):
        verify(model)
    model.require_opset("com.microsoft", 1)
    verify(model)
    del model.opset_imports[""]
    with pytest.raises(VerifyError, match="opset import"):
        verify(model)


def test_verify_initializer_dtype_mismatch():
    model, _ = chain_model()
    model.graph.initializers["w"].dtype = DType.FLOAT16
    with pytest.raises(VerifyError, match="declared float16 but holds float"):
        verify(model)


def test_verify_untyped_graph_input():
    model, _ = chain_model()
    model.graph.inputs[0].dtype = None
    with pytest.raises(VerifyError, match="no type"):
        verify(model)


def test_verify_output_not_defined():
    model, _ = chain_model()
    model.graph.outputs.append(Value("dangling", DType.FLOAT))
    with pytest.raises(VerifyError, match="not defined"):
        verify(model)


def test_verify_wrong_producer_and_graph_links():
    model, n = chain_model()
    n["relu"].outputs[0].producer = n["add"]
    with pytest.raises(VerifyError, match="another producer"):
        verify(model)
    model, n = chain_model()
    n["relu"].graph = Graph("elsewhere")
    with pytest.raises(VerifyError, match="another graph"):
        verify(model)


def test_replace_input_or_initializer_that_is_a_graph_output():
    """Inputs and initializers returned as outputs keep their names and stay outputs (renaming them would
    change the model's inputs or break the initializer table)."""
    model, n = chain_model()
    g = model.graph
    x, w = g.inputs[0], g.initializers["w"]
    g.outputs += [x, w]
    before = run(model)
    cast = g.make_node("Cast", [x], attrs={"to": int(DType.FLOAT)}, before=g.nodes[0])
    cast.outputs[0].dtype = DType.FLOAT
    x.replace_all_uses_with(cast.outputs[0])
    cast.set_input(0, x)
    w2 = g.add_initializer("w2", Tensor(np.arange(4, dtype=np.float32)))
    w.replace_all_uses_with(w2)
    assert [v.name for v in g.inputs] == ["x"] and x.name == "x" and w.name == "w"
    assert g.outputs[1] is x and g.outputs[2] is w
    g.remove_dead()
    assert set(g.initializers) == {"w", "w2"}
    verify(model)
    out = to_proto(model)
    assert [o.name for o in out.graph.output] == ["y", "x", "w"]
    assert_outputs_identical(before, ort_run(out, X))


def test_analysis_export_follows_every_edit():
    """Shape inference's exports reuse a node's proto while it is unchanged; each kind of edit
    (input rewired, attribute set, renamed output, new metadata, value type) must show up."""
    model, nodes = chain_model()

    def export() -> onnx.GraphProto:
        return to_proto(model, with_data=False).graph

    def node(gp: onnx.GraphProto, name: str) -> onnx.NodeProto:
        return next(n for n in gp.node if n.name == name)

    first = export()
    assert export() == first  # unchanged graph: the same protos
    nodes["mul"].set_input(1, nodes["add"].outputs[0])
    assert list(node(export(), "mul").input) == [nodes["relu"].outputs[0].name, nodes["add"].outputs[0].name]
    nodes["relu"].set_attr("note", 3)
    assert [(a.name, a.i) for a in node(export(), "relu").attribute] == [("note", 3)]
    nodes["relu"].set_attr("note", 4)
    assert [(a.name, a.i) for a in node(export(), "relu").attribute] == [("note", 4)]
    nodes["add"].outputs[0].name = "renamed"
    gp = export()
    assert list(node(gp, "relu").input) == ["renamed"] and "renamed" in {v.name for v in gp.value_info}
    nodes["add"].metadata_props["k"] = "v"
    assert [(p.key, p.value) for p in node(export(), "add").metadata_props] == [("k", "v")]
    nodes["relu"].outputs[0].shape = (2, 4)
    info = next(v for v in export().value_info if v.name == nodes["relu"].outputs[0].name)
    assert [d.dim_value for d in info.type.tensor_type.shape.dim] == [2, 4]
    assert to_proto(model, with_data=False).graph == to_proto(model.clone(), with_data=False).graph


def test_fewer_collections_raises_the_threshold_and_restores_it():
    import gc

    from infercc.ir.collection import YOUNG, fewer_collections

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        with fewer_collections():
            assert gc.get_threshold()[0] >= YOUNG
            with fewer_collections():
                assert gc.get_threshold()[0] >= YOUNG
            assert gc.get_threshold()[0] >= YOUNG  # the inner exit leaves the outer's raise
        assert gc.get_threshold() == (700, 10, 10)
        with pytest.raises(RuntimeError), fewer_collections():
            raise RuntimeError("a failing compile")
        assert gc.get_threshold() == (700, 10, 10)
        gc.set_threshold(0)  # collection switched off by the process: left off
        with fewer_collections():
            assert gc.get_threshold()[0] == 0
        assert gc.get_threshold()[0] == 0
    finally:
        gc.set_threshold(*before)
