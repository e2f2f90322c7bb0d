"""Atomic file writes: a file is whole or absent, never half-written. Without torch, so that
the figure worker (:mod:`inference.figure_worker`), which draws and writes a run's figures in a
process of its own, need not load it; :mod:`inference.io` re-exports these."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["TMP_SUFFIX", "atomic_write_bytes", "atomic_write_text", "clean_temporary_files"]

TMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``.

    The temporary file is ``.<name>.<random>.tmp``; one left by a killed process is removed by
    :func:`clean_temporary_files` at the next start.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; give the usual mode of a new file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def clean_temporary_files(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of interrupted atomic writes (``.<name>.<random>.tmp``)."""
    removed = []
    for p in Path(directory).glob(f".*{TMP_SUFFIX}"):
        if p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())
