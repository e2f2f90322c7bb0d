"""The user's own Pyro model, named on the command line as ``FILE.py:NAME`` or ``package.module:NAME``.

The model is a Pyro function ``model(x)`` of the data tensor ``x`` ``(N, D)`` (optionally with a
``num_data`` keyword for mini-batches); elbo-lab pairs it with an autoguide chosen by name
(:data:`models.guides.AUTOGUIDES`). Loading runs the user's file, so it is done only when the user
asks for it. Without ``num_data`` the model is trained and evaluated on all rows at once, as its
latents are global: ELBO and L_K are then whole-data values, reported divided by N.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from .errors import DataError, ElboLabError, OptionError, RunError

__all__ = [
    "check_user_model",
    "model_source_file",
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


def load_user_model(
    spec: str, *, path: str | None = None, expected_sha256: str | None = None
) -> Callable:
    """The callable ``NAME`` from ``FILE.py:NAME`` or ``package.module:NAME``.

    ``path`` imports the model from that file whatever the spec names (a run directory's
    recorded source). With ``expected_sha256`` (its recorded hash) the file's bytes are read once, hashed
    and, only if the hash matches, compiled and run: the code imported is the code checked.

    Raises:
        OptionError: malformed spec, missing file or module, import failure, missing or
            non-callable attribute (one line naming the spec).
    """
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name.isidentifier():
        raise OptionError(f"--model: expected FILE.py:NAME or package.module:NAME, got {spec!r}")
    if path is not None or _is_file_spec(source):
        path = Path(source) if path is None else Path(path)
        if not path.is_file():
            raise OptionError(f"--model: {path}: no such file")
        module_name = f"elbo_lab_user_{path.stem}_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise OptionError(f"--model: {path}: cannot be loaded as a Python module")
        source_bytes = path.read_bytes()
        if expected_sha256 is not None and hashlib.sha256(source_bytes).hexdigest() != (
            expected_sha256
        ):
            raise RunError(f"{path}: the model file changed since training; not imported")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            # the bytes hashed above, never a second read; no __pycache__ beside the file
            exec(compile(source_bytes, str(path), "exec"), module.__dict__)
        except (Exception, SystemExit) as exc:
            sys.modules.pop(module_name, None)
            what = (
                f"called sys.exit({exc.code!r}) at import"
                if isinstance(exc, SystemExit)
                else f"failed to import ({type(exc).__name__}: {_first_line(exc)})"
            )
            raise OptionError(f"--model: {path}: {what}") from None
    else:
        try:
            module = importlib.import_module(source)
        except SystemExit as exc:
            raise OptionError(
                f"--model: {source!r} called sys.exit({exc.code!r}) at import"
            ) from None
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


def model_source_file(fn: Callable) -> str | None:
    """The absolute path of the file that defines ``fn`` (what a run records and re-imports)."""
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    path = getattr(module, "__file__", None)
    return str(Path(path).resolve()) if path else None


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
                prior_trace = poutine.trace(model).get_trace(x, **kwargs)
    except ElboLabError:
        raise
    except Exception as exc:
        raise DataError(
            f"{data}: rejected by the model {spec} ({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    latent = [
        name
        for name, site in prior_trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site_is_subsample(site)  # a plate's index site
    ]
    if not latent:
        raise OptionError(
            f"--model: {spec} has no latent sample sites (every pyro.sample is observed); "
            "there is no posterior to approximate"
        )
    try:
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
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
