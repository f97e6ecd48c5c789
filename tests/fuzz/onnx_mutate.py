"""Structure-aware ONNX mutations through the protobuf, plus byte-level ones on the files.

A variant is a small folder: the model file and, for a model with external data, its data file,
either of which may be replaced by a symbolic link (to a file outside the folder) or a directory.
The base is parsed once; each variant edits a copy of its ModelProto (a dim, an attribute, an
op_type, a data_type, an opset, a dropped input, a node that reads its own output, hostile
external-data entries) or flips bytes of one of its files.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from pathlib import Path

import onnx
from onnx import AttributeProto, TensorProto

from .mutate import INTERESTING_FLOATS, interesting_int, mutate_bytes

OUTSIDE = "outside.bin"  # a file the child writes next to (outside of) every variant folder
#: larger than any data file of the bases, so that only a confinement check (not a size check) refuses it
OUTSIDE_BYTES = 4 << 20
#: in a variant's description: its weights lie outside its folder, so compiling it must fail
ESCAPES = "[escapes the folder]"


@dataclasses.dataclass(frozen=True)
class Link:
    """A symbolic link at this place of the variant folder, pointing at ``target``."""

    target: str


class Directory:
    """A directory at this place of the variant folder (where a file is expected)."""


Files = dict[str, "bytes | Link | Directory"]


@dataclasses.dataclass
class OnnxBase:
    """The model to mutate: its file name, parsed proto, every file of its folder, and the byte ranges
    of the model file that are structure (everything but the large raw_data weights)."""

    model_file: str
    proto: onnx.ModelProto
    files: dict[str, bytes]
    structure: list[tuple[int, int]]

    @classmethod
    def load(cls, path: Path) -> OnnxBase:
        data = path.read_bytes()
        proto = onnx.load_model_from_string(data)
        locations = {
            e.value for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"
        }
        files = {name: (path.parent / name).read_bytes() for name in sorted(locations)}
        files[path.name] = data
        weights = sorted(
            (at, at + len(t.raw_data)) for t in proto.graph.initializer
            if len(t.raw_data) >= 64 and (at := data.find(t.raw_data)) >= 0
        )
        structure, start = [], 0
        for a, b in weights:
            if a > start:
                structure.append((start, a))
            start = max(start, b)
        structure.append((start, len(data)))
        return cls(path.name, proto, files, structure)


# -- proto mutators: each edits ``proto`` (and maybe ``files``) in place and describes what it did --
def _value_infos(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    g = proto.graph
    return [v for v in [*g.input, *g.output, *g.value_info] if v.type.HasField("tensor_type")]


def set_dim(proto: onnx.ModelProto, files: Files, rng: random.Random) -> str:
    infos = [v for v in _value_infos(proto) if v.type.tensor_type.shape.dim]
    info = rng.choice(infos)
    dims = info.type.tensor_type.shape.dim
    i = rng.randrange(len(dims))
    how = rng.random()
    if how < 0.7:
        value = interesting_int(rng, dims[i].dim_value or 4)
        value = max(min(value, 2**63 - 1), -(2**63))
        dims[i].dim_value = value
        return f"set_dim({info.name}[{i}] = {value})"
    if how < 0.85:
        dims[i].dim_param = rng.choice(("", "batch", "weird dim", "seq"))
        return f"set_dim({info.name}[{i}] = {dims[i].dim_param!r})"
    if rng.random() < 0.5:
        del dims[i]
        return f"drop_dim({info.name}[{i}])"
    dims.add().dim_value = rng.choice((1, 2, 0))
    return f"add_dim({info.name})"


def set_elem_type(proto: onnx.ModelProto, files: Files, rng: random.Random) -> str:
    elem = rng.choice((*range(0, 24), 99, -1))
    if rng.random() < 0.5 and proto.graph.initializer:
        t = rng.choice(proto.graph.initializer)
        old, t.data_type = t.data_type, elem
        return f"set_data_type(initializer {t.name}: {old} -> {elem})"
    info = rng.choice(_value_infos(proto))
    old, info.type.tensor_type.elem_type = info.type.tensor_type.elem_type, elem
    return f"set_elem_type({info.name}: {old} -> {elem})"


def set_initializer_dims(proto: onnx.ModelProto, files: Files, rng: random.Random) -> str:
    t = rng.choice(proto.graph.initializer)
    old = list(t.dims)
    how = rng.choice(("set", "set", "drop", "add"))
    if how == "set" and t.dims:
        i = rng.randrange(len(t.dims))
        t.dims[i] = max(min(interesting_int(rng, t.dims[i]), 2**63 - 1), -(2**63))
    elif how == "drop" and t.dims:
        del t.dims[-1]
    else:
        t.dims.append(rng.choice((1, 2, 0, 2**40)))
    return f"set_initializer_dims({t.name}: {old} -> {list(t.dims)})"


def resize_raw_data(proto: onnx.ModelProto, files: Files, rng: random.Random) -> str:
    inits = [t for t in proto.graph.initializer if t.raw_data]
    if not inits:
        return set_initializer_dims(proto, files, rng)
    t = rng.choice(inits)
    old = len(t.raw_data)
    new = rng.choice((0, 1, old - 1, old // 2, old + 4, old * 2))
    t.raw_data = (t.raw_data * 2)[:new]
    return f"resize_raw_data({t.name}: {old} -> {new} bytes)"


def _nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    return list(proto.graph.node)


def set_attribute(proto: onnx.ModelProto, files: Files, rng: random.Random) -> str:
    nodes = [n for n in _nodes(proto) if n.attribute]
    node = rng.choice(nodes)
    a = rng.choice(node.attribute)
    where = f"{node.name or node.op_type}.{a.name}"
    if rng.random() < 0.15:
        new = rng.choice([t for t in AttributeProto.AttributeType.values() if t != a.type])
        old, a.type = a.type, new
        return f"set_attribute_type({where}: {old} -> {new})"
    if a.type == AttributeProto.INT:
        old, a.i = a.i, max(min(interesting_int(rng, a.i), 2**63 - 1), -(2**63))
        return f"set_attribute({where}: {old} -> {a.i})"
    if a.type == AttributeProto.INTS:
        old = list(a.ints)
        if a.ints and rng.random() < 0.7:
            a.ints[rng.randrange(len(a.ints))] = rng.choice((0, -1, 2**31 - 1, -(2**63), 99))
        else:
            del a.ints[rng.randrange(len(a.ints) + 1):]
        return f"set_attribute({where}: {old} -> {list(a.ints)})"
    if a.type == AttributeProto.FLOAT:
        old, a.f = a.f, rng.choice(INTERESTING_FLOATS)
        return f"set_attribute({where}: {old} -> {a.f})"
    if a.type == AttributeProto.FLOATS:
        old = list(a.floats)
        del a.floats[rng.randrange(len(a.floats) + 1):]
        return f"set_attribute({where}: {old} -> {list(a.floats)})"
    if a.type == AttributeProto.STRING:
        old, a.s = a.s, rng.choice((b"", b"\xff\xfe", b"NOTSET", b"a" * 100))
        return f"set_attribute({where}: {old!r} -> {a.s!r})"
    if a.type == AttributeProto.TENSOR:
        old = (a.t.data_type, list(a.t.dims))
        if rng.random() < 0.5:
            a.t.data_type = rng.choice((0, 1, 6, 7, 9, 11, 16, 99))
        else:
            a.t.dims.append(rng.choice((0, 2, 2**40)))
        return f"set_attribute({where}: tensor {old} -> {(a.t.data_type, list(a.t.dims))})"
    a.type = AttributeProto.INT
    a.i = -1
    return f"set_attribute({where}: -> INT -1)"


_OPS = ("Add", "MatMul", "Gather", "Reshape", "Softmax", "Transpose", "Concat", "Slice", "Where", "Identity", "Cast",
        "Split", "Loop", "If", "Scan", "Attention", "LayerNormalization", "NoSuchOp", "", "matmul")


def set_op_type(proto: onnx.ModelProto, files: Files, rng: random.Random) -> str:
    node = rng.choice(_nodes(proto))
    where = node.name or node.op_type
    if rng.random() < 0.2:
        old, node.domain = node.domain, rng.choice(("com.microsoft", "custom.domain", "ai.onnx.ml", "ai.onnx"))
        return f"set_domain({where}: {old!r} -> {node.domain!r})"
    old, node.op_type = node.op_type, rng.choice(_OPS)
    return f"set_op_type({where}: {old} -> {node.op_type!r})"


def drop_node_input(proto: onnx.ModelProto, files: Files, rng: random.Random) -> str:
    node = rng.choice([n for n in _nodes(proto) if n.input])
    i = rng.randrange(len(node.input))
    name = node.input[i]
    if rng.random() < 0.5:
        del node.input[i]
        return f"drop_node_input({node.name or node.op_type}.input[{i}] {name})"
    node.input[i] = ""
    return f"blank_node_input({node.name or node.op_type}.input[{i}] {name})"


def rewire(proto: onnx.ModelProto, files: Files, rng: random.Random) -> str:
    """A node reads its own output, a later node's output (a cycle), a missing name; or two writers share a name."""
    nodes = _nodes(proto)
    i = rng.randrange(len(nodes))
    node = nodes[i]
    how = rng.choice(("self", "later", "missing", "extra", "duplicate_output", "output_is_input"))
    where = node.name or node.op_type
    if how == "self" and node.input:
        node.input[rng.randrange(len(node.input))] = node.output[0]
        return f"self_loop({where})"
    if how == "later" and node.input and i + 1 < len(nodes):
        later = rng.choice(nodes[i + 1:])
        node.input[rng.randrange(len(node.input))] = later.output[0]
        return f"cycle({where} reads {later.output[0]})"
    if how == "missing" and node.input:
        node.input[rng.randrange(len(node.input))] = "does_not_exist"
        return f"dangling_input({where})"
    if how == "duplicate_output" and i > 0:
        other = rng.choice(nodes[:i])
        node.output[0] = other.output[0]
        return f"duplicate_output({where} writes {other.output[0]})"
    if how == "output_is_input" and proto.graph.input:
        node.output[0] = proto.graph.input[0].name
        return f"output_is_input({where} writes {proto.graph.input[0].name})"
    node.input.append(rng.choice(node.input) if node.input else node.output[0])
    return f"extra_input({where})"


def drop_element(proto: onnx.ModelProto, files: Files, rng: random.Random) -> str:
    """A node, a graph input, an initializer, a graph output, or every output, removed."""
    g = proto.graph
    what = rng.choice(("node", "node", "input", "initializer", "output", "all_outputs", "value_info"))
    field = {"node": g.node, "input": g.input, "initializer": g.initializer, "output": g.output,
             "all_outputs": g.output, "value_info": g.value_info}[what]
    if not field:
        return set_dim(proto, files, rng)
    if what == "all_outputs":
        del g.output[:]
        return "drop_all_outputs"
    i = rng.randrange(len(field))
    name = field[i].name or getattr(field[i], "op_type", "")
    del field[i]
    return f"drop_{what}({name})"


def set_opset(proto: onnx.ModelProto, files: Files, rng: random.Random) -> str:
    how = rng.random()
    if how < 0.15:
        del proto.opset_import[:]
        return "drop_opset_imports"
    if how < 0.3:
        proto.ir_version = rng.choice((0, 1, 3, 99, -1, 2**62))
        return f"set_ir_version({proto.ir_version})"
    if how < 0.4:
        extra = proto.opset_import.add()
        extra.domain, extra.version = rng.choice((("com.microsoft", 999), ("", 1), ("weird", -1)))
        return f"add_opset({extra.domain!r} v{extra.version})"
    imp = rng.choice(proto.opset_import)
    old, imp.version = imp.version, rng.choice((0, 1, 6, 7, 13, 17, 18, 21, 22, 23, 24, 99, -1, 2**62))
    return f"set_opset({imp.domain!r}: {old} -> {imp.version})"


def deep_nesting(proto: onnx.ModelProto, files: Files, rng: random.Random) -> str:
    """A chain of If nodes nested ``depth`` subgraphs deep (recursion in parsers and importers). Built in
    place, outermost first: copying a deep subgraph goes through a parse that has a depth limit."""
    depth = rng.choice((5, 20, 30, 60, 1000))
    leaf = onnx.helper.make_graph(
        [onnx.helper.make_node("Constant", [], ["c"], value=onnx.helper.make_tensor("c", TensorProto.FLOAT, [1], [1.0]))],
        "leaf", [], [onnx.helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])],
    )
    graph = proto.graph
    for level in range(depth):
        graph.node.append(onnx.helper.make_node("Constant", [], [f"cond{level}"],
                                                value=onnx.helper.make_tensor("t", TensorProto.BOOL, [], [True])))
        node = graph.node.add(op_type="If", input=[f"cond{level}"], output=[f"nested{level}"])
        graph.output.append(onnx.helper.make_tensor_value_info(f"nested{level}", TensorProto.FLOAT, [1]))
        node.attribute.add(name="else_branch", type=AttributeProto.GRAPH).g.CopyFrom(leaf)
        graph = node.attribute.add(name="then_branch", type=AttributeProto.GRAPH).g
        graph.name = f"level{level}"
    graph.CopyFrom(leaf)
    return f"deep_nesting({depth})"


#: stands for the variant folder's parent in a link target; the child writes the real path
ABSOLUTE = "{parent}"
_LOCATIONS = ("../outside.bin", f"/tmp/../{OUTSIDE}", "missing.bin", "sub/../../outside.bin", "", ".", "link.bin",
              "model.onnx", "a\0b", "../" * 20 + "etc/passwd")


def hostile_external(proto: onnx.ModelProto, files: Files, rng: random.Random) -> str:
    """An initializer's external-data entry made hostile: a path out of the folder (directly or through a
    symbolic link), a missing or absolute file, an offset/length past the end or negative, a bad key."""
    inits = list(proto.graph.initializer)
    external = [t for t in inits if t.data_location == TensorProto.EXTERNAL]
    t = rng.choice(external) if external and rng.random() < 0.8 else rng.choice(inits)
    if t.data_location != TensorProto.EXTERNAL:  # make it external: its bytes now live "elsewhere"
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value="missing.bin")
    entries = {e.key: e for e in t.external_data}
    how = rng.choice(("location", "location", "offset", "length", "drop_key", "unknown_key", "inline"))
    if how == "location":
        loc = rng.choice(_LOCATIONS)
        if loc == "link.bin":
            files["link.bin"] = Link(f"../{OUTSIDE}")
        entries["location"].value = loc
        escapes = loc == "link.bin" or OUTSIDE in loc
        return f"external({t.name}: location = {loc!r})" + (f" {ESCAPES}" if escapes else "")
    if how in ("offset", "length"):
        value = str(rng.choice((-1, 2**63 - 1, 2**40, 3, 0, "abc", "1e3", " 12")))
        entry = entries.get(how) or t.external_data.add(key=how)
        entry.value = value
        return f"external({t.name}: {how} = {value!r})"
    if how == "drop_key" and len(t.external_data) > 1:
        key = t.external_data[-1].key
        del t.external_data[-1]
        return f"external({t.name}: drop {key})"
    if how == "inline":
        t.data_location = TensorProto.DEFAULT
        return f"external({t.name}: data_location DEFAULT, no data)"
    t.external_data.add(key=rng.choice(("checksum", "basepath", "location")), value="x")
    return f"external({t.name}: extra key {t.external_data[-1].key})"


def replace_data_file(proto: onnx.ModelProto, files: Files, rng: random.Random) -> str:
    """The external data file replaced by a link out of the folder, a directory, or nothing."""
    data_files = [name for name in files if name != MODEL]
    if not data_files:
        return hostile_external(proto, files, rng)
    name = rng.choice(data_files)
    how = rng.choice(("link_out", "link_abs", "directory", "missing", "link_loop"))
    if how == "link_out":
        files[name] = Link(f"../{OUTSIDE}")
    elif how == "link_abs":
        files[name] = Link(f"{ABSOLUTE}/{OUTSIDE}")
    elif how == "directory":
        files[name] = Directory()
    elif how == "link_loop":
        files[name] = Link(name)
    else:
        del files[name]
    return f"data_file({name}: {how})" + (f" {ESCAPES}" if how.startswith("link_") and how != "link_loop" else "")


MODEL = "model.onnx"  # the model file's name in every variant folder
ProtoMutator = Callable[[onnx.ModelProto, Files, random.Random], str]
PROTO_MUTATORS: tuple[tuple[ProtoMutator, float], ...] = (
    (set_dim, 3), (set_elem_type, 2), (set_initializer_dims, 2), (resize_raw_data, 1.5), (set_attribute, 4),
    (set_op_type, 2.5), (drop_node_input, 2), (rewire, 3), (drop_element, 2), (set_opset, 1.5), (deep_nesting, 0.5),
    (hostile_external, 1.5),
)


def mutate_onnx(base: OnnxBase, seed: int) -> tuple[Files, str]:
    """Variant ``seed``: the folder's files, the model file named ``MODEL``. 65% a protobuf mutation,
    else a byte-level one of the model file (or, 30% of the time, of a data file); one in five gets
    a second mutation."""
    rng = random.Random(seed)
    files: Files = {(MODEL if k == base.model_file else k): v for k, v in base.files.items()}
    external = any(t.data_location == TensorProto.EXTERNAL for t in base.proto.graph.initializer)
    descriptions = []
    proto = None
    for step in range(2 if rng.random() < 0.2 else 1):
        if rng.random() < 0.65 and step == 0:
            proto = onnx.ModelProto()
            proto.CopyFrom(base.proto)
            mutators = [(m, w * (4 if m is hostile_external and external else 1)) for m, w in PROTO_MUTATORS]
            if external:
                mutators.append((replace_data_file, 2))
            chosen, weights = zip(*mutators)
            descriptions.append(rng.choices(chosen, weights=weights)[0](proto, files, rng))
            continue
        if proto is not None:
            files[MODEL], proto = proto.SerializeToString(), None
        others = [k for k, v in files.items() if k != MODEL and isinstance(v, bytes)]
        name = rng.choice(others) if others and rng.random() < 0.3 else MODEL
        structure = base.structure if name == MODEL and step == 0 else []
        files[name], text = mutate_bytes(files[name], rng, structure)
        descriptions.append(f"{name}: {text}" if name != MODEL else text)
    if proto is not None:
        files[MODEL] = proto.SerializeToString()
    return files, " + ".join(descriptions)
