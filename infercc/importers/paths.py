"""Every file an importer (or the tokenizer loader) opens inside a model folder goes through
``confined``: the name is joined to the folder, symbolic links are resolved, and the result must
still lie inside the folder. A checkpoint is downloaded data; without this a shard index naming
``../../.ssh/id_rsa.safetensors`` or a ``config.json`` linked to ``/etc/...`` would make infercc read
files the user never pointed it at (ONNX Runtime applies the same rule to external data).

One layout is allowed to leave the folder: the Hugging Face hub cache, where
``models--org--name/snapshots/<revision>/config.json`` links to ``models--org--name/blobs/<hash>``.
A link may point into that repository's own ``blobs`` folder (flat files, the folder itself not a
link), nowhere else, so ``snapshot_download`` folders keep working.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError


def confined(folder: str | os.PathLike, name: str | os.PathLike) -> Path:
    """``folder / name`` with links resolved, or a ModelLoadError when ``name`` is absolute, or it
    (or a linked folder on its way) leads outside ``folder``. The file need not exist: callers
    test ``is_file()`` on the returned path, so a dangling link inside the folder reads as absent."""
    root = Path(folder).resolve()
    if not isinstance(name, (str, os.PathLike)) or not os.fspath(name):
        raise ModelLoadError(f"{folder}: file name {name!r} is not a file name; fix the file that lists it.")
    if Path(name).is_absolute():
        raise ModelLoadError(
            f"{Path(folder) / name}: an absolute path is named where a file inside the model folder {root} is "
            "expected; infercc only reads files inside the model folder: list the file by its name in the folder."
        )
    target = (root / name).resolve()
    if target.is_relative_to(root) or _in_hub_blobs(root, target):
        return target
    raise ModelLoadError(
        f"{Path(folder) / name} points to {target}, outside the model folder {root}; infercc only reads files "
        "inside the model folder (symbolic links and '..' are resolved first): copy the file into the folder "
        "instead of linking to it or naming it with '..'."
    )


def _in_hub_blobs(root: Path, target: Path) -> bool:
    """Whether ``root`` is a hub-cache snapshot and ``target`` a file of its repository's blobs."""
    repo = root.parent.parent
    if root.parent.name != "snapshots" or not repo.name.startswith(("models--", "datasets--")):
        return False
    blobs = repo / "blobs"
    return not blobs.is_symlink() and target.parent == blobs


def read_text(folder: str | os.PathLike, name: str) -> str | None:
    """The UTF-8 text of ``folder/name`` (confined), or None when there is no such file."""
    path = confined(folder, name)
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{Path(folder) / name} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                             "re-download it.") from None
    except OSError as exc:
        raise ModelLoadError(f"{Path(folder) / name} cannot be read ({exc.strerror}); check its permissions.") from None


def read_json_object(folder: str | os.PathLike, name: str, missing_ok: bool = False) -> dict[str, Any]:
    """``folder/name`` (confined) parsed as a JSON object; ``{}`` when absent and ``missing_ok``.
    Anything but an object (a list, a number, invalid JSON) is a ModelLoadError."""
    text = read_text(folder, name)
    path = Path(folder) / name
    if text is None:
        if missing_ok:
            return {}
        raise ModelLoadError(f"{path}: no such file; a Hugging Face checkpoint folder needs it.")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser's stack
        raise ModelLoadError(f"{path} is not valid JSON ({exc}); re-download the checkpoint.") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(value).__name__}, not an object ({{...}}); "
                             "re-download or re-save the checkpoint.")
    return value
