"""Shared helpers for the IR tests: round trips, proto comparison, running models with onnxruntime."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from infercc.ir import Model, load_model, to_proto


def roundtrip(proto: onnx.ModelProto, base_dir: str | None = None) -> tuple[Model, onnx.ModelProto]:
    model = load_model(proto, base_dir=base_dir)
    return model, to_proto(model)


def first_difference(a: onnx.ModelProto, b: onnx.ModelProto) -> str:
    """A short human-readable description of where two models differ (for assertion messages)."""
    la, lb = str(a).splitlines(), str(b).splitlines()
    for i, (x, y) in enumerate(zip(la, lb)):
        if x != y:
            ctx = "\n".join(la[max(0, i - 6):i])
            return f"line {i}:\n{ctx}\n- {x}\n+ {y}"
    if len(la) != len(lb):
        return f"text identical up to line {min(len(la), len(lb))}; lengths {len(la)} vs {len(lb)}"
    return "text identical, bytes differ (field presence: an explicitly set empty/default field)"


def assert_same_proto(expected: onnx.ModelProto, actual: onnx.ModelProto) -> None:
    if expected.SerializeToString() != actual.SerializeToString():
        raise AssertionError("exported model differs from the source:\n" + first_difference(expected, actual))


def ort_session(model: onnx.ModelProto | str | os.PathLike):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def ort_run(model: onnx.ModelProto | str | os.PathLike, feeds: dict[str, np.ndarray]) -> list:
    return ort_session(model).run(None, feeds)


def assert_outputs_identical(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, list):  # sequence outputs
            assert_outputs_identical(x, y)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def random_feeds(model: onnx.ModelProto, seed: int = 0, dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Feeds for every graph input that is not an initializer (symbolic dims default to 2)."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (dims or {}).get(d.dim_param, 2) for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if dtype == np.bool_:
            feeds[vi.name] = rng.integers(0, 2, shape).astype(bool)
        elif np.issubdtype(dtype, np.integer):
            feeds[vi.name] = rng.integers(0, 4, shape).astype(dtype)
        else:
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def dir_files(path: str | os.PathLike) -> list[str]:
    return sorted(p.name for p in Path(path).iterdir())
