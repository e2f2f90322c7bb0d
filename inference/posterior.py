"""Draws from a guide's posterior q(z | x), stored as an :class:`arviz.InferenceData`.

Draws are independent (not MCMC): the guide is sampled directly, by Pyro's
:class:`~pyro.infer.Predictive` (or in one vectorized call for an amortized guide with a
``distribution(x)``). ArviZ's multi-chain summaries run on them split evenly into chains.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pyro import poutine
from pyro.infer import Predictive
from pyro.poutine.util import site_is_subsample

from .batching import ModelArgs
from .elbo import EVAL_SEED
from .io import seeded

if TYPE_CHECKING:
    import arviz

__all__ = ["posterior_draws", "save_netcdf", "to_inference_data"]


def posterior_draws(
    model: Callable, guide: Callable, call: Any, num_draws: int, seed: int = EVAL_SEED
) -> dict[str, torch.Tensor]:
    """``num_draws`` independent draws of every latent site from the guide, ``(S, *site shape)``.

    ``call``: the model's arguments (:class:`~inference.batching.ModelArgs` or one tensor).
    Amortized guides with a ``distribution(x)`` are sampled in one vectorized call; any other
    guide by Pyro's :class:`~pyro.infer.Predictive`, one guide run per draw. Only latent sites
    of the model are returned.
    """
    call = ModelArgs.of(call)
    with torch.no_grad(), seeded(seed):
        if hasattr(guide, "distribution") and hasattr(guide, "site"):
            return {guide.site: guide.distribution(call.args[0]).sample((num_draws,))}
        guide_trace = poutine.trace(guide).get_trace(*call.args, **call.kwargs)
        replayed = poutine.replay(model, trace=guide_trace)
        model_trace = poutine.trace(replayed).get_trace(*call.args, **call.kwargs)
        names = [
            name
            for name, site in model_trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
        ]
        predictive = Predictive(model, guide=guide, num_samples=num_draws, return_sites=names)
        draws = predictive(*call.args, **call.kwargs)
    # Predictive pads every site to the model's plate nesting: back to each site's own shape
    shapes = {name: model_trace.nodes[name]["value"].shape for name in names}
    return {name: draws[name].detach().reshape(num_draws, *shapes[name]) for name in names}


def to_inference_data(
    draws: Mapping[str, torch.Tensor], num_chains: int, *, local: bool, attrs: Mapping
) -> arviz.InferenceData:
    """Draws ``(S, ...)`` -> InferenceData with dims (chain, draw, ...), named dims and coords.

    The first ``num_chains * (S // num_chains)`` draws are split into ``num_chains`` chains;
    ``local``: a site ``(S, N, L)`` has dims ``datum`` and ``<site>_dim``; ``attrs`` go to the
    posterior group as strings.
    """
    per_chain = next(iter(draws.values())).shape[0] // num_chains
    posterior, dims, coords = {}, {}, {}
    for name, value in draws.items():
        array = value[: num_chains * per_chain].cpu().numpy()
        array = array.reshape(num_chains, per_chain, *array.shape[1:])
        posterior[name] = array
        if local and array.ndim == 4:  # (chain, draw, datum, latent)
            dims[name] = ["datum", f"{name}_dim"]
            coords["datum"] = np.arange(array.shape[2])
            coords[f"{name}_dim"] = np.arange(array.shape[3])
        else:
            dims[name] = [f"{name}_dim_{i}" for i in range(array.ndim - 2)]
            coords.update({f"{name}_dim_{i}": np.arange(s) for i, s in enumerate(array.shape[2:])})
    import arviz as az  # imported when needed: it costs 1.7 s at start-up of every command

    idata = az.from_dict(posterior=posterior, dims=dims, coords=coords)
    idata.posterior.attrs.update({k: str(v) for k, v in attrs.items()})
    return idata


def save_netcdf(idata: arviz.InferenceData, path: str | os.PathLike) -> None:
    """Write ``idata`` to ``path`` (NetCDF) atomically: beside it, then renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    idata.to_netcdf(str(tmp))
    os.replace(tmp, path)
