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
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuide, AutoMessenger
from pyro.poutine.util import site_is_subsample

from .errors import DataError, ElboLabError, OptionError, RunError

__all__ = [
    "check_user_model",
    "guide_label",
    "imported_user_code",
    "load_user_guide",
    "load_user_object",
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


#: Whether this process has imported a user's code (:func:`load_user_object`).
_imported_user_code = False


def imported_user_code() -> bool:
    """Whether this process has imported a user's file or module (a model, guide or data
    spec): its objects may hold what only Python's teardown finishes (a file left open, a
    finalizer), so :func:`inference.cli.run` lets such a process end as Python ends it."""
    return _imported_user_code


def load_user_object(
    spec: str,
    option: str = "model",
    *,
    path: str | None = None,
    expected_sha256: str | None = None,
) -> Any:
    """The object ``NAME`` from ``FILE.py:NAME`` or ``package.module:NAME``; ``NAME`` may be a
    dotted path into it (``FILE.py:vae.guide`` is the ``guide`` method of the module-level
    ``vae``, as in Pyro's VAE tutorial).

    ``path`` imports from that file whatever the spec names (a run directory's recorded
    source). With ``expected_sha256`` (its recorded hash) the file's bytes are read once,
    hashed and, only if the hash matches, compiled and run: the code imported is the code
    checked.

    Raises:
        OptionError: malformed spec, missing file or module, import failure (or ``sys.exit``),
            missing attribute (one line naming the parameter ``option`` and the spec).
        RunError: the file's hash differs from ``expected_sha256``.
    """
    global _imported_user_code
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not all(part.isidentifier() for part in name.split(".")):
        raise OptionError(
            f"expected FILE.py:NAME or package.module:NAME, got {spec!r}", option=option
        )
    _imported_user_code = True  # set before its code runs: an import that fails ran some
    if path is not None or _is_file_spec(source):
        file = Path(source) if path is None else Path(path)
        if not file.is_file():
            raise OptionError(f"{file}: no such file", option=option)
        module = _import_file(file, option, expected_sha256)
    else:
        try:
            module = importlib.import_module(source)
        except SystemExit as exc:
            raise OptionError(
                f"{source!r} called sys.exit({exc.code!r}) at import", option=option
            ) from None
        except Exception as exc:
            raise OptionError(
                f"cannot import {source!r} ({type(exc).__name__}: {_first_line(exc)})",
                option=option,
            ) from None
    value = module
    for part in name.split("."):
        value = getattr(value, part, None)
        if value is None:
            raise OptionError(f"{source} has no attribute {name!r}", option=option)
    return value


def _import_file(path: Path, option: str, expected_sha256: str | None = None) -> Any:
    """Import a user's file once per process (model, guide and data may share it), from the
    bytes whose hash was checked; no ``__pycache__`` is written beside it."""
    source_bytes = path.read_bytes()
    digest = hashlib.sha256(source_bytes).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise RunError(f"{path}: the model file changed since training; not imported")
    module_name = f"elbo_lab_user_{path.stem}_{digest[:16]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise OptionError(f"{path}: cannot be loaded as a Python module", option=option)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        exec(compile(source_bytes, str(path), "exec"), module.__dict__)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(module_name, None)
        what = (
            f"called sys.exit({exc.code!r}) at import"
            if isinstance(exc, SystemExit)
            else f"failed to import ({type(exc).__name__}: {_first_line(exc)})"
        )
        raise OptionError(f"{path}: {what}", option=option) from None
    return module


def load_user_model(
    spec: str, *, path: str | None = None, expected_sha256: str | None = None
) -> Callable:
    """The model ``NAME`` from ``FILE.py:NAME`` or ``package.module:NAME`` (a function, a
    ``PyroModule``, or a bound ``model`` method such as ``FILE.py:vae.model``); ``path`` and
    ``expected_sha256`` as in :func:`load_user_object`."""
    fn = load_user_object(spec, "model", path=path, expected_sha256=expected_sha256)
    if not callable(fn):
        raise OptionError(f"{spec} is not callable", option="model")
    return fn


def load_user_guide(spec: str, model: Callable, option: str = "guide") -> Callable:
    """The guide named ``spec`` for ``model``: a Pyro autoguide by name (``AutoNormal``, any
    class of :data:`models.guides.AUTOGUIDES`), or the user's own as ``FILE.py:NAME``:

    - a function with ``pyro.param`` sites (SVI Part I's Beta guide);
    - a ``PyroModule`` or ``nn.Module`` instance, or a bound ``guide`` method
      (``FILE.py:vae.guide``);
    - an autoguide class (``AutoGuide`` subclass), built for ``model``.
    """
    from pyro.infer.autoguide import AutoGuide

    from models.guides import make_autoguide

    if not is_user_model(spec):
        try:
            return make_autoguide(spec, model)
        except ValueError as exc:
            raise OptionError(str(exc), option=option) from None
    value = load_user_object(spec, option)
    if isinstance(value, type) and issubclass(value, AutoGuide):
        return value(model)
    if not callable(value):
        raise OptionError(f"{spec} is not callable", option=option)
    return value


def guide_label(spec: str) -> str:
    """A guide's short name: the autoguide's, or ``NAME`` of ``FILE.py:NAME``."""
    return spec.rpartition(":")[2] if is_user_model(spec) else spec


def model_source_file(fn: Callable) -> str | None:
    """The absolute path of the file that defines ``fn`` (what a run records and re-imports)."""
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    path = getattr(module, "__file__", None)
    return str(Path(path).resolve()) if path else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def check_user_model(model: Callable, guide: Callable, call: Any, *, spec: str, data: str) -> None:
    """Run ``guide`` and ``model`` once on their arguments ``call`` (a
    :class:`~inference.batching.ModelArgs`, or one data tensor) with Pyro's validation and every
    log-density computed, so data the model rejects fail here, before any training or writing.

    The random state is restored afterwards; an autoguide creates its parameters in this run,
    at the data's dtype.

    Raises:
        DataError: the model raised (one line naming ``data`` and ``spec``).
        OptionError: the guide raised (``option="guide"``), or the model has no latent site.
    """
    from .batching import ModelArgs, takes_num_data
    from .train import default_dtype, floating_dtype

    call = ModelArgs.of(call)
    args, kwargs = call.args, dict(call.kwargs)
    if takes_num_data(model) and args and torch.is_tensor(args[0]) and "num_data" not in kwargs:
        kwargs["num_data"] = args[0].shape[0]
    with torch.random.fork_rng(devices=[]), default_dtype(floating_dtype(args, kwargs)):
        with pyro.validation_enabled(True):
            try:  # the guide first: its failure is the guide's, not the data's
                guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
                guide_trace.compute_log_prob()
            except ElboLabError:
                raise
            except Exception as exc:
                why = f"{type(exc).__name__}: {_first_line(exc)}"
                if isinstance(guide, AutoGuide | AutoMessenger):  # it ran the model inside
                    raise DataError(f"{data}: rejected by the model {spec} ({why})") from None
                raise OptionError(
                    f"the guide failed on the model's arguments from {data} ({why})",
                    option="guide",
                ) from None
            try:
                replayed = poutine.replay(model, trace=guide_trace)
                model_trace = poutine.trace(replayed).get_trace(*args, **kwargs)
                model_trace.compute_log_prob()
            except ElboLabError:
                raise
            except Exception as exc:
                raise DataError(
                    f"{data}: rejected by the model {spec} "
                    f"({type(exc).__name__}: {_first_line(exc)})"
                ) from None
    sites = [
        site
        for site in model_trace.nodes.values()
        if site["type"] == "sample" and not site_is_subsample(site)
    ]
    if not any(site["is_observed"] for site in sites):
        raise DataError(
            f"{data}: the model {spec} observed nothing (no sample site got obs=...): did the "
            "data reach the model's arguments?"
        )
    if all(site["is_observed"] for site in sites):
        raise OptionError(
            f"{spec} has no latent sample site: there is nothing to infer", option="model"
        )
