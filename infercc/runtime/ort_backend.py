"""The ONNX Runtime backend: one InferenceSession over an exported IR model."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnxruntime as ort

from ..ir import Model, save_model, to_proto
from ..ir.onnx_save import PROTO_LIMIT, weight_bytes
from .ort_check import ORT_ERRORS, ort_error


class OrtBackend:
    def __init__(self, model: Model, providers: list[str], *, intra_op_threads: int = 0, inter_op_threads: int = 0):
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        # ORT's own rewrites stay on: they are provider-specific and cheap, and a user comparing us
        # with plain onnxruntime should see the same baseline optimizations on both sides.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Errors only: ORT warns about every input that has a default initializer (imported
        # checkpoints' optional attention_mask) and about shape merges it resolves itself.
        options.log_severity_level = 3
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.model = model
        try:
            if weight_bytes(model) > PROTO_LIMIT:
                # Protobuf cannot hold > 2 GB; ORT reads external data from a path instead.
                self._tmp = tempfile.TemporaryDirectory(prefix="infercc-")
                path = os.path.join(self._tmp.name, "model.onnx")
                save_model(model, path, external_data=True)
                self.session = ort.InferenceSession(path, options, providers=providers)
            else:
                data = to_proto(model, inline_external=True).SerializeToString()
                self.session = ort.InferenceSession(data, options, providers=providers)
        except ORT_ERRORS as exc:
            raise ort_error(exc, model, loading=True) from exc
        self.providers = self.session.get_providers()
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name; onnxruntime's failures come out as RunError naming the node."""
        try:
            results = self.session.run(self.output_names, feeds)
        except ORT_ERRORS as exc:
            raise ort_error(exc, self.model, loading=False) from exc
        return dict(zip(self.output_names, results))

