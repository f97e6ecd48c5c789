"""Lowering of the norm / activation canonical ops: the compiled fixtures match ORT on the original
exports (both targets), "ort" emits the contrib ops the capability table promises and ORT's CPU
provider really runs them, "onnx" stays standard, and a missing kernel falls back with a warning."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import infercc
from infercc.ir import DType
from infercc.passes.capabilities import CPU, CUDA, KERNELS, MS, LoweringContext
from tests.fixtures import catalog

from ._util import (
    F64,
    FIXTURES,
    TOLERANCE,
    F,
    compiled,
    const,
    feed_sets,
    model,
    op_counts,
    original_session,
    random,
    real_token_diff,
    run,
    session,
    x_input,
)

node = helper.make_node

#: family -> ORT ops the "ort" lowering must produce (see test_norms / test_activations for why).
ORT_OPS = {
    "bert": {"SkipLayerNormalization": 4, "LayerNormalization": 1, "BiasGelu": 2},
    "gpt2": {"SkipLayerNormalization": 5, "FastGelu": 2},
    "gpt_neox": {"SkipLayerNormalization": 2, "LayerNormalization": 3, "BiasGelu": 2},
    "phi": {"SkipLayerNormalization": 2, "LayerNormalization": 1, "FastGelu": 2},
    "llama": {"SkipSimplifiedLayerNormalization": 4, "SimplifiedLayerNormalization": 1, "QuickGelu": 2},
    "mistral": {"SkipSimplifiedLayerNormalization": 4, "SimplifiedLayerNormalization": 1, "QuickGelu": 2},
    "qwen2": {"SkipSimplifiedLayerNormalization": 4, "SimplifiedLayerNormalization": 1, "QuickGelu": 2},
}
#: The canonical ops these tests cover (other fusions, e.g. attention, lower in the same pass).
MINE = ("LayerNorm ", "RMSNorm ", "SkipLayerNorm ", "SkipRMSNorm ", "Gelu ", "SiLU ")
FUSED_OPS = {"SkipLayerNormalization", "LayerNormalization", "BiasGelu", "FastGelu", "SkipSimplifiedLayerNormalization",
             "SimplifiedLayerNormalization", "QuickGelu", "Gelu"}


@pytest.mark.parametrize("lowering", ["ort", "onnx"])
@pytest.mark.parametrize("name", FIXTURES)
def test_compiled_fixture_matches_the_original_export(name, lowering):
    cm = compiled(name, lowering)
    reference = original_session(name)
    for label, feeds in feed_sets(name):
        expected = run(reference, feeds)
        got = cm.run(feeds)
        for out, ref in expected.items():
            diff = real_token_diff(ref, got[out], feeds)
            assert diff <= TOLERANCE, (name, lowering, label, out, diff)


@pytest.mark.parametrize("name", FIXTURES)
def test_ort_lowering_emits_the_contrib_ops(name):
    cm = compiled(name, "ort")
    family = catalog.fixture_info(name)["family"]
    ops = {k: v for k, v in op_counts(cm).items() if k in FUSED_OPS}
    expected = dict(ORT_OPS[family])
    if name == "bert_torchscript":  # residual shapes unprovable: plain LayerNorms
        expected.pop("SkipLayerNormalization")
        expected["LayerNormalization"] = 5
    assert ops == expected, name
    assert not _my_warnings(cm)
    domains = {n.domain for n in cm.model.graph.nodes}
    assert "ai.infercc" not in domains and "ai.infercc" not in cm.model.opset_imports
    record = cm.diagnostics["lower_canonical_ops"]
    assert record.info["provider"] == CPU
    applied = [s for s in record.sites if s.status == "applied" and s.where.startswith(MINE)]
    assert len(applied) == sum(ORT_OPS[family].values())


def _my_warnings(cm) -> list[str]:
    """The lowering's warnings about these ops: one per op and reason ("RMSNorm 'x' ..." for one
    node, "4 SkipRMSNorm nodes (first: ...) ..." for several)."""
    prefix = "lower_canonical_ops: "
    ours = [w.removeprefix(prefix) for w in cm.diagnostics.warnings if w.startswith(prefix)]
    names = {m.strip() for m in MINE}
    return [w for w in ours if w.split(" ")[1 if w[0].isdigit() else 0] in names]


@pytest.mark.parametrize("name", FIXTURES)
def test_onnx_lowering_is_standard_onnx(name):
    cm = compiled(name, "onnx")
    proto = cm.to_onnx()
    opset = cm.model.opset("")
    for n in proto.graph.node:
        assert n.domain in ("", "ai.onnx") and onnx.defs.has(n.op_type, opset, ""), n.op_type
    onnx.checker.check_model(proto, full_check=True)
    family = catalog.fixture_info(name)["family"]
    warnings = _my_warnings(cm)
    if family in ("llama", "mistral", "qwen2"):  # RMSNormalization is opset 23, Swish opset 24
        changes = cm.diagnostics["lower_canonical_ops"].changes
        assert changes["RMSNorm_decomposed"] + changes["SkipRMSNorm_decomposed"] == 5 and changes["SiLU_decomposed"] == 2
        assert len(warnings) == 3  # one per op and reason, however many nodes
        assert sum("RMSNormalization needs opset 23; the model imports opset 20" in w for w in warnings) == 2
        assert sum(w.startswith("2 SiLU nodes") and "Swish needs opset 24" in w for w in warnings) == 1
    else:
        assert not warnings


def test_saved_compiled_model_with_contrib_ops_loads_and_runs(tmp_path):
    cm = compiled("llama_dynamo", "ort")
    feeds = catalog.reference("llama_dynamo")[0]
    loaded = infercc.load(cm.save(tmp_path / "llama"))
    np.testing.assert_array_equal(loaded.run(feeds)["logits"], cm.run(feeds)["logits"])
    skip = next(n for n in loaded.to_onnx().graph.node if n.op_type == "SkipSimplifiedLayerNormalization")
    assert skip.output[1:3] == ["", ""]  # mean / inv_std_var are not computed


# -- the capability table is what ORT's CPU provider runs ---------------------------------------
_NP = {DType.FLOAT: np.float32, DType.FLOAT16: np.float16, DType.DOUBLE: np.float64}


def _one_node(domain: str, op_type: str, dtype: DType):
    elem = int(dtype)
    shapes = {"SkipLayerNormalization": [(2, 3, 8), (2, 3, 8), (8,), (8,), (8,)],
              "SkipSimplifiedLayerNormalization": [(2, 3, 8), (2, 3, 8), (8,), (8,)],
              "LayerNormalization": [(2, 3, 8), (8,), (8,)], "SimplifiedLayerNormalization": [(2, 3, 8), (8,)],
              "BiasGelu": [(2, 3, 8), (8,)], "FastGelu": [(2, 3, 8), (8,)]}.get(op_type, [(2, 3, 8)])
    names = [f"i{k}" for k in range(len(shapes))]
    outputs = ["y", "", "", "s"] if op_type.startswith("Skip") else ["y"]
    attrs = {"alpha": 1.0} if op_type == "QuickGelu" else {}
    proto = model([node(op_type, names, outputs, domain=domain, **attrs)],
                  [helper.make_tensor_value_info(n, elem, list(s)) for n, s in zip(names, shapes)],
                  [o for o in outputs if o], out_type=elem)
    proto.opset_import.append(helper.make_opsetid(MS, 1))
    feeds = {n: np.random.default_rng(0).standard_normal(s).astype(_NP[dtype]) for n, s in zip(names, shapes)}
    return proto, feeds


CPU_ENTRIES = [(d, op, t) for (d, op), by in KERNELS.items() for t in sorted(by[CPU]) if t in _NP]


@pytest.mark.parametrize(("domain", "op_type", "dtype"), CPU_ENTRIES, ids=[f"{op}-{t}" for _, op, t in CPU_ENTRIES])
def test_cpu_capability_entries_really_run(domain, op_type, dtype):
    proto, feeds = _one_node(domain, op_type, dtype)
    out = session(proto).run(None, feeds)[0]
    assert out.shape == (2, 3, 8) and np.isfinite(out.astype(np.float64)).all()


@pytest.mark.parametrize("op_type", ["SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "BiasGelu"])
def test_cpu_capability_gaps_are_real(op_type):
    assert DType.DOUBLE not in KERNELS[(MS, op_type)][CPU]
    proto, feeds = _one_node(MS, op_type, DType.DOUBLE)
    with pytest.raises(Exception):  # noqa: B017 - ORT raises its own exception types
        session(proto).run(None, feeds)


def test_simplified_layernorm_lives_in_the_default_domain():
    """ORT registers it in the ONNX domain; com.microsoft has no such op."""
    proto, feeds = _one_node("", "SimplifiedLayerNormalization", DType.FLOAT)
    session(proto).run(None, feeds)
    proto.graph.node[0].domain = MS
    with pytest.raises(Exception):  # noqa: B017
        session(proto)


def test_context_consults_the_primary_provider():
    cuda = LoweringContext("ort", 20, (CUDA, CPU))
    cpu = LoweringContext("ort", 20, (CPU,))
    assert cuda.unsupported(MS, "SkipSimplifiedLayerNormalization", DType.BFLOAT16) is None
    assert "no com.microsoft::SkipSimplifiedLayerNormalization kernel for bfloat16" in cpu.unsupported(
        MS, "SkipSimplifiedLayerNormalization", DType.BFLOAT16)
    assert "unknown" in cpu.unsupported(MS, "Gelu", None)
    assert cpu.needs_opset("RMSNormalization") == "standard RMSNormalization needs opset 23; the model imports opset 20"


def test_missing_kernel_falls_back_to_a_decomposition_with_a_warning():
    """float64 residual + RMSNorm: ORT's CPU provider has no double SkipSimplifiedLayerNormalization."""
    nodes = [node("Add", ["x", "r"], ["s"]), node("Mul", ["s", "s"], ["sq"]), node("ReduceMean", ["sq", "axes"], ["ms"]),
             node("Add", ["ms", "eps"], ["v"]), node("Sqrt", ["v"], ["std"]), node("Div", ["s", "std"], ["n"]),
             node("Mul", ["n", "g"], ["y"])]
    inits = [const("axes", np.array([-1], np.int64)), const("eps", np.float64(1e-6)), const("g", np.linspace(0.5, 1.5, 8))]
    proto = model(nodes, [x_input(elem=F64), x_input("r", elem=F64)], ["y"], inits, out_type=F64)
    feeds = {"x": random([2, 3, 8], np.float64), "r": random([2, 3, 8], np.float64, seed=1)}
    cm = infercc.compile(proto, lowering="ort", provider="cpu", strict=True)
    warnings = cm.diagnostics.warnings
    assert len(warnings) == 1
    assert "SkipRMSNorm" in warnings[0] and "decomposed to standard ONNX" in warnings[0]
    assert "no com.microsoft::SkipSimplifiedLayerNormalization kernel for double" in warnings[0]
    record = cm.diagnostics["lower_canonical_ops"]
    assert record.changes == {"SkipRMSNorm_decomposed": 1}
    np.testing.assert_allclose(cm.run(feeds)["y"], run(session(proto), feeds)["y"], rtol=1e-12, atol=1e-12)


def test_float_sites_use_float_kernels():
    proto = model([node("LayerNormalization", ["x", "g"], ["y"])], [x_input(elem=F)], ["y"], [const("g", np.ones(8, np.float32))])
    cm = infercc.compile(proto, lowering="ort", provider="cpu")
    assert op_counts(cm) == {"LayerNormalization": 1} and not cm.diagnostics.warnings


# -- decompositions (the fallback every lowering relies on) -------------------------------------
def _skip_norm_model(kind: str, elem: int, opset: int):
    if kind == "ln":
        norm = [node("LayerNormalization", ["s", "g", "b"], ["n"], epsilon=1e-5)]
    else:  # HF's RMSNorm: statistics in float32 around the 16-bit stream
        norm = [node("Cast", ["s"], ["sf"], to=F), node("Pow", ["sf", "two"], ["sq"]),
                node("ReduceMean", ["sq", "axes"], ["ms"]), node("Add", ["ms", "eps"], ["v"]), node("Sqrt", ["v"], ["std"]),
                node("Reciprocal", ["std"], ["inv"]), node("Mul", ["sf", "inv"], ["nf"]), node("Cast", ["nf"], ["nc"], to=elem),
                node("Mul", ["g", "nc"], ["n"])]
    nodes = [node("Add", ["x", "r"], ["s"]), *norm, node("Add", ["n", "s"], ["y"])]
    np_dtype = np.float16 if elem == TensorProto.FLOAT16 else np.float32
    inits = [const("g", np.linspace(0.5, 1.5, 8).astype(np_dtype)), const("b", np.linspace(-0.1, 0.1, 8).astype(np_dtype)),
             const("two", np.float32(2)), const("axes", np.array([-1], np.int64)), const("eps", np.float32(1e-6))]
    return model(nodes, [x_input(elem=elem), x_input("r", elem=elem)], ["y"], inits, opset=opset, out_type=elem)


@pytest.mark.parametrize("elem", [F, TensorProto.FLOAT16], ids=["float", "float16"])
@pytest.mark.parametrize(("kind", "opset", "op_type"), [("ln", 13, "SkipLayerNorm"), ("rms", 20, "SkipRMSNorm")])
def test_skip_norm_decomposition_matches(kind, opset, op_type, elem):
    proto = _skip_norm_model(kind, elem, opset)
    np_dtype = np.float16 if elem == TensorProto.FLOAT16 else np.float32
    feeds = {"x": random([2, 3, 8], np_dtype, scale=2.0), "r": random([2, 3, 8], np_dtype, seed=1)}
    tol = 2e-3 if elem == TensorProto.FLOAT16 else 1e-5
    for lowering in ("ort", "onnx"):
        cm = infercc.compile(proto, lowering=lowering, provider="cpu", strict=True)
        if lowering == "onnx":
            assert cm.diagnostics["lower_canonical_ops"].changes == {f"{op_type}_decomposed": 1}
        else:
            assert cm.diagnostics["lower_canonical_ops"].changes == {f"{op_type}_lowered_ort": 1}
        np.testing.assert_allclose(cm.run(feeds)["y"].astype(np.float64), run(session(proto), feeds)["y"].astype(np.float64),
                                   atol=tol, rtol=tol)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_decomposition_below_opset_20_matches(approximate):
    from .test_activations import erf_gelu, tanh_gelu

    proto = erf_gelu() if approximate == "none" else tanh_gelu()
    proto.opset_import[0].version = 17
    feeds = {"x": random([2, 3, 16], scale=3.0)}
    cm = infercc.compile(proto, lowering="onnx", provider="cpu", strict=True)
    assert cm.diagnostics["lower_canonical_ops"].changes == {"Gelu_decomposed": 1}
    assert "standard Gelu needs opset 20" in cm.diagnostics.warnings[0]
    np.testing.assert_allclose(cm.run(feeds)["y"], run(session(proto), feeds)["y"], atol=1e-6, rtol=1e-6)
