"""The user's own Pyro model, named on the command line as ``FILE.py:NAME`` or ``package.module:NAME``.

The model is a Pyro function ``model(x)`` of the data tensor ``x`` ``(N, D)`` (optionally with a
``num_data`` keyword for mini-batches); elbo-lab pairs it with an autoguide chosen by name
(:data:`models.guides.AUTOGUIDES`). Loading runs the user's file, so it is done only when the user
asks for it. Without ``num_data`` the model is trained and evaluated on all rows at once, as its
latents are global: ELBO and L_K are then whole-data values, reported divided by N.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from pyro import poutine

from .errors import DataError, ElboLabError, OptionError

__all__ = [
    "check_user_model",
    "is_user_model",
    "load_user_model",
    "resolve_model_spec",
    "user_model_label",
]


def is_user_model(spec: str) -> bool:
    """Whether ``spec`` names a user model (``FILE.py:NAME`` / ``module:NAME``), not a built-in."""
    return ":" in spec


def _is_file_spec(source: str) -> bool:
    return source.endswith(".py") or "/" in source or "\\" in source


def resolve_model_spec(spec: str) -> str:
    """``spec`` with its file made absolute (``FILE.py:NAME``), so a run finds it from any directory."""
    source, _, name = spec.rpartition(":")
    if source and _is_file_spec(source) and Path(source).is_file():
        return f"{Path(source).resolve()}:{name}"
    return spec


def user_model_label(spec: str) -> str:
    """A short name for file and directory names: ``my_models.model`` for ``dir/my_models.py:model``."""
    source, _, name = spec.rpartition(":")
    stem = Path(source).stem if _is_file_spec(source) else source.rpartition(".")[2]
    return f"{stem}.{name}"


def load_user_model(spec: str) -> Callable:
    """The callable ``NAME`` from ``FILE.py:NAME`` or ``package.module:NAME``.

    Raises:
        OptionError: malformed spec, missing file or module, import failure, missing or
            non-callable attribute (one line naming the spec).
    """
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name.isidentifier():
        raise OptionError(f"--model: expected FILE.py:NAME or package.module:NAME, got {spec!r}")
    if _is_file_spec(source):
        path = Path(source)
        if not path.is_file():
            raise OptionError(f"--model: {path}: no such file")
        module_name = f"elbo_lab_user_{path.stem}_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise OptionError(f"--model: {path}: cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        # no __pycache__ beside the user's file: elbo-lab writes only to its run directories
        dont_write_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise OptionError(
                f"--model: {path}: failed to import ({type(exc).__name__}: {_first_line(exc)})"
            ) from None
        finally:
            sys.dont_write_bytecode = dont_write_bytecode
    else:
        try:
            module = importlib.import_module(source)
        except Exception as exc:
            raise OptionError(
                f"--model: cannot import {source!r} ({type(exc).__name__}: {_first_line(exc)})"
            ) from None
    fn = getattr(module, name, None)
    if fn is None:
        raise OptionError(f"--model: {source} has no attribute {name!r}")
    if not callable(fn):
        raise OptionError(f"--model: {source}:{name} is not callable")
    return fn


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def check_user_model(
    model: Callable, guide: Callable, x: torch.Tensor, *, spec: str, data: str
) -> None:
    """Run ``guide`` and ``model`` once on ``x`` ``(N, D)`` with Pyro's validation and every
    log-density computed, so data the model rejects fail here, before any training or writing.

    The random state is restored afterwards; an autoguide creates its parameters in this run.

    Raises:
        DataError: the model or guide raised on ``x`` (one line naming ``data`` and ``spec``).
    """
    from .train import default_dtype, takes_num_data

    kwargs = {"num_data": x.shape[0]} if takes_num_data(model) else {}
    try:
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []), default_dtype(x.dtype):
            with pyro.validation_enabled(True):
                guide_trace = poutine.trace(guide).get_trace(x, **kwargs)
                replayed = poutine.replay(model, trace=guide_trace)
                model_trace = poutine.trace(replayed).get_trace(x, **kwargs)
                guide_trace.compute_log_prob()
                model_trace.compute_log_prob()
    except ElboLabError:
        raise
    except Exception as exc:
        raise DataError(
            f"{data}: rejected by the model {spec} ({type(exc).__name__}: {_first_line(exc)})"
        ) from None
