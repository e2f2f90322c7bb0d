"""Atomic file writes, appended metrics and checksummed checkpoints: a run directory is never
left half-written, and what it holds is verified when it is read back. The random state a
checkpoint carries (torch, NumPy and Python) is captured and restored here too, and so are the
parameters it holds (:func:`copy_params`)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

from .errors import RunError
from .files import TMP_SUFFIX, atomic_write_bytes, atomic_write_text, clean_temporary_files

__all__ = [
    "CHECKPOINT",
    "CHECKPOINT_FORMAT",
    "MetricsLog",
    "TMP_SUFFIX",
    "atomic_write_bytes",
    "atomic_write_text",
    "checksum",
    "clean_temporary_files",
    "copy_params",
    "get_rng_state",
    "load_checkpoint",
    "save_checkpoint",
    "seeded",
    "set_rng_state",
    "write_csv",
    "write_json",
    "write_jsonl",
]

CHECKPOINT = "checkpoint.pt"  # a run directory's checkpoint file
CHECKPOINT_FORMAT = "elbo-lab/checkpoint"
CHECKPOINT_VERSION = 2  # 2: SHA-256 of the contents; history lives in metrics.jsonl

#: What every checkpoint holds, and the type each entry must have.
CHECKPOINT_KEYS = {
    "config": dict,
    "metadata": dict,
    "param_names": list,
    "params": dict,
    "optimizer": dict,
    "rng": dict,
    "position": dict,
    "metrics": dict,
    "sha256": str,
}


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(dict(r)) + "\n" for r in rows))


def write_csv(path: str | os.PathLike, rows: list[Mapping[str, Any]]) -> None:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


class MetricsLog:
    """Per-epoch rows appended to ``metrics.jsonl`` and ``metrics.csv``: O(rows) I/O per epoch.

    Rows are appended *before* the checkpoint that covers them, and the checkpoint records the
    files' lengths (:meth:`offsets`). After a kill the files may hold rows of epochs after the
    checkpoint (or half a row); :meth:`truncate` cuts them back to the checkpoint's lengths
    before a resumed run appends again, so the files and the checkpoint describe the same step.
    """

    JSONL, CSV = "metrics.jsonl", "metrics.csv"

    def __init__(self, run_dir: str | os.PathLike, columns: tuple[str, ...]):
        self.run_dir, self.columns = Path(run_dir), columns

    def reset(self) -> None:
        """Start both files afresh (a new run): an empty jsonl, a csv with its header."""
        atomic_write_text(self.run_dir / self.JSONL, "")
        atomic_write_text(self.run_dir / self.CSV, ",".join(self.columns) + "\n")

    def append(self, rows: list[Mapping[str, Any]]) -> None:
        if not rows:
            return
        jsonl = "".join(json.dumps(dict(r)) + "\n" for r in rows)
        buf = io.StringIO()
        writer = csv.DictWriter(
            buf, fieldnames=list(self.columns), lineterminator="\n", extrasaction="ignore"
        )
        writer.writerows({k: r.get(k, "") for k in self.columns} for r in rows)
        for name, text in ((self.JSONL, jsonl), (self.CSV, buf.getvalue())):
            with open(self.run_dir / name, "ab") as f:
                f.write(text.encode())

    def read(self, offsets: Mapping[str, int]) -> list[dict[str, Any]]:
        """The jsonl rows up to a checkpoint's ``offsets``, without changing the files."""
        with open(self.run_dir / self.JSONL, "rb") as f:
            text = f.read(offsets[self.JSONL]).decode()
        return [json.loads(line) for line in text.splitlines()]

    def offsets(self) -> dict[str, int]:
        """The files' current lengths in bytes, to be stored in the checkpoint."""
        return {name: (self.run_dir / name).stat().st_size for name in (self.JSONL, self.CSV)}

    def truncate(self, offsets: Mapping[str, int]) -> list[dict[str, Any]]:
        """Cut both files back to ``offsets`` (a checkpoint's) and return the jsonl rows kept.

        Raises:
            RunError: a file is missing or shorter than the checkpoint says it was.
        """
        for name in (self.JSONL, self.CSV):
            path = self.run_dir / name
            size = path.stat().st_size if path.is_file() else -1
            if size < offsets[name]:
                raise RunError(
                    f"{path}: holds {max(size, 0)} bytes but its checkpoint recorded "
                    f"{offsets[name]}; the metrics were lost or rewritten"
                )
            if size > offsets[name]:
                os.truncate(path, offsets[name])
        text = (self.run_dir / self.JSONL).read_text()
        return [json.loads(line) for line in text.splitlines()]


def checksum(state: Mapping[str, Any]) -> str:
    """SHA-256 of a checkpoint's contents: every tensor's dtype, shape and bytes, every other
    value's ``repr``, walked in a fixed order (the ``sha256`` entry itself excluded)."""
    h = hashlib.sha256()

    def walk(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(v.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(v, Mapping):
            h.update(b"{")
            for k in sorted(v, key=repr):
                if k != "sha256":
                    h.update(repr(k).encode())
                    walk(v[k])
            h.update(b"}")
        elif isinstance(v, list | tuple):
            h.update(b"[")
            for item in v:
                walk(item)
            h.update(b"]")
        else:
            h.update(repr(v).encode())

    walk(state)
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Serialize ``state`` with torch.save, with its :func:`checksum`, atomically."""
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    state["sha256"] = checksum(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read an elbo-lab checkpoint, verify its checksum and contents, or raise :class:`RunError`
    naming the file and the problem (missing, foreign, truncated, corrupt, incomplete, NaN)."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path}: no checkpoint (is this an elbo-lab run directory?)")
    if path.is_dir():
        raise RunError(f"{path}: is a directory, expected a checkpoint file")
    raw = path.read_bytes()  # an OSError here (EACCES, EIO) is about the file, reported as such
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise RunError(f"{path}: unreadable or truncated checkpoint ({msg[:120]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path}: not an elbo-lab checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise RunError(
            f"{path}: checkpoint version {state.get('version')} is not supported "
            f"(this elbo-lab reads version {CHECKPOINT_VERSION}; train the run again)"
        )
    for key, kind in CHECKPOINT_KEYS.items():
        if not isinstance(state.get(key), kind):
            raise RunError(f"{path}: incomplete checkpoint (no valid {key!r} entry)")
    if checksum(state) != state["sha256"]:
        raise RunError(f"{path}: checksum mismatch; the file is corrupt or was edited")
    _check_contents(path, state)
    return state


def _check_contents(path: Path, state: Mapping[str, Any]) -> None:
    names, params = state["param_names"], state["params"]
    for name in names:
        p = params.get(name)
        if not isinstance(p, torch.Tensor):
            raise RunError(f"{path}: incomplete checkpoint (parameter {name!r} is missing)")
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise RunError(f"{path}: parameter {name!r} holds NaN or Inf values")
    position = state["position"]
    for key in ("epoch", "step"):
        if not isinstance(position.get(key), int) or position[key] < 0:
            raise RunError(f"{path}: incomplete checkpoint (no valid position {key!r})")
    if not isinstance(position.get("loss_sum"), float | int) or not math.isfinite(
        position["loss_sum"]
    ):
        raise RunError(f"{path}: incomplete checkpoint (no valid position 'loss_sum')")
    offsets = state["metrics"]
    if not all(isinstance(offsets.get(k), int) for k in (MetricsLog.JSONL, MetricsLog.CSV)):
        raise RunError(f"{path}: incomplete checkpoint (no valid metrics lengths)")


def copy_params(
    names: list[str], params: list[torch.Tensor], state: Mapping[str, Any], source: Any
) -> None:
    """Overwrite ``params`` (named ``names``, in that order) in place with a checkpoint's.

    Raises:
        RunError: naming ``source``, when the names or a shape differ from the checkpoint's;
            then no parameter has been changed.
    """
    if state["param_names"] != names:
        raise RunError(f"{source}: its parameters do not match this model and guide")
    for name, p in zip(names, params, strict=True):
        saved = state["params"][name]
        if saved.shape != p.shape:
            raise RunError(
                f"{source}: parameter {name!r} has shape {tuple(saved.shape)}, "
                f"this model has {tuple(p.shape)}"
            )
    with torch.no_grad():
        for name, p in zip(names, params, strict=True):
            p.copy_(state["params"][name].to(p))


# --- random state --------------------------------------------------------------------------------


def get_rng_state() -> dict[str, Any]:
    """torch, numpy and Python RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (global state)
    return {
        "torch": torch.get_rng_state(),
        "numpy": [
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "python": random.getstate(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`get_rng_state` captured (e.g. from a checkpoint)."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    legacy = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    np.random.set_state(legacy)  # noqa: NPY002 (global state)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under ``pyro.set_rng_seed(seed)`` and restore the caller's RNG state after."""
    state = get_rng_state()
    pyro.set_rng_seed(seed)
    try:
        yield
    finally:
        set_rng_state(state)
