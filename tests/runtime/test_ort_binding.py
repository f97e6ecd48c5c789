"""Reused IOBindings (runtime/ort_binding.py): each run reads the arrays it was given, whatever was
bound before, and only changed arrays are bound again."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

from infercc.runtime.ort_backend import OrtBackend
from tests.passes._build import init, make, node, to_ir, vi

W = np.arange(16 * 4, dtype=np.float32).reshape(16, 4) / 10


def _backend() -> OrtBackend:
    """y = x @ W and z = x + 1: one output written into a given array, one left to ORT."""
    model = make([node("MatMul", ["x", "w"], ["y"]), node("Add", ["x", "one"], ["z"])],
                 [vi("x", ["n", 16])], [vi("y", ["n", 4]), vi("z", ["n", 16])],
                 [init("w", W), init("one", np.ones((1,), np.float32))])
    return OrtBackend(to_ir(model), ["CPUExecutionProvider"], intra_op_threads=1, inter_op_threads=1)


def _run(backend: OrtBackend, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    return backend.run_bound({"x": x}, {"y": y, "z": None})


def test_same_arrays_are_not_bound_again_and_their_new_contents_are_read() -> None:
    backend = _backend()
    x, y = np.ones((2, 16), np.float32), np.empty((2, 4), np.float32)
    first = _run(backend, x, y)
    np.testing.assert_allclose(first["y"], x @ W, rtol=1e-6)
    binds = backend.bindings.binds
    x[:] = 3.0  # same object, new contents (the KV cache's buffers, written in place)
    second = _run(backend, x, y)
    assert backend.bindings.binds == binds + 1  # only the ORT-allocated output
    assert second["y"] is y
    np.testing.assert_allclose(y, x @ W, rtol=1e-6)
    np.testing.assert_allclose(second["z"], x + 1)
    np.testing.assert_allclose(first["z"], 2.0)  # last run's allocated output is not overwritten


def test_new_or_reshaped_arrays_are_bound_again() -> None:
    backend = _backend()
    y = np.empty((2, 4), np.float32)
    for value in (1.0, 2.0, 5.0):  # a new array each run (the step's ids): each is read
        x = np.full((2, 16), value, np.float32)
        np.testing.assert_allclose(_run(backend, x, y)["y"], x @ W, rtol=1e-6)
        del x
        gc.collect()  # its memory may come back for the next array: still bound again
    x3, y3 = np.full((3, 16), 0.5, np.float32), np.empty((3, 4), np.float32)
    np.testing.assert_allclose(_run(backend, x3, y3)["y"], x3 @ W, rtol=1e-6)


def test_non_contiguous_inputs_and_changed_names() -> None:
    backend = _backend()
    wide = np.arange(2 * 32, dtype=np.float32).reshape(2, 32)
    x = wide[:, ::2]  # a strided view: run through a contiguous copy
    y = np.empty((2, 4), np.float32)
    np.testing.assert_allclose(_run(backend, x, y)["y"], np.ascontiguousarray(x) @ W, rtol=1e-5)
    only_y = backend.run_bound({"x": x}, {"y": y})  # other outputs: a fresh binding
    assert list(only_y) == ["y"]
    np.testing.assert_allclose(y, np.ascontiguousarray(x) @ W, rtol=1e-5)
    with pytest.raises(ValueError, match="C-contiguous"):
        backend.run_bound({"x": x}, {"y": np.empty((4, 2), np.float32).T})


def test_threads_keep_their_own_bindings() -> None:
    backend = _backend()
    errors: list[BaseException] = []

    def work(value: float) -> None:
        try:
            x, y = np.full((2, 16), value, np.float32), np.empty((2, 4), np.float32)
            for _ in range(20):
                x += 1
                np.testing.assert_allclose(_run(backend, x, y)["y"], x @ W, rtol=1e-6)
        except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(v,)) for v in (0.0, 100.0, -50.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
