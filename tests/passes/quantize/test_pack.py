"""The packed layout against onnxruntime itself: MatMulNBits and GatherBlockQuantized read our
bytes as the numbers we meant (accuracy_level 0, so exactly)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from infercc.passes.quantize.methods import quantize_rows
from infercc.passes.quantize.pack import (
    channel_block,
    pack_codes,
    pack_zero_points,
    reblock,
    to_nbits,
    unpack_codes,
    unpack_zero_points,
)

from ._util import run_single


def test_pack_round_trip() -> None:
    codes = np.random.default_rng(0).integers(0, 16, (5, 3, 32)).astype(np.uint8)
    assert np.array_equal(unpack_codes(pack_codes(codes, 4), 4), codes)
    assert pack_codes(codes, 4)[0, 0, 0] == codes[0, 0, 0] | (codes[0, 0, 1] << 4)  # even element: low nibble
    zeros = codes[:, :, 0]
    assert pack_zero_points(zeros, 4).shape == (5, 2)  # 3 blocks -> 2 bytes per row
    assert np.array_equal(unpack_zero_points(pack_zero_points(zeros, 4), 4, 3), zeros)


@pytest.mark.parametrize(("k", "expected"), [(768, 256), (384, 128), (64, 64), (2048, 256), (100, 128), (8, 16), (48, 16)])
def test_channel_block(k: int, expected: int) -> None:
    assert channel_block(k) == expected


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("k", "n", "block"), [(64, 24, 32), (100, 8, 32), (96, 16, 64)])
def test_matmul_nbits_reads_our_layout(bits: int, symmetric: bool, k: int, n: int, block: int) -> None:
    rng = np.random.default_rng(k + n)
    rows = rng.standard_normal((n, k)).astype(np.float32)
    q = quantize_rows(rows, bits, block, symmetric=symmetric, method="rtn")
    b, scales, zp = to_nbits(q, symmetric, np.float32)
    inits = {"B": b, "S": scales} | ({} if zp is None else {"Z": zp})
    node = helper.make_node("MatMulNBits", ["A", *inits], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=0)
    a = rng.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_allclose(run_single(node, {"A": a}, inits), a @ q.dequantize().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [768, 100])
def test_per_channel_int8_as_repeated_blocks(k: int) -> None:
    rows = np.random.default_rng(5).standard_normal((6, k)).astype(np.float32)
    q = quantize_rows(rows, 8, k, method="rtn")
    stored = reblock(q, channel_block(k))
    assert np.array_equal(stored.dequantize(), q.dequantize())
    b, scales, zp = to_nbits(stored, False, np.float32)
    node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=k, N=6, bits=8,
                            block_size=stored.block_size, accuracy_level=0)
    a = np.random.default_rng(6).standard_normal((2, k)).astype(np.float32)
    got = run_single(node, {"A": a}, {"B": b, "S": scales, "Z": zp})
    np.testing.assert_allclose(got, a @ q.dequantize().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gather_block_quantized_reads_the_same_bytes(bits: int, symmetric: bool) -> None:
    table = np.random.default_rng(7).standard_normal((50, 64)).astype(np.float32)
    q = quantize_rows(table, bits, 32, symmetric=symmetric, method="mse")
    b, scales, zp = to_nbits(q, symmetric, np.float32)
    inits = {"D": b.reshape(50, -1), "S": scales} | ({} if zp is None else {"Z": zp})
    names = ["D", "I", "S"] + (["Z"] if zp is not None else [])
    node = helper.make_node("GatherBlockQuantized", names, ["Y"], domain="com.microsoft", gather_axis=0,
                            quantize_axis=1, block_size=32, bits=bits)
    ids = np.array([[0, 49, 7]], np.int64)
    np.testing.assert_array_equal(run_single(node, {"I": ids}, inits), q.dequantize()[ids])
