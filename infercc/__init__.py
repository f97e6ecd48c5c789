"""infercc: an inference-optimizing compiler and runtime for transformer models.

The public surface is small: ``compile``, ``load``, ``Config``, ``CompiledModel`` (``run``,
``generate``, ``stream``, ``session``), ``SamplingParams`` and the errors.
"""

__version__ = "0.1.0"

from .api import compile, load  # noqa: E402,A004
from .compiled import CompiledModel  # noqa: E402
from .config import Config  # noqa: E402
from .errors import ConfigError, InferccError, InputError, ModelLoadError, PassError  # noqa: E402
from .runtime.kv_cache import ContextOverflowError  # noqa: E402
from .runtime.sampling import SamplingParams  # noqa: E402

__all__ = [
    "CompiledModel", "Config", "ConfigError", "ContextOverflowError", "InferccError", "InputError", "ModelLoadError",
    "PassError", "SamplingParams", "compile", "load",
]
