"""Activation fusion: every GELU / SiLU of the fixtures becomes a canonical op (GELU biases folded),
hand-written spellings fuse and match, near misses stay with a reason."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import helper

from tests.fixtures import catalog

from ._util import (
    FIXTURES,
    canonical_counts,
    check_compiles_equal,
    const,
    fuse_only,
    fused,
    model,
    op_counts,
    random,
    session,
    sites,
    x_input,
)

node = helper.make_node

#: family -> (canonical op, approximate, sites (one per layer), bias folded into it)
ACTIVATIONS = {
    "bert": ("Gelu", "none", 2, True), "gpt_neox": ("Gelu", "none", 2, True),
    "gpt2": ("Gelu", "tanh", 2, False),  # its projections are Gemm: the bias is already inside
    "phi": ("Gelu", "tanh", 2, True),
    "llama": ("SiLU", None, 2, False), "mistral": ("SiLU", None, 2, False), "qwen2": ("SiLU", None, 2, False),
}


@pytest.mark.parametrize("name", FIXTURES)
def test_every_activation_of_the_fixture_is_fused(name):
    op_type, approximate, expected, biased = ACTIVATIONS[catalog.fixture_info(name)["family"]]
    cm = fused(name)
    nodes = [n for n in cm.model.graph.nodes if n.op_type == op_type and n.domain == "ai.infercc"]
    assert len(nodes) == expected, (name, canonical_counts(cm))
    for n in nodes:
        if approximate is not None:
            assert n.attr("approximate") == approximate
        assert (len(n.inputs) == 2) == biased, n
    ops = op_counts(cm)
    for leftover in ("Gelu", "Erf", "Tanh", "Sigmoid", "Pow"):
        assert ops.get(leftover, 0) == 0, (name, leftover, ops)
    record = cm.diagnostics["fuse_activations"]
    applied = [s for s in record.sites if s.status == "applied"]
    assert len([s for s in applied if not s.where.endswith("(bias folded in)")]) == expected
    assert len([s for s in applied if s.where.endswith("(bias folded in)")]) == (expected if biased else 0)
    if op_type == "SiLU":  # LLaMA-style MLP: recognised, reported, kept
        assert record.info["gated_mlp_sites"] == 2
        gated = [s for s in record.sites if s.status == "skipped"]
        assert len(gated) == 2 and all("gated MLP" in s.reason and "kept" in s.reason for s in gated)


# -- hand-written GELU spellings ----------------------------------------------------------------
H = 16
SQRT2 = math.sqrt(2)


def _inits(**values):
    return [const(k, np.float32(v)) for k, v in values.items()]


def erf_gelu(form="x_half", arg="div", half=0.5, sqrt2=SQRT2):
    nodes = [node("Div", ["x", "c"], ["a"]) if arg == "div" else node("Mul", ["c", "x"], ["a"]),
             node("Erf", ["a"], ["e"]), node("Add", ["one", "e"], ["p"])]
    if form == "x_half":
        nodes += [node("Mul", ["x", "half"], ["h"]), node("Mul", ["h", "p"], ["y"])]
    elif form == "half_core":
        nodes += [node("Mul", ["p", "half"], ["h"]), node("Mul", ["x", "h"], ["y"])]
    else:
        nodes += [node("Mul", ["x", "p"], ["h"]), node("Mul", ["half", "h"], ["y"])]
    c = sqrt2 if arg == "div" else 1 / sqrt2
    return model(nodes, [x_input(shape=("b", "s", H))], ["y"], _inits(c=c, one=1.0, half=half))


def tanh_gelu(inner="hf", cube="pow", cubic=0.044715, form="x_half"):
    k = math.sqrt(2 / math.pi)
    nodes = [node("Pow", ["x", "three"], ["x3"]) if cube == "pow" else node("Mul", ["x", "x"], ["x2"])]
    if cube != "pow":
        nodes.append(node("Mul", ["x2", "x"], ["x3"]))
    if inner == "hf":  # k * (x + a x^3)
        nodes += [node("Mul", ["a", "x3"], ["ax3"]), node("Add", ["x", "ax3"], ["s"]), node("Mul", ["s", "k"], ["t"])]
    else:  # k x + (k a) x^3, as ORT writes it
        nodes += [node("Mul", ["x", "k"], ["kx"]), node("Mul", ["x3", "ka"], ["kax3"]), node("Add", ["kx", "kax3"], ["t"])]
    nodes += [node("Tanh", ["t"], ["th"]), node("Add", ["th", "one"], ["p"])]
    if form == "x_half":
        nodes += [node("Mul", ["half", "x"], ["h"]), node("Mul", ["h", "p"], ["y"])]
    else:
        nodes += [node("Mul", ["x", "p"], ["h"]), node("Mul", ["h", "half"], ["y"])]
    return model(nodes, [x_input(shape=("b", "s", H))], ["y"],
                 _inits(three=3.0, a=cubic, k=k, ka=k * cubic, one=1.0, half=0.5))


@pytest.mark.parametrize("form", ["x_half", "half_core", "half_outer"])
@pytest.mark.parametrize("arg", ["div", "mul"])
def test_exact_gelu_in_any_order_fuses_and_matches(form, arg):
    proto = erf_gelu(form, arg)
    cm = fuse_only(proto)
    assert canonical_counts(cm) == {"Gelu": 1}
    assert next(n for n in cm.model.graph.nodes if n.op_type == "Gelu").attr("approximate") == "none"
    results = check_compiles_equal(proto, {"x": random([2, 3, H], scale=3.0)})
    assert op_counts(results["ort"]) == {"Gelu": 1} and op_counts(results["onnx"]) == {"Gelu": 1}


@pytest.mark.parametrize(("inner", "cube", "form"), [("hf", "pow", "x_half"), ("hf", "mul", "half_outer"),
                                                     ("ort", "pow", "half_outer"), ("ort", "mul", "x_half")])
def test_tanh_gelu_spellings_fuse_and_match(inner, cube, form):
    proto = tanh_gelu(inner, cube, form=form)
    cm = fuse_only(proto)
    assert canonical_counts(cm) == {"Gelu": 1}
    assert next(n for n in cm.model.graph.nodes if n.op_type == "Gelu").attr("approximate") == "tanh"
    results = check_compiles_equal(proto, {"x": random([2, 3, H], scale=3.0)})
    assert op_counts(results["ort"]) == {"FastGelu": 1}


@pytest.mark.parametrize(
    ("proto", "reason"),
    [
        (tanh_gelu(cubic=0.05), "the cubic coefficient (GELU's tanh approximation uses 0.044715) is 0.0500000007"),
        (erf_gelu(sqrt2=1.5), "the erf divisor is 1.5, not 1.41421356"),
        (erf_gelu(half=0.25), "the GELU half factor is 0.25, not 0.5"),
    ],
    ids=["tanh_cubic", "erf_divisor", "half"],
)
def test_gelu_with_a_wrong_constant_stays_unfused_with_reason(proto, reason):
    cm = fuse_only(proto)
    assert canonical_counts(cm) == {}
    skipped = sites(cm, "fuse_activations", "skipped")
    assert any(reason in s.reason for s in skipped), [s.reason for s in skipped]
    check_compiles_equal(proto, {"x": random([2, 3, H])}, tol=1e-6)


def _biased(activation: str, bias_shape=(H,)):
    nodes = [node("MatMul", ["x", "W"], ["m"]), node("Add", ["bias", "m"], ["mb"])]
    if activation == "gelu":
        nodes.append(node("Gelu", ["mb"], ["y"]))
    else:
        nodes.append(node("Gelu", ["mb"], ["y"], approximate="tanh"))
    inits = [const("W", random([H, H], seed=3) * 0.5), const("bias", random(bias_shape, seed=4))]
    return model(nodes, [x_input(shape=("b", "s", H))], ["y"], inits)


@pytest.mark.parametrize(("activation", "ort_op"), [("gelu", "BiasGelu"), ("gelu_tanh", "FastGelu")])
def test_bias_before_gelu_is_folded(activation, ort_op):
    proto = _biased(activation)
    cm = fuse_only(proto)
    gelu = next(n for n in cm.model.graph.nodes if n.op_type == "Gelu")
    assert [v.name for v in gelu.inputs][1] == "bias" and "Add" not in op_counts(cm)
    results = check_compiles_equal(proto, {"x": random([2, 3, H])})
    assert op_counts(results["ort"]) == {"MatMul": 1, ort_op: 1}
    assert op_counts(results["onnx"]) == {"MatMul": 1, "Add": 1, "Gelu": 1}


def test_bias_of_another_shape_is_not_folded():
    proto = _biased("gelu", bias_shape=(3, 1, H))
    cm = fuse_only(proto)
    gelu = next(n for n in cm.model.graph.nodes if n.op_type == "Gelu")
    assert len(gelu.inputs) == 1
    assert any("not [16] (the hidden size)" in s.reason for s in sites(cm, "fuse_activations", "skipped"))


# -- SiLU ---------------------------------------------------------------------------------------
def test_silu_lowers_to_quickgelu_bit_exactly():
    proto = model([node("Sigmoid", ["x"], ["s"]), node("Mul", ["s", "x"], ["y"])], [x_input(shape=("b", "s", H))], ["y"])
    assert canonical_counts(fuse_only(proto)) == {"SiLU": 1}
    x = random([3, 7, H], scale=4.0)
    results = check_compiles_equal(proto, {"x": x}, tol=0)
    assert op_counts(results["ort"]) == {"QuickGelu": 1}
    q = results["ort"].model.graph.nodes[0]
    assert q.domain == "com.microsoft" and q.attr("alpha") == 1.0
    expected = session(proto).run(None, {"x": x})[0]
    assert np.array_equal(results["ort"].run({"x": x})["y"], expected)  # bit for bit on CPU
    warnings = results["onnx"].diagnostics.warnings  # standard Swish arrives at opset 24
    assert len(warnings) == 1 and "Swish needs opset 24" in warnings[0]


def test_sigmoid_used_elsewhere_blocks_silu():
    proto = model([node("Sigmoid", ["x"], ["s"]), node("Mul", ["s", "x"], ["y"]), node("Add", ["s", "y"], ["z"])],
                  [x_input(shape=("b", "s", H))], ["z"])
    cm = fuse_only(proto)
    assert canonical_counts(cm) == {}
    assert any("also used outside" in s.reason for s in sites(cm, "fuse_activations", "skipped"))

