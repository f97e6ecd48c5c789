"""Typed reads of a checkpoint's metadata: GGUF key/values and Hugging Face JSON files.

Every hyper-parameter, token id and vocabulary list an importer or tokenizer loader takes from a
file goes through ``Fields``: a value of the wrong kind (a string, list, float or bool where a
count belongs; 0 or a negative count; NaN; text that is not UTF-8) becomes one ModelLoadError that
names the file, the field and the fix, instead of a TypeError deep in a graph builder or, worse, a
huge allocation. Ranges are checked here; agreement with the tensors is ``checks``' job.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

#: Upper bound of integer fields: a value from a file must fit the int64 constants graphs are built
#: from. Sizes are bounded by the tensors that must match them (``checks``), not by a cap here.
INT64_MAX = 2**63 - 1
_ABSENT = object()
#: ``default`` of a field that must be present.
REQUIRED: Any = object()


class Fields:
    """Typed getters over one file's metadata. ``default`` is returned when the field is absent
    (JSON null counts as absent); without one, absence is an error. Subclasses supply ``_raw``."""

    def __init__(self, source: str | os.PathLike, fix: str) -> None:
        self.source = os.fspath(source)
        self.fix = fix

    # -- what subclasses provide --------------------------------------------------------------
    def _raw(self, key: str) -> Any:
        """The field as a Python value (int, float, bool, str, list, dict), or ``_ABSENT``."""
        raise NotImplementedError

    def where(self, key: str) -> str:
        return f"{self.source}: {key}"

    def missing(self, key: str) -> ModelLoadError:
        return ModelLoadError(f"{self.where(key)} is missing; {self.fix}")

    # -- typed getters -------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return self._raw(key) is not _ABSENT

    def integer(self, key: str, default: Any = REQUIRED, *, minimum: int = 1, maximum: int = INT64_MAX) -> Any:
        """An integer in [minimum, maximum] (bools and integral floats are not integers)."""
        value = self._get(key, default)
        if value is _ABSENT:
            return default
        self._check_int(key, value, minimum, maximum)
        return value

    def number(self, key: str, default: Any = REQUIRED, *, minimum: float | None = None,
               positive: bool = False) -> Any:
        """A finite float (an integer is accepted), > 0 when ``positive``, >= ``minimum`` if given."""
        value = self._get(key, default)
        if value is _ABSENT:
            return default
        if not _is_number(value) or not math.isfinite(value) or (positive and value <= 0) \
                or (minimum is not None and value < minimum):
            bound = " > 0" if positive else f" >= {minimum}" if minimum is not None else ""
            raise self.bad(key, value, f"a finite number{bound}")
        return float(value)

    def text(self, key: str, default: Any = REQUIRED) -> Any:
        value = self._get(key, default)
        if value is _ABSENT:
            return default
        if not isinstance(value, str):
            raise self.bad(key, value, "a string")
        return value

    def flag(self, key: str, default: Any = REQUIRED) -> Any:
        value = self._get(key, default)
        if value is _ABSENT:
            return default
        if not isinstance(value, bool):
            raise self.bad(key, value, "true or false")
        return value

    def integers(self, key: str, default: Any = REQUIRED, *, minimum: int = 0, maximum: int = INT64_MAX) -> Any:
        """A list of integers, each in [minimum, maximum]."""
        value = self._get(key, default)
        if value is _ABSENT:
            return default
        if not isinstance(value, list):
            raise self.bad(key, value, "a list of integers")
        for i, item in enumerate(value):
            self._check_int(f"{key}[{i}]", item, minimum, maximum)
        return value

    def numbers(self, key: str, default: Any = REQUIRED) -> Any:
        """A list of finite floats."""
        value = self._get(key, default)
        if value is _ABSENT:
            return default
        if not isinstance(value, list):
            raise self.bad(key, value, "a list of numbers")
        for i, item in enumerate(value):
            if not _is_number(item) or not math.isfinite(item):
                raise self.bad(f"{key}[{i}]", item, "a finite number")
        return [float(v) for v in value]

    def texts(self, key: str, default: Any = REQUIRED) -> Any:
        value = self._get(key, default)
        if value is _ABSENT:
            return default
        if not isinstance(value, list):
            raise self.bad(key, value, "a list of strings")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.bad(f"{key}[{i}]", item, "a string")
        return value

    def token_ids(self, key: str, default: Any = REQUIRED) -> Any:
        """One token id or a list of them (HF's eos_token_id takes both), as a list."""
        value = self._get(key, default)
        if value is _ABSENT:
            return default
        return self.integers(key, minimum=0) if isinstance(value, list) else [self.integer(key, minimum=0)]

    # -- helpers -------------------------------------------------------------------------------
    def bad(self, key: str, value: Any, expected: str) -> ModelLoadError:
        return ModelLoadError(f"{self.where(key)} is {_show(value)}, expected {expected}; {self.fix}")

    def _get(self, key: str, default: Any) -> Any:
        """The raw value, or ``_ABSENT`` when absent with a default (absent and required raises)."""
        value = self._raw(key)
        if value is _ABSENT and default is REQUIRED:
            raise self.missing(key)
        return value

    def _check_int(self, key: str, value: Any, minimum: int, maximum: int) -> None:
        if not _is_int(value) or not minimum <= value <= maximum:
            raise self.bad(key, value, f"an integer from {minimum} to {maximum}")


class GGUFFields(Fields):
    """Key/values of a GGUFReader. Values are decoded once and kept (vocabularies are large)."""

    def __init__(self, reader, path: str | os.PathLike) -> None:
        super().__init__(path, "the file is damaged or was edited: re-convert it with llama.cpp's "
                               "convert_hf_to_gguf.py or re-download it.")
        self.reader = reader
        self._values: dict[str, Any] = {}

    def where(self, key: str) -> str:
        return f"{self.source}: GGUF metadata {key}"

    def missing(self, key: str) -> ModelLoadError:
        return ModelLoadError(f"{self.where(key)} is missing; the file is incomplete: re-convert or re-download it.")

    def _raw(self, key: str) -> Any:
        if key not in self._values:
            found = self.reader.fields.get(key)
            if found is None:
                return _ABSENT
            try:
                self._values[key] = found.contents()
            except UnicodeDecodeError as exc:
                raise ModelLoadError(f"{self.where(key)} is not valid UTF-8 text ({exc.reason} at byte {exc.start} "
                                     f"of a string); {self.fix}") from None
            except Exception as exc:  # a value layout the reader cannot decode (e.g. nested arrays)
                raise ModelLoadError(f"{self.where(key)} cannot be decoded ({type(exc).__name__}: {exc}); "
                                     f"{self.fix}") from None
        return self._values[key]


class JsonFields(Fields):
    """Entries of a JSON object (config.json, generation_config.json, ...); ``prefix`` names a
    nested object in messages (``rope_parameters.``)."""

    def __init__(self, data: Mapping[str, Any], path: str | os.PathLike, *, needs: str = "the model",
                 prefix: str = "") -> None:
        super().__init__(path, f"fix that entry in {os.path.basename(os.fspath(path))} or re-save the checkpoint "
                               "with save_pretrained.")
        self.data, self.needs, self.prefix = data, needs, prefix

    def where(self, key: str) -> str:
        return f"{self.source}: {self.prefix}{key}"

    def missing(self, key: str) -> ModelLoadError:
        return ModelLoadError(f"{self.source} has no {self.prefix + key!r} (absent or null), which {self.needs} "
                              "needs; re-save it with save_pretrained.")

    def _raw(self, key: str) -> Any:
        value = self.data.get(key)
        return _ABSENT if value is None else value

    def nested(self, key: str) -> JsonFields:
        """The object at ``key`` (``{}`` when absent) as its own Fields."""
        value = self._get(key, None)
        if value is _ABSENT:
            value = {}
        if not isinstance(value, dict):
            raise self.bad(key, value, "an object")
        return JsonFields(value, self.source, needs=self.needs, prefix=f"{self.prefix}{key}.")


def chat_template(folder: str | os.PathLike, config: Mapping[str, Any]) -> tuple[str | None, str]:
    """A Hugging Face folder's chat template and where it came from: tokenizer_config.json's
    chat_template (a string, or a list of {"name", "template"} of which the one named "default" is
    used), else chat_template.jinja. Another shape is a ModelLoadError naming the file."""
    from .paths import read_text

    path = Path(folder) / "tokenizer_config.json"
    template = config.get("chat_template")
    if isinstance(template, list):
        if not all(isinstance(t, dict) and isinstance(t.get("template", ""), str) for t in template):
            raise ModelLoadError(f"{path}: chat_template is a list whose entries are not {{\"name\", \"template\"}} "
                                 "objects; fix that entry or re-save the tokenizer with save_pretrained.")
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is not None and not isinstance(template, str):
        raise ModelLoadError(f"{path}: chat_template is a {type(template).__name__}, expected a string; fix that entry "
                             "or re-save the tokenizer with save_pretrained.")
    if template is not None:
        return template, f"{path} (chat_template)"
    return read_text(folder, "chat_template.jinja"), str(Path(folder) / "chat_template.jinja")


def known_ids(ids: list[int | None], vocab_size: int, where: str) -> list[int]:
    """``ids`` without Nones and without ids outside [0, vocab_size), each dropped with a warning:
    llama.cpp ignores such special-token ids too, and feeding one to the model would fail in its
    embedding lookup."""
    kept = []
    for token in ids:
        if token is None:
            continue
        if 0 <= token < vocab_size:
            kept.append(token)
        else:
            warnings.warn(f"{where}: token id {token} is outside the vocabulary of {vocab_size} tokens; ignored.",
                          stacklevel=3)
    return kept


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value: Any) -> str:
    """A short description of a bad value for a one-line message."""
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return "an object"
    kind = {str: "a string", bool: "a bool", float: "a float"}.get(type(value))
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return f"{shown} ({kind})" if kind else shown
