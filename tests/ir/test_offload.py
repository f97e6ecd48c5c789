"""ir/offload.py: once the generated-C runtime holds the packed weights, the IR's large initializers
leave anonymous memory (a read-only map of a temporary file, or of the saved model's external data)
and every reader still gets the same values: run, save/load, the ONNX Runtime fallback."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import infercc
from infercc.ir import Tensor
from infercc.ir.offload import MIN_BYTES, offload

K, N = 64, 512  # a weight of 128 KiB: above MIN_BYTES


def _linear(path, w: np.ndarray, small: np.ndarray) -> None:
    """y = relu(x @ w + small) (w large, small under MIN_BYTES)."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "small"], ["s"]),
             helper.make_node("Relu", ["s"], ["y"])]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", N])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(small, "small")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((K, N)).astype(np.float32), rng.standard_normal(N).astype(np.float32), \
        rng.standard_normal((3, K)).astype(np.float32)


def _initializers(model: infercc.CompiledModel) -> dict[str, Tensor]:
    return {name: v.const for name, v in model.model.graph.initializers.items()}


def test_offload_maps_large_initializers_with_the_same_values_and_proto(tmp_path) -> None:
    big = Tensor(np.arange(N * K, dtype=np.float32).reshape(K, N), name="w")
    before = big.to_proto("w").SerializeToString()
    small = Tensor(np.ones(8, np.float32), name="s")
    model = infercc.compile(_write(tmp_path), passes=[]).model
    model.graph.initializers["w"].const = big
    model.graph.initializers["small"].const = small
    assert offload(model, str(tmp_path)) == big.nbytes
    assert isinstance(big.numpy(), np.memmap) and not big.numpy().flags.writeable
    np.testing.assert_array_equal(big.numpy(), np.arange(N * K, dtype=np.float32).reshape(K, N))
    assert big.to_proto("w").SerializeToString() == before  # save() writes the same bytes
    assert not isinstance(small.numpy(), np.memmap)  # under MIN_BYTES: left alone
    assert list(tmp_path.glob("infercc-weights-*")) == []  # the file is unlinked: it lives as long as the map
    assert offload(model, str(tmp_path)) == 0  # a second call moves nothing (drops mapped pages only)


def _write(tmp_path):
    w, small, _ = _data()
    path = tmp_path / "linear.onnx"
    _linear(path, w, small)
    return path


def test_c_backend_leaves_the_ir_weights_mapped_and_every_reader_works(tmp_path) -> None:
    w, small, x = _data()
    expected = np.maximum(x @ w + small, 0)
    compiled = infercc.compile(_write(tmp_path), backend="c")
    np.testing.assert_allclose(compiled.run({"x": x})["y"], expected, rtol=1e-5, atol=1e-5)
    assert compiled.runtime == "c", compiled.runtime_reason
    large = {n: t for n, t in _initializers(compiled).items() if t.nbytes >= MIN_BYTES}
    assert large and all(isinstance(t.loaded, np.memmap) for t in large.values())
    compiled.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.onnx.data").is_file()  # weights streamed out, mapped by load
    loaded = infercc.load(tmp_path / "saved")
    np.testing.assert_array_equal(loaded.run({"x": x})["y"], compiled.run({"x": x})["y"])
    assert loaded.runtime == "c"
    for name, tensor in _initializers(loaded).items():
        if tensor.nbytes >= MIN_BYTES:
            assert tensor.is_external and (tensor.loaded is None or isinstance(tensor.loaded, np.memmap)), name
    ort = infercc.compile(tmp_path / "saved" / "model.onnx", backend="ort", passes=[])  # the saved IR, on ORT
    np.testing.assert_allclose(ort.run({"x": x})["y"], expected, rtol=1e-5, atol=1e-5)


def test_offload_off_keeps_the_arrays(tmp_path) -> None:
    compiled = infercc.compile(_write(tmp_path), backend="c", offload_weights=False)
    assert compiled.runtime == "c"
    assert not any(isinstance(t.loaded, np.memmap) for t in _initializers(compiled).values())


@pytest.mark.slow
def test_peak_rss_of_a_loaded_c_artifact_is_the_blob_once(tmp_path) -> None:
    """In a fresh process: loading and running a saved C artifact keeps about one copy of the weights
    resident (the blob), not the blob plus the IR's arrays."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    w, small = rng.standard_normal((1024, 16384)).astype(np.float32), np.zeros(16384, np.float32)  # 64 MiB
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "small"], ["y"])]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16384])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(small, "small")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "big.onnx")
    infercc.compile(tmp_path / "big.onnx", backend="c").save(tmp_path / "saved")
    script = ("import resource, numpy as np, infercc\n"
              "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              f"m = infercc.load({str(tmp_path / 'saved')!r}); m.run({{'x': np.ones((1, 1024), np.float32)}})\n"
              "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)")
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert grown < 1.5 * w.nbytes, f"{grown / 2**20:.0f} MiB for {w.nbytes / 2**20:.0f} MiB of weights"
