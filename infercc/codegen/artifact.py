"""The generated-C runtime's files in a saved model folder: ``model.c`` (the generated source) and
``weights.bin`` (the packed, 64-byte-aligned weight blob), with their sha256 and sizes recorded in
manifest.json under ``"c_runtime"``.

Why load never compiles ``model.c``: a model folder is hostile input, and C read from it would run
with the user's rights. Load regenerates the source from the IR (model.onnx) and trusts the saved
blob only when the regenerated source is byte-identical to the saved ``model.c`` (the blob's layout
is then the one the source reads) and both files match their recorded hashes and sizes; then
``weights.bin`` is memory-mapped read-only (no copy, pages shared between processes). Anything else
warns and the weights are packed again in memory: same outputs, slower load. ``model.c`` is kept
for people (to read, to build by hand with PORTABLE flags), never for load to build.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelLoadError
from ..importers.paths import confined
from .emit import Program

SOURCE_FILE = "model.c"
WEIGHTS_FILE = "weights.bin"
MANIFEST_KEY = "c_runtime"
_CHUNK = 1 << 24


def _atomic_write(path: Path, chunks: Any) -> tuple[str, int]:
    """Write the byte chunks to a temporary file beside ``path``, then rename it over ``path``:
    a library of this process may have the old file memory-mapped (a model loaded from this folder
    and saved back into it), and truncating a mapped file in place would crash it."""
    digest, size = hashlib.sha256(), 0
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                digest.update(view)
                f.write(view)
                size += len(view)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest.hexdigest(), size


def write(directory: Path, source: str, weights: np.ndarray) -> dict[str, Any]:
    """Write model.c and weights.bin into ``directory``; the manifest entry that records them."""
    flat = np.ascontiguousarray(weights).reshape(-1).view(np.uint8)
    source_sha, source_size = _atomic_write(directory / SOURCE_FILE, [source.encode("utf-8")])
    weights_sha, weights_size = _atomic_write(
        directory / WEIGHTS_FILE, (flat[i:i + _CHUNK] for i in range(0, len(flat), _CHUNK)))
    return {"source": SOURCE_FILE, "source_sha256": source_sha, "source_size": source_size,
            "weights": WEIGHTS_FILE, "weights_sha256": weights_sha, "weights_size": weights_size}


def _sha256(data: np.ndarray | bytes) -> str:
    digest = hashlib.sha256()
    view = memoryview(data).cast("B")
    for i in range(0, len(view), _CHUNK):
        digest.update(view[i:i + _CHUNK])
    return digest.hexdigest()


def open_weights(directory: Path, entry: object, program: Program) -> np.ndarray | None:
    """weights.bin memory-mapped read-only when it belongs to ``program`` (a planned blob), else
    None after a warning that says why (the caller packs the weights again)."""
    try:
        return _open(Path(directory), entry, program)
    except _Mismatch as exc:
        warnings.warn(f"{directory}: {exc}; the C runtime's weights are packed again from {directory}/model.onnx "
                      "(same outputs, slower load); save the model again to refresh these files", stacklevel=4)
        return None


class _Mismatch(Exception):
    pass


def _open(directory: Path, entry: object, program: Program) -> np.ndarray | None:
    if program.blob.size == 0:
        return None  # nothing to map (a model without weights): packing costs nothing
    if not isinstance(entry, dict):
        raise _Mismatch(f"manifest.json's {MANIFEST_KEY!r} is not an object")
    fields = {}
    for key, kind in (("source_sha256", str), ("source_size", int), ("weights_sha256", str), ("weights_size", int)):
        value = entry.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _Mismatch(f"manifest.json's {MANIFEST_KEY}.{key} is missing or not a {kind.__name__}")
        fields[key] = value
    try:
        source_path = confined(directory, SOURCE_FILE)
        weights_path = confined(directory, WEIGHTS_FILE)
    except ModelLoadError as exc:
        raise _Mismatch(str(exc).split(";")[0]) from None
    expected = program.source.encode("utf-8")
    for path in (source_path, weights_path):
        if not path.is_file():
            raise _Mismatch(f"{path.name} is missing or not a regular file")
    if os.path.getsize(source_path) != len(expected) or fields["source_size"] != len(expected):
        raise _Mismatch(f"{SOURCE_FILE} is not the source this infercc generates for model.onnx (its size differs: "
                        "another infercc version, other custom kernels, or an edited file)")
    saved = source_path.read_bytes()
    if saved != expected or _sha256(saved) != fields["source_sha256"]:
        raise _Mismatch(f"{SOURCE_FILE} is not the source this infercc generates for model.onnx (another infercc "
                        "version, other custom kernels, or an edited file)")
    size = os.path.getsize(weights_path)
    if size != program.blob.size or fields["weights_size"] != program.blob.size:
        raise _Mismatch(f"{WEIGHTS_FILE} holds {size} bytes (manifest: {fields['weights_size']}) but the weight "
                        f"layout of {SOURCE_FILE} needs {program.blob.size}")
    mapped = np.memmap(weights_path, dtype=np.uint8, mode="r", shape=(size,))
    if _sha256(mapped) != fields["weights_sha256"]:
        del mapped
        raise _Mismatch(f"{WEIGHTS_FILE} does not match the sha256 recorded in manifest.json (changed or damaged)")
    return mapped
