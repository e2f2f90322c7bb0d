"""Eight schools, non-centered (Rubin 1981; Gelman et al., BDA3 §5.5), as Pyro users write it."""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints


def data():
    y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
    sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
    return (), {"J": 8, "sigma": sigma, "y": y}


def model(J, sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", J):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        theta = mu + tau * theta_tilde
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def guide(J, sigma, y=None):
    """A hand-written mean-field guide: log-normal for the scale tau."""
    mu_loc = pyro.param("mu_loc", torch.tensor(0.0))
    mu_scale = pyro.param("mu_scale", torch.tensor(1.0), constraint=constraints.positive)
    tau_loc = pyro.param("tau_loc", torch.tensor(0.0))
    tau_scale = pyro.param("tau_scale", torch.tensor(0.5), constraint=constraints.positive)
    theta_loc = pyro.param("theta_loc", torch.zeros(J))
    theta_scale = pyro.param("theta_scale", torch.ones(J), constraint=constraints.positive)
    pyro.sample("mu", dist.Normal(mu_loc, mu_scale))
    pyro.sample("tau", dist.LogNormal(tau_loc, tau_scale))
    with pyro.plate("schools", J):
        pyro.sample("theta_tilde", dist.Normal(theta_loc, theta_scale))
