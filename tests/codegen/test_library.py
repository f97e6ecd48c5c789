"""The loaded library's argument handling: an input array fed again (the serving engine's KV
pools, every step) is not described again, yet its new contents, a new array, a new shape or a
converted input are always what the kernels read, and the library never keeps an input alive."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import onnx
from onnx import TensorProto, helper

import infercc


def _add_model(path) -> infercc.CompiledModel:
    """y = a + b, both [n, m] float32."""
    node = helper.make_node("Add", ["a", "b"], ["y"])
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", "m"])  # noqa: E731
    graph = helper.make_graph([node], "g", [value("a"), value("b")], [value("y")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    compiled = infercc.compile(path, backend="c")
    assert compiled.runtime == "c", compiled.runtime_reason
    return compiled


def test_an_input_fed_again_is_read_afresh_and_never_kept_alive(tmp_path) -> None:
    compiled = _add_model(tmp_path / "add.onnx")
    library = compiled.backend.library
    a = np.ones((2, 4), np.float32)
    b = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(library.run([a, b])[0], a + b)
    a[1] = 10.0  # the same array, new contents: read again
    np.testing.assert_array_equal(library.run([a, b])[0], a + b)
    a.shape = (4, 2)  # the same array, another shape: described again
    np.testing.assert_array_equal(library.run([a, b.reshape(4, 2)])[0], a + b.reshape(4, 2))
    c = np.full((3, 4), 2.0, np.float32)  # a new array, a new shape
    d = np.ones((3, 4), np.float32)
    np.testing.assert_array_equal(library.run([c, d])[0], c + d)
    ints = np.arange(12).reshape(3, 4)  # int64: converted for this run only, then again
    np.testing.assert_array_equal(library.run([ints, d])[0], ints + d)
    ints[0, 0] = 100
    np.testing.assert_array_equal(library.run([ints, d])[0], ints + d)
    view = c[:, ::-1]  # not contiguous: copied, not mistaken for c
    np.testing.assert_array_equal(library.run([view, d])[0], view + d)
    gone = weakref.ref(d)
    del d
    gc.collect()
    assert gone() is None  # the library holds only weak references to what it took
    e = np.full((3, 4), 5.0, np.float32)  # whatever lands at d's old address is described afresh
    np.testing.assert_array_equal(library.run([c, e])[0], c + e)


def test_argmax_in_c_is_numpys(tmp_path) -> None:
    """``argmax`` outputs: the first maximum of each row (ties across SIMD lanes and in the tail
    after them), a NaN winning as numpy's does, -inf rows, signed zeros; and the same ids through
    the numpy fallback of a library without the entry."""
    compiled = _add_model(tmp_path / "add.onnx")
    library = compiled.backend.library
    a = np.random.default_rng(0).standard_normal((8, 37)).astype(np.float32)
    a[1, 20] = a[1, 3] = 9.0  # a tie in two lanes: the lower index
    a[2, 4], a[2, 1] = np.nan, 50.0  # a NaN after the maximum: the NaN
    a[3] = -np.inf
    a[4, 35] = a[4, 36] = 40.0  # the maximum in the tail after the last 8 lanes
    a[5] = 0.0
    a[5, 9], a[5, 2] = 0.0, -0.0  # signed zeros are equal: the first
    a[6] = -5.0
    a[7, 36] = np.nan
    zeros = np.zeros_like(a)
    got = library.run([a, zeros], argmax=frozenset({0}))[0]
    assert got.dtype == np.int64 and got.tolist() == np.argmax(a, axis=-1).tolist()
    assert got[1:5].tolist() == [3, 4, 0, 35] and got[5] == 0 and got[7] == 36
    library._argmax, entry = None, library._argmax
    try:
        assert library.run([a, zeros], argmax=frozenset({0}))[0].tolist() == got.tolist()
    finally:
        library._argmax = entry
