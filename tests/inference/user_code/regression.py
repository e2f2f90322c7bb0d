"""Bayesian linear regression model(X, y), as plain sample sites and as a PyroModule.

y ~ N(X w + b, sigma^2), w ~ N(0, I), b ~ N(0, 10^2), sigma known: the evidence is
log N(y; 0, sigma^2 I + X X^T + 100 1 1^T) (Bishop, PRML §3.5.1).
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample
from torch import nn

SIGMA = 0.5


def model(X, y=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 10.0))
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("obs", dist.Normal(X @ w + b, SIGMA), obs=y)


def batched_model(X, y=None, num_data=None):
    """The same model on a mini-batch of rows of X and y, scaled to num_data rows by its plate."""
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 10.0))
    with pyro.plate("data", num_data or X.shape[0], subsample_size=X.shape[0]):
        return pyro.sample("obs", dist.Normal(X @ w + b, SIGMA), obs=y)


def batched_guide(X, y=None, num_data=None):
    return guide(X, y)


def guide(X, y=None):
    w_loc = pyro.param("w_loc", torch.zeros(X.shape[1]))
    w_scale = pyro.param("w_scale", torch.ones(X.shape[1]), constraint=dist.constraints.positive)
    b_loc = pyro.param("b_loc", torch.tensor(0.0))
    b_scale = pyro.param("b_scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    pyro.sample("w", dist.Normal(w_loc, w_scale).to_event(1))
    pyro.sample("b", dist.Normal(b_loc, b_scale))


class BayesianRegression(PyroModule):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.linear = PyroModule[nn.Linear](in_features, out_features)
        self.linear.weight = PyroSample(
            dist.Normal(0.0, 1.0).expand([out_features, in_features]).to_event(2)
        )
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([out_features]).to_event(1))

    def forward(self, X, y=None):
        mean = self.linear(X).squeeze(-1)
        with pyro.plate("data", X.shape[0]):
            return pyro.sample("obs", dist.Normal(mean, SIGMA), obs=y)


module_model = BayesianRegression(2, 1)
