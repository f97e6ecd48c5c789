"""Blockwise int4/int8 matmul and gather (kernels/qgemm.h) on packing.pack_quant's layout, built
with real gcc for each code path, on real grids from infercc.passes.quantize.

Tolerance: the kernel quantizes each activation row to int8 per weight block (d = max|x| / 127),
so with e_k the rounding of x_k (|e_k| <= d / 2) an output is off the exact product with the
dequantized weight by sum_k e_k (w_k - rest_k) (the rest multiplies the exact float sum). Its
bound per output, sum over blocks of d_b / 2 * sum_{k in b} |w_k - rest_k|, plus float32 rounding
(1e-5 of sum |x| |w|), is what the tests allow; against ONNX Runtime, which rounds the activations
the same way, twice that."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import pytest
from onnx import helper

from infercc.codegen.packing import (
    FLAG_F16_RESTS,
    FLAG_F16_SCALES,
    FLAG_MINS,
    FLAG_RESTS,
    FLAG_ZERO_POINTS,
    HEADER,
    MAGIC,
    pack_quant,
)
from infercc.passes.quantize.methods import quantize_rows
from infercc.passes.quantize.native import find_native
from infercc.passes.quantize.pack import pack_codes, pack_zero_points, to_nbits

from ..passes.quantize._util import run_single
from ._cbuild import aligned, ptr


@dataclass
class Grid:
    """A quantized weight [N, K]: MatMulNBits arrays, rests, and its exact dequantized rows."""

    b: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    rests: np.ndarray | None
    rows: np.ndarray  # [N, K] dequantized, float32
    bits: int
    block: int

    @property
    def n(self) -> int:
        return self.rows.shape[0]

    @property
    def k(self) -> int:
        return self.rows.shape[1]

    def packed(self) -> np.ndarray:
        return aligned(pack_quant(self.b, self.scales, self.zero_points, self.rests, self.k, self.n, self.bits, self.block))


def make_grid(kind: str, n: int, k: int, block: int, seed: int = 0) -> Grid:
    rng = np.random.default_rng(seed)
    if kind == "q4_1_f32_min":  # minimums that are no float16: packed with zero points and float32 rests
        g = make_grid("q4_1", n, k, block, seed)
        g.rests = g.rests + np.float32(1e-5)
        g.rows = (g.rows.astype(np.float64) + 1e-5).astype(np.float32)
        return g
    if kind == "q4_1":  # GGUF Q4_1: d * q + m per block of 32, m not a multiple of d
        d = (rng.uniform(0.01, 0.05, (n, k // 32, 1))).astype(np.float16).astype(np.float32)
        m = rng.uniform(-0.5, 0.0, (n, k // 32, 1)).astype(np.float16).astype(np.float32)
        q = rng.integers(0, 16, (n, k // 32, 32))
        q[..., 0], q[..., 1] = 0, 15  # every block spans its grid, as a real Q4_1 block does
        values = (d * q + m).reshape(n, k).astype(np.float32)
        native = find_native(values, 4)
        assert native is not None and native.kind == "offset"
        b, scales, zp = to_nbits(native.quantized, False, np.float32)
        return Grid(b, scales, zp, native.offsets, native.dequantize(), 4, 32)
    bits, symmetric = {"int4_sym": (4, True), "int4_zp": (4, False), "int4_f16": (4, False), "int4_f16_tiny": (4, False),
                       "int8": (8, False),
                       "int8_sym": (8, True)}[kind]
    q = quantize_rows(rng.standard_normal((n, k)).astype(np.float32), bits, block, symmetric=symmetric, method="rtn")
    if kind == "int4_f16":  # steps as float16 holds them: packed as float16
        q.scales = q.scales.astype(np.float16).astype(np.float32)
    if kind == "int4_f16_tiny":  # float16 subnormal steps (< 6.1e-5): the software conversion's edge
        q.scales = (q.scales * 1e-4).astype(np.float16).astype(np.float32)
    b, scales, zp = to_nbits(q, symmetric, np.float32)
    return Grid(b, scales, zp, None, q.dequantize(), bits, block)


def bound(x: np.ndarray, g: Grid) -> np.ndarray:
    """The int8 activation rounding's worst case per output (module docstring)."""
    rest = 0 if g.rests is None else np.repeat(g.rests, g.block, axis=1)[:, : g.k]
    centred = np.abs(g.rows - rest)  # [N, K]
    nb = -(-g.k // g.block)
    out = np.zeros((x.shape[0], g.n))
    for b in range(nb):
        sl = slice(b * g.block, min(g.k, (b + 1) * g.block))
        d = np.abs(x[:, sl]).max(axis=1, keepdims=True) / 127.0
        out += d / 2 * centred[:, sl].sum(axis=1)[None, :]
    return out * 1.001 + 1e-5 * (np.abs(x) @ np.abs(g.rows).T) + 1e-7


def run_q(lib: ctypes.CDLL, x: np.ndarray, g: Grid, packed: np.ndarray | None = None) -> np.ndarray:
    packed = g.packed() if packed is None else packed
    y = np.full((x.shape[0], g.n), np.nan, np.float32)
    lib.t_matmul_q(x.shape[0], g.n, g.k, g.bits, g.block, ptr(x), ptr(packed), ptr(y))
    return y


CASES = [("int4_sym", 40, 100, 32), ("int4_zp", 37, 96, 16), ("int8", 40, 100, 64), ("int8_sym", 16, 256, 256),
         ("int4_zp", 33, 300, 128), ("q4_1", 24, 96, 32), ("q4_1_f32_min", 24, 96, 32), ("int4_f16", 20, 64, 32)]


@pytest.mark.parametrize("m", [1, 5, 128])
@pytest.mark.parametrize(("kind", "n", "k", "block"), CASES)
def test_matmul_q_within_activation_rounding(lib: ctypes.CDLL, m: int, kind: str, n: int, k: int, block: int) -> None:
    g = make_grid(kind, n, k, block, seed=n + k)
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    got = run_q(lib, x, g)
    err = np.abs(got - x.astype(np.float64) @ g.rows.T)
    allowed = bound(x, g)
    assert np.all(err <= allowed), float(np.max(err / allowed))
    # the bound is tight enough to mean something: far below the product's own size
    assert np.max(allowed) < 0.1 * np.max(np.abs(x @ g.rows.T))


def test_activation_rounding_is_what_the_error_is(lib: ctypes.CDLL) -> None:
    """Activations already on an int8 grid per block lose nothing: the kernel is then exact up to
    float rounding, so the tolerance above is spent on activation rounding alone."""
    g = make_grid("int4_zp", 40, 96, 32, seed=3)
    rng = np.random.default_rng(4)
    q = rng.integers(-127, 128, (3, 96)).astype(np.float32)
    q[:, ::32] = 127  # every block's max |x| is exactly 127 steps
    x = (q * np.float32(0.5)).astype(np.float32)
    ref = x.astype(np.float64) @ g.rows.T
    np.testing.assert_allclose(run_q(lib, x, g), ref, rtol=0, atol=1e-5 * np.max(np.abs(x) @ np.abs(g.rows).T))


def exact_case(bits: int, form: str, n: int, k: int, block: int, m: int, seed: int) -> tuple[Grid, np.ndarray]:
    """A weight and activations on grids where no path rounds: scales and activation steps are
    powers of two and every block of x holds a +-127 step (so d = 2^-e and x quantizes to itself),
    codes, zero points and rests small integers times powers of two. Column 0 is all top codes,
    row 0 all +127 and row 1 all -127 steps: the largest integer sums a block can have (a wrong
    int16 accumulation would overflow there)."""
    rng = np.random.default_rng(seed)
    nb, top = -(-k // block), (1 << bits) - 1
    codes = rng.integers(0, top + 1, (n, nb, block)).astype(np.uint8)
    codes[0] = top
    codes = codes.reshape(n, nb * block)
    codes[:, k:] = 0
    codes = codes.reshape(n, nb, block)
    scales = (2.0 ** -rng.integers(0, 3, (n, nb))).astype(np.float32)
    zeros = rng.integers(0, top + 1, (n, nb)) if form != "sym" else np.full((n, nb), 1 << (bits - 1))
    rests = (rng.integers(-8, 9, (n, nb)) / 4.0).astype(np.float32) if form == "rest" else None
    w = scales[..., None] * (codes.astype(np.float64) - zeros[..., None])
    if rests is not None:
        w = w + rests[..., None]
    q = rng.integers(-127, 128, (m, nb, block))
    q[:, :, 0] = np.where(rng.random((m, nb)) < 0.5, -127, 127)
    q[0] = 127
    if m > 1:
        q[1] = -127
    x = (q * 2.0 ** -rng.integers(0, 3, (m, nb, 1))).reshape(m, nb * block)[:, :k].astype(np.float32)
    zp = None if form == "sym" else pack_zero_points(zeros.astype(np.uint8), bits)
    return Grid(pack_codes(codes, bits), scales, zp, rests, w.reshape(n, -1)[:, :k].astype(np.float32), bits, block), x


def _exact_reference(x: np.ndarray, g: Grid) -> np.ndarray:
    """x @ W in float64, after checking that each block's term and every running sum over the
    blocks is a float32: then the kernel's float steps (with or without fused multiply-adds, any
    order within a block's term) are exact and every path must give exactly this."""
    nb = -(-g.k // g.block)
    y = np.zeros((x.shape[0], g.n))
    for b in range(nb):
        sl = slice(b * g.block, min(g.k, (b + 1) * g.block))
        term = x[:, sl].astype(np.float64) @ g.rows[:, sl].T.astype(np.float64)
        y = y + term
        assert np.array_equal(term.astype(np.float32), term) and np.array_equal(y.astype(np.float32), y)
    return y


@pytest.mark.parametrize(("bits", "form", "n", "k", "block"), [
    (4, "sym", 37, 200, 32), (4, "zp", 45, 72, 16), (4, "rest", 29, 300, 32), (4, "zp", 16, 256, 128),
    (8, "sym", 45, 100, 32), (8, "zp", 37, 96, 64), (8, "rest", 21, 130, 32)])
def test_matmul_q_exact_on_exact_grids(lib: ctypes.CDLL, bits: int, form: str, n: int, k: int, block: int) -> None:
    """Every code path (AVX-512 VNNI, AVX2 with its int16 sums of maddubs, AVX-VNNI, plain C)
    computes the integer block sums exactly: on grids where no float step rounds they all equal
    the float64 product bit for bit, for 1..9 rows (whole and partial row tiles), N with a partial
    last panel (half or more of it empty) and K not a multiple of the block."""
    for m in range(1, 10):
        g, x = exact_case(bits, form, n, k, block, m, seed=100 * bits + m)
        np.testing.assert_array_equal(run_q(lib, x, g), _exact_reference(x, g).astype(np.float32), err_msg=f"{m} rows")


@pytest.mark.parametrize(("kind", "n", "k", "block"), CASES)
def test_matmul_q_matches_onnxruntime(lib: ctypes.CDLL, kind: str, n: int, k: int, block: int) -> None:
    """Same weights through ORT's MatMulNBits (accuracy_level 4: int8 activations too); Q4_1's
    rests added as the exact-mode graph does (block sums of x times the rests)."""
    g = make_grid(kind, n, k, block, seed=n + k)
    x = np.random.default_rng(9).standard_normal((4, k)).astype(np.float32)
    inits = {"B": g.b, "S": g.scales} | ({} if g.zero_points is None else {"Z": g.zero_points})
    node = helper.make_node("MatMulNBits", ["A", *inits], ["Y"], domain="com.microsoft", K=k, N=n, bits=g.bits,
                            block_size=g.block, accuracy_level=4)
    ort = run_single(node, {"A": x}, inits).astype(np.float64)
    if g.rests is not None:
        ort += x.reshape(4, -1, 32).sum(axis=2) @ g.rests.T
    err = np.abs(run_q(lib, x, g) - ort)
    assert np.all(err <= 2 * bound(x, g)), float(np.max(err / bound(x, g)))


@pytest.mark.parametrize(("kind", "n", "k", "block"), [*CASES, ("int8", 20, 40, 32), ("int4_f16_tiny", 20, 64, 32)])
def test_gather_q_exact(lib: ctypes.CDLL, kind: str, n: int, k: int, block: int) -> None:
    g = make_grid(kind, n, k, block, seed=1)
    ids = np.array([0, n - 1, 7, -1, -n, n + 5, -n - 3], np.int64)  # the last two clamp
    out = np.full((len(ids), k), np.nan, np.float32)
    packed = g.packed()  # alive across the call
    lib.t_gather_q(len(ids), ptr(ids), n, k, g.bits, g.block, ptr(packed), ptr(out))
    expected = g.rows[np.clip(np.where(ids < 0, ids + n, ids), 0, n - 1)]
    if kind.startswith("q4_1"):  # q4_1: packed in GGUF's own form, d * q + m: the same values but for float32 rounding
        np.testing.assert_allclose(out, expected, rtol=0, atol=4 * np.spacing(np.abs(expected).max()))
    else:
        np.testing.assert_array_equal(out, expected)


def test_pack_quant_rejects_mismatched_shapes() -> None:
    g = make_grid("int4_sym", 16, 64, 32)
    with pytest.raises(ValueError, match="B has shape"):
        pack_quant(g.b, g.scales, None, None, 96, 16, 4, 32)
    with pytest.raises(ValueError, match="power of two"):
        pack_quant(g.b, g.scales, None, None, 64, 16, 4, 24)


@pytest.mark.parametrize(("kind", "flags"), [("int4_sym", 0), ("int4_zp", FLAG_ZERO_POINTS),
                                             ("int4_f16", FLAG_ZERO_POINTS | FLAG_F16_SCALES),
                                             ("q4_1", FLAG_RESTS | FLAG_F16_SCALES | FLAG_F16_RESTS | FLAG_MINS),
                                             ("q4_1_f32_min", FLAG_ZERO_POINTS | FLAG_RESTS | FLAG_F16_SCALES)])
def test_pack_quant_header(kind: str, flags: int) -> None:
    """Scales go to float16 only when every one of them is exactly a float16 (GGUF steps are); a
    Q4_1 grid whose minimums are float16 (GGUF's) is packed as d * q + m with half minimums and no
    zero points, one whose minimums are not stays scale * (code - zero) + float32 rest."""
    g = make_grid(kind, 20, 64, 32)
    packed = pack_quant(g.b, g.scales, g.zero_points, g.rests, 64, 20, 4, 32)
    header = packed[:HEADER].view(np.int32)
    assert list(header[:7]) == [MAGIC, 1, 4, 32, 64, 20, flags]
    assert header[7] % 64 == 0 and packed.nbytes == HEADER + 2 * header[7]  # two panels of 16 columns
