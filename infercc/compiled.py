"""CompiledModel: the optimized graph, the config it was built with, what the passes did, and a
backend to run it. Saved as a folder: model.onnx (+ external data) and manifest.json, and when the
model runs on the generated-C runtime model.c + weights.bin (codegen/artifact.py)."""

from __future__ import annotations

import functools
import json
import os
import platform
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .codegen import artifact, custom
from .codegen.build import cache_dir
from .config import Config
from .errors import InputError, ModelLoadError
from .ir import Model, load_model, save_model, to_proto
from .ir.offload import offload
from .passes.diagnostics import Diagnostics
from .passes.lowering import lower_for_ort, wants_c
from .runtime.c_backend import CBackend, CUnavailable
from .runtime.feeds import check_feeds, signature
from .runtime.ort_backend import OrtBackend
from .runtime.ort_check import check_ops
from .runtime.paged_runner import built_paged_backend
from .runtime.providers import choose_providers

if TYPE_CHECKING:
    from .lora import AdapterRegistry
    from .runtime.generate import GenerationResult, TextStream
    from .runtime.session import Session
    from .runtime.tokenizer import Tokenizer

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
#: The manifest's ``format``: "infercc-compiled/<version>"; the version goes up when a change to
#: the folder's layout would make an older infercc misread it.
FORMAT_NAME = "infercc-compiled"
FORMAT_VERSION = 1
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
#: Files save() may write (what an overwrite may replace or remove; nothing else is touched).
SAVED_FILES = (MODEL_FILE, MODEL_FILE + ".data", artifact.SOURCE_FILE, artifact.WEIGHTS_FILE)


class CompiledModel:
    def __init__(self, model: Model, config: Config, diagnostics: Diagnostics,
                 kernels: Mapping[tuple[str, str], custom.Kernel] | None = None) -> None:
        self.model = model
        self.config = config
        self.diagnostics = diagnostics
        #: The user C kernels (register_kernel) this model runs with: those registered when it was
        #: compiled or loaded; a later registration does not change an existing model.
        self.kernels = custom.snapshot() if kernels is None else dict(kernels)
        #: (folder, manifest entry) of a saved C artifact whose weights.bin load may map.
        self._saved_c: tuple[Path, Any] | None = None
        self._backend: OrtBackend | CBackend | None = None
        #: Why the model runs where it runs (set when the backend is created).
        self.runtime_reason: str | None = None
        self._tokenizer: Tokenizer | None = None
        self._lora: AdapterRegistry | None = None
        self._lock = threading.Lock()
        providers, why = choose_providers(config.provider)
        self._providers = providers
        diagnostics.facts.setdefault("provider", why)

    # -- running ------------------------------------------------------------------------------
    @property
    def inputs(self) -> list[dict]:
        return signature([v for v in self.model.graph.inputs if v.const is None])

    @property
    def outputs(self) -> list[dict]:
        return signature(self.model.graph.outputs)

    @property
    def backend(self) -> OrtBackend | CBackend:
        """Created on first use: compiling or loading should not pay for a session nobody runs.
        A graph compiled for the C runtime that cannot run there is lowered for ONNX Runtime."""
        with self._lock:
            if self._backend is None:
                self._backend = self._make_backend()
            return self._backend

    @property
    def runtime(self) -> str:
        """"c" (generated C) or "ort" (ONNX Runtime): which runtime runs the model."""
        return "c" if isinstance(self.backend, CBackend) else "ort"

    def _make_backend(self) -> OrtBackend | CBackend:
        model = self.model
        if wants_c(self.config):
            saved = functools.partial(artifact.open_weights, *self._saved_c) if self._saved_c else None
            try:  # (a paged serving library built first holds the same weights: share its bytes)
                backend = CBackend(model, intra_op_threads=self.config.intra_op_threads, kernels=self.kernels,
                                   weights_from=saved, share=built_paged_backend(self))
                self.runtime_reason = "generated C: every op has a C kernel"
                if self.config.offload_weights:  # the blob holds the weights now: the IR's copy leaves memory
                    offload(model, str(cache_dir()))
                return backend
            except CUnavailable as exc:
                self.runtime_reason = f"ONNX Runtime: the generated-C runtime cannot run this model ({exc})"
                if self.config.backend == "c":
                    warnings.warn(f"backend='c': {self.runtime_reason}", stacklevel=3)
                model = lower_for_ort(model, self.config)
                _require_ort_kernels(model, self.runtime_reason)
        else:
            self.runtime_reason = f"ONNX Runtime: Config.backend={self.config.backend!r}"
        return OrtBackend(model, self._providers, intra_op_threads=self.config.intra_op_threads,
                          inter_op_threads=self.config.inter_op_threads)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Stateless inference: feeds by input name -> outputs by output name."""
        return self.backend.run(check_feeds(self.model.graph, feeds))

    def to_onnx(self):
        return to_proto(self.model, inline_external=True)

    # -- text generation (runtime/session.py, runtime/generate.py) ----------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer of the checkpoint the model was imported from (loaded on first use);
        assign one for a model that came from a plain ONNX file."""
        with self._lock:
            if self._tokenizer is None:
                from .runtime.tokenizer import Tokenizer

                self._tokenizer = Tokenizer.from_model(self.model)
            return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def session(self, *, max_context: int | None = None, kv_cache_memory: int | None = None,
                speculation: str | None = None) -> Session:
        """A Session for step-by-step use: ``session.sequence()`` makes independent sequences
        (prefill / decode / append / reset / fork). ``max_context`` overrides the model's context
        length; ``kv_cache_memory`` the bytes of the session's paged KV pool (default
        ``Config.kv_cache_memory``); ``speculation`` its sequences' default speculative decoding
        method (default ``Config.speculation``; "off" for none)."""
        from .runtime.session import Session

        return Session(self, max_context=max_context, kv_cache_memory=kv_cache_memory, speculation=speculation)

    def generate(self, prompt: Any, **options: Any) -> GenerationResult | list[GenerationResult]:
        """Generate text for ``prompt`` (text, token ids, or chat messages [{"role", "content"}]);
        a list of prompts runs as one batch and returns a list. ``options``: the fields of
        ``SamplingParams`` (max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
        frequency_penalty, presence_penalty, stop, stop_token_ids, seed, ignore_eos), or
        ``params=SamplingParams(...)``, ``max_context``, ``speculation`` (None, "off", or a method
        of ``Config.speculation``: this request's speculative decoding, overriding the config's;
        see runtime/speculative/) and its ``speculation_policy`` and
        ``max_speculation_compute_fraction`` (None: the config's)."""
        from .runtime.generate import generate

        return generate(self, prompt, **options)

    def stream(self, prompt: Any, **options: Any) -> TextStream:
        """Like ``generate`` for one prompt, but iterate to get text pieces as they are made;
        ``.result`` holds the GenerationResult (timings, finish reason) afterwards."""
        from .runtime.generate import stream

        return stream(self, prompt, **options)

    # -- LoRA adapters (infercc/lora/) ---------------------------------------------------------
    @property
    def lora(self) -> AdapterRegistry:
        """The adapters loaded into this model (made on first use)."""
        with self._lock:
            if self._lora is None:
                from .lora import AdapterRegistry

                self._lora = AdapterRegistry(self)
            return self._lora

    def add_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Load the PEFT LoRA adapter in folder ``path`` (adapter_config.json +
        adapter_model.safetensors) as ``name``, then select it per request: ``generate(...,
        adapter=name)``, ``stream``, ``session.sequence(adapter=name)``. The base weights are never
        changed. All or nothing: a module the model does not have, a size mismatch or a rank above
        ``Config.max_lora_rank`` is an InputError naming the module, and nothing is loaded."""
        self.lora.add(name, path)

    def remove_adapter(self, name: str) -> None:
        """Unload adapter ``name`` (refused while a running request or open sequence uses it)."""
        self.lora.remove(name)

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters."""
        return self._lora.names if self._lora is not None else []

    # -- persistence --------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write model.onnx (+ model.onnx.data for large weights) and manifest.json into
        ``directory``: a new or empty folder, or one an earlier save() wrote, whose model is then
        replaced (its model files and manifest; other files in it are left alone). A file, or a
        folder holding anything else, is refused, never emptied: those files are the user's."""
        directory = Path(directory)
        previous = _previous_save(directory)
        directory.mkdir(parents=True, exist_ok=True)
        on_c = wants_c(self.config) and isinstance(self.backend, CBackend)
        # On the C runtime the weights go to model.onnx.data, streamed tensor by tensor (no second
        # copy in a protobuf while saving) and memory-mapped by load (resident only when read).
        files = save_model(self.model, directory / MODEL_FILE, external_data=True if on_c else None)
        c_runtime = None
        if on_c:  # the C artifact, for load to map
            c_runtime = artifact.write(directory, self.backend.source, self.backend.library.weights)
            files += [str(directory / artifact.SOURCE_FILE), str(directory / artifact.WEIGHTS_FILE)]
        written = {os.path.basename(f) for f in files}
        for stale in previous - written:  # e.g. the old model.onnx.data when the new model has none
            (directory / stale).unlink(missing_ok=True)
        manifest = {
            "format": FORMAT,
            "files": [os.path.basename(f) for f in files],
            "config": self.config.to_dict(),
            "versions": _versions(),
            "inputs": self.inputs,
            "outputs": self.outputs,
            "facts": self.diagnostics.facts,
            "diagnostics": self.diagnostics.to_list(),
        }
        if c_runtime is not None:
            manifest[artifact.MANIFEST_KEY] = c_runtime
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> CompiledModel:
        directory = Path(directory)
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            raise ModelLoadError(
                f"{directory} has no {MANIFEST}: it is not a folder written by CompiledModel.save(); "
                "to compile a plain ONNX file use infercc.compile(path)."
            )
        try:
            manifest = json.loads(manifest_path.read_text())
            if not isinstance(manifest, dict):
                raise ValueError(f"a JSON {type(manifest).__name__}, not an object")
            _check_format(manifest, manifest_path)
            config = Config.from_dict(manifest["config"])
            diagnostics = Diagnostics.from_dict({"facts": manifest.get("facts", {}), "passes": manifest["diagnostics"]})
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{manifest_path} is damaged ({exc}); compile the model again.") from None
        # No shape inference here: the file holds the types the compiled model had, and a loaded
        # model must be the saved one exactly (inferred value_info would change what onnxruntime's
        # optimizer does, and so the outputs).
        model = load_model(directory / MODEL_FILE)
        loaded = cls(model, config, diagnostics)
        if artifact.MANIFEST_KEY in manifest:  # checked when the backend is made (a warning, never an error)
            loaded._saved_c = (directory, manifest[artifact.MANIFEST_KEY])
        return loaded

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompiledModel):
            return NotImplemented
        return (
            self.config == other.config
            and self.diagnostics == other.diagnostics
            and self.to_onnx().SerializeToString() == other.to_onnx().SerializeToString()
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        g = self.model.graph
        return f"<CompiledModel {len(g.nodes)} nodes, inputs {[v['name'] for v in self.inputs]}>"


def _require_ort_kernels(model: Model, reason: str) -> None:
    """ModelLoadError naming the op when the ONNX Runtime fallback has no kernel for an op (a
    custom op whose only kernel is a registered C kernel), instead of onnxruntime's own message."""
    try:
        check_ops(model)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{reason}; and ONNX Runtime cannot run it either: {exc} A custom op needs its C "
                             "kernel (infercc.codegen.register_kernel, registered before compile/load) and a working "
                             "C compiler.") from None


def _check_format(manifest: dict[str, Any], path: Path) -> None:
    """ModelLoadError unless the manifest's format is the one this infercc reads; says what was
    found, what is read, and the fix (upgrade for a newer version, else compile again)."""
    from . import __version__

    found = manifest.get("format")
    if found == FORMAT:
        return
    version = found[len(FORMAT_NAME) + 1:] if isinstance(found, str) and found.startswith(FORMAT_NAME + "/") else ""
    if version.isdigit() and int(version) > FORMAT_VERSION:
        raise ModelLoadError(f"{path}: format {found!r} is newer than what this infercc ({__version__}) reads "
                             f"({FORMAT!r}); upgrade infercc (pip install -U infercc), or compile the model again "
                             "with this version")
    what = "has no 'format' field" if found is None else f"has format {found!r}"
    raise ModelLoadError(f"{path} {what}, but this infercc ({__version__}) reads {FORMAT!r}; compile the model "
                         "again (infercc.compile(model).save(folder), or `infercc convert`)")


def _previous_save(directory: Path) -> set[str]:
    """The files an earlier save() wrote into ``directory`` (to replace), or an InputError when
    the path is a file or a non-empty folder that save() did not write."""
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory} is a file, not a folder: save() writes a folder ({MODEL_FILE} + {MANIFEST}); "
                         "pass the path of a new or empty folder")
    if not directory.exists() or not any(directory.iterdir()):
        return set()

    def refuse(reason: str) -> InputError:
        names = sorted(p.name for p in directory.iterdir())
        shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return InputError(f"{directory} is a folder that holds other files ({shown}) and {reason}: save() writes "
                          "only into a new or empty folder, or over an earlier save(); pass an empty or new folder "
                          "(nothing in this one is deleted)")

    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise refuse(f"no {MANIFEST}") from None
    except (OSError, ValueError):
        manifest = None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if not (isinstance(found, str) and found.startswith(FORMAT_NAME + "/")):
        raise refuse(f"its {MANIFEST} was not written by infercc")
    files = manifest.get("files")
    return {f for f in files if f in SAVED_FILES} if isinstance(files, list) else set()


def _versions() -> dict[str, Any]:
    import onnx
    import onnxruntime

    from . import __version__

    return {
        "infercc": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__, "python": platform.python_version(),
    }
