"""What the machine offers a command (cores, memory, a writable run directory) and how many torch
threads a command uses."""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from . import choices
from .errors import OptionError

log = logging.getLogger(__name__)

__all__ = [
    "available_cores",
    "available_memory",
    "idle_cores",
    "check_writable",
    "default_threads",
    "phase_threads",
    "step_threads",
    "stored_spec",
    "use_threads",
]


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


#: Where Linux says how many tasks are runnable this instant (the fourth field, "R/T").
LOADAVG = "/proc/loadavg"


def idle_cores(path: str = LOADAVG) -> int | None:
    """The cores this process may run on that nothing else is running on this instant: the
    available cores (:func:`available_cores`) less the tasks runnable now, this process
    included (Linux's ``/proc/loadavg``); None where that is unknown. One reading: a task that
    runs in bursts may be missed, a process that keeps a core busy is not."""
    try:
        with open(path) as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(available_cores() - running, 0)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_threads(spec: dict, rows: int) -> int:
    """torch threads for passes over ``rows`` rows of the model ``spec`` (its name and sizes,
    :class:`inference.run.ModelSpec` fields): one per
    :data:`~inference.threads.MIN_FLOPS_PER_THREAD` of one forward pass, up to the cores, and
    more than one only where a probe confirms they are faster now
    (:func:`~inference.threads.confirmed_threads`). The probe follows the machine's load, so it
    runs only where the count cannot change the numbers (:func:`count_keeps_numbers`);
    elsewhere (float64, pPCA, FA, passes of 32,768 rows or more) the rule's count stands."""
    from .threads import (
        confirmed_threads,
        forward_flops,
        largest_layer,
        threads_for,
        weights_per_row,
    )

    sizes = _sizes(spec)
    proposed = threads_for(forward_flops(weights_per_row(*sizes), rows), available_cores())
    if proposed > 1 and not count_keeps_numbers(spec, rows):
        # the rule alone: a count that followed the load would carry it into the numbers
        return proposed
    threads = confirmed_threads(proposed, rows, largest_layer(*sizes))
    if threads != proposed:
        log.info("threads: 1, not %d: a probe found %d no faster now", proposed, proposed)
    return threads


def _sizes(spec: dict) -> tuple[str, int, int, tuple[int, ...]]:
    """The model's name and sizes in ``spec``, as :mod:`inference.threads` counts them."""
    return (
        str(spec.get("model", choices.MODEL)),
        int(spec.get("data_dim") or 1),
        int(spec.get("latent_dim", choices.LATENT_DIM)),
        tuple(spec.get("hidden_dims", choices.HIDDEN_DIMS)),
    )


def _count_is_ours(args, spec: dict) -> bool:
    """Whether the thread count is ours to choose: not given by ``--threads``, and torch's CPU
    threads do the work (``spec``'s ``device``)."""
    return getattr(args, "threads", None) is None and spec.get("device", "cpu") == "cpu"


def phase_threads(args, spec: dict, rows: int) -> Callable[[], int] | None:
    """What a phase other than the training steps (an evaluation, L_K's chunks) asks for its
    threads when it starts: :func:`default_threads` for chunks of ``rows`` rows, probed then.
    None (it keeps the training's count) with ``--threads``, off the CPU (``spec``'s
    ``device``), or for a user model, whose work per row the rule cannot count."""
    from .user_model import is_user_model

    if not _count_is_ours(args, spec):
        return None
    if is_user_model(str(spec.get("model", choices.MODEL))):
        return None
    return functools.partial(default_threads, spec, rows)


def step_threads(args, spec: dict, rows: int):
    """A :class:`~inference.threads.StepThreads` for training steps of ``rows`` rows of the
    model ``spec`` where one forward pass has work for more than one thread
    (:func:`~inference.threads.threads_for_steps`); None (torch's count as it is set) with
    ``--threads``, off the CPU, for a step too small to share, or where the count could change
    the numbers (:func:`count_keeps_numbers`: the count follows the machine's load, and the
    numbers must not)."""
    from .threads import StepThreads, forward_flops, threads_for_steps, weights_per_row

    if not _count_is_ours(args, spec):
        return None
    if not count_keeps_numbers(spec, rows):
        return None
    sizes = _sizes(spec)
    flops = forward_flops(weights_per_row(*sizes), rows)
    threads = threads_for_steps(flops, available_cores())
    return StepThreads(threads) if threads > 1 else None


def count_keeps_numbers(spec: dict, rows: int) -> bool:
    """Whether passes over ``rows`` rows of the model ``spec`` compute the same bits with any
    torch thread count, so that a count chosen by the machine's load (a probe, a trial of
    steps) cannot reach the numbers: the built-in VAE (the model tested for it), in float32
    (torch's float64 products change in the last bits with the count even in MKL's strict
    mode: 784-200-10 at batch 128, torch 2.13's MKL 2024.2), over fewer than
    :data:`~inference.threads.SPLIT_SUM_ELEMENTS` rows (from there torch splits a sum over the
    rows between threads), with torch's MKL in strict reproducible mode
    (:func:`_mkl_strict`)."""
    import torch

    from .threads import SPLIT_SUM_ELEMENTS

    if rows >= SPLIT_SUM_ELEMENTS or _sizes(spec)[0] != "vae":
        return False
    if spec.get("dtype", "float32") != "float32":
        return False
    return _mkl_strict(os.environ.get("MKL_CBWR", "")) and torch.backends.mkl.is_available()


def _mkl_strict(cbwr: str) -> bool:
    """Whether ``MKL_CBWR`` (``[BRANCH=]<branch>[,STRICT]``) asks for MKL's strict reproducible
    mode on a branch that has it (AUTO, AVX2, AVX-512: Intel's "Reproducibility Conditions");
    elsewhere MKL runs non-strict, whose products may change with the thread count (784-200-10
    at ``COMPATIBLE,STRICT``: they did)."""
    branch, *flags = cbwr.upper().replace(" ", "").removeprefix("BRANCH=").split(",")
    return "STRICT" in flags and (branch == "AUTO" or branch.startswith(("AVX2", "AVX512")))


def use_threads(args, spec: dict, rows: int) -> int:
    """Unless ``--threads`` was given, set torch's threads to :func:`default_threads` for steps
    or chunks of ``rows`` rows; returns the count torch runs."""
    import torch

    if getattr(args, "threads", None) is None:
        torch.set_num_threads(default_threads(spec, rows))
    return torch.get_num_threads()


def stored_spec(run_dir: Path) -> dict:
    """A run's model sizes from its config.json, without loading it ({} if unreadable)."""
    try:
        return json.loads((run_dir / "config.json").read_text())["metadata"]["model_spec"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def check_writable(run_dir: Path) -> None:
    """Refuse early, before any work, an output directory that cannot be written."""
    parent = next((p for p in (run_dir, *run_dir.parents) if p.exists()), Path("."))
    if not parent.is_dir():
        raise OptionError(f"--run-dir: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OptionError(f"--run-dir: {parent} is not writable")
