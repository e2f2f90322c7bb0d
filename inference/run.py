"""A run: which model was trained on which data, and how to rebuild it from its directory.

A model is a built-in name (:data:`MODELS`, trained with its own mean-field encoder, the ``diag``
family of :mod:`models.guides`) or the user's Pyro model ``FILE.py:NAME`` / ``package.module:NAME``
(:mod:`inference.user_model`) with a Pyro autoguide chosen by name
(:data:`models.guides.AUTOGUIDES`, default ``AutoNormal``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pyro
import torch
from torch import nn

from .batching import Batching, ModelArgs
from .data import Dataset, ModelData, check_support, load_data, load_model_data
from .errors import OptionError, RunError
from .io import CHECKPOINT, load_checkpoint
from .provenance import check_absolute, data_fingerprint, file_fingerprint, verify_fingerprint
from .train import restore
from .user_model import (
    check_user_model,
    is_user_model,
    load_user_guide,
    load_user_model,
    resolve_model_spec,
)

__all__ = [
    "BUILTIN_GUIDE",
    "MODELS",
    "LoadedRun",
    "ModelSpec",
    "build_model",
    "check_sources",
    "load_run",
]

#: Model names the command line knows: the Bernoulli VAE, probabilistic PCA, factor analysis.
MODELS = ("vae", "ppca", "fa")

#: The guide a built-in model trains with: its own amortized mean-field encoder.
BUILTIN_GUIDE = "diag"
#: The autoguide a user model gets unless ``--guide`` names another.
DEFAULT_AUTOGUIDE = "AutoNormal"

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a run's model: its name, guide, data and sizes (stored in the checkpoint).

    ``model`` is a name from :data:`MODELS` or a user model ``FILE.py:NAME`` /
    ``package.module:NAME``; ``guide`` is then an autoguide name (canonicalized, default
    ``AutoNormal``) and ``latent_dim``/``hidden_dims`` do not apply. A built-in model's guide is
    its own encoder, ``"diag"``.
    """

    model: str = "vae"
    data: str = "digits"
    latent_dim: int = 10
    hidden_dims: tuple[int, ...] = (200,)
    device: str = "cpu"
    dtype: str = "float32"
    data_dim: int | None = field(default=None)
    guide: str | None = None
    #: how mini-batches of a user model's arguments are cut (``--batch-args`` ...); None: the
    #: ``num_data`` convention (:func:`~inference.batching.default_batching`), if it applies
    batching: Batching | None = None

    def __post_init__(self):
        if self.model not in MODELS and not is_user_model(self.model):
            raise OptionError(
                f"unknown model {self.model!r} (choose from {', '.join(MODELS)}, "
                "or your own as FILE.py:NAME or package.module:NAME)",
                option="model",
            )
        object.__setattr__(self, "guide", _check_guide(self.model, self.guide))
        if not isinstance(self.latent_dim, int) or self.latent_dim < 1:
            raise OptionError(
                f"must be a positive integer, got {self.latent_dim!r}", option="latent_dim"
            )
        if any((not isinstance(h, int)) or h < 1 for h in self.hidden_dims):
            raise OptionError(
                f"widths must be positive integers, got {self.hidden_dims!r}", option="hidden_dims"
            )
        if self.dtype not in DTYPES:
            raise OptionError(
                f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}", option="dtype"
            )
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise OptionError(f"must be 'cpu' or 'cuda[:N]', got {self.device!r}", option="device")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise OptionError(
                f"{self.device!r} requested but CUDA is not available", option="device"
            )
        if self.batching is not None and not self.user_model:
            raise OptionError(
                "the built-in models batch their own rows; a batching declares how your own "
                "model's (FILE.py:NAME) rows are cut",
                option="batching",
            )

    @property
    def user_model(self) -> bool:
        """Whether the model is the user's own (``FILE.py:NAME``), with global latents."""
        return is_user_model(self.model)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden_dims"] = list(self.hidden_dims)
        if self.batching is not None:
            d["batching"] = {**d["batching"], "args": list(self.batching.args)}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        batching = d.get("batching")
        if isinstance(batching, dict):
            batching = Batching(**{**batching, "args": tuple(batching["args"])})
        return cls(**{**d, "hidden_dims": tuple(d["hidden_dims"]), "batching": batching})


def _check_guide(model: str, guide: str | None) -> str:
    """The canonical guide for ``model``: an autoguide name, the user's ``FILE.py:NAME`` (its
    file made absolute), or ``diag`` for a built-in model; else an OptionError naming
    ``guide``."""
    from models.guides import AUTOGUIDES, GUIDE_FAMILIES, autoguide_name

    if is_user_model(model):
        if guide is None:
            return DEFAULT_AUTOGUIDE
        if is_user_model(guide):
            return resolve_model_spec(guide)
        if guide in GUIDE_FAMILIES:
            raise OptionError(
                f"{guide!r} is an amortized encoder for the built-in models; your "
                f"model takes an autoguide ({', '.join(AUTOGUIDES)}) or your own guide as "
                "FILE.py:NAME",
                option="guide",
            )
        try:
            return autoguide_name(guide)
        except ValueError as exc:
            raise OptionError(str(exc), option="guide") from None
    if guide is None or guide == BUILTIN_GUIDE:
        return BUILTIN_GUIDE
    if guide in GUIDE_FAMILIES:
        raise OptionError(
            f"{model} trains with its own mean-field encoder ({BUILTIN_GUIDE!r}); to fit "
            f"{guide!r} use: elbo-lab compare --model {model} --guides {','.join(GUIDE_FAMILIES)}",
            option="guide",
        )
    raise OptionError(
        f"{guide!r} does not fit {model}, which trains with its own mean-field encoder "
        f"({BUILTIN_GUIDE!r}); autoguides are for your own model (model='FILE.py:NAME')",
        option="guide",
    )


class LoadedRun(NamedTuple):
    """A trained run rebuilt from disk: the module, its model/guide pair, data and checkpoint.

    ``module`` is the built-in model's ``nn.Module``, None for a user model (whose guide is an
    autoguide and whose model is the user's function).
    """

    spec: ModelSpec
    module: nn.Module | None
    model: Any
    guide: Any
    data: Dataset | ModelData  # ModelData (the model's own arguments) for a user model
    state: dict[str, Any]

    @property
    def default_split(self) -> str:
        """``train`` for a user model (the data its posterior describes), else ``test``."""
        return "train" if self.spec.user_model else "test"

    @property
    def batching(self) -> Batching | None:
        """How the run's mini-batches were cut: declared (``--batch-args`` ...), or None for the
        ``num_data`` convention (:func:`~inference.batching.default_batching`)."""
        return self.spec.batching

    @property
    def batched(self) -> bool:
        """Whether the model's latents are local to rows evaluated in chunks (built-in)."""
        return not self.spec.user_model

    def split(self, name: str) -> ModelArgs:
        """The model's arguments for split ``name`` (``train`` or ``test``)."""
        if self.spec.user_model:
            call = self.data.train if name == "train" else self.data.test
            if call is None:
                raise OptionError(f"{self.spec.data} has no {name} data", option="split")
            return call
        return ModelArgs((self.data.train if name == "train" else self.data.test,), {})

    def probe(self, call: ModelArgs) -> ModelArgs:
        """A small call of the same structure, to choose the estimator on."""
        return ModelArgs((call.args[0][:2],), {}) if self.batched else call


def build_model(
    spec: ModelSpec,
    data: Dataset | ModelData,
    model: Any = None,
    *,
    source: str | None = None,
    source_sha256: str | None = None,
) -> tuple[nn.Module | None, Any, Any]:
    """Instantiate the model named by ``spec`` for ``data``; returns (module, model, guide).

    A user model (``model``, if already imported) is paired with its guide (an autoguide or the
    user's own, :func:`~inference.user_model.load_user_guide`) and run once on
    ``data.train`` (:class:`~inference.data.ModelData` already on the run's device and dtype),
    so that a model that rejects the data fails here with a
    :class:`~inference.errors.DataError`; ``module`` is then None. ``source`` and
    ``source_sha256`` import the user model from that file only, if its bytes have that hash
    (:func:`check_sources`).
    """
    if spec.user_model:
        if model is None:
            model = load_user_model(spec.model, path=source, expected_sha256=source_sha256)
        guide = load_user_guide(spec.guide, model)
        check_user_model(model, guide, data.train, spec=spec.model, data=spec.data)
        return None, model, guide
    if spec.model == "vae":
        from models.vae import VAE

        check_support(data, "bernoulli")
        module = VAE(data.data_dim, spec.latent_dim, spec.hidden_dims)
    elif spec.model in ("ppca", "fa"):
        from models.linear_gaussian import LinearGaussian

        # Normal likelihood: any real data; hidden_dims do not apply to a linear model.
        noise = "isotropic" if spec.model == "ppca" else "diagonal"
        module = LinearGaussian(data.data_dim, spec.latent_dim, noise=noise)
        with torch.no_grad():  # start mu at the data mean, as the ML solution has it
            module.decoder.mu.copy_(data.train.mean(0))
    else:  # pragma: no cover - guarded by ModelSpec
        raise OptionError(f"unknown model {spec.model!r}", option="model")
    module = module.to(device=spec.device, dtype=DTYPES[spec.dtype])
    return module, module.model, module.guide


def check_sources(
    state: dict[str, Any],
    run_dir: Path,
    *,
    data: str | None = None,
    allow_changed: bool = False,
    warn: Callable[[str], None] | None = None,
) -> tuple[str | None, str | None]:
    """Check, before anything is imported, that a run's model file and data are what it was
    trained on; return the model file to import and its expected hash (None, None: built-in).

    The model is imported only from the absolute path recorded at training time, never from
    inside ``run_dir`` and never relative to the working directory, and only if its SHA-256 is
    the recorded one. A changed model or data file is refused, or with ``allow_changed`` reported
    through ``warn`` (default: :func:`warnings.warn`) and used. ``data`` (other data named by the
    user) skips the data check.

    Raises:
        RunError: a relative or in-run-directory path, a missing record, a changed file.
    """
    where = str(run_dir / CHECKPOINT)
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
    spec = state["metadata"].get("model_spec", {})
    provenance = state["metadata"].get("provenance", {})
    if not isinstance(provenance, dict):
        raise RunError(f"{where}: incomplete checkpoint (no valid 'provenance' entry)")

    def changed(problem: str) -> None:
        if not allow_changed:
            raise RunError(
                f"{where}: {problem}; refusing (pass allow_changed=True to use it anyway)"
            )
        warn(f"{problem}; using it anyway (allow_changed=True)")

    result: tuple[str | None, str | None] = (None, None)
    if is_user_model(str(spec.get("model", ""))):  # first: it decides what code may run
        result = _check_model_source(provenance.get("model"), run_dir, where, changed)
    if data is None and spec.get("data") != "digits":
        check_absolute("data", str(spec.get("data", "")).removeprefix("mnist:"), where)
        recorded = provenance.get("data")
        if recorded is None:
            changed(f"the data {spec.get('data')} have no recorded hash")
        else:
            try:
                current = data_fingerprint(spec["data"])
            except OSError:
                current = None
            problem = verify_fingerprint("data", recorded, current)
            if problem:
                changed(problem)
    return result


def _check_model_source(recorded, run_dir: Path, where: str, changed) -> tuple[str, str | None]:
    """The recorded model file to import and its expected hash (None once a change is allowed)."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("path"), str):
        raise RunError(f"{where}: the model has no recorded source file")
    source = check_absolute("model file", recorded["path"], where)
    resolved = source.resolve()
    if resolved.is_relative_to(run_dir.resolve()) or source.is_relative_to(run_dir.absolute()):
        raise RunError(
            f"{where}: the model file {source} lies inside the run directory; "
            "a run directory's own code is never imported"
        )
    try:
        current = file_fingerprint(source)
    except OSError:
        current = None
    problem = verify_fingerprint("model file", recorded, current)
    if problem is None:
        return str(source), recorded["sha256"]
    if current is None:
        raise RunError(f"{where}: {problem}")
    changed(problem)
    return str(source), None


def load_run(
    run_dir: str | os.PathLike,
    data: str | None = None,
    *,
    allow_changed: bool = False,
    warn: Callable[[str], None] | None = None,
) -> LoadedRun:
    """Rebuild a run from ``run_dir/checkpoint.pt`` (its data, or ``data`` if given).

    The checkpoint is read with ``weights_only=True`` and its checksum verified; the model's
    source and the data are checked against their recorded hashes (:func:`check_sources`)
    before any user code is imported.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory")
    state = load_checkpoint(run_dir / CHECKPOINT)
    try:
        spec = ModelSpec.from_dict(state["metadata"]["model_spec"])
    except (KeyError, TypeError) as exc:
        raise RunError(
            f"{run_dir / CHECKPOINT}: checkpoint lacks a model description ({exc})"
        ) from None
    source, source_sha256 = check_sources(
        state, run_dir, data=data, allow_changed=allow_changed, warn=warn
    )
    if data is not None:
        spec = ModelSpec.from_dict({**spec.to_dict(), "data": data})
    pyro.clear_param_store()
    if spec.user_model:
        model = load_user_model(spec.model, path=source, expected_sha256=source_sha256)
        user_data = load_model_data(spec.data, model).to(spec.device, DTYPES[spec.dtype])
        _, model, guide = build_model(spec, user_data, model)
        # a user model's parameters may depend on the rows it sees: rebuild them on all of them
        restore(
            model,
            guide,
            *user_data.train.args,
            state=state,
            source=str(run_dir / CHECKPOINT),
            **user_data.train.kwargs,
        )
        return LoadedRun(spec, None, model, guide, user_data, state)
    dataset = load_data(spec.data)
    if spec.data_dim is not None and dataset.data_dim != spec.data_dim:
        raise RunError(
            f"{spec.data}: data have {dataset.data_dim} columns but the checkpoint in {run_dir} "
            f"was trained on {spec.data_dim}"
        )
    dataset = dataset.to(spec.device, DTYPES[spec.dtype])
    module, model, guide = build_model(spec, dataset, source=source, source_sha256=source_sha256)
    restore(model, guide, dataset.train[:2], state=state, source=str(run_dir / CHECKPOINT))
    return LoadedRun(spec, module, model, guide, dataset, state)
