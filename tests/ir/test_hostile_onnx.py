"""Hostile and broken ONNX files: external data reached through symbolic links, bad offsets and
lengths, names that are not UTF-8, cycles, unknown data types, short data. Each ends in one
ModelLoadError naming the element and the fix, and no byte from outside the model's folder ever
reaches a compiled model or a saved one."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import infercc
from infercc.errors import ModelLoadError
from infercc.ir import load_model

from .models import control_flow_model
from .test_errors import load_error

W = np.arange(1024, dtype=np.float32).reshape(32, 32)
SECRET = np.full(1024, 7.5, np.float32).tobytes()  # what the "outside" file holds: must never leak


def _external_model(folder: Path, location: str = "model.onnx.data", *, write_data: bool = True) -> Path:
    """model.onnx in ``folder`` whose initializer W (32x32 float, 4096 bytes) lives at ``location``."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "ext",
        [helper.make_tensor_value_info("x", TP.FLOAT, [1, 32])], [helper.make_tensor_value_info("y", TP.FLOAT, [1, 32])],
        initializer=[numpy_helper.from_array(W, "W")],
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(path),
        save_as_external_data=True, location="model.onnx.data", size_threshold=0,
    )
    if location != "model.onnx.data":
        _set_external(path, location=location)
        data = folder / "model.onnx.data"
        if write_data:
            target = folder / location
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(data, target)
        else:
            data.unlink()
    return path


def _set_external(path: Path, **entries: str | None) -> None:
    """Rewrite W's external_data entries (None removes one)."""
    proto = onnx.load(str(path), load_external_data=False)
    ext = proto.graph.initializer[0].external_data
    info = {e.key: e.value for e in ext}
    info.update(entries)
    del ext[:]
    for k, v in info.items():
        if v is not None:
            ext.add(key=k, value=v)
    path.write_bytes(proto.SerializeToString())


def _outside(tmp_path: Path) -> Path:
    """A folder beside the model's, holding secret.bin (same size as W's data)."""
    out = tmp_path / "outside"
    out.mkdir(exist_ok=True)
    (out / "secret.bin").write_bytes(SECRET)
    return out


def _tree_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


# ----------------------------------------------------------------------------- symbolic links
def test_data_file_that_is_a_link_to_outside_is_refused(tmp_path):
    outside = _outside(tmp_path)
    path = _external_model(tmp_path / "m", "w.bin", write_data=False)
    os.symlink(outside / "secret.bin", tmp_path / "m" / "w.bin")
    msg = load_error(path)
    assert "'W'" in msg and "'w.bin'" in msg and "symbolic link" in msg
    assert str(outside / "secret.bin") in msg and "outside the model's folder" in msg and "copy the data file" in msg
    assert str(path) in msg  # the message names the model file too
    with pytest.raises(ModelLoadError, match="symbolic link"):
        infercc.compile(path, provider="cpu")


def test_data_reached_through_a_linked_folder_is_refused(tmp_path):
    outside = _outside(tmp_path)
    path = _external_model(tmp_path / "m", "weights/secret.bin", write_data=False)
    os.symlink(outside, tmp_path / "m" / "weights")
    msg = load_error(path)
    assert "'weights/secret.bin'" in msg and "'weights' is a symbolic link" in msg and str(outside) in msg
    with pytest.raises(ModelLoadError, match="symbolic link"):
        infercc.compile(path, provider="cpu")


def test_link_inside_the_folder_is_fine(tmp_path):
    """A link that stays in the model's folder is what onnxruntime accepts too: not refused."""
    path = _external_model(tmp_path / "m", "real/w.bin")
    os.symlink("real/w.bin", tmp_path / "m" / "w.bin")
    _set_external(path, location="w.bin")
    np.testing.assert_array_equal(load_model(path).graph.initializers["W"].const.numpy(), W)


def test_model_folder_itself_reached_through_a_link_is_fine(tmp_path):
    _external_model(tmp_path / "real")
    os.symlink(tmp_path / "real", tmp_path / "alias")
    np.testing.assert_array_equal(load_model(tmp_path / "alias" / "model.onnx").graph.initializers["W"].const.numpy(), W)


def test_link_swapped_in_after_import_never_reaches_compiled_or_saved_model(tmp_path):
    """The check is repeated wherever the data is opened: a data file replaced by a link between
    compile() and save()/run()/to_onnx() is refused there, and the outside bytes are never copied."""
    outside = _outside(tmp_path)
    path = _external_model(tmp_path / "m")
    compiled = infercc.compile(path, provider="cpu", optimize=False)
    data = tmp_path / "m" / "model.onnx.data"
    data.unlink()
    os.symlink(outside / "secret.bin", data)
    out = tmp_path / "saved"
    with pytest.raises(ModelLoadError, match="symbolic link") as info:
        compiled.save(out)
    assert "'W'" in str(info.value)
    assert SECRET not in (_tree_bytes(out) if out.exists() else b"")
    with pytest.raises(ModelLoadError, match="symbolic link"):
        compiled.to_onnx()
    with pytest.raises(ModelLoadError, match="symbolic link"):
        compiled.run({"x": np.ones((1, 32), np.float32)})


def test_save_of_a_clean_external_model_still_copies_the_data(tmp_path):
    """The control for the test above: the same save without a link writes W's bytes."""
    path = _external_model(tmp_path / "m")
    compiled = infercc.compile(path, provider="cpu", optimize=False)
    out = compiled.save(tmp_path / "saved")
    assert W.tobytes() in _tree_bytes(out)
    np.testing.assert_array_equal(infercc.load(out).model.graph.initializers["W"].const.numpy(), W)


# ----------------------------------------------------------------------------- location, offset, length
def test_location_with_a_nul_byte(tmp_path):
    path = _external_model(tmp_path / "m")
    _set_external(path, location="model.onnx.data\0/../../etc/passwd")
    msg = load_error(path)
    assert "'W'" in msg and "NUL" in msg and "re-export" in msg


def test_location_missing(tmp_path):
    path = _external_model(tmp_path / "m")
    _set_external(path, location=None)
    msg = load_error(path)
    assert "'W'" in msg and "no 'location'" in msg


def test_location_is_a_folder(tmp_path):
    path = _external_model(tmp_path / "m")
    (tmp_path / "m" / "sub").mkdir()
    _set_external(path, location="sub")
    msg = load_error(path)
    assert "'sub'" in msg and "not a regular file" in msg


@pytest.mark.parametrize(("key", "value"), [
    ("offset", "-64"), ("offset", "abc"), ("offset", "1e3"), ("offset", ""), ("length", "-4096"), ("length", "4k"),
    ("offset", "0x10"),
])
def test_offset_or_length_not_a_whole_number(tmp_path, key, value):
    path = _external_model(tmp_path / "m")
    _set_external(path, **{key: value})
    msg = load_error(path)
    assert "'W'" in msg and f"{key} {value!r}" in msg and "non-negative whole number" in msg


def test_offset_past_the_end_of_the_file(tmp_path):
    path = _external_model(tmp_path / "m")
    _set_external(path, offset=str(10**12))
    msg = load_error(path)
    assert "truncated" in msg and "4096 bytes" in msg and str(10**12 + 4096) in msg


def test_length_that_disagrees_with_the_dims(tmp_path):
    """onnxruntime refuses a length other than the dims' size; so do we, before reading anything."""
    path = _external_model(tmp_path / "m")
    (tmp_path / "m" / "model.onnx.data").write_bytes(W.tobytes() + b"\0" * 4096)
    _set_external(path, length="8192")
    msg = load_error(path)
    assert "'W'" in msg and "4096 bytes" in msg and "8192" in msg


def test_huge_dims_with_external_data(tmp_path):
    """dims that would need petabytes are refused from the file size, not by trying to map them."""
    path = _external_model(tmp_path / "m")
    proto = onnx.load(str(path), load_external_data=False)
    proto.graph.initializer[0].dims[:] = [2**25, 2**25]
    path.write_bytes(proto.SerializeToString())
    _set_external(path, length=None)
    assert "truncated" in load_error(path)


def test_sparse_initializer_with_external_data_is_refused():
    sparse = helper.make_sparse_tensor(
        helper.make_tensor("sp_values", TP.FLOAT, [2], [1.0, 2.0]), helper.make_tensor("sp_idx", TP.INT64, [2], [0, 3]), [4],
    )
    sparse.values.data_location = TP.EXTERNAL
    sparse.values.external_data.add(key="location", value="values.bin")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["sp_values"], ["y"])], "g", [], [helper.make_tensor_value_info("y", TP.FLOAT, [4])],
        sparse_initializer=[sparse],
    )
    msg = load_error(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    assert "'sp_values'" in msg and "external" in msg and "inline" in msg


# ----------------------------------------------------------------------------- names that are not UTF-8
def _named_model() -> onnx.ModelProto:
    """Every kind of name spelled with a unique token, so the serialized bytes can be corrupted."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["xinput", "winit"], ["yvalue"], name="nodename", domain="", attrname=1)],
        "graphname", [helper.make_tensor_value_info("xinput", TP.FLOAT, [2])],
        [helper.make_tensor_value_info("yvalue", TP.FLOAT, [2])], initializer=[numpy_helper.from_array(np.ones(2, np.float32), "winit")],
        doc_string="docstring",
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _corrupt(proto: onnx.ModelProto, token: bytes) -> bytes:
    data = proto.SerializeToString()
    assert token in data
    return data.replace(token, b"\xff" * (len(token) - 1) + b"\xfe")


@pytest.mark.parametrize(("token", "where"), [
    # A value name is reported where it is first met: the node that reads or writes it.
    (b"nodename", "node[0].name"), (b"xinput", "node[0].input[0]"), (b"winit", "node[0].input[1]"),
    (b"yvalue", "node[0].output[0]"),
    (b"Add", "node[0].op_type"), (b"attrname", "attribute[0].name"), (b"graphname", "graph.name"),
    (b"docstring", "doc_string"),
])
def test_names_that_are_not_utf8(tmp_path, token, where):
    path = tmp_path / "bad.onnx"
    path.write_bytes(_corrupt(_named_model(), token))
    msg = load_error(path)
    assert str(path) in msg and "not valid UTF-8" in msg and where in msg and "re-export" in msg
    with pytest.raises(ModelLoadError, match="UTF-8"):
        infercc.compile(path, provider="cpu")


def test_domain_that_is_not_utf8(tmp_path):
    proto = _named_model()
    proto.graph.node[0].domain = "com.domainx"
    proto.opset_import.append(helper.make_opsetid("com.domainx", 1))
    path = tmp_path / "bad.onnx"
    path.write_bytes(_corrupt(proto, b"domainx"))
    msg = load_error(path)
    assert "not valid UTF-8" in msg and "domain" in msg


def test_non_utf8_string_attribute_value_is_carried_but_refused_at_compile():
    """Attribute values are bytes in ONNX (carried verbatim, see test_roundtrip); onnxruntime chokes
    on them, so compile() refuses them by node."""
    graph = helper.make_graph(
        [helper.make_node("Gelu", ["x"], ["y"], name="gelu", approximate=b"\xff\xfe")], "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, [2])], [helper.make_tensor_value_info("y", TP.FLOAT, [2])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    assert load_model(proto).graph.nodes[0].attr("approximate") == b"\xff\xfe"
    with pytest.raises(ModelLoadError) as info:
        infercc.compile(proto, provider="cpu")
    assert "'gelu' (Gelu)" in str(info.value) and "'approximate'" in str(info.value) and "UTF-8" in str(info.value)


# ----------------------------------------------------------------------------- cycles
def _chain(*nodes: onnx.NodeProto) -> onnx.ModelProto:
    graph = helper.make_graph(
        list(nodes), "g", [helper.make_tensor_value_info("x", TP.FLOAT, [2])], [helper.make_tensor_value_info("y", TP.FLOAT, [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_self_loop():
    msg = load_error(_chain(helper.make_node("Add", ["x", "y"], ["y"], name="loop")))
    assert "'loop' (Add) reads its own output" in msg and "cycle" in msg and "re-export" in msg
    with pytest.raises(ModelLoadError, match="reads its own output"):
        infercc.compile(_chain(helper.make_node("Add", ["x", "y"], ["y"], name="loop")), provider="cpu")


def test_cycle_through_three_nodes():
    proto = _chain(
        helper.make_node("Add", ["x", "c"], ["a"], name="n1"), helper.make_node("Relu", ["a"], ["b"], name="n2"),
        helper.make_node("Neg", ["b"], ["c"], name="n3"), helper.make_node("Identity", ["a"], ["y"], name="out"),
    )
    msg = load_error(proto)
    assert "cycle" in msg and "'n1' (Add)" in msg and "'n2' (Relu)" in msg and "'n3' (Neg)" in msg
    assert "'out'" not in msg  # downstream of the cycle, not part of it


def test_cycle_inside_a_subgraph():
    proto, _ = control_flow_model()
    loop = next(n for n in proto.graph.node if n.op_type == "Loop")
    body = loop.attribute[0].g
    add = next(n for n in body.node if n.name == "loop_add")
    add.input[1] = "acc_sum"  # reads its own output
    msg = load_error(proto)
    assert "'loop_body'" in msg and "'loop_add' (Add) reads its own output" in msg


def test_unsorted_but_acyclic_graph_loads_and_compiles():
    """ONNX asks for topological order but onnxruntime runs unsorted files: so do we."""
    proto = _chain(helper.make_node("Neg", ["a"], ["y"], name="second"), helper.make_node("Relu", ["x"], ["a"], name="first"))
    model = load_model(proto)
    assert [n.name for n in model.graph.nodes] == ["second", "first"]  # import keeps the file's order
    compiled = infercc.compile(proto, provider="cpu")
    x = np.array([-1.0, 2.0], np.float32)
    np.testing.assert_array_equal(compiled.run({"x": x})["y"], -np.maximum(x, 0))


# ----------------------------------------------------------------------------- data types and data
def _init_model(tensor: onnx.TensorProto) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", tensor.name], ["y"], name="add")], "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, [2])], [helper.make_tensor_value_info("y", TP.FLOAT, [2])],
        initializer=[tensor],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize(("code", "expect"), [
    (999, "not an ONNX data type"), (0, "no data type"), (-3, "not an ONNX data type"), (24, "does not support yet"),
])
def test_initializer_data_type(tmp_path, code, expect):
    w = numpy_helper.from_array(np.ones(2, np.float32), "w")
    w.data_type = code
    path = tmp_path / "m.onnx"
    path.write_bytes(_init_model(w).SerializeToString())
    msg = load_error(path)
    assert "'w'" in msg and expect in msg and str(path) in msg
    with pytest.raises(ModelLoadError, match=expect):
        infercc.compile(path, provider="cpu")


def test_value_info_data_type():
    proto = _chain(helper.make_node("Relu", ["x"], ["y"], name="r"))
    proto.graph.input[0].type.tensor_type.elem_type = 999
    msg = load_error(proto)
    assert "value 'x'" in msg and "999" in msg


@pytest.mark.parametrize("size", [4, 12, 0])
def test_raw_data_length_differs_from_dims(size):
    w = numpy_helper.from_array(np.ones(2, np.float32), "w")
    w.raw_data = b"\0" * size
    msg = load_error(_init_model(w))
    assert "'w'" in msg and "dims [2]" in msg and "8 bytes" in msg and f"holds {size}" in msg
    with pytest.raises(ModelLoadError, match="holds"):
        infercc.compile(_init_model(w), provider="cpu")


def test_typed_data_shorter_than_dims():
    w = helper.make_tensor("w", TP.FLOAT, [2], [1.0, 2.0])
    del w.float_data[1:]
    msg = load_error(_init_model(w))
    assert "'w'" in msg and "2 entries in float_data" in msg and "holds 1" in msg


def test_negative_dims():
    w = numpy_helper.from_array(np.ones(2, np.float32), "w")
    w.dims[:] = [-2]
    assert "negative dims [-2]" in load_error(_init_model(w))


def test_short_data_in_a_constant_attribute():
    value = numpy_helper.from_array(np.ones(4, np.float32), "cval")
    value.raw_data = value.raw_data[:6]
    proto = _chain(helper.make_node("Constant", [], ["c"], value=value), helper.make_node("Add", ["x", "c"], ["y"]))
    msg = load_error(proto)
    assert "'cval'" in msg and "16 bytes" in msg and "holds 6" in msg


def test_packed_and_complex_typed_data_counts_are_accepted():
    """4-bit values are packed two per int32_data entry and complex ones take two floats: not short."""
    int4 = helper.make_tensor("q", TP.INT4, [5], [1, -2, 3, -4, 5])
    cplx = helper.make_tensor("c", TP.COMPLEX64, [2], [1 + 2j, 3 - 1j])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["q"], ["y"]), helper.make_node("Identity", ["c"], ["z"])], "g", [],
        [helper.make_tensor_value_info("y", TP.INT4, [5]), helper.make_tensor_value_info("z", TP.COMPLEX64, [2])],
        initializer=[int4, cplx],
    )
    model = load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))
    assert model.graph.initializers["q"].const.numpy().astype(np.int8).tolist() == [1, -2, 3, -4, 5]


# ----------------------------------------------------------------------------- garbage bytes
@pytest.mark.parametrize("seed", range(4))
def test_mutated_bytes_never_escape_as_raw_exceptions(tmp_path, seed):
    """Random byte edits of a valid model (control flow, subgraphs): each load either succeeds or
    raises ModelLoadError (load_error checks the type and that the message is one line)."""
    proto, _ = control_flow_model()
    data = proto.SerializeToString()
    rng = np.random.default_rng(seed)
    path = tmp_path / "m.onnx"
    loaded = refused = 0
    for _ in range(60):
        d = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(len(d)))
            kind = int(rng.integers(3))
            if kind == 0:
                d[pos] = int(rng.integers(256))
            elif kind == 1:
                del d[pos:pos + int(rng.integers(1, 8))]
            else:
                d[pos:pos] = rng.bytes(int(rng.integers(1, 4)))
        path.write_bytes(bytes(d))
        try:
            load_model(path)
            loaded += 1
        except ModelLoadError:
            load_error(path)
            refused += 1
    assert refused > 0


@pytest.mark.parametrize("dim", [2**31 - 1, 2**62, -3])
def test_an_input_axis_beyond_any_real_model_is_refused(dim):
    """A fixed input axis of 2^31 (a fuzzer's mutation) hung onnx's shape inference, which
    materializes the shape computations over it; such a dim is refused, naming the input."""
    proto = _chain(helper.make_node("Relu", ["x"], ["y"], name="r"))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = dim
    msg = load_error(proto)
    assert "input 'x'" in msg and str(dim) in msg and "dim_param" in msg


def test_a_long_fixed_input_compiles_without_data_propagation():
    """Between 2^20 and MAX_INPUT_DIM the file loads, and shape inference leaves onnx's data
    propagation off (a Range over the length would be materialized): it compiles in seconds."""
    from infercc.ir.shapes import infer_shapes

    proto = _chain(helper.make_node("Relu", ["x"], ["y"], name="r"))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1 << 25
    notes = infer_shapes(load_model(proto))
    assert any("data propagation is off" in n for n in notes)


def test_a_feed_onnxruntime_cannot_convert_is_a_run_error():
    """onnxruntime's binding raises a bare RuntimeError for a numpy type it has no tensor type
    for (a fuzzer's float8 attention mask): it comes out as RunError."""
    from infercc.errors import RunError

    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TP.FLOAT, name="c")], "f8",
                              [helper.make_tensor_value_info("x", TP.FLOAT8E4M3FN, [2])],
                              [helper.make_tensor_value_info("y", TP.FLOAT, [2])])
    compiled = infercc.compile(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), provider="cpu")
    with pytest.raises(RunError, match="onnxruntime"):
        compiled.run({"x": np.zeros(2, compiled.model.graph.inputs[0].dtype.numpy)})
