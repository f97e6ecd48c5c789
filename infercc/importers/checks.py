"""Hyper-parameters against each other and against the tensors a checkpoint actually holds,
checked from tensor headers before any weight is read or any graph constant is built.

A file's counts are only trusted once the weights confirm them: a GGUF claiming an
``embedding_length`` of 4e9 with 64-wide tensors would otherwise make the graph builder compute a
2e9-entry rotary table, and a ``block_count`` of 1e9 would loop a billion times. Real models of
any size pass, because their metadata and tensors agree; no fixed caps are involved.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from ..errors import ModelLoadError

#: expected shape and the hyper-parameters (spec field names) that determine it, by tensor name.
Expected = Mapping[str, tuple[tuple[int, ...], tuple[str, ...]]]
_FIX = "the metadata does not match the weights (the file is damaged, edited or mis-converted): re-convert or re-download it."


def layer_indices(names: Iterable[str], prefix: str) -> set[int]:
    """Layer numbers N of tensor names ``<prefix>N.<rest>`` (``blk.``, ``model.layers.``, ``h.``)."""
    found: set[int] = set()
    for name in names:
        if name.startswith(prefix):
            number = name[len(prefix):].split(".", 1)[0]
            if number.isdigit():
                found.add(int(number))
    return found


def check_layer_count(declared: int, present: set[int], source: str, key: str, prefix: str) -> None:
    """The tensors must hold layers 0..declared-1, no fewer and no more (what llama.cpp requires)."""
    expected = set(range(declared)) if declared <= len(present) + 1 else None
    if expected == present:
        return
    have = f"layers {min(present)}..{max(present)}" if present else "no layer tensors"
    missing = next((i for i in range(declared) if i not in present), None)
    if missing is not None:
        raise ModelLoadError(
            f"{source}: {key} is {declared} but the checkpoint has no tensor '{prefix}{missing}.*' (it has {have}, "
            f"{len(present)} in all); {_FIX}")
    extra = min(i for i in present if i >= declared)
    raise ModelLoadError(
        f"{source}: {key} is {declared} but the checkpoint also has tensors '{prefix}{extra}.*' ({have}); "
        f"set {key} to the number of layers present or {_FIX}")


def check_shapes(expected: Expected, shapes: Mapping[str, tuple[int, ...]], source: str,
                 values: Mapping[str, int], keys: Mapping[str, str],
                 tensor_name: Callable[[str], str] = lambda name: name) -> None:
    """Every expected tensor is present with its shape. ``values``/``keys`` give each spec field's
    value and its name in the file, so a message says which metadata disagrees with which tensor;
    ``tensor_name`` turns our (HF) names into the file's."""
    for name, (shape, fields) in expected.items():
        actual = shapes.get(name)
        if actual is None:
            raise ModelLoadError(f"{source}: checkpoint has no tensor {tensor_name(name)!r}; the file is incomplete "
                                 "or not a model of this architecture: re-convert or re-download it.")
        if tuple(actual) != shape:
            said = ", ".join(f"{keys.get(f, f)}={values[f]}" for f in fields)
            raise ModelLoadError(f"{source}: tensor {tensor_name(name)!r} has shape {list(actual)} but the metadata "
                                 f"({said}) says {list(shape)}; {_FIX}")


def check_optional(name: str, shape: tuple[int, ...], shapes: Mapping[str, tuple[int, ...]], source: str,
                   tensor_name: Callable[[str], str] = lambda name: name) -> None:
    """A tensor the model may have (a bias): when present, its shape must be ``shape``."""
    actual = shapes.get(name)
    if actual is not None and tuple(actual) != shape:
        raise ModelLoadError(f"{source}: tensor {tensor_name(name)!r} has shape {list(actual)}, expected "
                             f"{list(shape)} from the model's other weights; {_FIX}")


def require(condition: bool, source: str, problem: str) -> None:
    """A ModelLoadError saying ``problem`` (which names the fields) unless ``condition``."""
    if not condition:
        raise ModelLoadError(f"{source}: {problem}; {_FIX}")
