"""The VAE's Pyro loss equals a plain-PyTorch BCE + KL computation, values and gradients."""

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from models.vae import VAE


def _data(n=17, d=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, d), 0.4, dtype=torch.float64), generator=g)


def _plain_loss(vae, x, num_data, analytic_kl):
    """-ELBO written by hand: BCE-with-logits(sum) + KL, scaled by N / B."""
    z_loc, z_scale = vae.encoder.encode(x)
    q = torch.distributions.Normal(z_loc, z_scale)
    z = q.rsample()  # the same standard-normal draw Pyro's Normal.rsample makes
    bce = F.binary_cross_entropy_with_logits(vae.decoder(z), x, reduction="sum")
    if analytic_kl:
        # KL(N(m, s^2) || N(0, 1)) = 1/2 (s^2 + m^2 - 1) - log s
        kl = (0.5 * (z_scale**2 + z_loc**2 - 1) - torch.log(z_scale)).sum()
    else:
        p = torch.distributions.Normal(torch.zeros_like(z), torch.ones_like(z))
        kl = (q.log_prob(z) - p.log_prob(z)).sum()
    return (bce + kl) * num_data / x.shape[0]


def _grads(loss, vae):
    return torch.autograd.grad(loss, list(vae.parameters()), allow_unused=False)


@pytest.mark.parametrize("analytic_kl", [False, True], ids=["Trace_ELBO", "TraceMeanField_ELBO"])
@pytest.mark.parametrize("num_data", [17, 100], ids=["full-batch", "subsampled"])
def test_pyro_loss_equals_plain_pytorch(float64, analytic_kl, num_data):
    vae = VAE(12, latent_dim=3, hidden_dims=(7,)).double()
    x = _data()
    estimator = TraceMeanField_ELBO() if analytic_kl else Trace_ELBO()
    pyro.set_rng_seed(11)
    pyro_loss = estimator.differentiable_loss(vae.model, vae.guide, x, num_data=num_data)
    pyro_grads = _grads(pyro_loss, vae)
    pyro.set_rng_seed(11)
    plain = _plain_loss(vae, x, num_data, analytic_kl)
    plain_grads = _grads(plain, vae)
    assert abs(pyro_loss.item() - plain.item()) < 1e-10 * abs(plain.item())
    for a, b in zip(pyro_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_model_and_guide_shapes_and_sites(dtype):
    vae = VAE(12, latent_dim=3, hidden_dims=(7, 5)).to(dtype)
    x = _data().to(dtype)
    guide_trace = pyro.poutine.trace(vae.guide).get_trace(x, num_data=40)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(vae.model, guide_trace)).get_trace(
        x, num_data=40
    )
    z = guide_trace.nodes["z"]
    assert z["value"].shape == (17, 3) and z["value"].dtype == dtype
    assert model_trace.nodes["x"]["is_observed"]
    # the plate scales a batch of 17 to the 40 data points it stands for
    assert model_trace.nodes["x"]["scale"] == pytest.approx(40 / 17)
    assert vae.reconstruct(x).shape == x.shape
    assert vae.sample(4).shape == (4, 12)


@pytest.mark.cuda
def test_vae_on_cuda():
    vae = VAE(12, latent_dim=3, hidden_dims=(7,)).cuda()
    x = _data().float().cuda()
    loss = TraceMeanField_ELBO().loss(vae.model, vae.guide, x)
    assert torch.isfinite(torch.tensor(loss))
