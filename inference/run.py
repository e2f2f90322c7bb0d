"""A run: which model was trained on which data, and how to rebuild it from its directory."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pyro
import torch
from torch import nn

from .data import Dataset, check_support, load_data
from .errors import OptionError, RunError
from .io import load_checkpoint
from .train import CHECKPOINT, restore

__all__ = ["MODELS", "LoadedRun", "ModelSpec", "build_model", "load_run"]

#: Model names the command line knows: the Bernoulli VAE, probabilistic PCA, factor analysis.
MODELS = ("vae", "ppca", "fa")

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a run's model: its name, data and sizes (stored in the checkpoint)."""

    model: str = "vae"
    data: str = "digits"
    latent_dim: int = 10
    hidden_dims: tuple[int, ...] = (200,)
    device: str = "cpu"
    dtype: str = "float32"
    data_dim: int | None = field(default=None)

    def __post_init__(self):
        if self.model not in MODELS:
            raise OptionError(
                f"--model: unknown model {self.model!r} (choose from {', '.join(MODELS)})"
            )
        if not isinstance(self.latent_dim, int) or self.latent_dim < 1:
            raise OptionError(f"--latent-dim: must be a positive integer, got {self.latent_dim!r}")
        if any((not isinstance(h, int)) or h < 1 for h in self.hidden_dims):
            raise OptionError(
                f"--hidden-dims: widths must be positive integers, got {self.hidden_dims!r}"
            )
        if self.dtype not in DTYPES:
            raise OptionError(f"--dtype: must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise OptionError(f"--device: must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise OptionError(f"--device: {self.device!r} requested but CUDA is not available")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden_dims"] = list(self.hidden_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(**{**d, "hidden_dims": tuple(d["hidden_dims"])})


class LoadedRun(NamedTuple):
    """A trained run rebuilt from disk: the module, its model/guide pair, data and checkpoint."""

    spec: ModelSpec
    module: nn.Module
    model: Any
    guide: Any
    data: Dataset
    state: dict[str, Any]


def build_model(spec: ModelSpec, data: Dataset) -> tuple[nn.Module, Any, Any]:
    """Instantiate the model named by ``spec`` for ``data``; returns (module, model, guide)."""
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
        raise OptionError(f"--model: unknown model {spec.model!r}")
    module = module.to(device=spec.device, dtype=DTYPES[spec.dtype])
    return module, module.model, module.guide


def load_run(run_dir: str | os.PathLike, data: str | None = None) -> LoadedRun:
    """Rebuild a run from ``run_dir/checkpoint.pt`` (its data, or ``data`` if given)."""
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
    if data is not None:
        spec = ModelSpec.from_dict({**spec.to_dict(), "data": data})
    dataset = load_data(spec.data)
    if spec.data_dim is not None and dataset.data_dim != spec.data_dim:
        raise RunError(
            f"{spec.data}: data have {dataset.data_dim} columns but the checkpoint in {run_dir} "
            f"was trained on {spec.data_dim}"
        )
    dataset = dataset.to(spec.device, DTYPES[spec.dtype])
    pyro.clear_param_store()
    module, model, guide = build_model(spec, dataset)
    restore(model, guide, dataset.train[:2], state, str(run_dir / CHECKPOINT))
    return LoadedRun(spec, module, model, guide, dataset, state)
