"""Shared helpers: one-node ORT models and "real-ish" weights for the quantization tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parents[3]
SHARED_MODELS = ROOT.parent / "shared" / "models"
STORIES = SHARED_MODELS / "stories260K" / "stories260K.gguf"


def run_single(node: onnx.NodeProto, inputs: dict[str, np.ndarray], inits: dict[str, np.ndarray], opset: int = 21) -> np.ndarray:
    """Run one contrib/standard node on the CPU provider."""
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)) for k, v in inputs.items()],
        [helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def realistic_weights(seed: int = 0) -> list[np.ndarray]:
    """[N, K] rows of trained weights when a real model is at hand (stories260K), else heavy-tailed
    synthetic rows (Student-t, per-channel scales) standing in for them: trained weights are not
    Gaussian, and their outliers are what separates the methods."""
    if STORIES.is_file():
        import gguf

        reader = gguf.GGUFReader(str(STORIES))
        found = [np.asarray(t.data, np.float32).reshape([int(d) for d in reversed(t.shape)])
                 for t in reader.tensors if t.name.endswith(("attn_q.weight", "ffn_up.weight", "ffn_down.weight"))]
        if found:
            return found
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_t(4, size=(n, k)) * rng.uniform(0.5, 2.0, size=(n, 1)) * 0.02).astype(np.float32)
        for n, k in ((256, 512), (512, 256))
    ]
