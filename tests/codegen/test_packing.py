"""Blob planning without packing (codegen/packing.py): the size a quantized weight will take is known
from its scales, zero points and rests, so loading a saved artifact never reads (and so never makes
resident) the codes of the model's weights."""

from __future__ import annotations

import pytest

from infercc.codegen.packing import FLAG_F16_SCALES, FLAG_MINS, HEADER, pack_quant, quant_nbytes

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
