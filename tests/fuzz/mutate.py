"""Deterministic byte-level mutators shared by the GGUF and ONNX fuzzers.

Every mutator takes a ``random.Random`` seeded from the variant's integer seed and returns the new
bytes plus a short description, so a failure is reproduced from ``(base file, seed)`` alone.
Offsets are drawn, most of the time, from the file's *structural* ranges (the GGUF header and
metadata, the ONNX graph without the weight bytes): flipping bits inside a weight only changes
numbers, while the importers' validation lives in the structure.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Sequence

#: One byte that parsers tend to treat specially.
INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0xFE, 0x20, 0x0A)
#: Integers worth writing into a length, count, dimension or id field (negative ones are written in
#: two's complement, so -1 in a uint64 field is 2**64 - 1).
INTERESTING_INTS = (
    0, 1, 2, 3, 7, 8, 16, 31, 32, 33, 64, 255, 256, 1023, 4096, 65535, 65536,
    2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, -1, -2, -(2**31), -(2**63),
)
INTERESTING_FLOATS = (0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e38, -1e38, 1e-45, 65504.0)

Ranges = Sequence[tuple[int, int]]


def wrap(value: int, size: int, signed: bool) -> int:
    """``value`` as the field of ``size`` bytes would hold it (two's complement wrap-around)."""
    bits = 8 * size
    value &= (1 << bits) - 1
    if signed and value >= 1 << (bits - 1):
        value -= 1 << bits
    return value


def interesting_int(rng: random.Random, original: int | None = None) -> int:
    """A value from INTERESTING_INTS, or (a third of the time) a small change of ``original``."""
    if original is not None and rng.random() < 0.33:
        return rng.choice((original + 1, original - 1, original * 2, original // 2, -original, original * 1000))
    return rng.choice(INTERESTING_INTS)


def pick_offset(rng: random.Random, size: int, structure: Ranges) -> int:
    """An offset in ``[0, size)``: 70% of the time inside one of the ``structure`` ranges."""
    usable = [(a, min(b, size)) for a, b in structure if a < min(b, size)]
    if usable and rng.random() < 0.7:
        a, b = rng.choices(usable, weights=[b - a for a, b in usable])[0]
        return rng.randrange(a, b)
    return rng.randrange(size)


def flip_bits(data: bytes, rng: random.Random, structure: Ranges) -> tuple[bytes, str]:
    out = bytearray(data)
    flips = []
    for _ in range(rng.choice((1, 1, 2, 4, 8))):
        offset, bit = pick_offset(rng, len(out), structure), rng.randrange(8)
        out[offset] ^= 1 << bit
        flips.append(f"{offset}.{bit}")
    return bytes(out), f"flip_bits({','.join(flips)})"


def overwrite_bytes(data: bytes, rng: random.Random, structure: Ranges) -> tuple[bytes, str]:
    out = bytearray(data)
    offset = pick_offset(rng, len(out), structure)
    count = min(rng.choice((1, 1, 2, 4, 8)), len(out) - offset)
    value = rng.choice(INTERESTING_BYTES)
    out[offset:offset + count] = bytes([value]) * count
    return bytes(out), f"overwrite_bytes(@{offset}x{count}={value:#04x})"


def overwrite_int(data: bytes, rng: random.Random, structure: Ranges) -> tuple[bytes, str]:
    """A little-endian int32 or int64 extreme at a random offset (clipped at the end of the file)."""
    out = bytearray(data)
    size = rng.choice((4, 8))
    value = rng.choice(INTERESTING_INTS)
    packed = struct.pack("<Q" if size == 8 else "<I", wrap(value, size, signed=False))
    offset = pick_offset(rng, len(out), structure)
    out[offset:offset + size] = packed[: len(out) - offset]
    return bytes(out[: len(data)]), f"overwrite_int(@{offset} int{size * 8}={value})"


def truncate(data: bytes, rng: random.Random, structure: Ranges) -> tuple[bytes, str]:
    offset = pick_offset(rng, len(data), structure) if rng.random() < 0.8 else rng.randrange(len(data))
    return data[:offset], f"truncate(@{offset})"


def duplicate_chunk(data: bytes, rng: random.Random, structure: Ranges) -> tuple[bytes, str]:
    start = pick_offset(rng, len(data), structure)
    length = min(rng.choice((1, 4, 8, 16, 64, 256, 4096)), len(data) - start)
    chunk = data[start:start + length]
    return data[:start] + chunk + data[start:], f"duplicate_chunk(@{start}+{length})"


def delete_chunk(data: bytes, rng: random.Random, structure: Ranges) -> tuple[bytes, str]:
    start = pick_offset(rng, len(data), structure)
    length = min(rng.choice((1, 4, 8, 16, 64, 256, 4096)), len(data) - start)
    return data[:start] + data[start + length:], f"delete_chunk(@{start}+{length})"


ByteMutator = Callable[[bytes, random.Random, Ranges], tuple[bytes, str]]
#: (mutator, weight): the ones that keep the file's length (and so most of its layout) are likelier.
BYTE_MUTATORS: tuple[tuple[ByteMutator, float], ...] = (
    (flip_bits, 3), (overwrite_bytes, 2), (overwrite_int, 3), (truncate, 1), (duplicate_chunk, 1), (delete_chunk, 1),
)


def mutate_bytes(data: bytes, rng: random.Random, structure: Ranges = ()) -> tuple[bytes, str]:
    """One byte-level mutation of ``data``, drawn by weight."""
    mutators, weights = zip(*BYTE_MUTATORS)
    return rng.choices(mutators, weights=weights)[0](data, rng, structure)
