"""Malformed input: each way a model can be bad gives one clear ModelLoadError naming problem and fix."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from infercc.errors import InferccError, ModelLoadError
from infercc.ir import load_model

from .models import control_flow_model


def _model_bytes() -> bytes:
    proto, _ = control_flow_model()
    return proto.SerializeToString()


def load_error(source, **kw) -> str:
    """Load ``source`` and return the ModelLoadError message (fails if anything else happens)."""
    with pytest.raises(ModelLoadError) as info:
        load_model(source, **kw)
    exc = info.value
    assert isinstance(exc, InferccError)
    msg = str(exc)
    assert "\n" not in msg, f"message must be one line: {msg!r}"
    assert exc.__cause__ is None or isinstance(exc.__cause__, Exception)
    return msg


def _external_model(folder: Path) -> Path:
    w = numpy_helper.from_array(np.arange(1024, dtype=np.float32).reshape(32, 32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "ext",
        [helper.make_tensor_value_info("x", TP.FLOAT, [1, 32])], [helper.make_tensor_value_info("y", TP.FLOAT, [1, 32])],
        initializer=[w],
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path),
        save_as_external_data=True, location="model.onnx.data", size_threshold=0,
    )
    return path


def test_truncated_file(tmp_path):
    data = _model_bytes()
    for cut in (len(data) // 2, len(data) - 3, 7):
        path = tmp_path / f"cut{cut}.onnx"
        path.write_bytes(data[:cut])
        msg = load_error(path)
        assert str(path) in msg and "truncated" in msg and ("re-export" in msg or "re-download" in msg)


def test_a_folder_names_the_model_files_it_holds(tmp_path):
    """A folder that is not a Hugging Face checkpoint: the message names the .onnx and .gguf files
    in it, so the fix (pass one of them) is one copy away."""
    (tmp_path / "model.Q4_1.gguf").write_bytes(b"GGUF")
    (tmp_path / "notes.txt").write_text("x")
    msg = load_error(tmp_path)
    assert "is a folder" in msg and "model.Q4_1.gguf" in msg and "notes.txt" not in msg


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    msg = load_error(path)
    assert "empty" in msg and "0 bytes" in msg and "again" in msg


@pytest.mark.filterwarnings("ignore:The onnxtxt format is experimental")
@pytest.mark.parametrize("suffix", [".onnx", ".txt", ".json", ".textproto", ".onnxtxt", ""])
def test_text_file(tmp_path, suffix):
    path = tmp_path / f"notes{suffix}"
    path.write_text("This is a README, not a model.\nIt has two lines.\n")
    msg = load_error(path)
    assert "not ONNX" in msg or "not an ONNX" in msg
    assert "check the file" in msg or "re-export" in msg


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes(tmp_path, seed):
    rng = np.random.default_rng(seed)
    path = tmp_path / "random.onnx"
    path.write_bytes(rng.bytes(int(rng.integers(1, 4096))))
    msg = load_error(path)
    assert "not ONNX" in msg or "not an ONNX" in msg


def test_other_protobuf_message(tmp_path):
    """A valid protobuf of another kind (a bare TensorProto) is not a model."""
    path = tmp_path / "tensor.onnx"
    path.write_bytes(numpy_helper.from_array(np.zeros(3, np.float32), "t").SerializeToString())
    msg = load_error(path)
    assert "not ONNX" in msg or "not an ONNX" in msg or "no ONNX graph" in msg


def test_missing_external_data(tmp_path):
    path = _external_model(tmp_path / "m")
    os.remove(tmp_path / "m" / "model.onnx.data")
    msg = load_error(path)
    assert "model.onnx.data" in msg and "missing" in msg and "'W'" in msg
    assert "next to the .onnx file" in msg


def test_truncated_external_data(tmp_path):
    path = _external_model(tmp_path / "m")
    data = tmp_path / "m" / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    msg = load_error(path)
    assert "truncated" in msg and "1000 bytes" in msg and "4096" in msg and "copy it again" in msg


def test_truncated_external_data_without_length(tmp_path):
    path = _external_model(tmp_path / "m")
    proto = onnx.load(str(path), load_external_data=False)
    entries = proto.graph.initializer[0].external_data
    keep = [(e.key, e.value) for e in entries if e.key != "length"]
    del entries[:]
    for k, v in keep:
        entries.add(key=k, value=v)
    path.write_bytes(proto.SerializeToString())
    data = tmp_path / "m" / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    assert "truncated" in load_error(path)


def test_external_data_proto_without_base_dir(tmp_path, monkeypatch):
    path = _external_model(tmp_path / "m")
    proto = onnx.load(str(path), load_external_data=False)
    monkeypatch.chdir(tmp_path)  # relative locations resolve against the working directory
    msg = load_error(proto)
    assert "missing" in msg
    load_model(proto, base_dir=str(tmp_path / "m"))  # and load with the right base_dir


def test_unknown_opset_version(tmp_path):
    proto, _ = control_flow_model()
    proto.opset_import[0].version = 999
    path = tmp_path / "future.onnx"
    path.write_bytes(proto.SerializeToString())
    msg = load_error(path)
    assert "v999" in msg and "upgrade" in msg and f"{onnx.defs.onnx_opset_version()}" in msg


def test_unknown_opset_version_spelled_ai_onnx():
    proto, _ = control_flow_model()
    del proto.opset_import[:]
    proto.opset_import.add(domain="ai.onnx", version=999)
    assert "v999" in load_error(proto)


def test_node_domain_without_opset_import():
    proto, _ = control_flow_model()
    proto.graph.node[0].domain = "com.example"
    msg = load_error(proto)
    assert "'com.example'" in msg and "opset" in msg and "re-export" in msg


def test_nested_node_domain_without_opset_import():
    proto, _ = control_flow_model()
    loop = next(n for n in proto.graph.node if n.op_type == "Loop")
    loop.attribute[0].g.node[0].domain = "com.nested"
    assert "'com.nested'" in load_error(proto)


def test_missing_default_opset_import():
    proto, _ = control_flow_model()
    del proto.opset_import[:]
    msg = load_error(proto)
    assert "default domain" in msg


def test_node_input_nobody_produces():
    proto, _ = control_flow_model()
    proto.graph.node[0].input[1] = "ghost"
    msg = load_error(proto)
    assert "'ghost'" in msg and "produced by no node" in msg and "re-export" in msg


def test_subgraph_input_nobody_produces():
    proto, _ = control_flow_model()
    loop = next(n for n in proto.graph.node if n.op_type == "Loop")
    loop.attribute[0].g.node[0].input[1] = "phantom"
    msg = load_error(proto)
    assert "'phantom'" in msg and "loop_body" in msg


def test_graph_output_nobody_produces():
    proto, _ = control_flow_model()
    proto.graph.output[0].name = "nothing_makes_this"
    assert "'nothing_makes_this'" in load_error(proto)


def test_path_that_does_not_exist(tmp_path):
    msg = load_error(tmp_path / "nope" / "model.onnx")
    assert "no such file" in msg and "Check the path" in msg


def test_folder(tmp_path):
    _external_model(tmp_path / "m")
    msg = load_error(tmp_path / "m")
    assert "folder" in msg and "model file inside" in msg and "model.onnx" in msg


def test_good_file_loads(tmp_path):
    path = tmp_path / "ok.onnx"
    path.write_bytes(_model_bytes())
    load_model(path)
    load_model(str(path))


def test_value_defined_twice():
    proto, _ = control_flow_model()
    proto.graph.node[1].output[0] = "outer"  # the If now writes the name outer_add already wrote
    msg = load_error(proto)
    assert "'outer'" in msg and "defined twice" in msg and "re-export" in msg


def test_node_output_reusing_an_input_name():
    proto, _ = control_flow_model()
    proto.graph.node[0].output[0] = "x"
    proto.graph.node[1].attribute[0].g.node[0].input[0] = "x"
    proto.graph.node[2].attribute[0].g.node[0].input[1] = "x"
    assert "'x'" in load_error(proto)


@pytest.mark.parametrize("location", ["../outside.bin", "/tmp/absolute.bin", "sub/../../up.bin"])
def test_external_data_outside_the_model_folder(tmp_path, location):
    path = _external_model(tmp_path / "m")
    proto = onnx.load(str(path), load_external_data=False)
    for e in proto.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = location
    path.write_bytes(proto.SerializeToString())
    msg = load_error(path)
    assert "outside the model's folder" in msg and "relative" in msg


def test_external_data_in_a_subfolder_is_fine(tmp_path):
    path = _external_model(tmp_path / "m")
    (tmp_path / "m" / "weights").mkdir()
    os.rename(tmp_path / "m" / "model.onnx.data", tmp_path / "m" / "weights" / "w.bin")
    proto = onnx.load(str(path), load_external_data=False)
    for e in proto.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = "weights/w.bin"
    path.write_bytes(proto.SerializeToString())
    model = load_model(path)
    np.testing.assert_array_equal(
        model.graph.initializers["W"].const.numpy(), np.arange(1024, dtype=np.float32).reshape(32, 32)
    )
