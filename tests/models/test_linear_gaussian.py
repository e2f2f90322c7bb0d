"""pPCA / factor analysis: closed forms against identities, a reference, and Monte Carlo."""

import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.optim import ClippedAdam
from sklearn.decomposition import PCA

from inference.elbo import decompose
from models.linear_gaussian import (
    LinearGaussian,
    exact_elbo,
    kl_to_posterior,
    log_marginal,
    posterior,
    tipping_bishop,
)

NOISES = {"ppca": "isotropic", "fa": "diagonal"}


def random_params(noise: str, d: int = 6, q: int = 3, seed: int = 0):
    """W (D, Q), mu (D,), psi: scalar sigma^2 (pPCA) or (D,) (FA), float64."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, q, generator=g, dtype=torch.float64)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    shape = () if noise == "isotropic" else (d,)
    psi = 0.2 + torch.rand(shape, generator=g, dtype=torch.float64)
    return W, mu, psi


def random_guide(n: int, q: int, per_datum: bool, seed: int = 1):
    """Means (N, Q) and SPD covariances (Q, Q) or (N, Q, Q)."""
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(n, q, generator=g, dtype=torch.float64)
    shape = (n, q, q) if per_datum else (q, q)
    A = torch.randn(shape, generator=g, dtype=torch.float64)
    return loc, A @ A.transpose(-1, -2) + 0.1 * torch.eye(q, dtype=torch.float64)


@pytest.mark.parametrize("per_datum", [False, True], ids=["shared-cov", "per-datum-cov"])
@pytest.mark.parametrize("name", list(NOISES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_elbo_plus_kl_to_posterior_is_log_evidence(name, per_datum, seed):
    """Kingma & Welling (2014) eq. (1): ELBO(q) + KL(q || p(z|x)) = log p(x), to 1e-8."""
    W, mu, psi = random_params(NOISES[name], seed=seed)
    psi = psi.expand(mu.shape)
    g = torch.Generator().manual_seed(100 + seed)
    x = 3 * torch.randn(20, W.shape[0], generator=g, dtype=torch.float64)
    q_loc, q_cov = random_guide(20, W.shape[1], per_datum, seed=seed)
    elbo = exact_elbo(x, W, mu, psi, q_loc, q_cov)
    kl = kl_to_posterior(x, W, mu, psi, q_loc, q_cov)
    torch.testing.assert_close(elbo.elbo + kl, log_marginal(x, W, mu, psi), rtol=0, atol=1e-8)
    torch.testing.assert_close(elbo.elbo, elbo.reconstruction - elbo.kl, rtol=0, atol=1e-12)
    assert (kl >= 0).all()


@pytest.mark.parametrize("name", list(NOISES))
def test_posterior_is_gaussian_conditioning(name):
    """p(z|x) from the joint N([0, mu], [[I, W^T], [W, C]]): W^T C^{-1} (x - mu), I - W^T C^{-1} W."""
    W, mu, psi = random_params(NOISES[name])
    psi = psi.expand(mu.shape)
    x = torch.randn(5, W.shape[0], dtype=torch.float64)
    C = W @ W.T + torch.diag(psi)
    loc, cov = posterior(x, W, mu, psi)
    torch.testing.assert_close(loc, torch.linalg.solve(C, (x - mu).T).T @ W, rtol=0, atol=1e-10)
    eye = torch.eye(W.shape[1], dtype=torch.float64)
    torch.testing.assert_close(cov, eye - W.T @ torch.linalg.solve(C, W), rtol=0, atol=1e-10)


def test_tipping_bishop_matches_scikit_learn_pca():
    """C = W W^T + sigma^2 I equals sklearn's pPCA covariance up to its 1/(N-1) normalization,
    and its likelihood is at least sklearn's (which is not the ML estimate)."""
    W, mu, psi = random_params("isotropic", d=7, q=2, seed=3)
    g = torch.Generator().manual_seed(4)
    n = 300
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x = z @ W.T + mu + psi.sqrt() * torch.randn(n, 7, generator=g, dtype=torch.float64)
    ml = tipping_bishop(x, 2)
    pca = PCA(n_components=2).fit(x.numpy())
    reference = torch.from_numpy(pca.get_covariance()) * (n - 1) / n
    C = ml.W @ ml.W.T + ml.sigma2 * torch.eye(7, dtype=torch.float64)
    torch.testing.assert_close(C, reference, rtol=0, atol=1e-10)
    assert ml.log_likelihood / n >= pca.score(x.numpy())
    # a maximum: moving W or sigma^2 away lowers the likelihood
    psi_ml = torch.full((7,), ml.sigma2, dtype=torch.float64)
    for W_, psi_ in ((1.05 * ml.W, psi_ml), (ml.W, 1.05 * psi_ml), (0.95 * ml.W, psi_ml)):
        assert log_marginal(x, W_, ml.mu, psi_).sum() < ml.log_likelihood


@pytest.fixture
def fa_model(float64):
    W, mu, psi = random_params("diagonal", d=5, q=2, seed=5)
    module = LinearGaussian.from_params(W, mu, psi)
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    return module, x


def test_monte_carlo_decompose_matches_exact_elbo(fa_model):
    """decompose with Monte-Carlo KL is within 5 stderr of the closed-form ELBO and its parts."""
    module, x = fa_model
    exact = module.exact_elbo(x)
    d = decompose(module.model, module.guide, x, num_particles=300, analytic_kl=False)
    assert abs(d.elbo - float(exact.elbo.sum())) < 5 * d.elbo_stderr
    assert abs(d.reconstruction - float(exact.reconstruction.sum())) < 5 * d.reconstruction_stderr
    assert abs(d.kl - float(exact.kl.sum())) < 5 * d.kl_stderr


def test_analytic_and_monte_carlo_kl_agree(fa_model):
    """Analytic KL(q || p(z)) is the closed form exactly; Monte Carlo agrees within 5 stderr."""
    module, x = fa_model
    exact_kl = float(module.exact_elbo(x).kl.sum())
    analytic = decompose(module.model, module.guide, x, num_particles=2, analytic_kl=True)
    mc = decompose(module.model, module.guide, x, num_particles=300, analytic_kl=False)
    assert {s.name: s.method for s in analytic.sites}["z"] == "analytic"
    assert analytic.kl == pytest.approx(exact_kl, abs=1e-8)
    assert abs(mc.kl - analytic.kl) < 5 * mc.kl_stderr


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_module_closed_forms_use_its_guide(fa_model, covariance):
    """The module's exact ELBO and KL are the functions applied to its own guide."""
    _, x = fa_model
    W, mu, psi = random_params("diagonal", d=5, q=2, seed=5)
    module = LinearGaussian.from_params(W, mu, psi, covariance=covariance)
    loc, _ = module.encoder(x)
    cov = module.encoder.covariance()
    assert cov.shape == (2, 2)
    q = module.encoder.distribution(x)
    torch.testing.assert_close(q.mean, loc)
    torch.testing.assert_close(q.variance, cov.diagonal().expand(30, 2))
    gap = module.log_marginal(x) - module.exact_elbo(x).elbo
    torch.testing.assert_close(gap, module.kl_to_posterior(x), rtol=0, atol=1e-8)


def test_fixed_parameters_are_not_learnable():
    module = LinearGaussian(4, 2, learnable=False)
    names = {n for n, _ in module.named_parameters()}
    assert names == {"encoder.loc.weight", "encoder.loc.bias", "encoder.raw_scale"}


def test_linear_vae_reaches_tipping_bishop_maximum(float64):
    """SVI on pPCA with the linear amortized guide: ELBO within 0.05 nats/datum of the ML
    log-likelihood (the linear VAE's ELBO is tight at its optimum, Lucas et al. 2019).

    Full batch, float64, a decaying learning rate so the last iterates sit near the optimum.
    """
    d, q, n = 5, 2, 200
    g = torch.Generator().manual_seed(7)
    W = torch.randn(d, q, generator=g)
    x = torch.randn(n, q, generator=g) @ W.T + 0.5 * torch.randn(n, d, generator=g) + 1.0
    ml = tipping_bishop(x, q)
    module = LinearGaussian(d, q, noise="isotropic")
    with torch.no_grad():
        module.decoder.mu.copy_(x.mean(0))
    svi = SVI(
        module.model, module.guide, ClippedAdam({"lr": 0.1, "lrd": 0.99}), TraceMeanField_ELBO()
    )
    for _ in range(300):
        svi.step(x)
    elbo = float(module.exact_elbo(x).elbo.mean())
    assert elbo <= ml.log_likelihood / n + 1e-9  # ELBO <= log p(x) <= max log-likelihood
    assert ml.log_likelihood / n - elbo < 0.05
