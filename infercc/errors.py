"""Errors a user can act on. Each message names the problem and the fix; the CLI prints it as one
line, so messages never rely on a traceback for context."""

from __future__ import annotations


class InferccError(Exception):
    """Base class: anything infercc raises on purpose."""


class ModelLoadError(InferccError):
    """The model file or object cannot be read or is not a model we support."""


class ConfigError(InferccError, ValueError):
    """A configuration field has a value outside what it allows."""


class InputError(InferccError, ValueError):
    """Feeds given to a compiled model do not match its signature."""


class PassError(InferccError):
    """A pass failed and ``strict=True`` asked for it to be fatal."""


class RunError(InferccError, RuntimeError):
    """ONNX Runtime failed while running a model that it had accepted (a shape or index that only
    goes wrong with these inputs); the message names the node and op, and keeps the runtime's text."""
