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


# --- the compiled graph is the plain estimator, bit for bit ---------------------------------------


def _pair_grads(loss, params):
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _bitwise_equal_to_plain(plain, traced, model, guide, x, num_data, params, seeds=(1, 2)):
    compiled = traced()(model, guide)
    eager = plain()(model, guide)
    kwargs = {"num_data": num_data} if num_data is not None else {}
    for seed in seeds:
        pyro.set_rng_seed(seed)
        want = eager(x, **kwargs)
        want_grad = _pair_grads(want, params)
        pyro.set_rng_seed(seed)
        got = compiled(x, **kwargs)
        got_grad = _pair_grads(got, params)
        assert torch.equal(got, want), (got.item(), want.item())
        for a, b in zip(got_grad, want_grad, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows, num_data", [(7, 20), (20, None), (20, 20)])
@pytest.mark.parametrize("plain, traced", PAIRS, ids=["trace", "meanfield"])
def test_vae_graph_is_bitwise_the_plain_estimator(plain, traced, rows, num_data, dtype):
    torch.manual_seed(0)
    vae = VAE(6, latent_dim=3, hidden_dims=(5,)).to(dtype)
    x = torch.bernoulli(torch.full((rows, 6), 0.4, dtype=dtype))
    _bitwise_equal_to_plain(
        plain, traced, vae.model, vae.guide, x, num_data, list(vae.parameters())
    )


@pytest.mark.parametrize("family", ["diag", "full", "flow"])
def test_builtin_guides_and_linear_gaussian_graphs_are_bitwise_plain(family):
    from models.guides import make_guide
    from models.linear_gaussian import LinearGaussian

    torch.manual_seed(0)
    vae = VAE(6, latent_dim=2, hidden_dims=(5,))
    guide = make_guide(family, 6, 2, (5,))
    x = torch.bernoulli(torch.full((9, 6), 0.5))
    params = list(vae.decoder.parameters()) + list(guide.parameters())
    _bitwise_equal_to_plain(Trace_ELBO, JitTrace_ELBO, vae.model, guide, x, 30, params)
    if family != "flow":  # no closed-form KL for a flow
        _bitwise_equal_to_plain(
            TraceMeanField_ELBO, JitTraceMeanField_ELBO, vae.model, guide, x, 30, params
        )
    for noise in ("isotropic", "diagonal"):
        pyro.clear_param_store()  # the linear model's "encoder" and "decoder" are new modules
        lg = LinearGaussian(6, 2, noise=noise)
        y = torch.randn(9, 6)
        _bitwise_equal_to_plain(
            TraceMeanField_ELBO,
            JitTraceMeanField_ELBO,
            lg.model,
            lg.guide,
            y,
            30,
            list(lg.parameters()),
        )


def _graph_of(elbo, model, guide):
    (traced,) = elbo._traced_losses.values()
    ((_, graph),) = traced._graphs.values()
    return graph.graph


def test_lean_graph_keeps_only_the_arithmetic_of_the_loss():
    """Shape arithmetic, identity reshapes, fills and arithmetic with them are gone; the ops
    that compute the loss remain, one normal draw included."""
    torch.manual_seed(0)
    vae = VAE(6, latent_dim=3, hidden_dims=(5,))
    x = torch.bernoulli(torch.full((7, 6), 0.4))
    elbo = JitTraceMeanField_ELBO()
    elbo.differentiable_loss(vae.model, vae.guide, x, num_data=20)
    kinds = [node.kind() for node in _graph_of(elbo, vae.model, vae.guide).nodes()]
    for gone in (
        "aten::size",
        "aten::arange",
        "aten::expand",
        "aten::broadcast_tensors",
        "aten::zeros",
        "aten::ones",
        "aten::ones_like",
        "aten::new_zeros",
        "aten::div",
    ):
        assert gone not in kinds, gone
    assert kinds.count("aten::normal") == 1
    assert kinds.count("aten::linear") == 5 and kinds.count("aten::softplus") == 2


def test_fill_arithmetic_that_broadcasts_is_kept():
    """a / ones(...) that changes the shape is not an identity: the value must follow eager."""

    def model(x):
        loc = torch.zeros(3)
        scale = torch.ones(2, 3)
        with pyro.plate("data", x.shape[0], dim=-3):
            w = pyro.param("w", torch.full((3,), 0.5))
            pyro.sample("x", pyro.distributions.Normal(w / scale + loc, scale).to_event(2), obs=x)

    def guide(x):
        pass

    x = torch.randn(4, 2, 3)
    pyro.clear_param_store()
    want = Trace_ELBO().differentiable_loss(model, guide, x)
    got = JitTrace_ELBO().differentiable_loss(model, guide, x)
    assert torch.equal(got, want)


def _mask_model(x):
    """A mask made from ones and edited in place: not a tensor of ones any more."""
    w = pyro.param("w", torch.full((3,), 0.5))
    mask = torch.ones(3)
    mask[0] = 0.0
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", pyro.distributions.Normal(w * mask, 1.0).to_event(1), obs=x)


def _bits_model(x):
    """``view(dtype)``, which TorchScript's alias analysis cannot handle: the graph runs as
    traced, unoptimized."""
    w = pyro.param("w", torch.full((3,), 0.5))
    odd = (x.view(torch.int32) & 1).to(x.dtype)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", pyro.distributions.Normal(w + odd, 1.0).to_event(1), obs=x)


@pytest.mark.parametrize("model", [_mask_model, _bits_model], ids=["mask", "view-dtype"])
def test_graphs_that_mutate_or_defeat_the_passes_still_equal_eager(model):
    x = torch.randn(4, 3)
    pyro.clear_param_store()
    model(x)  # create w
    w = pyro.param("w").unconstrained()

    def guide(x):
        pass

    _bitwise_equal_to_plain(Trace_ELBO, JitTrace_ELBO, model, guide, x, None, [w])


@pytest.mark.parametrize("rows", [8, 64])
@pytest.mark.parametrize("plain, traced", PAIRS, ids=["trace", "meanfield"])
def test_several_particles_are_averaged_as_pyro_averages_them(plain, traced, rows):
    """With S > 1 particles Pyro averages the values as Python floats and the surrogates as
    tensors; the graph does the same, so value and gradients are still bit-identical (and an
    encoder run once per particle is not merged into one run, which would reorder gradients)."""
    torch.manual_seed(0)
    vae = VAE(64, latent_dim=3, hidden_dims=(16, 8))
    x = torch.bernoulli(torch.full((rows, 64), 0.3))

    def make(cls):
        return lambda: cls(num_particles=3, vectorize_particles=False)

    _bitwise_equal_to_plain(
        make(plain), make(traced), vae.model, vae.guide, x, 200, list(vae.parameters())
    )
