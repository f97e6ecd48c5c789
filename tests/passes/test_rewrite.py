"""The rewrite toolkit: patterns, the backtracking matcher, and rule application with diagnostics."""

from __future__ import annotations

import numpy as np
import pytest

from infercc.ir import verify
from infercc.passes.rewrite import Attr, Const, Matcher, Or, Rule, apply_rules, const_value, node_attr
from infercc.passes.rewrite.pattern import build_pattern

from ._build import I64, B, F, assert_same_outputs, context, init, make, node, ops, ort_run, to_ir, vi

X = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5


def rewrite(model, *rules, **config):
    ctx = context(**config)
    n = apply_rules(model, list(rules), ctx)
    ctx.record.finish()
    verify(model)
    return n, ctx.record


def matcher_for(pattern, model):
    root, _ = build_pattern(pattern)
    return Matcher(root, model.opset("") or 99)


def value(model, name):
    return model.graph.value(name)


# ------------------------------------------------------------------------------------ variables
def _square(op, x):
    return op.Mul(x, x)


def test_variable_bound_twice_must_be_the_same_value():
    proto = make(
        [node("Mul", ["a", "a"], ["sq"]), node("Mul", ["a", "b"], ["ab"]), node("Add", ["sq", "ab"], ["y"])],
        [vi("a", [2, 3]), vi("b", [2, 3])], [vi("y", [2, 3])],
    )
    model = to_ir(proto)
    m = matcher_for(_square, model)
    match = m.match(value(model, "sq"))
    assert match is not None and match.bindings["x"] is value(model, "a")
    assert m.match(value(model, "ab")) is None
    assert "x must be the same value" in m.reason

    rule = Rule("square", _square, lambda op, x: op.Pow(x, op.const(np.float32(2))), report_mismatch=True)
    n, record = rewrite(model, rule)
    assert n == 1
    assert sorted(ops(model)) == ["Add", "Mul", "Pow"]
    assert any("x must be the same value" in s.reason for s in record.sites)
    feeds = {"a": X, "b": X + 1}
    assert_same_outputs(ort_run(proto, feeds), ort_run(model, feeds), atol=1e-5)


# ------------------------------------------------------------------------------------ constants
def _add_zero(op, x):
    return op.Add(x, Const("c", 0.0))


def test_const_with_value_matches_only_that_constant():
    proto = make(
        [
            node("Add", ["x", "zero"], ["a"]),
            node("Add", ["x", "one"], ["b"]),
            node("Add", ["x", "x2"], ["c"]),
            node("Constant", [], ["kzero"], value=init("", np.array(0.0, np.float32))),
            node("Add", ["x", "kzero"], ["d"]),
        ],
        [vi("x", [2, 3]), vi("x2", [2, 3])], [vi(n, [2, 3]) for n in "abcd"],
        [init("zero", np.float32(0)), init("one", np.float32(1))],
    )
    model = to_ir(proto)
    m = matcher_for(_add_zero, model)
    assert m.match(value(model, "a")).bindings["c"] is value(model, "zero")
    assert m.match(value(model, "b")) is None and "is not 0.0" in m.reason
    assert m.match(value(model, "c")) is None and "not a constant" in m.reason
    # A Constant node counts as a constant too.
    assert m.match(value(model, "d")) is not None


def test_literal_number_in_pattern_is_a_const():
    def pattern(op, x):
        return op.Mul(x, 2.0)

    proto = make(
        [node("Mul", ["x", "two"], ["a"]), node("Mul", ["x", "three"], ["b"])],
        [vi("x", [2, 3])], [vi("a", [2, 3]), vi("b", [2, 3])],
        [init("two", np.float32(2)), init("three", np.float32(3))],
    )
    model = to_ir(proto)
    m = matcher_for(pattern, model)
    assert m.match(value(model, "a")) is not None
    assert m.match(value(model, "b")) is None


def test_const_value_reads_initializers_and_constant_nodes():
    proto = make(
        [
            node("Constant", [], ["k1"], value_float=1.5),
            node("Constant", [], ["k2"], value_ints=[1, 2]),
            node("Add", ["x", "k1"], ["a"]),
            node("Reshape", ["a", "k2"], ["y"]),
        ],
        [vi("x", [2])], [vi("y", [1, 2])], [init("w", np.ones(2, np.float32))],
    )
    model = to_ir(proto)
    assert const_value(value(model, "k1")) == np.float32(1.5)
    assert const_value(value(model, "k2")).tolist() == [1, 2]
    assert const_value(value(model, "w")).tolist() == [1.0, 1.0]
    assert const_value(value(model, "x")) is None
    assert const_value(value(model, "a")) is None
    assert const_value(None) is None


# -------------------------------------------------------------------------------- commutativity
@pytest.mark.parametrize("op_type", ["Add", "Mul"])
@pytest.mark.parametrize("const_first", [False, True])
def test_commutative_ops_match_in_both_orders(op_type, const_first):
    def pattern(op, x):
        return getattr(op, op_type)(x, Const("c"))

    ins = ["c0", "x"] if const_first else ["x", "c0"]
    proto = make([node(op_type, ins, ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])], [init("c0", np.float32(3))])
    model = to_ir(proto)
    match = matcher_for(pattern, model).match(value(model, "y"))
    assert match is not None
    assert match.bindings["x"] is value(model, "x")
    assert match.bindings["c"] is value(model, "c0")


def test_non_commutative_op_does_not_swap_inputs():
    def pattern(op, x):
        return op.Sub(x, Const("c"))

    proto = make([node("Sub", ["c0", "x"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])], [init("c0", np.float32(3))])
    model = to_ir(proto)
    m = matcher_for(pattern, model)
    assert m.match(value(model, "y")) is None


def test_check_sees_the_swapped_order_when_the_first_is_refused():
    """With plain variables both orders match; a check refusing the first order must not hide the
    second (the constant may come first: Mul(c, x))."""

    def pattern(op, x, c):
        return op.Mul(x, c)

    def check(x, c):
        return None if const_value(c) is not None and const_value(x) is None else "c must be the constant"

    rule = Rule("mul_by_const", pattern, lambda op, x, c: op.Div(x, op.const(1 / const_value(c))), check=check)
    proto = make([node("Mul", ["c0", "x"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])], [init("c0", np.float32(4))])
    model = to_ir(proto)
    n, record = rewrite(model, rule)
    assert n == 1, record.sites
    assert ops(model) == ["Div"]
    assert_same_outputs(ort_run(proto, {"x": X}), ort_run(model, {"x": X}))


# ------------------------------------------------------------------------------------ optional
def _relu_of_optional_cast(op, x):
    return op.Relu(op.Cast(x, to=Attr("to"), _optional=True, _bind="cast"))


def test_optional_node_matches_present_and_absent():
    proto = make(
        [node("Cast", ["i"], ["f"], to=F), node("Relu", ["f"], ["a"]), node("Relu", ["x"], ["b"])],
        [vi("i", [2, 3], I64), vi("x", [2, 3])], [vi("a", [2, 3]), vi("b", [2, 3])],
    )
    model = to_ir(proto)
    m = matcher_for(_relu_of_optional_cast, model)
    present = m.match(value(model, "a"))
    assert present.bindings["x"] is value(model, "i")
    assert present.bindings["to"] == F
    assert present.bindings["cast"].op_type == "Cast"
    assert len(present.nodes) == 2
    absent = m.match(value(model, "b"))
    assert absent.bindings["x"] is value(model, "x")
    assert len(absent.nodes) == 1


def test_unbound_captures_of_an_absent_optional_node_are_passed_as_none():
    seen = []

    def replacement(op, x, to, cast):
        seen.append((to, cast))
        return op.Sigmoid(x if cast is None else op.Cast(x, to=to))

    rule = Rule("relu_to_sigmoid", _relu_of_optional_cast, replacement)
    proto = make(
        [node("Cast", ["i"], ["f"], to=F), node("Relu", ["f"], ["a"]), node("Relu", ["x"], ["b"])],
        [vi("i", [2, 3], I64), vi("x", [2, 3])], [vi("a", [2, 3]), vi("b", [2, 3])],
    )
    model = to_ir(proto)
    n, _ = rewrite(model, rule)
    assert n == 2
    assert sorted(ops(model)) == ["Cast", "Sigmoid", "Sigmoid"]
    assert (None, None) in seen


# ---------------------------------------------------------------------------------------- Or
def test_or_matches_any_alternative():
    def pattern(op, x):
        return op.Relu(Or(op.Sigmoid(x), op.Tanh(x)))

    proto = make(
        [
            node("Sigmoid", ["x"], ["s"]), node("Relu", ["s"], ["a"]),
            node("Tanh", ["x"], ["t"]), node("Relu", ["t"], ["b"]),
            node("Exp", ["x"], ["e"]), node("Relu", ["e"], ["c"]),
        ],
        [vi("x", [2, 3])], [vi(n, [2, 3]) for n in "abc"],
    )
    model = to_ir(proto)
    m = matcher_for(pattern, model)
    assert m.match(value(model, "a")) is not None
    assert m.match(value(model, "b")) is not None
    assert m.match(value(model, "c")) is None


# ------------------------------------------------------------------------------ bind and Attr
def test_bind_captures_the_node_and_attr_captures_values():
    def pattern(op, x):
        return op.Transpose(op.Softmax(x, axis=Attr("axis"), _bind="sm"), perm=Attr("perm"), _bind="tr")

    proto = make(
        [node("Softmax", ["x"], ["s"], axis=0), node("Transpose", ["s"], ["y"], perm=[1, 0])],
        [vi("x", [2, 3])], [vi("y", [3, 2])],
    )
    model = to_ir(proto)
    match = matcher_for(pattern, model).match(value(model, "y"))
    assert match.bindings["axis"] == 0
    assert list(match.bindings["perm"]) == [1, 0]
    assert match.bindings["sm"].op_type == "Softmax"
    assert match.bindings["tr"].op_type == "Transpose"


def test_attr_capture_of_absent_attribute_without_default_is_none():
    def pattern(op, x):
        return op.Transpose(x, perm=Attr("perm"))

    proto = make([node("Transpose", ["x"], ["y"])], [vi("x", [2, 3])], [vi("y", [3, 2])])
    model = to_ir(proto)
    assert matcher_for(pattern, model).match(value(model, "y")).bindings["perm"] is None


def test_literal_attribute_must_equal():
    def pattern(op, x):
        return op.Transpose(x, perm=[1, 0])

    proto = make(
        [node("Transpose", ["x"], ["a"], perm=[1, 0]), node("Transpose", ["x"], ["b"], perm=[0, 1])],
        [vi("x", [2, 3])], [vi("a", [3, 2]), vi("b", [2, 3])],
    )
    model = to_ir(proto)
    m = matcher_for(pattern, model)
    assert m.match(value(model, "a")) is not None
    assert m.match(value(model, "b")) is None and "perm" in m.reason


# ----------------------------------------------------------------------- schema default attrs
@pytest.mark.parametrize(("opset", "default_axis"), [(11, 1), (13, -1), (17, -1)])
def test_schema_default_attributes_depend_on_opset(opset, default_axis):
    def last_axis(op, x):
        return op.Softmax(x, axis=-1)

    def captured(op, x):
        return op.Softmax(x, axis=Attr("axis"))

    proto = make([node("Softmax", ["x"], ["y"])], [vi("x", [2, 3, 4])], [vi("y", [2, 3, 4])], opset=opset)
    model = to_ir(proto)
    n = model.graph.nodes[0]
    assert node_attr(n, "axis", opset) == default_axis
    assert matcher_for(captured, model).match(value(model, "y")).bindings["axis"] == default_axis
    assert (matcher_for(last_axis, model).match(value(model, "y")) is not None) == (default_axis == -1)


def test_schema_defaults_for_float_attributes():
    def pattern(op, a, b):
        return op.Gemm(a, b, alpha=1.0, transA=0)

    proto = make([node("Gemm", ["a", "b"], ["y"], transB=1)], [vi("a", [2, 3]), vi("b", [4, 3])], [vi("y", [2, 4])])
    model = to_ir(proto)
    assert matcher_for(pattern, model).match(value(model, "y")) is not None


def test_rules_use_the_model_opset_for_defaults():
    """apply_rules reads the model's opset: a rule needing axis=-1 rewrites at opset 13 only."""

    def pattern(op, x):
        return op.Softmax(x, axis=-1)

    rule = Rule("sm_last", pattern, lambda op, x: op.Softmax(x, axis=2))
    for opset, expected in ((11, 0), (13, 1)):
        model = to_ir(make([node("Softmax", ["x"], ["y"])], [vi("x", [2, 3, 4])], [vi("y", [2, 3, 4])], opset=opset))
        n, _ = rewrite(model, rule)
        assert n == expected, opset


# ------------------------------------------------------------------------- other inputs
def test_allow_other_inputs():
    def strict(op, x):
        return op.Clip(x)

    def loose(op, x):
        return op.Clip(x, _allow_other_inputs=True)

    proto = make(
        [node("Clip", ["x", "lo", "hi"], ["a"]), node("Clip", ["x"], ["b"]), node("Clip", ["x", "", "hi"], ["c"])],
        [vi("x", [2, 3])], [vi(n, [2, 3]) for n in "abc"],
        [init("lo", np.float32(0)), init("hi", np.float32(1))],
    )
    model = to_ir(proto)
    m = matcher_for(strict, model)
    assert m.match(value(model, "a")) is None and "has 3 inputs, pattern expects 1" in m.reason
    assert m.match(value(model, "b")) is not None
    assert m.match(value(model, "c")) is None
    m = matcher_for(loose, model)
    assert all(m.match(value(model, n)) is not None for n in "abc")


def test_trailing_omitted_inputs_do_not_count():
    def pattern(op, x):
        return op.Clip(x)

    proto = make([node("Clip", ["x", "", ""], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])])
    model = to_ir(proto)
    assert matcher_for(pattern, model).match(value(model, "y")) is not None


# ------------------------------------------------------------------------- rule application
def _relu_exp(op, x):
    return op.Relu(op.Exp(x))


def _softplus_like(op, x):
    return op.Softplus(x)


def test_check_returning_a_reason_is_recorded_as_a_skipped_site():
    rule = Rule("relu_exp", _relu_exp, _softplus_like, check=lambda x: "x is not known to be small")
    proto = make([node("Exp", ["x"], ["e"]), node("Relu", ["e"], ["y"], name="the_relu")], [vi("x", [2, 3])], [vi("y", [2, 3])])
    model = to_ir(proto)
    n, record = rewrite(model, rule)
    assert n == 0
    assert ops(model) == ["Exp", "Relu"]
    assert [(s.where, s.status, s.reason) for s in record.sites] == [
        ("Relu 'the_relu'", "skipped", "relu_exp: x is not known to be small"),
    ]
    assert record.status == "skipped"
    assert any("x is not known to be small" in r for r in record.reasons)


def test_check_returning_false_or_true():
    proto = make([node("Exp", ["x"], ["e"]), node("Relu", ["e"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])])
    model = to_ir(proto)
    # False: not a candidate after all -- nothing rewritten, nothing recorded.
    n, record = rewrite(model, Rule("relu_exp", _relu_exp, _softplus_like, check=lambda: False))
    assert n == 0 and record.sites == [] and ops(model) == ["Exp", "Relu"]
    n, record = rewrite(model, Rule("relu_exp", _relu_exp, _softplus_like, check=lambda x: True))
    assert n == 1 and ops(model) == ["Softplus"]
    assert record.status == "applied" and record.changes == {"relu_exp": 1}


def test_check_receives_only_the_bindings_it_names():
    got = {}

    def check(x, **rest):
        got.update(rest, x=x)

    proto = make([node("Exp", ["x"], ["e"]), node("Relu", ["e"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])])
    model = to_ir(proto)
    rewrite(model, Rule("relu_exp", _relu_exp, _softplus_like, check=check))
    assert set(got) == {"x"}


def test_intermediate_used_outside_is_skipped_with_reason():
    rule = Rule("relu_exp", _relu_exp, _softplus_like)
    proto = make(
        [node("Exp", ["x"], ["e"]), node("Relu", ["e"], ["y"]), node("Neg", ["e"], ["z"])],
        [vi("x", [2, 3])], [vi("y", [2, 3]), vi("z", [2, 3])],
    )
    model = to_ir(proto)
    n, record = rewrite(model, rule)
    assert n == 0
    assert ops(model) == ["Exp", "Relu", "Neg"]
    assert "intermediate %e is also used outside the pattern" in record.sites[0].reason


def test_intermediate_graph_output_is_skipped_with_reason():
    rule = Rule("relu_exp", _relu_exp, _softplus_like)
    proto = make([node("Exp", ["x"], ["e"]), node("Relu", ["e"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3]), vi("e", [2, 3])])
    model = to_ir(proto)
    n, record = rewrite(model, rule)
    assert n == 0
    assert "intermediate %e is a graph output" in record.sites[0].reason


def test_replacement_keeps_graph_output_names_and_numbers():
    rule = Rule("relu_exp", _relu_exp, lambda op, x: op.Relu(op.Exp(op.Identity(x))))
    rule2 = Rule("relu_exp2", _relu_exp, _softplus_like, check=lambda x: x.producer is None)
    proto = make([node("Exp", ["x"], ["e"]), node("Relu", ["e"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])])
    model = to_ir(proto)
    n, _ = rewrite(model, rule)
    assert n >= 1
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert_same_outputs(ort_run(proto, {"x": X}), ort_run(model, {"x": X}))
    model = to_ir(proto)
    n, _ = rewrite(model, rule2)
    assert n == 1 and ops(model) == ["Softplus"]
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert model.graph.outputs[0].dtype is not None
    out = ort_run(model, {"x": X})
    assert list(out) == ["y"]


def test_pass_through_replacement_of_an_output_reading_an_input_converges():
    """Identity(x) -> x where x is a graph input and the result a graph output: the output must keep
    its name, so an Identity stays; the rule must not rewrite it again and again."""
    rule = Rule("identity", lambda op, x: op.Identity(x), lambda op, x: x)
    proto = make([node("Identity", ["x"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])])
    model = to_ir(proto)
    n, record = rewrite(model, rule)
    assert n == 0, record.changes
    assert ops(model) == ["Identity"]
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert_same_outputs(ort_run(proto, {"x": X}), ort_run(model, {"x": X}))


def test_rules_apply_to_fixpoint():
    rule = Rule("identity", lambda op, x: op.Identity(x), lambda op, x: x)
    proto = make(
        [node("Identity", ["x"], ["a"]), node("Identity", ["a"], ["b"]), node("Identity", ["b"], ["c"]), node("Relu", ["c"], ["y"])],
        [vi("x", [2, 3])], [vi("y", [2, 3])],
    )
    model = to_ir(proto)
    n, record = rewrite(model, rule)
    assert n == 3 and ops(model) == ["Relu"] and record.changes == {"identity": 3}


def test_report_mismatch_records_the_deepest_failure():
    def pattern(op, x, y, m):
        return op.Softmax(Or(op.Add(op.MatMul(x, y), m), op.Div(x, Const("c"))))

    rule = Rule("attention_scores", pattern, lambda op, x: x, report_mismatch=True)
    proto = make(
        [node("Mul", ["a", "b"], ["p"]), node("Add", ["p", "m"], ["s"]), node("Softmax", ["s"], ["y"], name="sm")],
        [vi("a", [2, 3]), vi("b", [2, 3]), vi("m", [2, 3])], [vi("y", [2, 3])],
    )
    model = to_ir(proto)
    n, record = rewrite(model, rule)
    assert n == 0
    assert len(record.sites) == 1
    site = record.sites[0]
    assert site.where == "Softmax 'sm'" and site.status == "skipped"
    assert site.reason.startswith("attention_scores: expected MatMul producing %p, found Mul"), site.reason

    quiet = Rule("attention_scores", pattern, lambda op, x: x)
    model = to_ir(proto)
    _, record = rewrite(model, quiet)
    assert record.sites == []


def test_rule_anchor_and_params():
    rule = Rule("relu_exp", _relu_exp, _softplus_like)
    assert rule.anchor == ("", "Relu")
    assert rule.params == ["x"]


def test_pattern_must_return_an_op_output():
    with pytest.raises(TypeError):
        Rule("bad", lambda op, x: x, lambda op, x: x)
    with pytest.raises(TypeError):
        Rule("bad", lambda op, x: op.Relu("x"), lambda op, x: x)


def test_domain_in_patterns():
    def pattern(op, x):
        return op.FastGelu(x, _domain="com.microsoft")

    proto = make([node("Relu", ["x"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])])
    model = to_ir(proto)
    m = matcher_for(pattern, model)
    assert m.match(value(model, "y")) is None


def test_multi_output_patterns():
    def pattern(op, x):
        values, _ = op.TopK(x, Const("k"), _outputs=2)
        return op.Relu(values)

    proto = make(
        [node("TopK", ["x", "k"], ["v", "i"]), node("Relu", ["v"], ["y"]), node("Relu", ["x"], ["z"])],
        [vi("x", [2, 3])], [vi("y", [2, 2]), vi("z", [2, 3])], [init("k", np.array([2], np.int64))],
    )
    model = to_ir(proto)
    m = matcher_for(pattern, model)
    assert m.match(value(model, "y")) is not None
    assert m.match(value(model, "z")) is None


def test_shared_pattern_node_must_be_one_graph_node():
    def pattern(op, x):
        t = op.Relu(x)
        return op.Add(t, t)

    proto = make(
        [node("Relu", ["a"], ["r"]), node("Add", ["r", "r"], ["y1"]),
         node("Relu", ["a"], ["r1"]), node("Relu", ["a"], ["r2"]), node("Add", ["r1", "r2"], ["y2"])],
        [vi("a", [2, 3])], [vi("y1", [2, 3]), vi("y2", [2, 3])],
    )
    model = to_ir(proto)
    m = matcher_for(pattern, model)
    assert len(m.match(value(model, "y1")).nodes) == 2
    assert m.match(value(model, "y2")) is None


def test_named_const_used_twice_must_be_the_same_constant():
    def pattern(op, x):
        c = Const("c")
        return op.Add(op.Mul(x, c), c)

    proto = make(
        [node("Mul", ["x", "k1"], ["m1"]), node("Add", ["m1", "k1"], ["y1"]),
         node("Mul", ["x", "k1"], ["m2"]), node("Add", ["m2", "k2"], ["y2"])],
        [vi("x", [2])], [vi("y1", [2]), vi("y2", [2])], [init("k1", np.float32(2)), init("k2", np.float32(3))],
    )
    model = to_ir(proto)
    m = matcher_for(pattern, model)
    assert m.match(value(model, "y1")) is not None
    assert m.match(value(model, "y2")) is None


def test_refused_in_every_order_records_the_first_reason():
    def pattern(op, x, c):
        return op.Mul(x, c)

    rule = Rule("mul", pattern, lambda op, x: x, check=lambda x, c: f"refused {x.name}")
    proto = make([node("Mul", ["a", "b"], ["y"], name="m")], [vi("a", [2]), vi("b", [2])], [vi("y", [2])])
    model = to_ir(proto)
    n, record = rewrite(model, rule)
    assert n == 0
    assert [s.reason for s in record.sites] == ["mul: refused a"]


def test_replacement_giving_up_leaves_nothing_behind():
    def replacement(op, x):
        op.Neg(op.Exp(x))  # starts building, then decides not to
        return None

    rule = Rule("relu_exp", _relu_exp, replacement)
    proto = make([node("Exp", ["x"], ["e"]), node("Relu", ["e"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])])
    model = to_ir(proto)
    n, record = rewrite(model, rule)
    assert n == 0 and ops(model) == ["Exp", "Relu"] and record.changes == {}


def test_rewrite_does_not_look_into_subgraphs():
    """Documented limit: rules apply to the main graph only (If/Loop bodies are left as they are)."""
    from onnx import helper

    rule = Rule("identity", lambda op, x: op.Identity(x), lambda op, x: x)
    body = helper.make_graph([node("Identity", ["x"], ["t0"]), node("Relu", ["t0"], ["t"])], "then", [], [vi("t", [2])])
    other = helper.make_graph([node("Neg", ["x"], ["e"])], "else", [], [vi("e", [2])])
    proto = make([node("If", ["c"], ["y"], then_branch=body, else_branch=other)],
                 [vi("x", [2]), vi("c", [], B)], [vi("y", [2])])
    model = to_ir(proto)
    n, _ = rewrite(model, rule)
    assert n == 0
