"""An ``onnx.backend`` adapter over the generated-C runtime, for ONNX conformance tests.

It runs a plain ModelProto on the C kernels as they are: the model is imported into infercc's IR
and given types and shapes (``infer_shapes``, which the emitters need for dtypes and ranks), but
none of the optimization passes run, so every node of the test model reaches its own kernel (a
fused or folded node would test the pass, not the kernel). Then ``emit`` -> ``build`` ->
``Library``, with numpy arrays in and out.

A model whose op, attribute value or element type no emitter accepts raises ``Unsupported`` while
emitting; ``is_compatible`` answers False for it and ``prepare`` raises ``BackendUnsupported``
(an ``InferccError`` naming the node and the reason), which is how an onnx backend says "not
supported" (onnx's runner skips such a case when ``is_compatible`` is False).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.backend.base import Backend, BackendRep

from ..errors import InferccError, ModelLoadError
from ..ir import Model, load_model
from ..ir.shapes import infer_shapes
from .build import NATIVE, BuildError, build
from .emit import Program, emit
from .library import Library, RunError
from .ops import Unsupported


class BackendUnsupported(InferccError):
    """The model uses an op, attribute value or element type the generated-C runtime does not claim."""


class CBackendRep(BackendRep):
    """One built library for one model: ``run`` feeds it numpy arrays in graph-input order."""

    def __init__(self, program: Program, library: Library) -> None:
        self.program = program
        self.library = library

    def run(self, inputs: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
        """Outputs in graph order; ``inputs`` a list (graph-input order), a dict by name, or one array."""
        names = [name for name, _ in self.program.inputs]
        if isinstance(inputs, Mapping):
            missing = [n for n in names if n not in inputs]
            if missing:
                raise BackendUnsupported(f"inputs {missing} not fed: feed every graph input ({names})")
            arrays = [_array(inputs[n]) for n in names]
        else:
            arrays = [_array(a) for a in (inputs if isinstance(inputs, Sequence) else [inputs])]
            if len(arrays) != len(names):
                raise BackendUnsupported(f"{len(arrays)} inputs fed, the model takes {len(names)} ({names})")
        for array, (name, dtype) in zip(arrays, self.program.inputs):
            if array.dtype != dtype:  # the library would convert silently: a conformance run must not
                raise BackendUnsupported(f"input {name!r} is {array.dtype}, the model declares {dtype}: feed {dtype}")
        try:
            return tuple(self.library.run(arrays))
        except RunError as exc:
            raise BackendUnsupported(str(exc)) from None


def _array(x: Any) -> np.ndarray:
    """A numpy array from an array or a TensorProto (onnx's in-memory node cases hold some as protos)."""
    return numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else np.asarray(x)


def program_of(model: onnx.ModelProto) -> Program:
    """The C program for ``model``, imported without optimization; ``Unsupported`` when not claimed."""
    ir: Model = load_model(model)
    infer_shapes(ir)
    return emit(ir)


class GeneratedCBackend(Backend):
    """``onnx.backend.base.Backend`` over the generated-C runtime (CPU only)."""

    flags: tuple[str, ...] = NATIVE

    @classmethod
    def is_compatible(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> bool:
        if not cls.supports_device(device):
            return False
        try:
            program_of(model)
        except (Unsupported, ModelLoadError):  # an op, attribute or element type we do not claim
            return False
        return True

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> CBackendRep:
        if not cls.supports_device(device):
            raise BackendUnsupported(f"device {device!r}: the generated-C runtime runs on the CPU only; pass device='CPU'")
        try:
            program = program_of(model)
        except Unsupported as exc:
            raise BackendUnsupported(f"model {model.graph.name!r}: {exc} (not claimed by the generated-C runtime; "
                                     "run it on ONNX Runtime)") from None
        try:
            path = build(program.source, kwargs.get("flags", cls.flags))
        except BuildError as exc:
            raise BackendUnsupported(str(exc)) from None
        return CBackendRep(program, Library(path, program))

    @classmethod
    def run_model(cls, model: onnx.ModelProto, inputs: Any, device: str = "CPU", **kwargs: Any) -> tuple[np.ndarray, ...]:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(cls, node: onnx.NodeProto, inputs: Any, device: str = "CPU",
                 outputs_info: Sequence[tuple[Any, tuple[int, ...]]] | None = None,
                 **kwargs: Any) -> tuple[np.ndarray, ...]:
        """One node on the given arrays: wrapped in a model (inputs typed from the arrays, outputs
        typed by onnx's shape inference, or by ``outputs_info`` as (numpy dtype, shape) pairs)."""
        arrays = [_array(x) for x in inputs]
        present = [name for name in node.input if name]
        if len(arrays) != len(present):
            raise BackendUnsupported(f"run_node {node.op_type}: {len(arrays)} inputs given for {len(present)} named inputs")
        graph_inputs = [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                        for name, a in zip(present, arrays)]
        outputs = [name for name in node.output if name]
        if outputs_info is not None:
            typed = [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dt)), shape)
                     for name, (dt, shape) in zip(outputs, outputs_info)]
        else:
            typed = [onnx.helper.make_empty_tensor_value_info(name) for name in outputs]
        opset = int(kwargs.get("opset_version", onnx.defs.onnx_opset_version()))
        graph = onnx.helper.make_graph([node], f"run_node_{node.op_type}", graph_inputs, typed)
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(node.domain, opset)])
        if outputs_info is None:
            inferred = onnx.shape_inference.infer_shapes(model)
            known = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]
                     if v.type.tensor_type.elem_type}
            missing = [name for name in outputs if name not in known]
            if missing:
                raise BackendUnsupported(f"run_node {node.op_type}: onnx cannot infer the type of {missing}; "
                                         "pass outputs_info=[(dtype, shape), ...]")
            del model.graph.output[:]
            model.graph.output.extend(known[name] for name in outputs)
        return cls.run_model(model, arrays, device, **kwargs)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return str(device).upper().startswith("CPU")


prepare = GeneratedCBackend.prepare
run_model = GeneratedCBackend.run_model
supports_device = GeneratedCBackend.supports_device
is_compatible = GeneratedCBackend.is_compatible
run_node = GeneratedCBackend.run_node
