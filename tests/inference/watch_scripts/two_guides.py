"""Two guides for one model, fitted side by side in one loop (a comparison script)."""

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

pyro.set_rng_seed(0)
X = torch.randn(40, 2)
y = X @ torch.tensor([1.0, -2.0]) + 0.5 * torch.randn(40)


def model(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, 0.5), obs=y)


guides = {"mean field": AutoNormal(model), "full rank": AutoMultivariateNormal(model)}
svis = {
    name: SVI(model, g, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO()) for name, g in guides.items()
}
for step in range(150):
    losses = {name: svi.step(X, y) for name, svi in svis.items()}
    if step % 50 == 0:
        print(step, {name: round(v, 3) for name, v in losses.items()})
