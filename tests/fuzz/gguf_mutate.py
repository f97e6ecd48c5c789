"""Structure-aware GGUF mutations, parsed and re-encoded by hand.

The base file is parsed once into its header, metadata key-values and tensor infos, keeping the
byte offset of every integer field (a *slot*). A mutation either rewrites one slot in place (the
file keeps its layout, so the reader gets past it and the importer sees the hostile value) or
re-encodes the header with key-values/tensor infos dropped, duplicated, retyped or renamed; the
tensor data section is then moved to the next alignment boundary so its relative offsets hold.

GGUF v2/v3 layout (little-endian): magic "GGUF", u32 version, u64 tensor_count, u64 kv_count,
kv_count x (string key, u32 type, value), tensor_count x (string name, u32 n_dims, n_dims x u64,
u32 ggml_type, u64 offset), padding to ``general.alignment`` (32), tensor data. A string is a u64
length and its bytes; an array is a u32 item type, a u64 count and the items.
"""

from __future__ import annotations

import dataclasses
import random
import struct
from typing import Any

from .mutate import INTERESTING_FLOATS, interesting_int, mutate_bytes, wrap

UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
#: scalar value type -> (struct code, size)
SCALARS = {
    UINT8: ("B", 1), INT8: ("b", 1), UINT16: ("H", 2), INT16: ("h", 2), UINT32: ("I", 4), INT32: ("i", 4),
    FLOAT32: ("f", 4), BOOL: ("?", 1), UINT64: ("Q", 8), INT64: ("q", 8), FLOAT64: ("d", 8),
}
#: ggml tensor types: the ones infercc reads, then some it does not (K-quants, IQ, I8/I16/I32/I64, ...)
GGML_TYPES = (0, 1, 30, 8, 2, 3, 6, 7, 10, 12, 14, 16, 24, 25, 26, 27, 28, 4, 5, 39, 40, 1000, 2**31 - 1)


@dataclasses.dataclass(frozen=True)
class Slot:
    """An integer or float field of the file: where it is, how it is packed, what it means."""

    offset: int
    code: str  # struct code: B b H h I i Q q f d ?
    label: str
    category: str


@dataclasses.dataclass
class KV:
    key: str
    vtype: int
    value: Any  # int/float/bool, bytes for a string, list for an array
    item_type: int | None = None


@dataclasses.dataclass
class TensorInfo:
    name: bytes
    dims: list[int]
    ggml_type: int
    offset: int


@dataclasses.dataclass
class Layout:
    data: bytes
    version: int
    kvs: list[KV]
    tensors: list[TensorInfo]
    header_end: int
    data_start: int
    alignment: int
    slots: list[Slot]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, code: str) -> tuple[int, Any]:
        at = self.pos
        (value,) = struct.unpack_from("<" + code, self.data, at)
        self.pos += struct.calcsize(code)
        return at, value

    def string(self) -> tuple[int, bytes]:
        at, length = self.take("Q")
        value = self.data[self.pos:self.pos + length]
        self.pos += length
        return at, value


def parse(data: bytes) -> Layout:
    """The layout of a well-formed GGUF file (the fuzzer's base; mutated files are never parsed)."""
    if data[:4] != b"GGUF":
        raise ValueError("not a GGUF file")
    r = _Reader(data)
    r.pos = 4
    slots: list[Slot] = []
    at, version = r.take("I")
    slots.append(Slot(at, "I", "header.version", "header"))
    at, n_tensors = r.take("Q")
    slots.append(Slot(at, "Q", "header.tensor_count", "header"))
    at, n_kv = r.take("Q")
    slots.append(Slot(at, "Q", "header.kv_count", "header"))
    kvs = []
    for _ in range(n_kv):
        at, key_bytes = r.string()
        key = key_bytes.decode()
        slots.append(Slot(at, "Q", f"kv[{key}].key_length", "lengths"))
        at, vtype = r.take("I")
        slots.append(Slot(at, "I", f"kv[{key}].type", "types"))
        kvs.append(_parse_value(r, key, vtype, slots))
    tensors = []
    for _ in range(n_tensors):
        at, name = r.string()
        label = f"tensor[{name.decode()}]"
        slots.append(Slot(at, "Q", f"{label}.name_length", "tensor_meta"))
        at, n_dims = r.take("I")
        slots.append(Slot(at, "I", f"{label}.n_dims", "tensor_meta"))
        dims = []
        for d in range(n_dims):
            at, dim = r.take("Q")
            slots.append(Slot(at, "Q", f"{label}.dim{d}", "tensor_dims"))
            dims.append(dim)
        at, ggml_type = r.take("I")
        slots.append(Slot(at, "I", f"{label}.ggml_type", "tensor_meta"))
        at, offset = r.take("Q")
        slots.append(Slot(at, "Q", f"{label}.offset", "tensor_meta"))
        tensors.append(TensorInfo(name, dims, ggml_type, offset))
    alignment = next((kv.value for kv in kvs if kv.key == "general.alignment"), 32)
    data_start = -(-r.pos // alignment) * alignment
    return Layout(data, version, kvs, tensors, r.pos, data_start, alignment, slots)


def _parse_value(r: _Reader, key: str, vtype: int, slots: list[Slot]) -> KV:
    if vtype in SCALARS:
        code = SCALARS[vtype][0]
        at, value = r.take(code)
        model_key = key.split(".")[0] not in ("general", "tokenizer")
        category = "model_kv" if model_key else ("token_ids" if key.endswith("_id") else "kv_other")
        slots.append(Slot(at, code, f"kv[{key}]", category))
        return KV(key, vtype, value)
    if vtype == STRING:
        at, value = r.string()
        slots.append(Slot(at, "Q", f"kv[{key}].string_length", "lengths"))
        return KV(key, vtype, value)
    if vtype != ARRAY:
        raise ValueError(f"base file: key {key} has unknown type {vtype}")
    at, item_type = r.take("I")
    slots.append(Slot(at, "I", f"kv[{key}].item_type", "types"))
    at, count = r.take("Q")
    slots.append(Slot(at, "Q", f"kv[{key}].count", "lengths"))
    items = []
    for i in range(count):
        if item_type == STRING:
            at, value = r.string()
            slots.append(Slot(at, "Q", f"kv[{key}][{i}].string_length", "array_items"))
        else:
            code = SCALARS[item_type][0]
            at, value = r.take(code)
            slots.append(Slot(at, code, f"kv[{key}][{i}]", "array_items"))
        items.append(value)
    return KV(key, vtype, items, item_type)


# -- encoding ------------------------------------------------------------------------------------
def _string(value: bytes) -> bytes:
    return struct.pack("<Q", len(value)) + value


def _scalar(vtype: int, value: Any) -> bytes:
    code, size = SCALARS[vtype]
    if code in "fd":
        return struct.pack("<" + code, value)
    if code == "?":
        return struct.pack("<B", int(value) & 0xFF)
    return struct.pack("<" + code, wrap(int(value), size, signed=code.islower()))


def encode_kv(kv: KV) -> bytes:
    out = _string(kv.key.encode()) + struct.pack("<I", kv.vtype)
    if kv.vtype == STRING:
        return out + _string(kv.value)
    if kv.vtype == ARRAY:
        out += struct.pack("<IQ", kv.item_type, len(kv.value))
        encode = _string if kv.item_type == STRING else (lambda v: _scalar(kv.item_type, v))
        return out + b"".join(encode(v) for v in kv.value)
    return out + _scalar(kv.vtype, kv.value)


def encode_tensor(t: TensorInfo) -> bytes:
    dims = b"".join(struct.pack("<Q", wrap(d, 8, signed=False)) for d in t.dims)
    return _string(t.name) + struct.pack("<I", len(t.dims)) + dims + struct.pack("<IQ", t.ggml_type, t.offset)


def assemble(layout: Layout, kvs: list[KV], tensors: list[TensorInfo]) -> bytes:
    """A file with these key-values and tensor infos and the base file's tensor data, realigned."""
    header = b"GGUF" + struct.pack("<IQQ", layout.version, len(tensors), len(kvs))
    header += b"".join(encode_kv(kv) for kv in kvs) + b"".join(encode_tensor(t) for t in tensors)
    alignment = next((kv.value for kv in kvs if kv.key == "general.alignment" and kv.vtype in SCALARS), 32)
    alignment = alignment if isinstance(alignment, int) and 0 < alignment < 1 << 20 else 32
    padding = -len(header) % alignment
    return header + b"\0" * padding + layout.data[layout.data_start:]


# -- mutators ------------------------------------------------------------------------------------
#: slot category -> weight: the model's hyper-parameters and the tensor shapes matter most.
SLOT_WEIGHTS = {
    "model_kv": 6, "tensor_dims": 4, "tensor_meta": 3, "token_ids": 2, "lengths": 2, "types": 1.5,
    "array_items": 1.5, "kv_other": 1, "header": 1,
}


def set_slot(layout: Layout, rng: random.Random) -> tuple[bytes, str]:
    """One integer/float field set to 0, 1, huge, negative, NaN, ... in place."""
    categories = [c for c in SLOT_WEIGHTS if any(s.category == c for s in layout.slots)]
    category = rng.choices(categories, weights=[SLOT_WEIGHTS[c] for c in categories])[0]
    slot = rng.choice([s for s in layout.slots if s.category == category])
    (original,) = struct.unpack_from("<" + slot.code, layout.data, slot.offset)
    if slot.code in "fd":
        value: Any = rng.choice(INTERESTING_FLOATS)
        packed = struct.pack("<" + slot.code, value)
    else:
        value = interesting_int(rng, int(original))
        size = struct.calcsize(slot.code)
        code = {1: "B", 2: "H", 4: "I", 8: "Q"}[size]
        packed = struct.pack("<" + code, wrap(value, size, signed=False))
    out = bytearray(layout.data)
    out[slot.offset:slot.offset + len(packed)] = packed
    return bytes(out), f"set_slot({slot.label}: {original!r} -> {value!r})"


def set_field(layout: Layout, label: str, value: int | float) -> bytes:
    """The base file with the slot named ``label`` (e.g. ``kv[tokenizer.ggml.token_type].count``) set to
    ``value``: a minimal reproducer for a failure a random variant found."""
    slot = next(s for s in layout.slots if s.label == label)
    size = struct.calcsize(slot.code)
    if slot.code in "fd":
        packed = struct.pack("<" + slot.code, value)
    else:
        packed = struct.pack("<" + {1: "B", 2: "H", 4: "I", 8: "Q"}[size], wrap(int(value), size, signed=False))
    return layout.data[:slot.offset] + packed + layout.data[slot.offset + size:]


def drop_kv(layout: Layout, rng: random.Random) -> tuple[bytes, str]:
    kvs = list(layout.kvs)
    dropped = kvs.pop(rng.randrange(len(kvs)))
    return assemble(layout, kvs, layout.tensors), f"drop_kv({dropped.key})"


def duplicate_kv(layout: Layout, rng: random.Random) -> tuple[bytes, str]:
    kvs = list(layout.kvs)
    i = rng.randrange(len(kvs))
    kvs.insert(i, kvs[i])
    return assemble(layout, kvs, layout.tensors), f"duplicate_kv({kvs[i].key})"


#: values a metadata key may be replaced with: (type, value, item type)
_RETYPES: tuple[tuple[int, Any, int | None], ...] = (
    (UINT32, 0, None), (UINT32, 2**32 - 1, None), (INT32, -1, None), (INT64, 2**63 - 1, None), (UINT64, 2**64 - 1, None),
    (FLOAT32, float("nan"), None), (FLOAT64, 1e300, None), (BOOL, True, None), (UINT8, 255, None),
    (STRING, b"abc", None), (STRING, b"", None), (STRING, b"\xff\xfe", None),
    (ARRAY, [], INT32), (ARRAY, [1, 2], INT32), (ARRAY, [b"a", b"b"], STRING), (ARRAY, [], STRING), (ARRAY, [0.5], FLOAT32),
)


def retype_kv(layout: Layout, rng: random.Random) -> tuple[bytes, str]:
    """One key's value replaced by a value of another type (an int key as a string, an array as an int...)."""
    kvs = list(layout.kvs)
    i = rng.randrange(len(kvs))
    vtype, value, item_type = rng.choice(_RETYPES)
    kvs[i] = KV(kvs[i].key, vtype, value, item_type)
    return assemble(layout, kvs, layout.tensors), f"retype_kv({kvs[i].key} = {_show(vtype, value, item_type)})"


#: keys whose value changes what the importer or the tokenizer does, and hostile values for them
_SEMANTIC: dict[str, tuple[tuple[int, Any], ...]] = {
    "general.architecture": ((STRING, b"gpt2"), (STRING, b""), (STRING, b"LLAMA"), (STRING, b"llama\0"), (UINT32, 7)),
    "general.alignment": ((UINT32, 0), (UINT32, 1), (UINT32, 3), (UINT32, 2**31), (INT32, -32), (UINT32, 64)),
    "tokenizer.ggml.model": ((STRING, b"gpt2"), (STRING, b"bert"), (STRING, b""), (UINT32, 0)),
    "tokenizer.ggml.add_bos_token": ((BOOL, False), (STRING, b"yes"), (UINT32, 2)),
    "tokenizer.ggml.add_space_prefix": ((BOOL, False), (STRING, b"no")),
    "tokenizer.ggml.bos_token_id": ((UINT32, 2**32 - 1), (INT32, -1), (UINT64, 2**63), (UINT32, 100000), (STRING, b"1")),
    "tokenizer.ggml.eos_token_id": ((UINT32, 2**32 - 1), (INT32, -5), (UINT32, 100000), (FLOAT32, 2.5)),
    "tokenizer.ggml.unknown_token_id": ((UINT32, 100000), (INT32, -1)),
    "tokenizer.ggml.pre": ((STRING, b"unknown-pre"), (STRING, b"")),
    "tokenizer.ggml.merges": ((ARRAY, ([b"a b", b"", b"x"], STRING)), (ARRAY, ([1], INT32))),
    "tokenizer.chat_template": ((STRING, b"{{ raise_exception('no') }}"), (STRING, b"{% for %}"), (STRING, b"{{ 1/0 }}"),
                                (UINT32, 3)),
    "llama.vocab_size": ((UINT32, 0), (UINT32, 1), (UINT32, 2**31), (INT32, -1), (UINT32, 100000)),
    "llama.attention.key_length": ((UINT32, 0), (UINT32, 3), (UINT32, 2**20), (INT32, -8)),
    "llama.attention.value_length": ((UINT32, 0), (UINT32, 3)),
    "llama.rope.dimension_count": ((UINT32, 0), (UINT32, 4), (INT32, -8)),
    "llama.rope.scaling.type": ((STRING, b"linear"), (STRING, b"yarn"), (UINT32, 1)),
    "llama.rope.freq_base": ((FLOAT32, float("nan")), (FLOAT32, 0.0), (FLOAT32, -1.0), (FLOAT32, float("inf")),
                             (STRING, b"1e4")),
    "llama.attention.layer_norm_rms_epsilon": ((FLOAT32, float("nan")), (FLOAT32, -1.0), (STRING, b"1e-5")),
    "llama.context_length": ((UINT32, 0), (UINT32, 1), (UINT64, 2**63 - 1), (INT32, -1), (FLOAT32, 2048.5)),
    "llama.embedding_length": ((INT32, -64), (UINT64, 2**40), (FLOAT32, 64.0), (STRING, b"64")),
    "llama.block_count": ((UINT32, 0), (INT32, -1), (UINT64, 2**40), (UINT32, 1000)),
    "llama.attention.head_count": ((UINT32, 0), (UINT32, 3), (INT32, -8), (UINT32, 2**31)),
    "llama.attention.head_count_kv": ((UINT32, 0), (UINT32, 3), (UINT32, 5), (INT32, -4)),
    "llama.feed_forward_length": ((UINT32, 0), (INT32, -1), (UINT32, 2**31)),
}


def set_semantic_kv(layout: Layout, rng: random.Random) -> tuple[bytes, str]:
    """Add or replace one key the importer or the tokenizer reads, with a hostile value."""
    key = rng.choice(sorted(_SEMANTIC))
    vtype, value = rng.choice(_SEMANTIC[key])
    item_type = None
    if vtype == ARRAY:
        value, item_type = value
    kvs = [kv for kv in layout.kvs if kv.key != key]
    where = next((i for i, kv in enumerate(layout.kvs) if kv.key == key), len(kvs))
    kvs.insert(where, KV(key, vtype, value, item_type))
    return assemble(layout, kvs, layout.tensors), f"set_kv({key} = {_show(vtype, value, item_type)})"


def resize_array(layout: Layout, rng: random.Random) -> tuple[bytes, str]:
    """An array (the vocabulary, scores, token types, merges) cut short, emptied or grown."""
    arrays = [i for i, kv in enumerate(layout.kvs) if kv.vtype == ARRAY]
    if not arrays:
        return set_slot(layout, rng)
    i = rng.choice(arrays)
    kv = layout.kvs[i]
    count = len(kv.value)
    new_count = rng.choice((0, 1, 3, count // 2, count - 1, count + 1, count * 2))
    items = (kv.value * (new_count // max(count, 1) + 1))[:new_count] if count else []
    kvs = list(layout.kvs)
    kvs[i] = KV(kv.key, ARRAY, items, kv.item_type)
    return assemble(layout, kvs, layout.tensors), f"resize_array({kv.key}: {count} -> {len(items)} items)"


_TOKEN_TEXTS = (b"", b"\xff\xfe", b"<0xZZ>", b"<0x", b"<0x100>", b"<s>", b"\xe2\x96\x81", b"a" * 70000, b"<|endoftext|>")


def set_token_text(layout: Layout, rng: random.Random) -> tuple[bytes, str]:
    """One vocabulary entry replaced: empty, invalid UTF-8, a malformed byte token, a duplicate, a huge one."""
    tokens = next((i for i, kv in enumerate(layout.kvs) if kv.key == "tokenizer.ggml.tokens"), None)
    if tokens is None:
        return set_slot(layout, rng)
    kv = layout.kvs[tokens]
    items = list(kv.value)
    index = rng.choice((0, 1, 2, 3, rng.randrange(len(items))))
    text = rng.choice(_TOKEN_TEXTS)
    items[index] = text
    kvs = list(layout.kvs)
    kvs[tokens] = KV(kv.key, ARRAY, items, STRING)
    return assemble(layout, kvs, layout.tensors), f"set_token_text(tokens[{index}] = {text[:20]!r})"


def drop_tensor(layout: Layout, rng: random.Random) -> tuple[bytes, str]:
    tensors = list(layout.tensors)
    dropped = tensors.pop(rng.randrange(len(tensors)))
    return assemble(layout, layout.kvs, tensors), f"drop_tensor({dropped.name.decode()})"


def rename_tensor(layout: Layout, rng: random.Random) -> tuple[bytes, str]:
    """A tensor renamed to another tensor's name, an unknown layer, or a name the importer parses oddly."""
    tensors = list(layout.tensors)
    i = rng.randrange(len(tensors))
    old = tensors[i].name
    name = rng.choice((
        rng.choice(tensors).name, b"blk.999.attn_q.weight", b"blk.-1.attn_q.weight", b"blk.x.ffn_up.weight",
        b"rope_freqs.weight", b"", b"\xff\xfe", old + b".extra", b"blk.0.attn_q.weight",
    ))
    tensors[i] = dataclasses.replace(tensors[i], name=name)
    return assemble(layout, layout.kvs, tensors), f"rename_tensor({old.decode()} -> {name!r})"


def reshape_tensor(layout: Layout, rng: random.Random) -> tuple[bytes, str]:
    """A tensor's dims swapped, one dropped, or one added (its data stays as it was)."""
    tensors = list(layout.tensors)
    i = rng.randrange(len(tensors))
    dims = list(tensors[i].dims)
    how = rng.choice(("reverse", "drop", "append1", "prepend2", "zero"))
    if how == "reverse":
        dims.reverse()
    elif how == "drop" and len(dims) > 1:
        dims.pop()
    elif how == "append1":
        dims.append(1)
    elif how == "prepend2":
        dims.insert(0, 2)
    else:
        dims[rng.randrange(len(dims))] = 0
    tensors[i] = dataclasses.replace(tensors[i], dims=dims)
    return assemble(layout, layout.kvs, tensors), f"reshape_tensor({tensors[i].name.decode()}: {layout.tensors[i].dims} -> {dims})"


def retype_tensor(layout: Layout, rng: random.Random) -> tuple[bytes, str]:
    """A tensor's ggml type changed (a supported one whose size does not match the data, or an unsupported one)."""
    tensors = list(layout.tensors)
    i = rng.randrange(len(tensors))
    ggml_type = rng.choice(GGML_TYPES)
    tensors[i] = dataclasses.replace(tensors[i], ggml_type=ggml_type)
    return assemble(layout, layout.kvs, tensors), f"retype_tensor({tensors[i].name.decode()}: {layout.tensors[i].ggml_type} -> {ggml_type})"


STRUCTURE_MUTATORS = (
    (set_slot, 10), (set_semantic_kv, 5), (drop_kv, 1.5), (duplicate_kv, 0.5), (retype_kv, 1.5), (resize_array, 1.5),
    (set_token_text, 1), (drop_tensor, 1.5), (rename_tensor, 1), (reshape_tensor, 1.5), (retype_tensor, 1.5),
)


def mutate_gguf(layout: Layout, seed: int) -> tuple[bytes, str]:
    """Variant ``seed`` of the base file: a structure-aware mutation 70% of the time, else a byte-level one
    (aimed at the header and metadata 70% of the time); one in five variants gets a second mutation."""
    rng = random.Random(seed)
    data, descriptions = layout.data, []
    for _ in range(2 if rng.random() < 0.2 else 1):
        if rng.random() < 0.7 and data is layout.data:
            mutators, weights = zip(*STRUCTURE_MUTATORS)
            data, text = rng.choices(mutators, weights=weights)[0](layout, rng)
        else:
            data, text = mutate_bytes(data, rng, [(0, layout.header_end)])
        descriptions.append(text)
    return data, " + ".join(descriptions)


_TYPE_NAMES = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "STRING", "ARRAY", "UINT64",
               "INT64", "FLOAT64")


def _show(vtype: int, value: Any, item_type: int | None) -> str:
    if vtype == ARRAY:
        return f"ARRAY[{_TYPE_NAMES[item_type]}]{value!r}"
    return f"{_TYPE_NAMES[vtype]}({value!r})"
