"""A Gaussian mixture with enumerated assignments (Pyro's GMM tutorial, parameters learned)."""

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import config_enumerate


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(40, generator=g) - 2.0, 0.5 * torch.randn(60, generator=g) + 1.5])
    return (x,), {}


@config_enumerate
def model(data):
    weights = pyro.param("weights", torch.tensor([0.5, 0.5]), constraint=dist.constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
    scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


def guide(data):
    """Every latent is enumerated in the model: the guide samples nothing."""


@config_enumerate
def enumerated_guide(data):
    """A guide that enumerates the assignments itself (Pyro's guide-side enumeration)."""
    probs = pyro.param(
        "assignment_probs", torch.ones(len(data), 2) / 2, constraint=dist.constraints.simplex
    )
    with pyro.plate("data", len(data)):
        pyro.sample("assignment", dist.Categorical(probs))
