"""External data: lazy import, streaming export, re-saving in place, and models over the 2 GB limit."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from infercc.ir import load_model, save_model, to_proto, verify
from infercc.ir.onnx_save import EXTERNAL_THRESHOLD

from ._util import assert_outputs_identical, assert_same_proto, dir_files, ort_run

N = 64


def _weights() -> dict[str, np.ndarray]:
    import ml_dtypes

    rng = np.random.default_rng(0)
    return {
        "W1": (rng.standard_normal((N, N)) / N).astype(np.float32),
        "Wbf": (rng.standard_normal((N, N)) / N).astype(ml_dtypes.bfloat16),
        "Wf16": (rng.standard_normal((N, N)) / N).astype(np.float16),
        "Wq": rng.integers(-8, 8, (N, N)).astype(ml_dtypes.int4),
        "b": rng.standard_normal(N).astype(np.float32),  # 256 bytes: stays inline
    }


def weight_model() -> onnx.ModelProto:
    """MatMuls over float32/bfloat16/float16/int4 weights (int4 both raw and as int32_data)."""
    w = _weights()
    inits = [numpy_helper.from_array(a, k) for k, a in w.items()]
    # The same int4 weights stored the other way (int32_data, as helper.make_tensor writes them).
    inits.append(helper.make_tensor("Wq32", TP.INT4, [N, N], w["Wq"].astype(np.int8).reshape(-1).tolist()))
    assert not inits[-1].HasField("raw_data")
    inits.append(numpy_helper.from_array(np.array(0.01, np.float32), "scale"))
    f = TP.FLOAT
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="mm1"),
        helper.make_node("Add", ["h1", "b"], ["h2"], name="add"),
        helper.make_node("Cast", ["Wbf"], ["Wbf_f"], to=f, name="cast_bf"),
        helper.make_node("MatMul", ["h2", "Wbf_f"], ["h3"], name="mm2"),
        helper.make_node("Cast", ["Wf16"], ["Wf16_f"], to=f, name="cast_f16"),
        helper.make_node("MatMul", ["h3", "Wf16_f"], ["h4"], name="mm3"),
        helper.make_node("DequantizeLinear", ["Wq", "scale"], ["Wq_f"], name="dq"),
        helper.make_node("MatMul", ["h4", "Wq_f"], ["h5"], name="mm4"),
        helper.make_node("DequantizeLinear", ["Wq32", "scale"], ["Wq32_f"], name="dq32"),
        helper.make_node("MatMul", ["h5", "Wq32_f"], ["y"], name="mm5"),
    ]
    graph = helper.make_graph(
        nodes, "weights", [helper.make_tensor_value_info("x", f, ["batch", N])],
        [helper.make_tensor_value_info("y", f, ["batch", N])], initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


FEEDS = {"x": np.random.default_rng(1).standard_normal((3, N)).astype(np.float32)}
BIG = ["W1", "Wbf", "Wf16", "Wq", "Wq32"]  # written external by infercc (>= 1 KiB)
LAZY = BIG[:4]  # onnx externalizes raw_data tensors only; Wq32 (int32_data) stays inline


def save_with_onnx(folder: Path, location: str = "model.onnx.data") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(
        weight_model(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=location, size_threshold=1024,
    )
    return path


def expected_arrays() -> dict[str, np.ndarray]:
    m = weight_model()
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def test_reference_model_runs_identically_from_onnx_external_save(tmp_path):
    path = save_with_onnx(tmp_path / "src")
    assert_outputs_identical(ort_run(weight_model(), FEEDS), ort_run(path, FEEDS))


def test_import_is_lazy(tmp_path):
    path = save_with_onnx(tmp_path / "src")
    model = load_model(path)
    verify(model)
    inits = model.graph.initializers
    for name in LAZY:
        t = inits[name].const
        assert t.is_external, name
        assert t._array is None, f"{name} was read at import"
        file, offset, length = t.external_location
        assert Path(file) == tmp_path / "src" / "model.onnx.data" and length == t.nbytes
    assert not any(inits[n].const.is_external for n in ("b", "scale", "Wq32"))
    # Exporting without data and inferring shapes read nothing either.
    to_proto(model, with_data=False)
    from infercc.ir.shapes import infer_shapes

    infer_shapes(model)
    assert all(inits[n].const._array is None for n in LAZY)
    # Proof that nothing was cached: change the bytes on disk now; .numpy() must see the change.
    data = tmp_path / "src" / "model.onnx.data"
    _, offset, length = inits["W1"].const.external_location
    with open(data, "r+b") as f:
        f.seek(offset)
        f.write(np.full(4, 7.0, np.float32).tobytes())
    w1 = inits["W1"].const.numpy()
    assert isinstance(w1, np.memmap) and not w1.flags.writeable
    np.testing.assert_array_equal(w1.reshape(-1)[:4], np.full(4, 7.0, np.float32))
    np.testing.assert_array_equal(w1.reshape(-1)[4:], expected_arrays()["W1"].reshape(-1)[4:])


def test_external_values_are_exact(tmp_path):
    model = load_model(save_with_onnx(tmp_path / "src"))
    for name, expected in expected_arrays().items():
        got = model.graph.initializers[name].const.numpy()
        assert got.dtype == expected.dtype, name
        np.testing.assert_array_equal(got.astype(np.float32), expected.astype(np.float32), err_msg=name)


def _check_saved(path: Path) -> None:
    """model.onnx + model.onnx.data, aligned offsets, exact bytes, same ORT outputs."""
    proto = onnx.load(str(path), load_external_data=False)
    expected = expected_arrays()
    data_file = path.parent / "model.onnx.data"
    ext = {}
    for t in proto.graph.initializer:
        if t.data_location == TP.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            assert info["location"] == "model.onnx.data"
            ext[t.name] = (int(info["offset"]), int(info["length"]))
        else:
            assert len(t.SerializeToString()) < EXTERNAL_THRESHOLD + 100, t.name
    assert sorted(ext) == sorted(BIG)
    raw = data_file.read_bytes()
    spans = sorted(ext.values())
    for (o1, l1), (o2, _) in zip(spans, spans[1:]):
        assert o1 + l1 <= o2, "overlapping tensors"
    for name, (offset, length) in ext.items():
        assert offset % 64 == 0
        want = numpy_helper.from_array(expected[name]).raw_data
        assert raw[offset:offset + length] == want, name
    full = onnx.load(str(path))
    for t in full.graph.initializer:
        np.testing.assert_array_equal(
            numpy_helper.to_array(t).astype(np.float32), expected[t.name].astype(np.float32), err_msg=t.name
        )
    assert_outputs_identical(ort_run(weight_model(), FEEDS), ort_run(path, FEEDS))


def test_save_to_new_folder(tmp_path):
    model = load_model(save_with_onnx(tmp_path / "src"))
    out = tmp_path / "out" / "model.onnx"
    files = save_model(model, out)  # external by default: the source was external
    assert files == [str(out), str(out.parent / "model.onnx.data")]
    assert dir_files(out.parent) == ["model.onnx", "model.onnx.data"]
    _check_saved(out)
    # And the saved files load again into an equivalent model.
    again = load_model(out)
    verify(again)
    assert [v.name for v in again.graph.initializers.values()] == [v.name for v in model.graph.initializers.values()]


def test_save_inline_model_with_external_data(tmp_path):
    """A model built in memory (no external tensors) saved with external_data=True."""
    model = load_model(weight_model())
    out = tmp_path / "out" / "model.onnx"
    save_model(model, out, external_data=True)
    _check_saved(out)


def test_save_external_model_as_single_file(tmp_path):
    model = load_model(save_with_onnx(tmp_path / "src"))
    out = tmp_path / "single" / "model.onnx"
    assert save_model(model, out, external_data=False) == [str(out)]
    assert dir_files(out.parent) == ["model.onnx"]
    proto = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location != TP.EXTERNAL for t in proto.graph.initializer)
    os.rename(tmp_path / "src", tmp_path / "gone")  # the single file must not need the old data
    assert_outputs_identical(ort_run(weight_model(), FEEDS), ort_run(out, FEEDS))


def test_resave_into_the_source_folder(tmp_path):
    src = save_with_onnx(tmp_path / "src")
    model = load_model(src)
    expected = expected_arrays()
    save_model(model, src)
    assert dir_files(src.parent) == ["model.onnx", "model.onnx.data"]
    _check_saved(src)
    # The in-memory model still reads the right numbers after its source file was replaced.
    for name in BIG:
        np.testing.assert_array_equal(
            model.graph.initializers[name].const.numpy().astype(np.float32), expected[name].astype(np.float32)
        )


def test_resave_in_place_after_an_edit_that_moves_offsets(tmp_path):
    """Drop the first external tensor: every other tensor moves in the new data file, while tensors not
    yet read still point at their old offsets. Both the saved file and the model must stay right."""
    src = save_with_onnx(tmp_path / "src")
    model = load_model(src)
    g = model.graph
    mm1 = next(n for n in g.nodes if n.name == "mm1")
    mm1.set_input(1, g.add_const(load_model(weight_model()).graph.initializers["W1"].const, "W1_inline"))
    g.remove_dead()
    assert "W1" not in g.initializers
    assert all(g.initializers[n].const._array is None for n in LAZY[1:])
    save_model(model, src)
    # Tensors not read yet were re-pointed at their new place in the new file: still lazy, still right.
    saved = {t.name: t for t in onnx.load(str(src), load_external_data=False).graph.initializer}
    for name in LAZY[1:]:
        t = g.initializers[name].const
        assert t._array is None
        offset = {e.key: e.value for e in saved[name].external_data}["offset"]
        assert t.external_location[1] == int(offset) and t.external_location[0] == str(src.parent / "model.onnx.data")
    expected = expected_arrays()
    for name in BIG[1:]:
        np.testing.assert_array_equal(
            g.initializers[name].const.numpy().astype(np.float32), expected[name].astype(np.float32), err_msg=name
        )
    assert_outputs_identical(ort_run(weight_model(), FEEDS), ort_run(src, FEEDS))
    # Saving a second time (now from memory-mapped sources) is still right.
    save_model(model, src)
    assert_outputs_identical(ort_run(weight_model(), FEEDS), ort_run(src, FEEDS))
    assert dir_files(src.parent) == ["model.onnx", "model.onnx.data"]


def test_other_data_file_name_is_rewritten(tmp_path):
    src = save_with_onnx(tmp_path / "src", location="weights.bin")
    model = load_model(src)
    save_model(model, src)
    assert dir_files(src.parent) == ["model.onnx", "model.onnx.data", "weights.bin"]
    _check_saved(src)


def test_loading_a_proto_with_base_dir(tmp_path):
    src = save_with_onnx(tmp_path / "src")
    proto = onnx.load(str(src), load_external_data=False)
    model = load_model(proto, base_dir=str(src.parent))
    np.testing.assert_array_equal(model.graph.initializers["W1"].const.numpy(), expected_arrays()["W1"])


# ----------------------------------------------------------------------------- > 2 GB
@pytest.mark.slow
def test_model_over_2gb(tmp_path):
    """~2.2 GB of float32 weights written as a sparse file: import, export with external data, check the
    proto is small, offsets are right, and run a gather of a few rows with onnxruntime."""
    rows, cols, count = 135_000, 1024, 4  # 4 x 553 MB
    nbytes = rows * cols * 4
    src = tmp_path / "src"
    src.mkdir()
    data = src / "big.bin"
    with open(data, "wb") as f:
        f.truncate(nbytes * count)  # sparse: zeros that take no disk space
    marks = {}  # (tensor, row) -> value, written at a few places to check offsets end to end
    with open(data, "r+b") as f:
        for k in range(count):
            for row in (0, 1, rows // 2, rows - 1):
                value = np.full(cols, 1000 * k + row % 997 + 0.5, np.float32)
                f.seek(k * nbytes + row * cols * 4)
                f.write(value.tobytes())
                marks[(k, row)] = value
    inits = []
    for k in range(count):
        t = onnx.TensorProto(name=f"E{k}", data_type=TP.FLOAT, dims=[rows, cols], data_location=TP.EXTERNAL)
        for key, val in (("location", "big.bin"), ("offset", str(k * nbytes)), ("length", str(nbytes))):
            t.external_data.add(key=key, value=val)
        inits.append(t)
    nodes = [helper.make_node("Gather", [f"E{k}", "idx"], [f"g{k}"], axis=0) for k in range(count)]
    nodes.append(helper.make_node("Concat", [f"g{k}" for k in range(count)], ["y"], axis=0))
    graph = helper.make_graph(
        nodes, "big", [helper.make_tensor_value_info("idx", TP.INT64, [4])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [4 * count, cols])], initializer=inits,
    )
    (src / "model.onnx").write_bytes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10).SerializeToString()
    )
    model = load_model(src / "model.onnx")
    verify(model)
    assert all(v.const.is_external and v.const._array is None for v in model.graph.initializers.values())
    from infercc.ir.onnx_save import PROTO_LIMIT, weight_bytes

    assert weight_bytes(model) > PROTO_LIMIT
    out = tmp_path / "out" / "model.onnx"
    save_model(model, out)
    assert out.stat().st_size < 100_000
    saved = onnx.load(str(out), load_external_data=False)
    data_out = out.parent / "model.onnx.data"
    assert data_out.stat().st_size >= nbytes * count
    with open(data_out, "rb") as f:
        for t in saved.graph.initializer:
            k = int(t.name[1:])
            info = {e.key: e.value for e in t.external_data}
            assert info["location"] == "model.onnx.data" and int(info["length"]) == nbytes
            for row in (0, 1, rows // 2, rows - 1):
                f.seek(int(info["offset"]) + row * cols * 4)
                np.testing.assert_array_equal(np.frombuffer(f.read(cols * 4), np.float32), marks[(k, row)])
            f.seek(int(info["offset"]) + 2 * cols * 4)
            assert not np.frombuffer(f.read(cols * 4), np.float32).any()
    idx = np.array([0, rows - 1, 2, rows // 2], np.int64)
    (y,) = ort_run(out, {"idx": idx})
    for k in range(count):
        for j, row in enumerate(idx):
            want = marks.get((k, int(row)), np.zeros(cols, np.float32))
            np.testing.assert_array_equal(y[4 * k + j], want)


# ----------------------------------------------------------------------------- GPT-2 small
@pytest.mark.slow
def test_gpt2_small_external_roundtrip(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    config.use_cache = False
    hf = transformers.GPT2LMHeadModel(config).eval()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    src = tmp_path / "export" / "gpt2.onnx"
    src.parent.mkdir()
    # Batch 2 with padding: at batch 1 transformers' packed-sequence detection traces aten::diff,
    # which the TorchScript exporter cannot convert.
    trace_mask = torch.ones(2, 8, dtype=torch.int64)
    trace_mask[1, :3] = 0
    args = (torch.randint(0, config.vocab_size, (2, 8)), trace_mask)
    axes = {0: "batch", 1: "seq"}
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Logits(hf), args, str(src), input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": axes}, dynamo=False,
        )
    proto = onnx.load(str(src), load_external_data=False)
    if not any(t.data_location == TP.EXTERNAL for t in proto.graph.initializer):
        # The exporter inlined the weights (< 2 GB): move them out the way users ship large models.
        full = onnx.load(str(src))
        onnx.save_model(full, str(src), save_as_external_data=True, location="gpt2.onnx.data")
        del full
    model = load_model(src)
    verify(model)
    assert sum(v.const.is_external for v in model.graph.initializers.values()) > 40
    # Lossless, external references included, and nothing read.
    assert_same_proto(onnx.load(str(src), load_external_data=False), to_proto(model))
    assert all(v.const._array is None for v in model.graph.initializers.values() if v.const.is_external)
    out = tmp_path / "out" / "model.onnx"
    save_model(model, out)
    assert dir_files(out.parent) == ["model.onnx", "model.onnx.data"]
    rng = np.random.default_rng(0)
    mask = np.ones((2, 16), np.int64)
    mask[1, :5] = 0
    feeds = {"input_ids": rng.integers(0, config.vocab_size, (2, 16)).astype(np.int64), "attention_mask": mask}
    assert_outputs_identical(ort_run(src, feeds), ort_run(out, feeds))


def test_subgraph_initializers_go_external(tmp_path):
    """Initializers inside a Loop body are written to the data file like top-level ones."""
    big = np.linspace(-1, 1, 2048, dtype=np.float32).reshape(2, 1024)
    body = helper.make_graph(
        [
            helper.make_node("Add", ["acc_in", "inner_w"], ["acc_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [helper.make_tensor_value_info("i", TP.INT64, []), helper.make_tensor_value_info("cond_in", TP.BOOL, []),
         helper.make_tensor_value_info("acc_in", TP.FLOAT, [2, 1024])],
        [helper.make_tensor_value_info("cond_out", TP.BOOL, []), helper.make_tensor_value_info("acc_out", TP.FLOAT, [2, 1024])],
        initializer=[numpy_helper.from_array(big, "inner_w")],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)], "loop",
        [helper.make_tensor_value_info("n", TP.INT64, []), helper.make_tensor_value_info("x", TP.FLOAT, [2, 1024])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [2, 1024])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    model = load_model(proto)
    out = tmp_path / "out" / "model.onnx"
    save_model(model, out, external_data=True)
    saved = onnx.load(str(out), load_external_data=False)
    inner = saved.graph.node[0].attribute[0].g.initializer[0]
    assert inner.data_location == TP.EXTERNAL
    feeds = {"n": np.array(3, np.int64), "x": np.zeros((2, 1024), np.float32)}
    assert_outputs_identical(ort_run(proto, feeds), ort_run(out, feeds))
    again = load_model(out)
    body_g = again.graph.nodes[0].attr("body")
    np.testing.assert_array_equal(body_g.initializers["inner_w"].const.numpy(), big)
