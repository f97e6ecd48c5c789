"""icc_rotary (codegen/kernels/rotary.h) against the canonical RotaryEmbedding's definition: a NumPy
reference from rotary_op.py's docstring, checked once against the op's ONNX decomposition run by
onnxruntime; the kernel built for -march=native, haswell and x86-64."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from onnx import TensorProto, helper

import infercc
from infercc.passes.canonical import DOMAIN
from infercc.passes.lowering import LowerCanonicalOps

from ._ckernel import MARCHES, build, cpu_has

EXPORTS = ("void icc_test_rotary(int64_t B, int64_t S, int64_t H, int64_t D, int64_t R, int il, int hf, const float *x,"
           " const float *c, const float *s, int64_t cbs, float *o) { icc_rotary(B, S, H, D, R, il, hf, x, c, s, cbs, o); }")
# (B, S, H, D, R, interleaved, heads_first, factors per batch)
CASES = {
    "half_3d": (2, 5, 4, 16, 16, 0, 0, False),
    "half_partial_4d": (2, 5, 3, 24, 8, 0, 1, True),
    "interleaved_3d_batched": (3, 4, 2, 12, 12, 1, 0, True),
    "interleaved_partial_4d": (1, 6, 4, 16, 10, 1, 1, False),
    "prefill_parallel": (2, 64, 12, 64, 64, 0, 0, False),  # 1536 rows: split over threads
}


def make(case: tuple, seed: int = 0) -> dict:
    B, S, H, D, R, _, heads_first, batched = case
    rng = np.random.default_rng(seed)
    shape = (B, H, S, D) if heads_first else (B, S, H * D)
    f = (B if batched else 1, S, R)
    return {"x": rng.standard_normal(shape).astype(np.float32), "cos": rng.standard_normal(f).astype(np.float32),
            "sin": rng.standard_normal(f).astype(np.float32)}


def reference(case: tuple, x: dict) -> np.ndarray:
    B, S, H, D, R, interleaved, heads_first, _ = case
    x4 = x["x"] if heads_first else x["x"].reshape(B, S, H, D)
    axis = 1 if heads_first else 2
    c, s = np.expand_dims(x["cos"], axis), np.expand_dims(x["sin"], axis)
    rot = x4[..., :R].astype(np.float64)
    if interleaved:
        turned = np.stack([-rot[..., 1::2], rot[..., 0::2]], axis=-1).reshape(rot.shape)
    else:
        turned = np.concatenate([-rot[..., R // 2:], rot[..., :R // 2]], axis=-1)
    out = np.concatenate([rot * c + turned * s, x4[..., R:]], axis=-1).astype(np.float32)
    return out if heads_first else out.reshape(x["x"].shape)


def decomposition(case: tuple, x: dict) -> np.ndarray:
    B, S, H, D, R, interleaved, heads_first, _ = case
    node = helper.make_node("RotaryEmbedding", ["x", "cos", "sin"], ["y"], domain=DOMAIN,
                            num_heads=0 if heads_first else H, rotary_dim=R, interleaved=interleaved)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(x[n].shape)) for n in ("x", "cos", "sin")]
    graph = helper.make_graph([node], "rotary", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)])
    proto.ir_version = 10
    cm = infercc.compile(proto, passes=[LowerCanonicalOps()], lowering="onnx", provider="cpu", strict=True)
    return cm.run(x)["y"]


@pytest.fixture(scope="module")
def libs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ctypes.CDLL]:
    folder = tmp_path_factory.mktemp("rotary_kernel")
    found = {}
    for march in MARCHES:
        if march == "haswell" and not cpu_has("avx2", "fma", "f16c"):
            continue
        found[march] = lib = build(folder, "rotary.h", EXPORTS, march)
        lib.icc_test_threads(2)
    return found


@pytest.mark.parametrize("name", ["half_partial_4d", "interleaved_3d_batched"])
def test_reference_is_the_decomposition(name: str) -> None:
    x = make(CASES[name])
    np.testing.assert_allclose(decomposition(CASES[name], x), reference(CASES[name], x), atol=1e-5, rtol=1e-5)


def _run(lib: ctypes.CDLL, case: tuple, x: dict, in_place: bool) -> np.ndarray:
    B, S, H, D, R, interleaved, heads_first, batched = case
    src = x["x"].copy()
    out = src if in_place else np.full_like(src, np.nan)
    i64 = ctypes.c_int64
    lib.icc_test_rotary(i64(B), i64(S), i64(H), i64(D), i64(R), interleaved, heads_first,
                        ctypes.c_void_p(src.ctypes.data), ctypes.c_void_p(x["cos"].ctypes.data),
                        ctypes.c_void_p(x["sin"].ctypes.data), i64(S * R if batched else 0),
                        ctypes.c_void_p(out.ctypes.data))
    return out


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_matches_reference(libs: dict, march: str, name: str, in_place: bool) -> None:
    if march not in libs:
        pytest.skip(f"this CPU cannot run -march={march} code")
    x = make(CASES[name], seed=len(name))
    np.testing.assert_allclose(_run(libs[march], CASES[name], x, in_place), reference(CASES[name], x),
                               atol=1e-5, rtol=1e-5)
