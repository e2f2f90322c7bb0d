"""Pyro's SVI Part I: is the coin fair? As the tutorial writes it."""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints


def data():
    # six heads and four tails, a list of scalar tensors
    return ([torch.tensor(1.0)] * 6 + [torch.tensor(0.0)] * 4,), {}


def model(data):
    alpha0 = torch.tensor(10.0)
    beta0 = torch.tensor(10.0)
    f = pyro.sample("latent_fairness", dist.Beta(alpha0, beta0))
    for i in range(len(data)):
        pyro.sample(f"obs_{i}", dist.Bernoulli(f), obs=data[i])


def guide(data):
    alpha_q = pyro.param("alpha_q", torch.tensor(15.0), constraint=constraints.positive)
    beta_q = pyro.param("beta_q", torch.tensor(15.0), constraint=constraints.positive)
    pyro.sample("latent_fairness", dist.Beta(alpha_q, beta_q))
