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


def indexed_model(data, ind=None):
    """The same model with the subsample's indices given (SVI Part II): all rows when None."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data), subsample=ind) as ind:
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=data[ind])


def indexed_guide(data, ind=None):
    loc = pyro.param("loc", torch.tensor(0.0))
    scale = pyro.param("scale", torch.tensor(1.0), constraint=constraints.positive)
    pyro.sample("mu", dist.Normal(loc, scale))


def local_model(data):
    """Local latents in a plate that subsamples itself: z_n ~ N(0, 1), x_n ~ N(z_n, 1)."""
    with pyro.plate("data", len(data), subsample_size=20) as ind:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(z, 1.0), obs=data[ind])


def local_guide(data):
    """q(z_n) = N(a x_n, s): the exact posterior N(x_n / 2, 1 / 2) at a = 1/2, s^2 = 1/2."""
    a = pyro.param("a", torch.tensor(0.5))
    s = pyro.param("s", torch.tensor(0.5**0.5), constraint=constraints.positive)
    with pyro.plate("data", len(data), subsample_size=20) as ind:
        pyro.sample("z", dist.Normal(a * data[ind], s))
