"""icc_attention (codegen/kernels/attention.h) against the canonical Attention's definition.

The reference is NumPy in float64 written from attention_op.py's docstring; one test checks it once
against the op's own ONNX decomposition run by onnxruntime (cache, fp16 cache, masks, softcap, GQA,
D != Dv), so the kernel is held to the decomposition. The kernel is built three ways (-march=native,
haswell = AVX2+F16C, x86-64 = plain C and the portable fp16 converter) and run with 2 threads so
the key split (flash-decoding) path runs too.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math

import numpy as np
import pytest
from onnx import TensorProto, helper

import infercc
from infercc.passes.canonical import DOMAIN
from infercc.passes.lowering import LowerCanonicalOps

from ._ckernel import MARCHES, build, cpu_has

TOL = 1e-5
F32_MIN = float(np.finfo(np.float32).min)
EXPORTS = "void icc_test_attention(const icc_attention_args *a) { icc_attention(a); }"
P64, PF = ctypes.c_int64, ctypes.c_float


class Args(ctypes.Structure):
    """icc_attention_args of api.h, field for field."""

    _fields_ = [(n, P64) for n in ("B", "S", "P", "H", "Hkv", "D", "Dv")] + [
        ("scale", PF), ("softcap", PF), ("mask_value", PF), ("causal", ctypes.c_int), ("left_window", P64),
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("mask_bool", ctypes.c_void_p),
        ("mask_float", ctypes.c_void_p), ("mask_stride", P64 * 4), ("cache_dtype", ctypes.c_int),
        ("past_k", ctypes.c_void_p), ("past_v", ctypes.c_void_p), ("past_cap", P64),
        ("present_k", ctypes.c_void_p), ("present_v", ctypes.c_void_p), ("present_cap", P64), ("out", ctypes.c_void_p)]


@dataclasses.dataclass
class Case:
    B: int
    S: int
    P: int
    H: int
    Hkv: int
    D: int
    Dv: int | None = None
    causal: int = 1
    left_window: int = -1
    softcap: float = 0.0
    mask: str | None = None  # "pad" [B,1,1,Skv] bool, "rows" [1,1,S,Skv] float, "full" [B,H,S,Skv] float
    mask_value: float = -math.inf
    cache: str = "f32"  # "f32", "f16", "none"
    dead_row: bool = False  # batch 0 fully padded (every key masked)

    @property
    def dv(self) -> int:
        return self.Dv or self.D


def make(case: Case, seed: int = 0) -> dict:
    """Random inputs of a case: q/k/v, the mask, the past in the cache's type (NumPy arrays)."""
    rng = np.random.default_rng(seed)
    B, S, P, H, Hkv, D, Dv = case.B, case.S, case.P, case.H, case.Hkv, case.D, case.dv
    f = np.float32
    x = {"q": rng.standard_normal((B, S, H * D)).astype(f) * 2, "k": rng.standard_normal((B, S, Hkv * D)).astype(f),
         "v": rng.standard_normal((B, S, Hkv * Dv)).astype(f), "mask": None}
    cache_type = np.float16 if case.cache == "f16" else f
    x["past_k"] = rng.standard_normal((B, Hkv, P, D)).astype(cache_type)
    x["past_v"] = rng.standard_normal((B, Hkv, P, Dv)).astype(cache_type)
    skv = P + S
    if case.mask == "pad":
        pad = rng.random((B, 1, 1, skv)) > 0.3
        if case.dead_row:
            pad[0] = False
        x["mask"] = pad
    elif case.mask == "rows":
        x["mask"] = (rng.standard_normal((1, 1, S, skv)) * 3).astype(f)
    elif case.mask == "full":
        m = (rng.standard_normal((B, H, S, skv)) * 3).astype(f)
        m[rng.random(m.shape) < 0.2] = -np.inf
        if case.dead_row:
            m[0, 1] = -np.inf
        x["mask"] = m
    return x


def reference(case: Case, x: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(out, present_k, present_v) as the docstring defines them, in float64."""
    B, S, P, H, Hkv, D, Dv = case.B, case.S, case.P, case.H, case.Hkv, case.D, case.dv
    dtype = np.float16 if case.cache == "f16" else np.float32
    new_k = x["k"].reshape(B, S, Hkv, D).transpose(0, 2, 1, 3).astype(dtype)
    new_v = x["v"].reshape(B, S, Hkv, Dv).transpose(0, 2, 1, 3).astype(dtype)
    pk, pv = np.concatenate([x["past_k"], new_k], 2), np.concatenate([x["past_v"], new_v], 2)
    rep = H // Hkv
    k4, v4 = (np.repeat(t.astype(np.float64), rep, axis=1) for t in (pk, pv))
    q4 = (x["q"] * np.float32(1 / math.sqrt(D))).reshape(B, S, H, D).transpose(0, 2, 1, 3).astype(np.float64)
    s = q4 @ k4.transpose(0, 1, 3, 2)
    if case.softcap:
        s = case.softcap * np.tanh(s / case.softcap)
    skv = P + S
    i, j = np.arange(S)[:, None] + P, np.arange(skv)[None, :]
    allowed = np.ones((S, skv), bool)
    if case.causal:
        allowed &= j <= i
    if case.left_window >= 0:
        allowed &= j >= i - case.left_window
    mask = x["mask"]
    if mask is not None and mask.dtype == bool:
        allowed = allowed & mask
    s = s + np.where(allowed, 0.0, case.mask_value)
    if mask is not None and mask.dtype != bool:
        s = s + mask
    with np.errstate(invalid="ignore"):
        p = np.exp(s - s.max(-1, keepdims=True))
        p = np.nan_to_num(p / p.sum(-1, keepdims=True), nan=0.0)
    out = (p @ v4).transpose(0, 2, 1, 3).reshape(B, S, H * Dv).astype(np.float32)
    return out, pk, pv


def decomposition(case: Case, x: dict) -> tuple[np.ndarray, ...]:
    """The same through the canonical op's ONNX decomposition, run by onnxruntime."""
    attrs = {"num_heads": case.H, "kv_num_heads": case.Hkv, "head_size": case.D, "v_head_size": case.dv,
             "scale": 1 / math.sqrt(case.D), "causal": case.causal, "left_window": case.left_window,
             "mask_value": case.mask_value, **({"softcap": case.softcap} if case.softcap else {})}
    cache = helper.np_dtype_to_tensor_dtype(x["past_k"].dtype)
    names = ["q", "k", "v", "mask" if x["mask"] is not None else "", "past_k", "past_v"]
    node = helper.make_node("Attention", names, ["y", "present_k", "present_v"], domain=DOMAIN, **attrs)
    vi = helper.make_tensor_value_info
    inputs = [vi(n, TensorProto.FLOAT, list(x[n].shape)) for n in "qkv"]
    if x["mask"] is not None:
        inputs.append(vi("mask", helper.np_dtype_to_tensor_dtype(x["mask"].dtype), list(x["mask"].shape)))
    inputs += [vi(n, cache, list(x[n].shape)) for n in ("past_k", "past_v")]
    outputs = [vi("y", TensorProto.FLOAT, None), vi("present_k", cache, None), vi("present_v", cache, None)]
    graph = helper.make_graph([node], "attention", inputs, outputs)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)])
    proto.ir_version = 10
    cm = infercc.compile(proto, passes=[LowerCanonicalOps()], lowering="onnx", provider="cpu", strict=True)
    assert "Softmax" in cm.model.graph.op_histogram()  # decomposed (opset 20 has no standard Attention)
    got = cm.run({n: x[n] for n in ("q", "k", "v", "mask", "past_k", "past_v") if x[n] is not None})
    return got["y"], got["present_k"], got["present_v"]


def run_kernel(lib: ctypes.CDLL, case: Case, x: dict, *, extra_cap: int = 3, in_place: bool = False) -> dict:
    """Call icc_attention; past/present live in buffers with spare capacity (rows past the valid
    ones hold NaN, which the kernel must neither read nor overwrite)."""
    B, S, P, H, Hkv, D, Dv = case.B, case.S, case.P, case.H, case.Hkv, case.D, case.dv
    a, keep = Args(), []

    def ptr(arr: np.ndarray | None) -> int | None:
        if arr is None:
            return None
        keep.append(arr)
        return arr.ctypes.data

    cached = case.cache != "none"
    cache = np.float16 if case.cache == "f16" else np.float32
    cap = P + S + extra_cap
    a.B, a.S, a.P, a.H, a.Hkv, a.D, a.Dv = B, S, P if cached else 0, H, Hkv, D, Dv
    a.scale, a.softcap, a.mask_value = 1 / math.sqrt(D), case.softcap, case.mask_value
    a.causal, a.left_window = case.causal, case.left_window
    a.q, a.k, a.v = ptr(x["q"]), ptr(x["k"]), ptr(x["v"])
    mask = x["mask"]
    if mask is not None:
        strides = np.broadcast_to(mask, (B, H, S, P + S)).strides
        a.mask_stride[:] = [st // mask.itemsize for st in strides]
        if mask.dtype == bool:
            a.mask_bool = ptr(np.ascontiguousarray(mask).view(np.uint8))
        else:
            a.mask_float = ptr(np.ascontiguousarray(mask))
    result = {}
    if cached:
        a.cache_dtype = int(case.cache == "f16")
        pk, pv = (np.full((B, Hkv, cap, n), np.nan, cache) for n in (D, Dv))
        pk[:, :, :P], pv[:, :, :P] = x["past_k"], x["past_v"]
        if in_place:
            nk, nv = pk, pv
        else:
            nk, nv = (np.full((B, Hkv, cap, n), np.nan, cache) for n in (D, Dv))
        a.past_k, a.past_v = (ptr(pk), ptr(pv)) if P else (None, None)
        a.past_cap = a.present_cap = cap
        a.present_k, a.present_v = ptr(nk), ptr(nv)
        result.update(present_k=nk, present_v=nv, past_k=pk)
    out = np.full((B, S, H * Dv), np.nan, np.float32)
    a.out = ptr(out)
    lib.icc_test_attention(ctypes.byref(a))
    result["out"] = out
    return result


CASES = {
    "decode_gqa": Case(1, 1, 200, 8, 2, 64),
    "decode_split_pad_min": Case(3, 1, 600, 6, 1, 80, cache="f16", mask="pad", mask_value=F32_MIN, dead_row=True),
    "decode_mqa_f16_pad": Case(3, 1, 200, 6, 1, 80, cache="f16", mask="pad"),
    "decode_long_split": Case(1, 1, 1000, 4, 4, 64, mask="pad"),
    "prefill_mha": Case(1, 64, 0, 4, 4, 16),
    "prefill_nocache_gqa": Case(3, 64, 0, 8, 2, 64, cache="none"),
    "chunk_window_mqa": Case(3, 7, 5, 6, 1, 16, left_window=3),
    "softcap": Case(1, 7, 5, 4, 4, 64, softcap=5.0),
    "float_rows_mask": Case(3, 7, 200, 8, 2, 64, mask="rows"),
    "pad_min_dead_rows": Case(3, 7, 5, 4, 4, 16, mask="pad", mask_value=F32_MIN, dead_row=True),
    "prefill_pad_min_dead_rows": Case(2, 70, 5, 4, 2, 16, mask="pad", mask_value=F32_MIN, dead_row=True),
    "pad_inf_dead_rows": Case(3, 7, 5, 4, 4, 16, mask="pad", dead_row=True),
    "dv_differs": Case(1, 7, 200, 8, 2, 64, Dv=16, causal=0),
    "odd_sizes_tails": Case(2, 9, 70, 6, 3, 24, Dv=12, mask="pad"),  # not multiples of the vector width
    "tiny_heads_wide_group": Case(1, 3, 300, 40, 1, 8, left_window=100),  # 40 heads per kv head > a chunk
    "nocausal_nocache_mqa": Case(3, 64, 0, 6, 1, 80, causal=0, cache="none"),
    "full_mask_window": Case(3, 7, 5, 8, 2, 16, causal=0, left_window=4, mask="full", dead_row=True),
    "prefill_f16_past": Case(1, 64, 5, 8, 2, 64, cache="f16", softcap=30.0),
}


@pytest.fixture(scope="module")
def libs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ctypes.CDLL]:
    folder = tmp_path_factory.mktemp("attention_kernel")
    found = {}
    for march in MARCHES:
        if march == "haswell" and not cpu_has("avx2", "fma", "f16c"):
            continue
        lib = build(folder, "attention.h", EXPORTS, march)
        lib.icc_test_threads(2)
        found[march] = lib
    return found


@pytest.mark.parametrize("name", ["decode_split_pad_min", "chunk_window_mqa", "dv_differs", "full_mask_window",
                                  "prefill_f16_past"])
def test_reference_is_the_decomposition(name: str) -> None:
    """The NumPy reference computes what the canonical op's ONNX decomposition computes."""
    case = CASES[name]
    x = make(case)
    want, got = reference(case, x), decomposition(case, x)
    np.testing.assert_allclose(got[0], want[0], atol=TOL, rtol=TOL)
    for a, b in zip(got[1:], want[1:]):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_matches_reference(libs: dict, march: str, name: str) -> None:
    if march not in libs:
        pytest.skip(f"this CPU cannot run -march={march} code")
    case = CASES[name]
    x = make(case, seed=len(name))
    out, pk, pv = reference(case, x)
    got = run_kernel(libs[march], case, x)
    np.testing.assert_allclose(got["out"], out, atol=TOL, rtol=TOL)
    if case.cache != "none":
        total = case.P + case.S
        for have, want in ((got["present_k"], pk), (got["present_v"], pv)):
            assert np.array_equal(have[:, :, :total].view(np.uint8), want.view(np.uint8))  # bit-exact rounding
            assert np.isnan(have[:, :, total:].astype(np.float32)).all()  # spare capacity untouched


@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("name", ["decode_mqa_f16_pad", "float_rows_mask", "prefill_f16_past"])
def test_in_place_equals_copy(libs: dict, march: str, name: str) -> None:
    """present == past (one buffer) writes only the new rows and gives the same bytes as a copy."""
    if march not in libs:
        pytest.skip(f"this CPU cannot run -march={march} code")
    case = CASES[name]
    x = make(case, seed=3)
    copy, inplace = run_kernel(libs[march], case, x), run_kernel(libs[march], case, x, in_place=True)
    assert inplace["present_k"] is inplace["past_k"]
    assert copy["out"].tobytes() == inplace["out"].tobytes()
    for n in ("present_k", "present_v"):
        assert copy[n].tobytes() == inplace[n].tobytes()


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.cache == "f16"))
def test_a_float16_cache_read_in_place_equals_its_converted_tiles(libs: dict, tmp_path_factory, name: str) -> None:
    """With F16C the kernel reads a float16 cache where it lies, converting each vector as it
    loads it; the same AVX2 code built without F16C converts each tile into a float buffer first
    (the portable converter). Same products in the same order: the same bytes out."""
    if "haswell" not in libs:
        pytest.skip("this CPU cannot run -march=haswell code")
    plain = build(tmp_path_factory.mktemp("attention_no_f16c"), "attention.h", EXPORTS, "haswell -mno-f16c")
    plain.icc_test_threads(2)
    case = CASES[name]
    x = make(case, seed=11)
    got, want = run_kernel(libs["haswell"], case, x), run_kernel(plain, case, x)
    assert got["out"].tobytes() == want["out"].tobytes()


@pytest.mark.parametrize("march", MARCHES)
def test_fp16_rounding_is_bit_exact(libs: dict, march: str) -> None:
    """New keys become IEEE half with round-to-nearest-even, ties, subnormals and overflow included."""
    if march not in libs:
        pytest.skip(f"this CPU cannot run -march={march} code")
    case = Case(1, 40, 0, 2, 2, 64, cache="f16", causal=0)
    x = make(case)
    halves = np.arange(0, 0x7C00, 13, dtype=np.uint16).view(np.float16).astype(np.float32)
    ties = (halves[:-1] + halves[1:]) / 2  # exactly between two halves (both even and odd below)
    special = np.array([65504, 65519, 65520, 1e6, -1e6, 6e-8, 3e-8, 2.9e-8, 1e-10, -0.0, np.inf, -np.inf], np.float32)
    pool = np.concatenate([ties, halves, special, -ties])
    x["k"] = np.resize(pool, x["k"].shape).astype(np.float32)
    x["v"] = np.zeros_like(x["v"])
    got = run_kernel(libs[march], case, x)
    with np.errstate(over="ignore"):
        want = x["k"].reshape(1, 40, 2, 64).transpose(0, 2, 1, 3).astype(np.float16)
    assert np.array_equal(got["present_k"][:, :, :40].view(np.uint16), want.view(np.uint16))
