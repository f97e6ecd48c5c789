"""infercc: an inference-optimizing compiler and runtime for transformer models.

The public surface is small: ``compile``, ``load``, ``Config``, ``CompiledModel`` and the errors.
"""

__version__ = "0.1.0"

from .api import compile, load  # noqa: E402,A004
from .compiled import CompiledModel  # noqa: E402
from .config import Config  # noqa: E402
from .errors import ConfigError, InferccError, InputError, ModelLoadError, PassError  # noqa: E402

__all__ = [
    "CompiledModel", "Config", "ConfigError", "InferccError", "InputError", "ModelLoadError", "PassError",
    "compile", "load",
]
