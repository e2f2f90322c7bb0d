"""A model that subsamples its own plate (pyro.plate(..., subsample_size=...)), SVI Part II."""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints


def data():
    g = torch.Generator().manual_seed(0)
    return (1.0 + torch.randn(200, generator=g),), {}


def model(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data), subsample_size=20) as ind:
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=data[ind])


def guide(data):
    loc = pyro.param("loc", torch.tensor(0.0))
    scale = pyro.param("scale", torch.tensor(1.0), constraint=constraints.positive)
    pyro.sample("mu", dist.Normal(loc, scale))


def full_model(data):
    """The same model on every row at once (no subsampling): the full-data ELBO."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=data)
