"""A script whose model lives at module level with its loop under ``if __name__ == "__main__"``:
importing it runs nothing, so ``elbo-lab explain`` can rebuild the model and its autoguide."""

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal


def model(x):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)


if __name__ == "__main__":
    pyro.set_rng_seed(0)
    x = torch.randn(30) + 2.0
    svi = SVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.1}), TraceMeanField_ELBO())
    for _ in range(100):
        svi.step(x)
