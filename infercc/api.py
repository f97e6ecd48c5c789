"""The facade: compile() and load()."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import onnx

from .codegen import custom
from .compiled import CompiledModel
from .config import Config
from .errors import ConfigError, ModelLoadError
from .families import detect_family
from .ir import Graph, Model, load_model
from .ir.collection import fewer_collections
from .ir.shapes import infer_shapes
from .passes import Diagnostics, Pass, PassManager, PassRecord, build_pipeline
from .passes.lowering import wants_c
from .runtime.ort_check import check_ops
from .runtime.providers import choose_providers


@fewer_collections()  # the IR is reference cycles: see ir/collection.py
def compile(  # noqa: A001 - the public name users expect
    model: str | os.PathLike | onnx.ModelProto,
    config: Config | None = None,
    *,
    on_pass: Callable[[Pass, PassRecord], None] | None = None,
    passes: list[Pass] | None = None,
    **options: Any,
) -> CompiledModel:
    """Import ``model`` (an .onnx path or ModelProto, a .gguf file, a Hugging Face folder), run the
    pass pipeline, return a CompiledModel.

    Keyword ``options`` override fields of ``config``. ``passes`` replaces the pipeline (for
    experiments and tests); ``on_pass`` is called after each pass (progress bars).
    """
    if config is not None and not isinstance(config, Config):
        raise ConfigError(f"config must be an infercc.Config, got {type(config).__name__}")
    config = (config or Config()).replace(**options)
    choose_providers(config.provider)  # an unusable provider is an error before any work is done
    ir = import_model(model)
    kernels = custom.snapshot()  # user C kernels: registered now, used for this model from now on
    # What onnxruntime would refuse at the first run() is refused now, by node; custom ops with a
    # registered C kernel are skipped when the model is meant for the C runtime.
    try:
        check_ops(ir, skip=custom.custom_ops(ir, kernels) if wants_c(config) else ())
    except ModelLoadError as exc:
        if custom.custom_ops(ir, kernels):  # say how the registered kernel would run it
            raise ModelLoadError(f"{exc} Its C kernel (register_kernel) runs on the generated-C runtime only: compile "
                                 "with backend='c' (or 'auto' on CPU).") from None
        raise
    custom.annotate(ir, kernels)
    _sort(ir.graph)  # onnxruntime runs unsorted (acyclic) files; passes and clone() need node order
    diagnostics = Diagnostics()
    diagnostics.facts.update(detect_family(ir))
    pipeline = passes if passes is not None else build_pipeline(config)
    if pipeline:
        # Passes need types and shapes. Without passes the model stays a faithful round trip:
        # inferred value_info alone changes what onnxruntime's own optimizer does.
        notes = infer_shapes(ir)
        if notes:
            diagnostics.facts["shape_inference"] = "; ".join(notes)
    check = None
    if config.check_each_pass and pipeline:
        from .runtime.numerics import NumericCheck

        check = NumericCheck(ir.clone(), config.check_tolerance)
    manager = PassManager(pipeline, config, check=check, on_pass=on_pass)
    ir, diagnostics = manager.run(ir, diagnostics)
    return CompiledModel(ir, config, diagnostics, kernels)


def _sort(graph: Graph) -> None:
    """Topological order in every graph; stable, so a sorted file keeps its order exactly."""
    graph.sort()
    for node in graph.nodes:
        for sub in node.subgraphs():
            _sort(sub)


def import_model(model: Any) -> Model:
    """.onnx file or ModelProto -> ONNX import; .gguf file or Hugging Face folder -> importers."""
    if isinstance(model, (str, os.PathLike)):
        if "\0" in str(os.fspath(model)):
            raise ModelLoadError(f"{os.fspath(model)!r}: a path cannot contain a NUL byte; check the path.")
        from .importers import import_checkpoint, is_checkpoint

        if is_checkpoint(model):
            return import_checkpoint(model)
    if isinstance(model, (str, os.PathLike, onnx.ModelProto)):
        return load_model(model)
    raise ModelLoadError(
        f"cannot compile a {type(model).__name__}: pass a path to an .onnx file, a .gguf file or a "
        "Hugging Face folder (config.json + safetensors), or an onnx.ModelProto"
    )


def load(directory: str | os.PathLike) -> CompiledModel:
    """Load a folder written by ``CompiledModel.save``."""
    return CompiledModel.load(directory)
