"""Run directories owned by one process: created exclusively, locked while in use, replaced only
by a run that already has its first checkpoint.

A run directory holds a marker file, ``.elbo-lab-run``. The process that trains or resumes the
run holds an exclusive ``flock`` on the directory, so a second process is refused at once (and
the kernel drops the lock when the holder dies, even by SIGKILL). ``--force`` writes
the new run into a sibling temporary directory and renames it over the old one only after the
new run's first checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import RunError
from .io import clean_temporary_files

__all__ = ["MARKER", "RunDirectory", "is_run_directory", "refuse_to_replace"]

#: The marker and lock file of an elbo-lab run directory.
MARKER = ".elbo-lab-run"


def is_run_directory(path: Path) -> bool:
    """Whether ``path`` is a directory elbo-lab wrote (its marker, a run's config.json, or a
    comparison's comparison.json)."""
    if (path / MARKER).is_file() or (path / "comparison.json").is_file():
        return True
    try:
        return "train" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _lock(directory: Path, *, mark: bool = False, option: str | None = None) -> int:
    """Take the exclusive lock of ``directory`` (a ``flock`` on the directory itself, which
    follows it through a rename); with ``mark`` also write its marker. Returns the fd; a
    directory in use is a RunError about the parameter ``option``."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunError(f"{directory}: in use by another elbo-lab process", option=option) from None
    if mark:
        try:
            (directory / MARKER).write_text('{"format": "elbo-lab/run"}\n')
        except BaseException:
            os.close(fd)
            raise
    return fd


def refuse_to_replace(path: Path, option: str, ours: Callable[[Path], bool] = is_run_directory):
    """Raise unless ``path`` is a directory ``--force`` may replace: not ., .., /, home, the
    working directory or one above it, a symbolic link, or a non-empty directory that ``ours``
    does not recognize as elbo-lab's."""
    if path.is_symlink():
        raise RunError(f"{path} is a symbolic link; refusing to replace it", option=option)
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if str(path) in ("", ".", "..") or resolved in (Path("/"), Path.home().resolve()):
        raise RunError(f"refusing to replace {str(path) or '.'!r}", option=option)
    if cwd == resolved or cwd.is_relative_to(resolved):
        raise RunError(
            f"{path} contains the working directory; refusing to replace it", option=option
        )
    if not path.is_dir():
        raise RunError(f"{path} is not a directory; refusing to replace it", option=option)
    if any(path.iterdir()) and not ours(path):
        raise RunError(
            f"{path} is not an elbo-lab run directory; refusing to replace it", option=option
        )


class RunDirectory:
    """The run directory this process owns, from :meth:`create` or :meth:`open` to :meth:`close`.

    ``path`` is where the run is written now: the final directory, or with ``--force`` a sibling
    temporary one until :meth:`publish` renames it into place.
    """

    def __init__(self, final: Path, path: Path, fd: int, *, created: list[Path], old_fd=None):
        self.final, self.path, self._fd, self._created, self._old_fd = (
            final,
            path,
            fd,
            created,
            old_fd,
        )

    @classmethod
    def create(cls, run_dir: Path, *, force: bool = False, option: str = "run_dir"):
        """Own a new run directory: create it exclusively, reuse one of ours that never got a
        checkpoint, or (``force``) prepare to replace an existing run."""
        if run_dir.is_symlink():
            raise RunError(
                f"{run_dir} is a symbolic link; name the directory itself", option=option
            )
        parent = run_dir.absolute().parent
        created = [p for p in (parent, *parent.parents) if not p.exists()]
        parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(run_dir)
            created.insert(0, run_dir)
        except FileExistsError:
            return cls._existing(run_dir, force=force, option=option)
        try:
            fd = _lock(run_dir, option=option, mark=True)
        except BaseException:
            cls._remove_created(created)
            raise
        return cls(run_dir, run_dir, fd, created=created)

    @classmethod
    def _existing(cls, run_dir: Path, *, force: bool, option: str):
        if not force:
            if run_dir.is_dir() and (run_dir / MARKER).is_file():
                fd = _lock(run_dir, option=option)
                if not (run_dir / "checkpoint.pt").exists():  # a run killed before its start
                    clean_temporary_files(run_dir)
                    return cls(run_dir, run_dir, fd, created=[])
                os.close(fd)
            raise RunError(
                f"{run_dir} exists (use force=True to replace it, resume=True to continue it)",
                option=option,
            )
        refuse_to_replace(run_dir, option)
        old_fd = _lock(run_dir, option=option) if is_run_directory(run_dir) else None
        try:
            _clean_stale_siblings(run_dir)
            tmp = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}.new-"))
            fd = _lock(tmp, option=option, mark=True)
        except BaseException:
            if old_fd is not None:
                os.close(old_fd)
            raise
        return cls(run_dir, tmp, fd, created=[tmp], old_fd=old_fd)

    @classmethod
    def open(cls, run_dir: Path, *, option: str = "run_dir"):
        """Own an existing run directory to resume it; clean temporary files of killed writes."""
        if run_dir.is_symlink():
            raise RunError(
                f"{run_dir} is a symbolic link; name the directory itself", option=option
            )
        if not run_dir.is_dir():
            raise RunError(f"{run_dir / 'checkpoint.pt'}: no checkpoint (no such run directory)")
        if not (run_dir / MARKER).is_file() and not (run_dir / "checkpoint.pt").is_file():
            raise RunError(
                f"{run_dir / 'checkpoint.pt'}: no checkpoint (is this an elbo-lab run directory?)"
            )
        fd = _lock(run_dir, option=option)
        clean_temporary_files(run_dir)
        return cls(run_dir, run_dir, fd, created=[])

    def publish(self) -> Path:
        """Put the run at its final path (after its first checkpoint); return that path."""
        if self.path == self.final:
            return self.final
        aside = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".{self.final.name}.old-"))
        os.rename(self.final, aside / "run")
        os.rename(self.path, self.final)
        self.path, self._created = self.final, []
        shutil.rmtree(aside)  # the replaced run: checked by refuse_to_replace, locked by us
        if self._old_fd is not None:
            os.close(self._old_fd)
            self._old_fd = None
        return self.final

    def close(self, *, keep: bool = True) -> None:
        """Release the lock; without ``keep``, remove what :meth:`create` made if the run never
        wrote its first checkpoint (an error before training: nothing is left behind)."""
        if not keep and not (self.path / "checkpoint.pt").exists():
            self._remove_created(self._created)
        for fd in (self._fd, self._old_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._old_fd = None

    @staticmethod
    def _remove_created(created: list[Path]) -> None:
        """Remove the directories this process created (a run's, then empty parents)."""
        for i, p in enumerate(created):
            if i == 0 and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    p.rmdir()
                except OSError:
                    break


def _clean_stale_siblings(run_dir: Path) -> None:
    """Remove the temporary siblings of a killed ``--force`` (``.<name>.new-*``/``.old-*``) whose
    lock is free; only while the run itself exists, so nothing unpublished is lost."""
    if not run_dir.is_dir():
        return
    for p in run_dir.parent.glob(f".{run_dir.name}.new-*"):
        if p.is_dir() and not p.is_symlink() and not (p / "checkpoint.pt").exists():
            try:
                fd = _lock(p)
            except (RunError, OSError):
                continue
            shutil.rmtree(p, ignore_errors=True)
            os.close(fd)
    for p in run_dir.parent.glob(f".{run_dir.name}.old-*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
