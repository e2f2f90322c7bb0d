"""The traced ELBOs equal their plain twins for shared noise, in value and gradient, and
trace once per shape (Kingma & Welling 2014, eq. 3)."""

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from inference.estimators import JitTrace_ELBO, JitTraceMeanField_ELBO
from models.vae import VAE

PAIRS = [(Trace_ELBO, JitTrace_ELBO), (TraceMeanField_ELBO, JitTraceMeanField_ELBO)]


def _loss_and_grad(elbo, vae, x, n, seed):
    pyro.set_rng_seed(seed)
    loss = elbo(vae.model, vae.guide)(x, num_data=n)
    vae.zero_grad(set_to_none=True)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in vae.parameters()]


@pytest.mark.parametrize("plain, traced", PAIRS, ids=["trace", "meanfield"])
def test_traced_loss_and_gradient_equal_the_plain_estimators(float64, plain, traced):
    torch.manual_seed(0)
    vae = VAE(6, latent_dim=2, hidden_dims=(5,))
    x = torch.bernoulli(torch.full((20, 6), 0.5))
    compiled = traced()
    for seed, rows in [(1, 8), (2, 8), (3, 4)]:  # a ragged last batch gets its own graph
        want, want_grad = _loss_and_grad(plain(), vae, x[:rows], 20, seed)
        got, got_grad = _loss_and_grad(lambda m, g: compiled(m, g), vae, x[:rows], 20, seed)
        assert got == pytest.approx(want, rel=1e-12)
        for a, b in zip(got_grad, want_grad, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert compiled.compilations(vae.model, vae.guide) == 2


def test_meanfield_compiles_once_per_shape_for_fresh_bound_methods():
    torch.manual_seed(0)
    vae = VAE(6, latent_dim=2, hidden_dims=(5,))
    x = torch.bernoulli(torch.full((8, 6), 0.5))
    elbo = JitTraceMeanField_ELBO()
    for _ in range(4):  # vae.model is a new bound-method object each time
        elbo.differentiable_loss(vae.model, vae.guide, x)
    assert elbo.compilations(vae.model, vae.guide) == 1


def test_first_call_draws_the_same_noise_as_later_calls():
    torch.manual_seed(0)
    vae = VAE(6, latent_dim=2, hidden_dims=(5,))
    x = torch.bernoulli(torch.full((8, 6), 0.5))
    elbo = JitTrace_ELBO()
    values = []
    for _ in range(2):
        pyro.set_rng_seed(5)
        values.append(elbo.loss(vae.model, vae.guide, x))
    pyro.set_rng_seed(5)
    assert values[0] == values[1] == pytest.approx(Trace_ELBO().loss(vae.model, vae.guide, x))
