"""An SVI loop whose model breaks at step 30: a shape error, as real scripts have them."""

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

pyro.set_rng_seed(0)
data = torch.randn(20) + 3.0


def model(data, broken=False):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    with pyro.plate("data", 20):
        scale = torch.ones(3) if broken else 1.0
        pyro.sample("x", dist.Normal(loc, scale), obs=data)


svi = SVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
for step in range(50):
    print(step, svi.step(data, broken=step == 30))
