"""The ONNX Runtime backend: one InferenceSession over an exported IR model."""

from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np
import onnxruntime as ort

from ..ir import Model, save_model, to_proto
from ..ir.onnx_save import PROTO_LIMIT, weight_bytes
from .ort_binding import BindingCache
from .ort_check import ORT_ERRORS, ORT_RUN_ERRORS, ort_error


@contextlib.contextmanager
def _without_defaults(model: Model):
    """The model with its inputs' defaults removed for the duration (restored as they were)."""
    graph = model.graph
    saved = [(v, v.const) for v in graph.inputs if v.const is not None]
    initializers = graph.initializers
    graph.initializers = {k: v for k, v in initializers.items() if all(k != x.name for x, _ in saved)}
    for value, _ in saved:
        value.const = None
    try:
        yield
    finally:
        graph.initializers = initializers
        for value, const in saved:
            value.const = const


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
        #: Inputs with a default (an importer's optional mask, ``logits_to_keep``) become plain
        #: inputs of the session, filled here when not fed: ORT lists a defaulted input as an
        #: overridable initializer, which IOBinding cannot bind.
        self.defaults = {v.name: v.const.numpy() for v in model.graph.inputs if v.const is not None}
        try:
            with _without_defaults(model):
                self._create(model, options, providers)
        except ORT_ERRORS as exc:
            raise ort_error(exc, model, loading=True) from exc
        self.providers = self.session.get_providers()
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.bindings = BindingCache(self.session)

    def _create(self, model: Model, options: ort.SessionOptions, providers: list[str]) -> None:
        if weight_bytes(model) > PROTO_LIMIT:
            # Protobuf cannot hold > 2 GB; ORT reads external data from a path instead.
            self._tmp = tempfile.TemporaryDirectory(prefix="infercc-")
            path = os.path.join(self._tmp.name, "model.onnx")
            save_model(model, path, external_data=True)
            self.session = ort.InferenceSession(path, options, providers=providers)
        else:
            data = to_proto(model, inline_external=True).SerializeToString()
            self.session = ort.InferenceSession(data, options, providers=providers)

    def run_bound(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray | None]) -> dict[str, np.ndarray]:
        """Run with IOBinding: inputs by pointer, the outputs in ``outputs`` written into the given
        arrays (None: allocated by ORT); returns those outputs by name. The binding is reused
        from the thread's last run, rebinding only the arrays that changed (``ort_binding``)."""
        binding, copies = self.bindings.bind(feeds, outputs)
        try:
            self.session.run_with_iobinding(binding)
        except ORT_RUN_ERRORS as exc:
            raise ort_error(exc, self.model, loading=False) from exc
        del copies  # (alive until the run ended)
        produced = binding.get_outputs() if any(array is None for array in outputs.values()) else []
        return {name: array if array is not None else produced[i].numpy() for i, (name, array) in enumerate(outputs.items())}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name; onnxruntime's failures come out as RunError naming the node."""
        missing = {name: value for name, value in self.defaults.items() if name not in feeds}
        try:
            results = self.session.run(self.output_names, {**missing, **feeds} if missing else feeds)
        except ORT_RUN_ERRORS as exc:
            raise ort_error(exc, self.model, loading=False) from exc
        return dict(zip(self.output_names, results))

