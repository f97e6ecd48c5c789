"""Errors a user can act on. Each message names the problem and the fix; the CLI prints it as one
line, so messages never rely on a traceback for context."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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


def reject_unknown(names: Iterable[str], valid: Iterable[str], what: str = "option") -> None:
    """ConfigError for ``names`` outside ``valid``: lists the valid ones and suggests the closest
    (``Config(qauntize=...)``, ``SamplingParams(tempreature=...)``), instead of a bare TypeError."""
    fields = sorted(valid)
    unknown = sorted(set(names) - set(fields))
    if not unknown:
        return
    matches = {name: close[0] for name in unknown if (close := difflib.get_close_matches(name, fields, n=1))}
    if len(unknown) == 1 and matches:
        hint = f" (did you mean {matches[unknown[0]]!r}?)"
    else:
        hint = f" (did you mean {', '.join(f'{k!r} -> {v!r}' for k, v in matches.items())}?)" if matches else ""
    raise ConfigError(f"unknown {what}(s) {unknown}{hint}; valid {what}s: {fields}")
