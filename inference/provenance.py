"""Where a run's model and data came from: absolute paths, sizes and SHA-256 hashes.

Recorded in the checkpoint at training time and checked before a run directory is used again
(``--resume``, ``evaluate``, ``explain``): an edited model file or rewritten data is refused, or
used with a loud warning when the user says so (``--allow-changed``). The model's file is never
imported unless its hash is the recorded one (or the user allowed the change).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import RunError

__all__ = ["absolute_data_spec", "data_fingerprint", "file_fingerprint", "verify_fingerprint"]

#: The file names an MNIST directory is read from (:func:`inference.data.load_mnist`).
MNIST_STEMS = ("train-images", "train-labels", "t10k-images", "t10k-labels")


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """``{"path": absolute, "size": bytes, "sha256": hex}`` of one file."""
    path = Path(path).resolve()
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"path": str(path), "size": size, "sha256": h.hexdigest()}


def absolute_data_spec(spec: str) -> str:
    """``spec`` with its file or directory made absolute (``digits`` stays as it is)."""
    if spec == "digits":
        return spec
    if spec.startswith("mnist:"):
        return "mnist:" + str(Path(spec.removeprefix("mnist:")).resolve())
    function = _data_function(spec)
    if function is not None:  # FILE.py:NAME, a function returning the model's arguments
        source, name = function
        return f"{Path(source).resolve()}:{name}" if source.endswith(".py") else spec
    return str(Path(spec).resolve())


def _data_function(spec: str) -> tuple[str, str] | None:
    """(source, NAME) of a ``FILE.py:NAME`` / ``package.module:NAME`` data spec, else None."""
    if spec.startswith("mnist:") or Path(spec).exists():
        return None
    source, sep, name = spec.rpartition(":")
    return (source, name) if sep and source and name.isidentifier() else None


def data_fingerprint(spec: str) -> dict[str, Any] | None:
    """Size and SHA-256 of the data a spec names: the file, or an MNIST directory's IDX files
    (combined); None for the embedded digits."""
    if spec == "digits":
        return None
    function = _data_function(spec)
    if function is not None:  # the data function's file (a module's code is not hashed)
        source = Path(function[0])
        return file_fingerprint(source.resolve()) if source.is_file() else None
    path = Path(spec.removeprefix("mnist:")).resolve()
    if path.is_file():
        return file_fingerprint(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.startswith(MNIST_STEMS))
    h = hashlib.sha256()
    size = 0
    for p in files:
        fp = file_fingerprint(p)
        h.update(f"{p.name}:{fp['sha256']}\n".encode())
        size += fp["size"]
    return {"path": str(path), "size": size, "sha256": h.hexdigest()}


def verify_fingerprint(
    what: str, recorded: Mapping[str, Any] | None, current: Mapping[str, Any] | None
) -> str | None:
    """None if ``current`` matches ``recorded``, else a one-line description of the change."""
    if recorded is None:
        return None
    if current is None:
        return f"{what} {recorded.get('path')}: no such file (it was there at training time)"
    if (current["size"], current["sha256"]) != (recorded.get("size"), recorded.get("sha256")):
        return (
            f"{what} {recorded.get('path')} changed since training (size {recorded.get('size')} "
            f"-> {current['size']}, sha256 {str(recorded.get('sha256'))[:12]} -> "
            f"{current['sha256'][:12]})"
        )
    return None


def check_absolute(what: str, path: str, source: str) -> Path:
    """``path`` as recorded in a checkpoint, which must be absolute (never relative to cwd)."""
    p = Path(path)
    if not p.is_absolute():
        raise RunError(
            f"{source}: the recorded {what} {path!r} is not an absolute path; "
            "refusing to resolve it against the working directory"
        )
    return p
