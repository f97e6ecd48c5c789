"""Helpers for the fusion and lowering tests: compile fixtures once per session, run models with
ORT's CPU provider, compare on real tokens, and build small hand-written ONNX models."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import infercc
from infercc.compiled import CompiledModel
from infercc.passes.canonical import DOMAIN
from tests.fixtures import catalog

F, F16, F64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE
FIXTURES = catalog.list_fixtures()
TOLERANCE = 1e-4


@functools.cache
def compiled(name: str, lowering: str = "ort") -> CompiledModel:
    return infercc.compile(str(catalog.fixture_path(name)), lowering=lowering, provider="cpu")


@functools.cache
def fused(name: str) -> CompiledModel:
    """The pipeline up to the fusions: canonical ops stay in the graph (not runnable)."""
    return infercc.compile(str(catalog.fixture_path(name)), disable_passes=("lower_canonical_ops",))


def canonical_counts(model: CompiledModel) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.model.graph.nodes:
        if node.domain == DOMAIN:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def op_counts(model: CompiledModel) -> dict[str, int]:
    """Op types outside the canonical domain (standard ONNX and ORT's)."""
    counts: dict[str, int] = {}
    for node in model.model.graph.nodes:
        if node.domain != DOMAIN:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


@functools.cache
def original_session(name: str) -> ort.InferenceSession:
    return session(catalog.fixture_path(name))


def run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def feed_sets(name: str) -> list[tuple[str, dict[str, np.ndarray]]]:
    sets = [("reference", catalog.reference(name)[0])]
    for batch in (1, 3):
        for seq in (5, 24):
            feeds = catalog.random_feeds(name, batch, seq, padding=True, seed=batch * 131 + seq)
            sets.append((f"b{batch}s{seq}", feeds))
    return sets


def real_token_diff(expected: np.ndarray, got: np.ndarray, feeds: dict[str, np.ndarray]) -> float:
    """Max |got - expected| over real (non-padding) token positions."""
    assert got.shape == expected.shape
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    mask = catalog.real_token_mask(feeds)
    if diff.shape[:2] == mask.shape:
        diff = diff[mask]
    return float(diff.max()) if diff.size else 0.0


# -- hand-written models ------------------------------------------------------------------------
def const(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto], outputs: Sequence[str],
          inits: Sequence[onnx.TensorProto] = (), *, opset: int = 20, out_type: int = F) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), [helper.make_tensor_value_info(o, out_type, None) for o in outputs],
                              list(inits))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 9
    return proto


def x_input(name: str = "x", shape: Sequence = ("batch", "seq", 8), elem: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


def random(shape: Sequence[int], dtype=np.float32, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def check_compiles_equal(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], *, tol: float = 1e-5,
                         lowerings: Sequence[str] = ("ort", "onnx")) -> dict[str, CompiledModel]:
    """Compile with each lowering; outputs must match ORT on ``proto`` within ``tol``."""
    expected = run(session(proto), feeds)
    results = {}
    for lowering in lowerings:
        cm = infercc.compile(proto, lowering=lowering, provider="cpu", strict=True)
        got = cm.run(feeds)
        for key, ref in expected.items():
            np.testing.assert_allclose(got[key].astype(np.float64), ref.astype(np.float64), atol=tol, rtol=tol,
                                       err_msg=f"{lowering}: {key}")
        results[lowering] = cm
    return results


def fuse_only(proto: onnx.ModelProto) -> CompiledModel:
    return infercc.compile(proto, disable_passes=("lower_canonical_ops",), strict=True)


def sites(cm: CompiledModel, pass_name: str, status: str | None = None) -> list:
    return [s for s in cm.diagnostics[pass_name].sites if status is None or s.status == status]
