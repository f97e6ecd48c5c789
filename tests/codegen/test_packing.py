"""The weight blob (codegen/packing.py) without extra copies: the size a quantized weight will take
is known from its scales, zero points and rests (loading a saved artifact never reads, so never
makes resident, the codes), and a part whose size is known is made only when the blob is written,
straight into its place (never a list of packed parts beside the blob)."""

from __future__ import annotations

import numpy as np
import pytest

from infercc.codegen.packing import FLAG_F16_SCALES, FLAG_MINS, HEADER, Blob, pack_quant, quant_nbytes

from .test_qgemm import make_grid


@pytest.mark.parametrize("kind", ["int4_sym", "int4_zp", "int4_f16", "int8", "int8_sym", "q4_1", "q4_1_f32_min",
                                  "q4_1_far_zero"])
@pytest.mark.parametrize(("n", "k"), [(16, 64), (37, 96)])
def test_quant_nbytes_is_the_packed_size(kind: str, n: int, k: int) -> None:
    g = make_grid(kind, n, k, 32)
    packed = pack_quant(g.b, g.scales, g.zero_points, g.rests, k, n, g.bits, g.block)
    assert quant_nbytes(g.scales, g.zero_points, g.rests, k, n, g.bits, g.block) == len(packed)
    flags = int(packed[:HEADER].view("<i4")[6])
    assert bool(flags & FLAG_MINS) == (kind == "q4_1")  # the forms differ in size: each one is covered
    assert bool(flags & FLAG_F16_SCALES) == (kind in ("int4_f16", "q4_1", "q4_1_f32_min", "q4_1_far_zero"))


def test_blob_makes_sized_parts_only_when_writing_the_blob() -> None:
    calls: list[str] = []

    def make(name: str, array: np.ndarray):
        def run() -> np.ndarray:
            calls.append(name)
            return array
        return run

    blob = Blob()
    big = np.arange(100, dtype=np.float32)
    a = blob.add("a", make("a", big), nbytes=big.nbytes)
    b = blob.add("b", make("b", np.ones(3, np.int64)))  # no size given: made now to learn it
    assert blob.add("a", make("again", big), nbytes=big.nbytes) == a  # one entry per key
    assert calls == ["b"] and (a, b) == (0, 448) and blob.size == 512
    out = blob.array()
    assert calls == ["b", "a"] and out.ctypes.data % 64 == 0
    np.testing.assert_array_equal(out[a:a + 400].view(np.float32), big)
    np.testing.assert_array_equal(out[b:b + 24].view(np.int64), np.ones(3, np.int64))
    assert not out[400:448].any()  # padding is zero
    with pytest.raises(ValueError, match="released"):
        blob.array()


def test_blob_refuses_a_part_whose_planned_size_was_wrong() -> None:
    blob = Blob()
    blob.add("w", lambda: np.zeros(10, np.float32), nbytes=32)
    with pytest.raises(ValueError, match="made 40 bytes where 32 were planned"):
        blob.array()
