"""The user's own Pyro model, named on the command line as ``FILE.py:NAME`` or ``package.module:NAME``.

The model is a Pyro function ``model(x)`` of the data tensor ``x`` ``(N, D)`` (optionally with a
``num_data`` keyword for mini-batches); elbo-lab pairs it with an autoguide chosen by name.
Loading runs the user's file, so it is done only when the user asks for it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import OptionError

__all__ = ["is_user_model", "load_user_model"]


def is_user_model(spec: str) -> bool:
    """Whether ``spec`` names a user model (``FILE.py:NAME`` / ``module:NAME``), not a built-in."""
    return ":" in spec


def load_user_model(spec: str) -> Callable:
    """The callable ``NAME`` from ``FILE.py:NAME`` or ``package.module:NAME``.

    Raises:
        OptionError: malformed spec, missing file or module, import failure, missing or
            non-callable attribute (one line naming the spec).
    """
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name.isidentifier():
        raise OptionError(f"--model: expected FILE.py:NAME or package.module:NAME, got {spec!r}")
    if source.endswith(".py") or "/" in source or "\\" in source:
        path = Path(source)
        if not path.is_file():
            raise OptionError(f"--model: {path}: no such file")
        module_name = f"elbo_lab_user_{path.stem}_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise OptionError(f"--model: {path}: cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise OptionError(
                f"--model: {path}: failed to import ({type(exc).__name__}: {exc})"
            ) from None
    else:
        try:
            module = importlib.import_module(source)
        except Exception as exc:
            raise OptionError(
                f"--model: cannot import {source!r} ({type(exc).__name__}: {exc})"
            ) from None
    fn = getattr(module, name, None)
    if fn is None:
        raise OptionError(f"--model: {source} has no attribute {name!r}")
    if not callable(fn):
        raise OptionError(f"--model: {source}:{name} is not callable")
    return fn
