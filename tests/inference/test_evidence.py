"""The importance-weighted bound L_K (Burda et al. 2016) against exact evidence and its properties.

Exact references: linear-Gaussian models (local latents, :mod:`models.linear_gaussian`) and
conjugate Bayesian linear regression (a global latent), where log p(x) and p(z | x) are closed forms.
"""

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from equivalence import assert_compiled_matches_eager

from inference.errors import OptionError
from inference.evidence import (
    KHAT_THRESHOLD,
    PARTICLE_PLATE,
    effective_sample_size,
    iwae,
    log_weights,
    psis_khat,
)
from models.linear_gaussian import LinearGaussian
from models.vae import VAE

# --- models with exact evidence -------------------------------------------------------------------


def linear_gaussian(noise: str, d: int = 5, q: int = 2, n: int = 20, seed: int = 0):
    """A fixed pPCA/FA model (float64) and data drawn from it."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, q, generator=g, dtype=torch.float64)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    psi = 0.3 + torch.rand(() if noise == "isotropic" else (d,), generator=g, dtype=torch.float64)
    module = LinearGaussian.from_params(W, mu, psi)
    z = torch.randn(n, q, generator=g, dtype=torch.float64)
    x = z @ W.T + mu + psi.sqrt() * torch.randn(n, d, generator=g, dtype=torch.float64)
    return module, x


def near_posterior_guide(module: LinearGaussian, x: torch.Tensor, shift=0.2, inflate=1.3):
    """Set the linear encoder to the exact posterior mean map, shifted, with inflated diag scale."""
    d = module.decoder
    W, mu, psi = d.W, d.mu, d.psi
    _, covariance = module.posterior(x)
    V = (W / psi.unsqueeze(-1) @ covariance).T  # posterior mean = V (x - mu)
    with torch.no_grad():
        module.encoder.loc.weight.copy_(V)
        module.encoder.loc.bias.copy_(-V @ mu + shift)
        module.encoder.raw_scale.copy_((inflate * covariance.diagonal().sqrt()).log())


class BayesianLinearRegression:
    """w ~ N(0, I / alpha), y | X, w ~ N(X w, sigma^2 I): one global latent, exact posterior."""

    alpha, sigma = 2.0, 0.5

    def __init__(
        self,
        n: int = 15,
        d: int = 3,
        seed: int = 0,
        vectorizable: bool = True,
        shift: float = 0.0,
        inflate: float = 1.0,
    ):
        """The guide is N(posterior mean + shift, inflate^2 posterior covariance)."""
        self.shift, self.inflate = shift, inflate
        g = torch.Generator().manual_seed(seed)
        self.X = torch.randn(n, d, generator=g, dtype=torch.float64)
        w = torch.randn(d, generator=g, dtype=torch.float64) / math.sqrt(self.alpha)
        self.y = self.X @ w + self.sigma * torch.randn(n, generator=g, dtype=torch.float64)
        self.vectorizable = vectorizable
        precision = (
            self.alpha * torch.eye(d, dtype=torch.float64) + self.X.T @ self.X / self.sigma**2
        )
        self.post_cov = torch.linalg.inv(precision)
        self.post_loc = self.post_cov @ self.X.T @ self.y / self.sigma**2

    def log_evidence(self) -> float:
        """log N(y; 0, sigma^2 I + X X^T / alpha)."""
        n = self.X.shape[0]
        cov = self.sigma**2 * torch.eye(n, dtype=torch.float64) + self.X @ self.X.T / self.alpha
        return float(
            dist.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov).log_prob(self.y)
        )

    def model(self):
        d = self.X.shape[1]
        prior = dist.Normal(torch.zeros(d, dtype=torch.float64), self.alpha**-0.5)
        w = pyro.sample("w", prior.to_event(1))
        # (X * w).sum(-1) broadcasts over particles; torch.mv does not (exercises the fallback)
        mean = (self.X * w).sum(-1) if self.vectorizable else torch.mv(self.X, w)
        with pyro.plate("data", self.X.shape[0]):
            pyro.sample("y", dist.Normal(mean, self.sigma), obs=self.y)

    def guide(self):
        scale_tril = torch.linalg.cholesky(self.inflate**2 * self.post_cov)
        pyro.sample("w", dist.MultivariateNormal(self.post_loc + self.shift, scale_tril=scale_tril))

    def elbo(self) -> float:
        """log p(y) - KL(q || p(w | y)) (Kingma & Welling eq. 1) for the guide."""
        q = dist.MultivariateNormal(self.post_loc + self.shift, self.inflate**2 * self.post_cov)
        p = dist.MultivariateNormal(self.post_loc, self.post_cov)
        return self.log_evidence() - float(torch.distributions.kl_divergence(q, p))


# --- exactness with the exact posterior -------------------------------------------------------------


@pytest.mark.parametrize("noise", ["isotropic", "diagonal"], ids=["ppca", "fa"])
def test_exact_posterior_weights_equal_log_evidence(float64, noise):
    """With q = p(z|x) every log w_k = log p(x_n) and L_K = log p(x) exactly (local latents)."""
    module, x = linear_gaussian(noise)
    exact = module.log_marginal(x)
    est = iwae(module.model, module.posterior_guide, x, num_samples=64, chunk_size=25)
    assert est.log_weights.shape == (64, 20)
    torch.testing.assert_close(est.log_weights, exact.expand(64, 20), rtol=0, atol=1e-8)
    torch.testing.assert_close(est.per_datum, exact, rtol=0, atol=1e-8)
    assert est.lk == pytest.approx(float(exact.sum()), abs=1e-8)
    torch.testing.assert_close(est.ess, torch.full((20,), 64.0, dtype=torch.float64))
    assert est.stderr < 1e-6
    assert est.num_samples == 64


@pytest.mark.parametrize("vectorizable", [True, False], ids=["vectorized", "one-draw-at-a-time"])
def test_exact_posterior_global_latent(float64, vectorizable):
    """A global latent: one weight per draw for the whole data set, each equal to log p(y)."""
    blr = BayesianLinearRegression(vectorizable=vectorizable)
    est = iwae(blr.model, blr.guide, num_samples=30, chunk_size=8)
    assert est.log_weights.shape == (30,)
    assert est.per_datum is None
    assert est.ess.shape == ()
    torch.testing.assert_close(
        est.log_weights, torch.full((30,), blr.log_evidence(), dtype=torch.float64)
    )
    assert est.lk == pytest.approx(blr.log_evidence(), abs=1e-8)


def test_subsampling_scale_is_removed_from_per_datum_weights(float64):
    """With num_data = 10 B the plate scales log p by 10; per-datum weights are still log p(x_n)."""
    module, x = linear_gaussian("diagonal")
    est = iwae(module.model, module.posterior_guide, x, num_samples=8, num_data=200)
    torch.testing.assert_close(est.per_datum, module.log_marginal(x), rtol=0, atol=1e-8)


# --- properties with an inexact guide -------------------------------------------------------------


def test_l1_equals_elbo_in_expectation(float64):
    """E[L_1] = E_q[log w] = ELBO: the mean over draws of the data-set log-weight, within 5 stderr."""
    module, x = linear_gaussian("diagonal", n=30)
    log_w = log_weights(module.model, module.guide, x, num_samples=2000)
    totals = log_w.sum(-1)  # L_1 of the whole data set, one per draw
    stderr = float(totals.std()) / math.sqrt(len(totals))
    exact = float(module.exact_elbo(x).elbo.sum())
    assert abs(float(totals.mean()) - exact) < 5 * stderr

    blr = BayesianLinearRegression(shift=0.3, inflate=1.5)
    log_w = log_weights(blr.model, blr.guide, num_samples=2000)
    stderr = float(log_w.std()) / math.sqrt(len(log_w))
    assert abs(float(log_w.mean()) - blr.elbo()) < 5 * stderr


def test_lk_is_non_decreasing_in_k_and_above_the_elbo(float64):
    """E[L_1] <= E[L_4] <= ... <= E[L_256] <= log p(x), from disjoint groups of one set of draws."""
    module, x = linear_gaussian("diagonal", n=10, seed=1)
    log_w = log_weights(module.model, module.guide, x, num_samples=8192)
    means, stderrs = [], []
    for k in (1, 4, 16, 64, 256):
        groups = log_w.reshape(-1, k, x.shape[0])  # (8192 / k, k, N)
        bounds = (torch.logsumexp(groups, dim=1) - math.log(k)).sum(-1)  # L_k per group
        means.append(float(bounds.mean()))
        stderrs.append(float(bounds.std()) / math.sqrt(len(bounds)))
    for i in range(len(means) - 1):
        assert means[i + 1] - means[i] > -5 * math.hypot(stderrs[i], stderrs[i + 1])
    assert means[-1] - means[0] > 5 * math.hypot(stderrs[0], stderrs[-1])  # strictly, here
    exact_elbo = float(module.exact_elbo(x).elbo.sum())
    exact_log_px = float(module.log_marginal(x).sum())
    assert abs(means[0] - exact_elbo) < 5 * stderrs[0]
    assert means[-1] < exact_log_px + 5 * stderrs[-1]
    assert iwae(module.model, module.guide, x, num_samples=100).lk > exact_elbo


@pytest.mark.parametrize("noise", ["isotropic", "diagonal"], ids=["ppca", "fa"])
def test_lk_converges_to_exact_log_evidence(float64, noise):
    """L_5000 is within 5 stderr of the exact log p(x) for a guide near the posterior."""
    module, x = linear_gaussian(noise, n=50, seed=2)
    near_posterior_guide(module, x)
    exact_log_px = float(module.log_marginal(x).sum())
    est = iwae(module.model, module.guide, x, num_samples=5000)
    assert abs(est.lk - exact_log_px) < 5 * est.stderr
    assert est.lk - float(module.exact_elbo(x).elbo.sum()) > 5 * est.stderr  # L_K > ELBO


def test_global_lk_converges_to_exact_log_evidence(float64):
    blr = BayesianLinearRegression(shift=0.1, inflate=1.2)
    est = iwae(blr.model, blr.guide, num_samples=5000)
    assert abs(est.lk - blr.log_evidence()) < 5 * est.stderr
    assert est.lk > blr.elbo()


def test_vae_lk_above_elbo_and_per_datum():
    """On a VAE the latents are local: (K, N) weights and L_K >= the ELBO from the same draws."""
    vae = VAE(16, latent_dim=2, hidden_dims=(8,))
    x = torch.bernoulli(torch.full((12, 16), 0.3))
    est = iwae(vae.model, vae.guide, x, num_samples=200)
    assert est.log_weights.shape == (200, 12) and est.per_datum.shape == (12,)
    assert est.ess.shape == (12,) and bool(((est.ess >= 1) & (est.ess <= 200)).all())
    assert est.lk == pytest.approx(float(est.per_datum.sum()))
    assert bool((est.per_datum >= est.log_weights.mean(0)).all())  # Jensen, draw by draw
    assert est.lk > float(est.log_weights.sum(-1).mean()) + 5 * est.stderr


# --- chunking and errors ------------------------------------------------------------------------


def test_particles_are_drawn_in_bounded_chunks(float64):
    """At most chunk_size draws are alive at once; the weights are the same distribution."""
    module, x = linear_gaussian("diagonal")
    shapes = []

    def guide(x):
        z = module.guide(x)
        shapes.append(tuple(z.shape))
        return z

    log_w = log_weights(module.model, guide, x, num_samples=100, chunk_size=30)
    assert log_w.shape == (100, 20)
    # one probe run, then chunks of 30, 30, 30, 10 along the particle dim
    assert shapes == [(20, 2), (30, 20, 2), (30, 20, 2), (30, 20, 2), (10, 20, 2)]


def test_global_and_local_latents_give_whole_data_weights(float64):
    """A model with a global and local latents is weighted for the whole data set: (K,)."""
    x = torch.randn(7, 3, dtype=torch.float64)

    def model(x):
        W = pyro.sample("W", dist.Normal(torch.zeros(3, 2, dtype=torch.float64), 1.0).to_event(2))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1))
            loc = (z.unsqueeze(-2) * W).sum(-1)
            pyro.sample("x", dist.Normal(loc, 0.5).to_event(1), obs=x)

    def guide(x):
        pyro.sample("W", dist.Normal(torch.zeros(3, 2, dtype=torch.float64), 0.5).to_event(2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample(
                "z", dist.Normal(torch.zeros(x.shape[0], 2, dtype=torch.float64), 0.7).to_event(1)
            )

    est = iwae(model, guide, x, num_samples=50, chunk_size=20)
    assert est.log_weights.shape == (50,) and est.per_datum is None
    assert math.isfinite(est.lk) and est.stderr > 0


def test_errors_are_one_line_option_errors(float64):
    module, x = linear_gaussian("isotropic")
    with pytest.raises(OptionError, match="num_samples"):
        iwae(module.model, module.guide, x, num_samples=0)
    with pytest.raises(OptionError, match="chunk_size"):
        log_weights(module.model, module.guide, x, num_samples=3, chunk_size=0)

    def guide_without_z(x):
        pass

    with pytest.raises(OptionError, match="'z'"):
        iwae(module.model, guide_without_z, x, num_samples=3)
    assert PARTICLE_PLATE.startswith("_")


# --- compiled chunks -----------------------------------------------------------------------------


@pytest.fixture
def export_at_once(monkeypatch):
    """log_weights exports a chunk size's graph at its first chunk (not after
    EXPORT_AFTER_CHUNKS chunks)."""
    import inference.evidence as evidence

    monkeypatch.setattr(evidence, "EXPORT_AFTER_CHUNKS", 0)
    evidence._GRAPHS.clear()
    yield
    evidence._GRAPHS.clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("which", ["vae", "ppca", "fa"])
def test_compiled_chunks_draw_the_same_weights_bit_for_bit(export_at_once, which, dtype):
    """A static pair's chunks run as exported graphs (the part that draws no noise computed
    once per call): the same noise and the same log-weights as Pyro run eagerly, last
    (ragged) chunk included; the second compiled call replays the graphs."""
    import inference.evidence as evidence

    pyro.clear_param_store()
    torch.manual_seed(0)
    if which == "vae":
        module = VAE(16, latent_dim=3, hidden_dims=(8,)).to(dtype)
        x = torch.bernoulli(torch.full((12, 16), 0.3, dtype=dtype))
    else:
        noise = "isotropic" if which == "ppca" else "diagonal"
        module = LinearGaussian(5, 2, noise=noise).to(dtype)
        x = torch.randn(12, 5, dtype=dtype)

    def weights(compiled):
        return log_weights(
            module.model, module.guide, x, num_samples=50, chunk_size=20, compiled=compiled
        )

    assert_compiled_matches_eager(
        lambda: weights(False),
        lambda: weights(True),
        lambda: sum(traced.graph_calls for traced in evidence._GRAPHS.values()),
        seeds=(7, 7),
    )
    (traced,) = evidence._GRAPHS.values()
    assert traced.hoist and all(graph.prefix is not None for graph in traced.graphs())


def test_only_declared_static_pairs_are_compiled_by_default(float64, export_at_once):
    import inference.evidence as evidence

    module, x = linear_gaussian("diagonal")
    evidence._GRAPHS.clear()

    def undeclared_guide(x):
        return module.guide(x)

    log_weights(module.model, undeclared_guide, x, num_samples=10, chunk_size=4)
    assert not evidence._GRAPHS
    log_weights(module.model, module.guide, x, num_samples=10, chunk_size=4)
    (traced,) = evidence._GRAPHS.values()
    assert traced.compilations == 1  # chunks of 4, 4, then 2 run eagerly: one graph
    log_weights(module.model, module.guide, x, num_samples=10, chunk_size=4)
    assert traced.compilations == 1  # graphs are kept for the pair


def test_chunks_of_more_rows_than_chunk_rows_are_exported_after_as_many_rows(float64, monkeypatch):
    """One draw of N > CHUNK_ROWS rows per chunk costs N / CHUNK_ROWS default chunks eagerly
    (and its graph computes the encoder once per call, not per chunk): its graph is exported
    after EXPORT_AFTER_CHUNKS * CHUNK_ROWS / N chunks, with the same log-weights."""
    import inference.evidence as evidence

    module, x = linear_gaussian("diagonal")  # N = 20 rows
    monkeypatch.setattr(evidence, "CHUNK_ROWS", 8)  # so one draw (20 rows) a chunk
    monkeypatch.setattr(evidence, "EXPORT_AFTER_CHUNKS", 10)  # 80 rows: after 4 chunks
    evidence._GRAPHS.clear()
    pyro.set_rng_seed(3)
    got = log_weights(module.model, module.guide, x, num_samples=7)
    (traced,) = evidence._GRAPHS.values()
    assert (traced.compilations, traced.graph_calls) == (1, 3)
    pyro.set_rng_seed(3)
    want = log_weights(module.model, module.guide, x, num_samples=7, compiled=False)
    assert torch.equal(got, want)
    pyro.set_rng_seed(3)  # chunks of 8 rows or fewer keep EXPORT_AFTER_CHUNKS
    evidence._GRAPHS.clear()
    log_weights(module.model, module.guide, x[:8], num_samples=7)
    (traced,) = evidence._GRAPHS.values()
    assert traced.compilations == 0
    evidence._GRAPHS.clear()


@pytest.mark.parametrize("slow", [0.0, 1e9])
def test_slow_eager_chunks_are_exported_after_their_seconds(float64, monkeypatch, slow):
    """Chunks whose eager calls take SLOW_CALL_SECONDS or more each are exported once they
    have taken EXPORT_AFTER_EAGER_SECONDS, before EXPORT_AFTER_CHUNKS, with the same
    log-weights; faster chunks keep the count."""
    import inference.evidence as evidence
    import inference.traced_loss as traced_loss

    module, x = linear_gaussian("diagonal")
    monkeypatch.setattr(evidence, "EXPORT_AFTER_CHUNKS", 10**6)  # the count never comes
    monkeypatch.setattr(evidence, "EXPORT_AFTER_EAGER_SECONDS", 1e-12)  # the first chunk
    monkeypatch.setattr(traced_loss, "SLOW_CALL_SECONDS", slow)
    evidence._GRAPHS.clear()
    pyro.set_rng_seed(3)
    got = log_weights(module.model, module.guide, x, num_samples=7, chunk_size=2)
    (traced,) = evidence._GRAPHS.values()
    exported = slow == 0.0  # chunks of 2, 2, 2 and 1 draws: the 2's graph after one eager
    assert (traced.compilations, traced.graph_calls) == ((1, 2) if exported else (0, 0))
    pyro.set_rng_seed(3)
    want = log_weights(module.model, module.guide, x, num_samples=7, chunk_size=2, compiled=False)
    assert torch.equal(got, want)
    evidence._GRAPHS.clear()


def test_two_latents_of_one_shape_keep_their_own_draws(export_at_once):
    """Two sites drawing noise of the same shape: the exported chunk graph (common
    subexpressions merged, the noise-free part kept across chunks) still draws twice."""
    import inference.evidence as evidence
    from models.structure import static_structure

    @static_structure
    def model(x):
        with pyro.plate("data", x.shape[0]):
            a = pyro.sample("a", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            b = pyro.sample("b", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(a + b, 1.0).to_event(1), obs=x)

    @static_structure
    def guide(x):
        loc = pyro.param("loc", torch.zeros(2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("a", dist.Normal(loc.expand(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("b", dist.Normal(loc.expand(x.shape[0], 2), 1.0).to_event(1))

    x = torch.randn(5, 2)
    assert_compiled_matches_eager(
        lambda: log_weights(model, guide, x, num_samples=8, chunk_size=4, compiled=False),
        lambda: log_weights(model, guide, x, num_samples=8, chunk_size=4, compiled=True),
        lambda: sum(traced.graph_calls for traced in evidence._GRAPHS.values()),
    )


# --- diagnostics of the log-weights: ESS and PSIS k̂ -----------------------------------------------


def test_effective_sample_size_closed_forms(float64):
    """ESS = (sum w)^2 / sum w^2: K for equal weights, 1 for one weight, (1 + a)^2 / (1 + a^2)
    for the pair (1, a); per column for (K, N) log-weights."""
    a = 3.0
    log_w = torch.stack(
        [
            torch.zeros(5),  # five equal weights
            torch.tensor([0.0, -math.inf, -math.inf, -math.inf, -math.inf]),  # one weight
            torch.tensor([0.0, math.log(a), -math.inf, -math.inf, -math.inf]),  # the pair (1, a)
        ],
        dim=1,
    )  # (K = 5, N = 3)
    expected = torch.tensor([5.0, 1.0, (1 + a) ** 2 / (1 + a**2)])
    torch.testing.assert_close(effective_sample_size(log_w), expected)
    torch.testing.assert_close(
        effective_sample_size(log_w[:, 2] + 700.0), expected[2]
    )  # no overflow


def test_iwae_reports_the_effective_sample_size_of_its_weights(float64):
    module, x = linear_gaussian("isotropic")
    est = iwae(module.model, module.guide, x, num_samples=64)
    torch.testing.assert_close(est.ess, effective_sample_size(est.log_weights))


@pytest.mark.parametrize("alpha", [5.0, 0.8], ids=["light-tail-k0.2", "heavy-tail-k1.25"])
def test_psis_khat_recovers_the_pareto_tail_of_the_weights(alpha):
    """Weights w ~ Pareto(1, alpha) have tail index k = 1 / alpha; log w ~ Exponential(alpha)."""
    g = torch.Generator().manual_seed(0)
    log_w = torch.empty(4000, 3, dtype=torch.float64).exponential_(alpha, generator=g)
    khat = psis_khat(log_w)
    assert khat.shape == (3,)
    assert np.abs(khat - 1 / alpha).max() < 0.25, khat
    assert ((khat > KHAT_THRESHOLD) == (1 / alpha > KHAT_THRESHOLD)).all()
    assert psis_khat(log_w[:, 0]).shape == ()  # (K,) global weights: one k̂


def test_psis_khat_of_one_draw_is_undefined_not_an_error():
    """One draw (K = 1, from the Python API; the command line refuses it) has no tail to fit:
    k̂ is NaN for each datum, where ArviZ would index past the single weight."""
    khat = psis_khat(torch.zeros(1, 3))
    assert khat.shape == (3,) and np.isnan(khat).all()
    assert np.isnan(psis_khat(torch.zeros(1))) and psis_khat(torch.zeros(1)).shape == ()


def test_log_px_is_a_deprecated_name_of_the_bound(float64):
    module, x = linear_gaussian("isotropic")
    est = iwae(module.model, module.guide, x, num_samples=8)
    with pytest.warns(DeprecationWarning, match="use .lk"):
        assert est.log_px == est.lk
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "log_px" not in est._asdict() and est.lk == est._asdict()["lk"]
