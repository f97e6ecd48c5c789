"""Norm fusion: every LayerNorm / RMSNorm of the fixtures becomes a canonical op (residual adds
joined where shapes allow), hand-written spellings fuse and match, near misses stay with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import infercc
from tests.fixtures import catalog

from ._util import (
    F16,
    FIXTURES,
    F,
    canonical_counts,
    check_compiles_equal,
    const,
    fuse_only,
    fused,
    model,
    op_counts,
    random,
    sites,
    x_input,
)

node = helper.make_node

#: family -> (canonical norm kind, norm sites: 2 per layer + final; phi has 1 per layer + final).
NORMS = {
    "bert": ("LayerNorm", 5), "gpt2": ("LayerNorm", 5), "gpt_neox": ("LayerNorm", 5), "phi": ("LayerNorm", 3),
    "llama": ("RMSNorm", 5), "mistral": ("RMSNorm", 5), "qwen2": ("RMSNorm", 5),
}
#: Norms whose input is a residual Add that becomes a Skip* op. bert's embedding norm adds a
#: (1, min(128, seq), H) position table (not provably (1, seq, H)); gpt_neox's parallel layers feed
#: one sum to two norms (the second reads the first's sum output); the first layer reads embeddings.
SKIPS = {"bert": 4, "gpt2": 5, "gpt_neox": 2, "phi": 2, "llama": 4, "mistral": 4, "qwen2": 4}
#: TorchScript exports lose dims through their Reshape chains ([None, None, 64]): where equal shapes
#: cannot be proven the residual Add stays separate (with a recorded reason).
UNPROVABLE_TORCHSCRIPT = {"bert", "gpt2"}


@pytest.mark.parametrize("name", FIXTURES)
def test_every_norm_of_the_fixture_is_fused(name):
    family = catalog.fixture_info(name)["family"]
    kind, expected = NORMS[family]
    cm = fused(name)
    counts = canonical_counts(cm)
    total = counts.get(kind, 0) + counts.get(f"Skip{kind}", 0)
    assert total == expected, (name, counts)
    skips = counts.get(f"Skip{kind}", 0)
    if name.endswith("_torchscript") and family in UNPROVABLE_TORCHSCRIPT:
        assert skips >= 0
    else:
        assert skips == SKIPS[family], (name, counts)
    ops = op_counts(cm)
    for leftover in ("LayerNormalization", "ReduceMean", "Sqrt", "Reciprocal"):
        assert ops.get(leftover, 0) == 0, (name, leftover, ops)
    record = cm.diagnostics["fuse_norms"]
    assert len([s for s in record.sites if s.status == "applied" and s.where.startswith(kind)]) == expected
    # Every norm left without its residual Add says why.
    for s in record.sites:
        if s.status == "skipped":
            assert s.reason.startswith("fuse_skip_norm: ") and "shape" in s.reason, s
    assert skips + len([s for s in record.sites if s.status == "skipped"]) >= SKIPS[family]


# -- hand-written RMSNorm spellings -------------------------------------------------------------
H = 8


def rms_model(*, square="pow", divide="reciprocal", exponent=2.0, eps_input=False, axes=(-1,), casts=False):
    elem = F16 if casts else F
    wdtype = np.float16 if casts else np.float32
    x = "xf" if casts else "x"
    nodes = [node("Cast", ["x"], ["xf"], to=F)] if casts else []
    nodes.append(node("Pow", [x, "two"], ["sq"]) if square == "pow" else node("Mul", [x, x], ["sq"]))
    nodes += [node("ReduceMean", ["sq", "axes"], ["ms"]), node("Add", ["ms", "eps"], ["var"])]
    if divide == "div":
        nodes += [node("Sqrt", ["var"], ["std"]), node("Div", [x, "std"], ["n"])]
    elif divide == "reciprocal":
        nodes += [node("Sqrt", ["var"], ["std"]), node("Reciprocal", ["std"], ["r"]), node("Mul", [x, "r"], ["n"])]
    elif divide == "one_over":
        nodes += [node("Sqrt", ["var"], ["std"]), node("Div", ["one", "std"], ["r"]), node("Mul", ["r", x], ["n"])]
    else:
        nodes += [node("Pow", ["var", "neg_half"], ["r"]), node("Mul", [x, "r"], ["n"])]
    if casts:
        nodes.append(node("Cast", ["n"], ["n16"], to=F16))
    nodes.append(node("Mul", ["w", "n16" if casts else "n"], ["y"]))
    inits = [
        const("two", np.float32(exponent)), const("axes", np.array(axes, np.int64)), const("one", np.float32(1)),
        const("neg_half", np.float32(-0.5)), const("w", (1 + random([H], seed=5) * 0.1).astype(wdtype)),
    ]
    inputs = [x_input(elem=elem)]
    if eps_input:
        inputs.append(helper.make_tensor_value_info("eps", F, []))
    else:
        inits.append(const("eps", np.float32(1e-6)))
    return model(nodes, inputs, ["y"], inits, out_type=elem)


@pytest.mark.parametrize("square", ["pow", "mul"])
@pytest.mark.parametrize("divide", ["div", "reciprocal", "one_over", "rsqrt_pow"])
def test_rmsnorm_spellings_fuse_and_match(square, divide):
    proto = rms_model(square=square, divide=divide)
    assert canonical_counts(fuse_only(proto)) == {"RMSNorm": 1}
    results = check_compiles_equal(proto, {"x": random([2, 3, H])})
    assert op_counts(results["ort"])["SimplifiedLayerNormalization"] == 1


@pytest.mark.parametrize("divide", ["div", "reciprocal", "one_over", "pow"])
def test_rmsnorm_whose_ones_scale_was_removed_still_fuses(divide):
    """Freshly initialized checkpoints have RMSNorm weights of ones; the no-op pass drops that Mul
    before the fusions run, and the norm must still become one kernel."""
    proto = rms_model(divide=divide)
    for init_ in proto.graph.initializer:
        if init_.name == "w":
            init_.CopyFrom(const("w", np.ones(H, np.float32)))
    cm = infercc.compile(proto)
    assert cm.diagnostics["fuse_norms"].changes.get("fuse_rmsnorm_unscaled") == 1
    results = check_compiles_equal(proto, {"x": random([2, 3, H])})
    assert op_counts(results["ort"])["SimplifiedLayerNormalization"] == 1


def test_rmsnorm_with_hf_casts_around_it_fuses_in_float16():
    proto = rms_model(casts=True)
    cm = fuse_only(proto)
    assert canonical_counts(cm) == {"RMSNorm": 1}
    assert "Cast" not in op_counts(cm)
    check_compiles_equal(proto, {"x": random([2, 3, H], np.float16)}, tol=2e-3)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"exponent": 3.0}, "the exponent of the square is 3, not 2"),
        ({"eps_input": True}, "epsilon %eps is not a constant"),
        ({"axes": (1,)}, "not the last axis"),
    ],
    ids=["wrong_constant", "epsilon_not_constant", "mean_over_axis_1"],
)
def test_rmsnorm_near_misses_stay_unfused_with_reason(options, reason):
    proto = rms_model(**options)
    cm = fuse_only(proto)
    assert canonical_counts(cm) == {}
    skipped = sites(cm, "fuse_norms", "skipped")
    assert any(reason in s.reason for s in skipped), [s.reason for s in skipped]
    feeds = {"x": random([2, 3, H])}
    if options.get("eps_input"):
        feeds["eps"] = np.array(1e-6, np.float32)
    check_compiles_equal(proto, feeds, tol=1e-6)


# -- LayerNorm ----------------------------------------------------------------------------------
def ln_model(*, opset=20, bias=True, axes=(-1,), square="pow"):
    def mean(src, dst):
        if opset >= 18:
            return node("ReduceMean", [src, "axes"], [dst])
        return node("ReduceMean", [src], [dst], axes=list(axes))

    nodes = [mean("x", "mu"), node("Sub", ["x", "mu"], ["d"])]
    nodes.append(node("Pow", ["d", "two"], ["sq"]) if square == "pow" else node("Mul", ["d", "d"], ["sq"]))
    nodes += [mean("sq", "var"), node("Add", ["var", "eps"], ["ve"]), node("Sqrt", ["ve"], ["std"]),
              node("Div", ["d", "std"], ["n"]), node("Mul", ["n", "g"], ["scaled" if bias else "y"])]
    if bias:
        nodes.append(node("Add", ["scaled", "b"], ["y"]))
    inits = [const("two", np.float32(2)), const("eps", np.float32(1e-5)), const("g", 1 + random([H], seed=2) * 0.1),
             const("b", random([H], seed=3) * 0.1)]
    if opset >= 18:
        inits.append(const("axes", np.array(axes, np.int64)))
    return model(nodes, [x_input()], ["y"], inits, opset=opset)


@pytest.mark.parametrize("opset", [13, 17, 20])
@pytest.mark.parametrize("bias", [True, False])
def test_decomposed_layernorm_fuses_and_matches(opset, bias):
    proto = ln_model(opset=opset, bias=bias, square="mul" if opset == 13 else "pow")
    assert canonical_counts(fuse_only(proto)) == {"LayerNorm": 1}
    results = check_compiles_equal(proto, {"x": random([2, 5, H], scale=3.0)})
    assert op_counts(results["ort"]) == {"LayerNormalization": 1}
    if opset < 17:  # no standard LayerNormalization: decomposed, with a warning naming the node
        warnings = results["onnx"].diagnostics.warnings
        assert len(warnings) == 1 and "LayerNorm" in warnings[0] and "needs opset 17" in warnings[0]


def test_layernorm_mean_over_another_axis_stays_unfused():
    proto = ln_model(axes=(1,))
    cm = fuse_only(proto)
    assert canonical_counts(cm) == {}
    assert any("not the last axis" in s.reason for s in sites(cm, "fuse_norms", "skipped"))
    check_compiles_equal(proto, {"x": random([2, 5, H])}, tol=1e-6)


def test_layernormalization_over_two_axes_is_not_a_last_axis_norm():
    proto = model([node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-2)], [x_input(shape=(2, 5, H))], ["y"],
                  [const("g", np.ones([5, H], np.float32)), const("b", np.zeros([5, H], np.float32))])
    cm = fuse_only(proto)
    assert canonical_counts(cm) == {}
    assert any("not over the last axis only" in s.reason for s in sites(cm, "fuse_norms", "skipped"))


# -- residual (skip) fusion ---------------------------------------------------------------------
def skip_model(kind="ln", *, skip_shape=("batch", "seq", H), sum_used=True):
    norm = (node("LayerNormalization", ["s", "g", "beta"], ["n"], epsilon=1e-5) if kind == "ln" else
            node("SimplifiedLayerNormalization", ["s", "g"], ["n"], epsilon=1e-6))
    nodes = [node("MatMul", ["x", "W"], ["m"]), node("Add", ["m", "bias"], ["mb"]), node("Add", ["r", "mb"], ["s"])]
    if kind == "rms":  # spelled out, as exporters do
        nodes += [node("Mul", ["s", "s"], ["sq"]), node("ReduceMean", ["sq", "axes"], ["ms"]),
                  node("Add", ["ms", "eps"], ["v"]), node("Sqrt", ["v"], ["std"]), node("Div", ["s", "std"], ["nn"]),
                  node("Mul", ["nn", "g"], ["n"])]
    else:
        nodes.append(norm)
    nodes.append(node("Add", ["n", "s"], ["y"]) if sum_used else node("Identity", ["n"], ["y"]))
    inits = [const("W", random([H, H], seed=4) * 0.3), const("bias", random([H], seed=6)), const("g", 1 + random([H], seed=7) * 0.1),
             const("beta", random([H], seed=8) * 0.1), const("axes", np.array([-1], np.int64)), const("eps", np.float32(1e-6))]
    return model(nodes, [x_input(), x_input("r", skip_shape)], ["y"], inits)


@pytest.mark.parametrize("kind", ["ln", "rms"])
@pytest.mark.parametrize("sum_used", [True, False])
def test_residual_add_with_bias_joins_the_norm(kind, sum_used):
    proto = skip_model(kind, sum_used=sum_used)
    cm = fuse_only(proto)
    skip_op = "SkipLayerNorm" if kind == "ln" else "SkipRMSNorm"
    assert canonical_counts(cm) == {skip_op: 1}
    skip = next(n for n in cm.model.graph.nodes if n.op_type == skip_op)
    assert skip.inputs[-1].name == "bias"  # the MatMul's bias rides along
    assert "Add" not in op_counts(cm) or sum_used
    feeds = {"x": random([3, 4, H], seed=1), "r": random([3, 4, H], seed=2)}
    results = check_compiles_equal(proto, feeds)
    ort_ops = op_counts(results["ort"])
    ort_name = "SkipLayerNormalization" if kind == "ln" else "SkipSimplifiedLayerNormalization"
    assert ort_ops[ort_name] == 1 and ort_ops.get("Add", 0) == (1 if sum_used else 0)


def test_broadcast_position_table_is_a_valid_skip():
    proto = skip_model("ln", skip_shape=(1, "seq", H))
    assert canonical_counts(fuse_only(proto)) == {"SkipLayerNorm": 1}
    check_compiles_equal(proto, {"x": random([3, 4, H], seed=1), "r": random([1, 4, H], seed=2)})


def test_residual_of_unprovable_shape_stays_a_separate_add():
    proto = skip_model("ln", skip_shape=("a", "b", H))
    cm = fuse_only(proto)
    assert canonical_counts(cm) == {"LayerNorm": 1}
    reasons = [s.reason for s in sites(cm, "fuse_norms", "skipped")]
    assert len(reasons) == 1 and "['batch', 'seq', 8]" in reasons[0] and "['a', 'b', 8]" in reasons[0], reasons
