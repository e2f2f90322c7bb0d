"""Guide families: shapes and sites, proper densities, and the gaps their optima leave.

The exact check uses a linear-Gaussian model with a fixed, non-orthogonal W, so the posterior
p(z | x) = N(., Lambda^{-1}), Lambda = I + W^T Psi^{-1} W, is known in closed form. The best
mean-field Gaussian keeps the exact mean and takes the precisions Lambda_jj (Bishop, PRML
§10.1.2), leaving the gap

    KL(q || p(z | x)) = 1/2 sum_j log Lambda_jj - 1/2 log |Lambda|   nats per datum,

while the full-covariance family contains the posterior (gap 0) and a flow lies at or below the
mean-field gap. Gaps of Gaussian guides are measured exactly: log p(x) - ELBO(q) in closed form.
"""

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from inference.train import TrainConfig, fit
from models.guides import (
    AUTOGUIDES,
    REFUSED_AUTOGUIDES,
    FlowGuide,
    FullNormalGuide,
    autoguide_name,
    make_autoguide,
    make_guide,
)
from models.linear_gaussian import LinearGaussian, exact_elbo, log_marginal, posterior

FAMILIES = ("diag", "full", "flow")


@pytest.mark.parametrize("family", FAMILIES)
def test_guide_samples_site_z_in_the_data_plate(family):
    guide = make_guide(family, data_dim=6, latent_dim=3, hidden_dims=(8,))
    x = torch.rand(5, 6)
    trace = poutine.trace(guide).get_trace(x, num_data=20)
    site = trace.nodes["z"]
    assert site["value"].shape == (5, 3)
    assert site["fn"].batch_shape == (5,) and site["fn"].event_shape == (3,)
    (frame,) = site["cond_indep_stack"]
    assert (frame.name, frame.size, frame.full_size) == ("data", 5, 20)
    assert site["scale"] == pytest.approx(4.0)  # N / B
    assert torch.isfinite(site["fn"].log_prob(site["value"])).all()


def test_full_covariance_starts_as_mean_field():
    guide = make_guide("full", data_dim=4, latent_dim=3, hidden_dims=())
    x = torch.randn(7, 4)
    q = guide.distribution(x)
    scale = torch.exp(guide.log_scale(x))
    assert torch.equal(q.scale_tril, torch.diag_embed(scale))


def test_full_covariance_factor_is_lower_cholesky():
    guide = FullNormalGuide(4, 3, ())
    torch.nn.init.normal_(guide.off_diagonal.weight)
    tril = guide.scale_tril(torch.randn(7, 4))
    assert torch.equal(tril, torch.tril(tril))
    assert (torch.diagonal(tril, dim1=-2, dim2=-1) > 0).all()
    assert (tril[:, 1, 0] != 0).all()


def test_flow_density_integrates_to_one(float64):
    """A proper density: E_{z ~ r}[q(z | x) / r(z)] = 1 for a wide Gaussian proposal r."""
    guide = FlowGuide(3, 2, (), flow_hidden_dims=(8,)).double()
    x = torch.randn(1, 3)
    proposal = torch.distributions.MultivariateNormal(torch.zeros(2), 9.0 * torch.eye(2))
    z = proposal.sample((40000,)).unsqueeze(1)  # (S, 1, 2)
    with torch.no_grad():
        ratio = torch.exp(guide.distribution(x).log_prob(z).squeeze(1) - proposal.log_prob(z[:, 0]))
    mean, stderr = ratio.mean(), ratio.std() / math.sqrt(ratio.numel())
    assert abs(mean - 1) < 5 * stderr, (float(mean), float(stderr))


def test_flow_needs_two_transforms_and_two_latents():
    with pytest.raises(ValueError, match="at least 2"):
        FlowGuide(4, 2, (), num_flows=1)
    with pytest.raises(ValueError, match="latent dimension"):
        FlowGuide(4, 1, ())


def test_unknown_family_is_an_option_error():
    with pytest.raises(ValueError, match="unknown guide 'iaf'"):
        make_guide("iaf", 4, 2)


@pytest.mark.parametrize("name", ["AutoNormal", "autonormal", "Normal"], ids=str)
def test_autoguides_by_name(name):
    def model(x):
        pyro.sample("w", pyro.distributions.Normal(0.0, 1.0))

    assert isinstance(make_autoguide(name, model), AutoNormal)
    assert autoguide_name("AutoMultivariateNormal") in AUTOGUIDES
    assert isinstance(make_autoguide("automultivariatenormal", model), AutoMultivariateNormal)
    with pytest.raises(ValueError, match="unknown autoguide"):
        autoguide_name("AutoLaplace")


def test_every_class_of_pyro_autoguide_is_accepted_or_refused_with_its_reason():
    """Pyro's public autoguide classes are split between the two tables, each one in exactly
    one; a refused name is one line saying why and where to go instead."""
    import inspect

    from pyro.infer import autoguide

    public = {n for n in autoguide.__all__ if inspect.isclass(getattr(autoguide, n))}
    assert public == set(AUTOGUIDES) | set(REFUSED_AUTOGUIDES)
    assert not set(AUTOGUIDES) & set(REFUSED_AUTOGUIDES)
    for name in AUTOGUIDES:
        assert issubclass(AUTOGUIDES[name], getattr(autoguide, name))
    for name, reason in REFUSED_AUTOGUIDES.items():
        with pytest.raises(ValueError) as refused:
            autoguide_name(name.lower())
        message = str(refused.value)
        assert message == f"{name} {reason}"
        assert "\n" not in message and "unknown" not in message
    with pytest.raises(ValueError, match="AutoNormalizingFlow needs a transform"):
        make_autoguide("NormalizingFlow", lambda: None)


@pytest.mark.parametrize("name", sorted(AUTOGUIDES), ids=str)
def test_each_accepted_autoguide_builds_from_the_model_alone(name):
    """``Class(model)`` and one call: parameters at the data's dtype (float64 here)."""
    import pyro.distributions as dist

    from inference.train import default_dtype

    def model(y):
        w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=y.dtype), 1.0).to_event(1))
        s = pyro.sample("s", dist.LogNormal(torch.zeros((), dtype=y.dtype), 1.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(w.sum(), s), obs=y)

    y = torch.randn(4, dtype=torch.float64)
    guide = make_autoguide(name, model)
    with default_dtype(y.dtype):  # as elbo-lab creates a guide's parameters
        guide(y)
    guide(y)  # and later calls, at any default dtype
    params = dict(pyro.get_param_store().items())
    assert params and {p.dtype for p in params.values()} == {torch.float64}


# --- the mean-field gap on a linear-Gaussian model with fixed W ----------------------------------

# W is non-orthogonal, so the posterior precision Lambda = I + W^T W / psi has off-diagonal terms.
W = [[1.0, 0.8, 0.3], [0.5, 1.0, 0.9], [0.2, 0.7, 1.0], [1.0, -0.4, 0.6], [0.3, 0.9, -0.5]]
PSI = 0.5
# (learning rate, epochs): full-batch Adam, then two smaller steps to settle below SVI noise
SCHEDULE = ((0.05, 300), (0.01, 100), (0.002, 100))


@pytest.fixture(scope="module")
def trained_gaps():
    """Train each family (only the guide: W, mu, psi are fixed buffers) and measure its gap."""
    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    try:
        pyro.set_rng_seed(0)
        w, mu, psi = torch.tensor(W), torch.zeros(5), torch.full((5,), PSI)
        model = LinearGaussian.from_params(w, mu, torch.tensor(PSI), learnable=False)
        x = model.sample(200) + PSI**0.5 * torch.randn(200, 5)
        precision = torch.eye(3) + w.T @ w / PSI
        expected = 0.5 * torch.log(torch.diagonal(precision)).sum() - 0.5 * torch.logdet(precision)
        gaps = {"expected_mean_field": float(expected)}
        for family in FAMILIES:
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            guide = make_guide(family, 5, 3, hidden_dims=())  # linear encoder
            estimator = "trace" if family == "flow" else "meanfield"
            for lr, epochs in SCHEDULE:  # validated on the first step only, for speed
                config = TrainConfig(
                    epochs=epochs,
                    batch_size=None,
                    learning_rate=lr,
                    estimator=estimator,
                    progress=False,
                )
                with pyro.validation_enabled(False):
                    fit(model.model, guide, x, config=config)
            with torch.no_grad():
                q = guide.distribution(x)
                if family == "flow":  # gap = E_q[log q(z|x) - log p(z|x)], 400 draws per datum
                    loc, cov = posterior(x, w, mu, psi)
                    z = q.sample((400,))
                    log_ratio = q.log_prob(z) - torch.distributions.MultivariateNormal(
                        loc, cov
                    ).log_prob(z)
                    gaps["flow"] = float(log_ratio.mean())
                    gaps["flow_stderr"] = float(log_ratio.mean(0).std() / math.sqrt(200))
                else:  # gap = log p(x) - ELBO(q), both in closed form
                    cov = (
                        q.covariance_matrix
                        if family == "full"
                        else torch.diag_embed(q.base_dist.scale**2)
                    )
                    elbo = exact_elbo(x, w, mu, psi, q.mean, cov).elbo
                    gaps[family] = float((log_marginal(x, w, mu, psi) - elbo).mean())
        return gaps
    finally:
        torch.set_default_dtype(old)
        torch.set_num_threads(threads)
        pyro.clear_param_store()


def test_mean_field_gap_matches_bishop(trained_gaps):
    expected = trained_gaps["expected_mean_field"]
    assert expected > 0.1  # the correlation is strong enough to matter
    assert abs(trained_gaps["diag"] - expected) < 0.02, trained_gaps


def test_full_covariance_gap_vanishes(trained_gaps):
    assert 0 <= trained_gaps["full"] < 0.01, trained_gaps


def test_flow_gap_at_or_below_mean_field(trained_gaps):
    flow, stderr = trained_gaps["flow"], trained_gaps["flow_stderr"]
    assert -5 * stderr < flow < trained_gaps["diag"] + 5 * stderr, trained_gaps


def test_models_import_nothing_from_inference():
    """models/ is a leaf: importing it in a fresh interpreter loads no inference module."""
    import subprocess
    import sys

    code = "import sys, models; print(sorted(m for m in sys.modules if m.split('.')[0] == 'inference'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
