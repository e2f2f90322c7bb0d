"""Python's cyclic collector kept off what large imports create: :func:`paused`.

The collector's full passes go over every object tracked, and they come more often as the
heap grows: an import of thousands of modules pays for passes over its own objects, again and
again, while it runs. ``torch._dynamo``, which ``torch.optim``'s optimizers import when they
are first constructed, took 0.81 s beside 0.54 s with the collector paused, and the first
:func:`torch.export.export` in a process (which imports its tracer) 0.46 s beside 0.34 s
(BENCHMARKS.md, "Whole runs", ninth stop). In a process that runs one command and ends
(:func:`inference.cli.run`, which calls :func:`freeze_what_pauses_create`), what a paused
stretch created is then frozen (:func:`gc.freeze`: later passes skip it), as the library's
own load is, where the stretch imported modules: the freeze takes every object tracked, and
the run's own (its data, a guide's parameters and graphs, the cycles not yet collected) would
never be freed. A pause that imported nothing (a later optimizer, every later export) freezes
nothing: with a freeze at each, ``compare`` (three guides, 12000 x 784 rows) kept every
finished guide's objects, 1.4-1.7 GB resident at its end and 2.3-2.5 GB at its peak, beside
0.9-1.1 GB and 2.0-2.1 GB. Elsewhere (a user's process) the collector goes over
it once, at its next pass. Torch-free: :mod:`inference.figure_worker` uses it too.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["freeze_what_pauses_create", "paused"]

_freeze = False


def freeze_what_pauses_create() -> None:
    """This process runs one command and ends: :func:`paused` freezes what it created."""
    global _freeze
    _freeze = True


@contextmanager
def paused() -> Iterator[None]:
    """Pause the cyclic collector (where it runs) for the body; then, in a program
    (:func:`freeze_what_pauses_create`) and where the body imported modules, freeze every
    object tracked so far."""
    if not gc.isenabled():  # paused already (an outer pause, or the user's choice)
        yield
        return
    modules = len(sys.modules)
    gc.disable()
    try:
        yield
    finally:
        if _freeze and len(sys.modules) > modules:
            gc.freeze()
        gc.enable()
