"""Blockwise int4/int8 matmul and gather (kernels/qgemm.h) on packing.pack_quant's layout, built
with real gcc for each code path, on real grids from infercc.passes.quantize.

Tolerance: the kernel quantizes each activation row to int8 per weight block (d = max|x| / 127),
so with e_k the rounding of x_k (|e_k| <= d / 2) an output is off the exact product with the
dequantized weight by sum_k e_k (w_k - rest_k) (the rest multiplies the exact float sum). Its
bound per output, sum over blocks of d_b / 2 * sum_{k in b} |w_k - rest_k|, plus float32 rounding
(1e-5 of sum |x| |w|), is what the tests allow against the exact product.

Against ONNX Runtime (MatMulNBits at accuracy_level 4, MLAS's int8 path) the kernel computes the same
function: the activations quantized bit for bit as MLAS does (d = max|x| / 127, ties to even), the
same integer zero point subtracted against them (for Q4_1 the one nearest the grid's zero, as
passes/quantize/native.py gives ORT) and the same float32 rests; only the float summation order
differs, so the two agree to float32 rounding, far inside the activation rounding error."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import infercc
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
from infercc.passes.quantize.pack import to_nbits, unpack_codes, unpack_zero_points

from ..importers._models import SMOLLM2, require
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
    if kind == "q4_1_far_zero":  # zero points one above the nearest (rests moved by a step): not the
        g = make_grid("q4_1", n, k, block, seed)  # form the kernel recomputes, so packed with both
        native = find_native(g.rows, 4)
        zero = native.quantized.zero_points.astype(np.float64)
        far = np.where(zero < 15, zero + 1, zero - 1)
        native.offsets = (native.offsets - zero * native.quantized.scales + far * native.quantized.scales).astype(np.float32)
        native.quantized.zero_points = far.astype(np.uint8)
        g.b, g.scales, g.zero_points = to_nbits(native.quantized, False, np.float32)
        g.rests = native.offsets
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


def tied(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    """Activations whose int8 rounding meets ties everywhere: every 16th value is 127 * 2^-6, so
    each block's x * 127 / max|x| is x * 2^6 exactly, and the others are half-integers times 2^-6,
    where ties to even and ties away from zero part on every even integer part."""
    q = rng.integers(-126, 126, (m, k)) + 0.5
    q[:, ::16] = 127.0
    return (q * 2.0**-6).astype(np.float32)


def mlas_quantize(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ONNX Runtime's int8 activations at accuracy_level 4 (MLAS QuantizeARow_CompInt8), in float32:
    per block d = max|x| / 127, q = rint(x * (127 / max|x|)) (ties to even; 0 for an all-zero
    block), and d * sum q -> (q [M, blocks * block], d, d * sum q [M, blocks])."""
    m, k = x.shape
    nb = -(-k // block)
    blocks = np.zeros((m, nb * block), np.float32)
    blocks[:, :k] = x
    blocks = blocks.reshape(m, nb, block)
    amax = np.abs(blocks).max(axis=2)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(blocks * inv[..., None])
    d = (amax / np.float32(127)).astype(np.float32)
    return q.astype(np.int8).reshape(m, -1), d, (d * q.sum(axis=2).astype(np.float32)).astype(np.float32)


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


@pytest.mark.parametrize(("m", "k", "block"), [(3, 96, 32), (2, 100, 32), (2, 256, 16), (1, 384, 128), (5, 64, 64)])
def test_activation_quantization_is_mlas_bit_for_bit(lib: ctypes.CDLL, m: int, k: int, block: int) -> None:
    """The int8 activations, their steps and d * sum q equal MLAS's (``mlas_quantize``) exactly,
    ties included (rounding them away from zero instead moves a code on every even tie), on every
    code path; an all-zero block quantizes to zeros with step 0."""
    rng = np.random.default_rng(k + m)
    x = np.concatenate([tied(rng, m, k), rng.standard_normal((m, k)).astype(np.float32)])
    x[0, :block] = 0.0
    q_ref, d_ref, dq_ref = mlas_quantize(x, block)
    v = x[:m].astype(np.float64) * 2.0**6  # the tied rows' x * 127 / max|x|, exact
    assert np.any((np.abs(v) % 2) == 0.5)  # the data holds ties that part the two roundings
    nb = -(-k // block)
    q = np.full((2 * m, nb * block), 99, np.int8)
    d, dq, sx = (np.full((2 * m, nb), np.nan, np.float32) for _ in range(3))
    assert lib.t_quantize_act(2 * m, k, block, ptr(x), ptr(q), ptr(d), ptr(dq), ptr(sx)) == 1
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(d, d_ref)
    np.testing.assert_array_equal(dq, dq_ref)
    padded = np.zeros((2 * m, nb, block), np.float64)
    padded.reshape(2 * m, -1)[:, :k] = x
    assert np.all(np.abs(sx - padded.sum(axis=2)) <= 1e-6 * np.abs(padded).sum(axis=2))  # float sums


def _onnxruntime(x: np.ndarray, g: Grid) -> np.ndarray:
    """x @ W^T through ORT's MatMulNBits at accuracy_level 4 (int8 activations), Q4_1's rests added
    as the exact-mode graph does (block sums of x times the rests)."""
    inits = {"B": g.b, "S": g.scales} | ({} if g.zero_points is None else {"Z": g.zero_points})
    node = helper.make_node("MatMulNBits", ["A", *inits], ["Y"], domain="com.microsoft", K=g.k, N=g.n, bits=g.bits,
                            block_size=g.block, accuracy_level=4)
    ort = run_single(node, {"A": x}, inits).astype(np.float64)
    if g.rests is not None:
        ort += x.reshape(len(x), -1, g.block).sum(axis=2) @ g.rests.T.astype(np.float64)
    return ort


@pytest.mark.parametrize(("kind", "n", "k", "block"), [*CASES, ("q4_1_far_zero", 24, 96, 32)])
def test_matmul_q_matches_onnxruntime(lib: ctypes.CDLL, kind: str, n: int, k: int, block: int) -> None:
    """Same weights through ORT's MatMulNBits: equal to float32 rounding (2e-6 of sum |x| |w|), on
    random and on tied activations; a different zero point against the int8 activations (the
    kernel's Q4_1 form once centred its codes at 8) or ties rounded away from zero is ~1e-3."""
    g = make_grid(kind, n, k, block, seed=n + k)
    rng = np.random.default_rng(9)
    x = np.concatenate([rng.standard_normal((2, k)).astype(np.float32), tied(rng, 2, k)])
    err = np.abs(run_q(lib, x, g) - _onnxruntime(x, g))
    allowed = 2e-6 * (np.abs(x) @ np.abs(g.rows).T) + 1e-6
    assert np.all(err <= allowed), float(np.max(err / allowed))


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
                                             ("q4_1_f32_min", FLAG_ZERO_POINTS | FLAG_RESTS | FLAG_F16_SCALES),
                                             ("q4_1_far_zero", FLAG_ZERO_POINTS | FLAG_RESTS | FLAG_F16_SCALES)])
def test_pack_quant_header(kind: str, flags: int) -> None:
    """Scales go to float16 only when every one of them is exactly a float16 (GGUF steps are); a
    Q4_1 grid whose minimums are float16 (GGUF's) is packed as d * q + m with half minimums and no
    zero points, one whose minimums are not, or whose zero points are not the ones the kernel derives
    from the minimums (the nearest to the grid's zero), stays scale * (code - zero) + float32 rest."""
    g = make_grid(kind, 20, 64, 32)
    packed = pack_quant(g.b, g.scales, g.zero_points, g.rests, 64, 20, 4, 32)
    header = packed[:HEADER].view(np.int32)
    assert list(header[:7]) == [MAGIC, 1, 4, 32, 64, 20, flags]
    assert header[7] % 64 == 0 and packed.nbytes == HEADER + 2 * header[7]  # two panels of 16 columns


@dataclass
class Projection:
    """One MatMulNBits of ORT's SmolLM2 graph: its arrays, and the input and output ORT computed."""

    name: str
    grid: Grid
    x: np.ndarray  # [M, K]
    y: np.ndarray  # [M, N]: MatMulNBits plus the Q4_1 rests correction where the graph adds one


def _ort_projections(model: onnx.ModelProto, prompt: list[int], count: int) -> list[Projection]:
    """Run ORT's graph once with the first ``count`` - 1 and the last MatMulNBits' inputs and
    outputs (after the Add of their rests correction) exposed as graph outputs."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    made = {o: n for n in g.node for o in n.output}
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    nodes = [n for n in g.node if n.op_type == "MatMulNBits"]
    picked = []
    for n in nodes[: count - 1] + nodes[-1:]:
        attrs = {a.name: a.i for a in n.attribute}
        arrays = [numpy_helper.to_array(inits[i]) if i else None for i in list(n.input[1:4]) + [""] * (4 - len(n.input))]
        out, rests = n.output[0], None
        adds = [u for u in users.get(out, []) if u.op_type == "Add"]
        if adds:  # MatMulNBits + MatMul(block sums, rests [blocks, N]) (passes/quantize/ops.py)
            other = made[next(i for i in adds[0].input if i != out)]
            rests, out = np.ascontiguousarray(numpy_helper.to_array(inits[other.input[1]]).T), adds[0].output[0]
        b, scales, zeros = arrays[:3]
        codes = unpack_codes(b, attrs["bits"]).astype(np.float32)
        blocks = codes.shape[1]
        z = np.full((attrs["N"], blocks), 1 << (attrs["bits"] - 1)) if zeros is None else unpack_zero_points(zeros, attrs["bits"], blocks)
        rows = (codes - z[..., None]) * scales[..., None] + (0 if rests is None else rests[..., None])
        grid = Grid(b, scales, zeros, rests, rows.reshape(attrs["N"], -1)[:, : attrs["K"]], attrs["bits"], attrs["block_size"])
        picked.append((n.name, grid, n.input[0], out))
        for name in (n.input[0], out):
            g.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([prompt]), "attention_mask": np.ones((1, len(prompt)), np.int64)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros([1, *[0 if d == "past_sequence_length" or not isinstance(d, int) else d for d in i.shape[1:]]], np.float32)
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    return [Projection(name, grid, got[x].reshape(-1, grid.k), got[y].reshape(-1, grid.n)) for name, grid, x, y in picked]


@pytest.fixture(scope="module")
def smollm2_projections() -> list[Projection]:
    compiled = infercc.compile(str(require(SMOLLM2)), kv_cache_dtype="fp32")
    prompt = compiled.tokenizer.encode("<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n")
    return _ort_projections(compiled.to_onnx(), prompt, 8)


@pytest.mark.slow
def test_smollm2_projections_equal_onnxruntime_on_its_activations(lib: ctypes.CDLL, smollm2_projections) -> None:
    """The first layers' Q4_1 projections (packed q/k/v, o, gate/up, down) and the Q8_0 LM head of
    SmolLM2-135M, fed the activations ORT computed for them in the model (outlier channels, real
    grids): the kernel's output is ORT's to float32 rounding. (Before the kernel used ORT's zero
    point and rounding, its Q4_1 outputs were ~6e-4 of sum |x| |w| off.)"""
    assert {p.grid.bits for p in smollm2_projections} == {4, 8}
    assert sum(p.grid.rests is not None for p in smollm2_projections) >= 6
    for p in smollm2_projections:
        packed = p.grid.packed()
        if p.grid.rests is not None:  # the Q4_1 form with the zero points recomputed in the kernel
            assert packed[:HEADER].view(np.int32)[6] & FLAG_MINS, p.name
        err = np.abs(run_q(lib, p.x, p.grid, packed) - p.y)
        allowed = 2e-6 * (np.abs(p.x) @ np.abs(p.grid.rows).T) + 1e-6
        assert np.all(err <= allowed), (p.name, float(np.max(err / allowed)))
