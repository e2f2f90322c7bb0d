"""ELBO <= L_K <= log p(x) on models whose evidence is known, for every autoguide.

The coin of Pyro's SVI Part I: theta ~ Beta(10, 10), six heads and four tails, so

    log p(x) = log B(16, 14) - log B(10, 10)                       (Beta-Bernoulli)

and conjugate Bayesian linear regression, w ~ N(0, I), y ~ N(X w, sigma^2 I), so

    log p(y) = log N(y; 0, sigma^2 I + X X^T)                       (Bishop, PRML §3.5.1).

An autoguide samples a constrained latent (theta in (0, 1)) as a Delta whose log-density is
the log-Jacobian of the transform; Pyro's registered KL(Delta || p) drops it, so
TraceMeanField_ELBO reports an "ELBO" above log p(x). elbo-lab uses the analytic KL only where
it is valid (inference.elbo.kl_method) and checks the bounds on every report.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoHierarchicalNormalMessenger,
    AutoIAFNormal,
    AutoLaplaceApproximation,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalMessenger,
    AutoRegressiveMessenger,
    AutoStructured,
)

from inference.bounds import check_bounds, is_point_estimate
from inference.elbo import decompose, meanfield_violations
from inference.errors import OptionError
from inference.evidence import iwae
from inference.train import choose_estimator
from models.guides import AUTOGUIDES as BY_NAME

HEADS, TAILS = 6, 4


def coin_data():
    """The tutorial's data: a list of ten scalar tensors."""
    return [torch.tensor(1.0)] * HEADS + [torch.tensor(0.0)] * TAILS


def coin_model(data):
    """SVI Part I, as written there."""
    f = pyro.sample("latent_fairness", dist.Beta(10.0, 10.0))
    for i in range(len(data)):
        pyro.sample(f"obs_{i}", dist.Bernoulli(f), obs=data[i])


def coin_log_evidence() -> float:
    def log_beta(a, b):
        return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    return log_beta(10 + HEADS, 10 + TAILS) - log_beta(10, 10)


SIGMA = 0.5


def regression_data():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(20, 2, generator=g)
    y = X @ torch.tensor([1.0, -0.5]) + SIGMA * torch.randn(20, generator=g)
    return X, y


def regression_model(X, y=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    s = pyro.sample("s", dist.LogNormal(0.0, 0.1))  # a positive latent, as a scale would be
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, SIGMA * s / s.detach()), obs=y)


def regression_log_evidence() -> float:
    """log p(y) with s integrated out exactly: s only rescales by s / s = 1 in value."""
    X, y = regression_data()
    covariance = SIGMA**2 * torch.eye(len(y)) + X @ X.T
    return float(dist.MultivariateNormal(torch.zeros(len(y)), covariance).log_prob(y))


AUTOGUIDES = {
    "AutoNormal": AutoNormal,
    "AutoDiagonalNormal": AutoDiagonalNormal,
    "AutoMultivariateNormal": AutoMultivariateNormal,
    "AutoLowRankMultivariateNormal": AutoLowRankMultivariateNormal,
    "AutoIAFNormal": lambda model: AutoIAFNormal(model, hidden_dim=[8]),
    "AutoDelta": AutoDelta,
    "AutoLaplaceApproximation": AutoLaplaceApproximation,
    "AutoStructured": AutoStructured,
    "AutoGaussian": BY_NAME["AutoGaussian"],
    # these run the model inside themselves: their trace holds its observed sites too
    "AutoNormalMessenger": AutoNormalMessenger,
    "AutoHierarchicalNormalMessenger": AutoHierarchicalNormalMessenger,
    "AutoRegressiveMessenger": AutoRegressiveMessenger,
}

#: point masses at the MAP (the Laplace guide's in unconstrained space, a Delta at a transform
#: of its auxiliary Delta, of log-density the log-Jacobian)
POINT_ESTIMATES = {"AutoDelta", "AutoLaplaceApproximation"}

CASES = {
    "coin": (coin_model, lambda: ((coin_data(),), {}), coin_log_evidence),
    "regression": (regression_model, lambda: (regression_data(), {}), regression_log_evidence),
}


#: every (model, autoguide); Pyro's AutoIAFNormal needs two latent dimensions, the coin has one
PAIRS = [
    (case, name)
    for case in CASES
    for name in AUTOGUIDES
    if (case, name) != ("coin", "AutoIAFNormal")
]


def _case(case, guide_name):
    model, make_args, exact = CASES[case]
    args, kwargs = make_args()
    guide = AUTOGUIDES[guide_name](model)
    guide(*args, **kwargs)  # create the parameters
    return model, guide, args, kwargs, exact()


@pytest.mark.parametrize("case, guide_name", PAIRS)
def test_default_estimator_elbo_is_below_the_exact_evidence(case, guide_name):
    model, guide, args, kwargs, exact = _case(case, guide_name)
    estimator = choose_estimator("auto", model, guide, *args, **kwargs)
    d = decompose(
        model, guide, *args, num_particles=100, analytic_kl=estimator == "meanfield", **kwargs
    )
    if guide_name in POINT_ESTIMATES:  # log p(x, z*) is no bound, and says so
        assert is_point_estimate(guide, *args, **kwargs)
        assert not check_bounds(d.elbo, d.elbo_stderr, d.elbo, None, 1, exact,
                                point_estimate=True).checked  # fmt: skip
        return
    assert not is_point_estimate(guide, *args, **kwargs)
    assert d.elbo <= exact + 5 * d.elbo_stderr
    estimate = iwae(model, guide, *args, num_samples=500, **kwargs)
    check = check_bounds(d.elbo, d.elbo_stderr, estimate.lk, estimate.stderr, 500, exact)
    assert check.ok, check.violations


@pytest.mark.parametrize("case, guide_name", PAIRS)
def test_decompose_is_trace_elbo_where_analytic_kl_is_invalid(case, guide_name):
    """Every autoguide site is a Delta, or (messenger guides) a transformed Normal against a
    Beta or LogNormal prior: decompose's terms are log q - log p, Trace_ELBO's."""
    model, guide, args, kwargs, _ = _case(case, guide_name)
    pyro.set_rng_seed(1)
    d = decompose(model, guide, *args, analytic_kl=True, **kwargs)
    pyro.set_rng_seed(1)
    loss = Trace_ELBO().loss(model, guide, *args, **kwargs)
    assert {s.method for s in d.sites} == {"monte_carlo"}
    assert d.loss == pytest.approx(loss, rel=1e-6, abs=1e-5)


@pytest.mark.parametrize(
    "guide_name", ["AutoNormal", "AutoDiagonalNormal", "AutoMultivariateNormal"]
)
def test_trace_meanfield_elbo_on_a_constrained_autoguide_breaks_the_bound(guide_name):
    """The defect the rule prevents, measured: Pyro's TraceMeanField_ELBO "ELBO" of the coin
    lies above log p(x); meanfield_violations names the site, choose_estimator falls back
    to Trace_ELBO, and an explicit meanfield is refused."""
    model, guide, args, kwargs, exact = _case("coin", guide_name)
    values = torch.tensor(
        [-TraceMeanField_ELBO().loss(model, guide, *args, **kwargs) for _ in range(400)]
    )
    broken, se = float(values.mean()), float(values.std() / 20)
    check = check_bounds(broken, se, broken, se, 1, exact)
    assert not check.ok and "exact log p(x)" in check.violations[0]
    assert "latent_fairness" in meanfield_violations(model, guide, *args, **kwargs)[0]
    assert choose_estimator("auto", model, guide, *args, **kwargs) == "trace"
    with pytest.raises(OptionError, match="latent_fairness"):
        choose_estimator("meanfield", model, guide, *args, **kwargs)


def test_the_vae_keeps_trace_meanfield_elbo():
    from models import VAE

    vae = VAE(8, 2, (4,))
    x = torch.bernoulli(torch.full((5, 8), 0.5))
    assert meanfield_violations(vae.model, vae.guide, x) == []
    assert choose_estimator("auto", vae.model, vae.guide, x) == "meanfield"


def test_a_prior_that_depends_on_a_latent_gets_monte_carlo_kl():
    def model(x):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.Normal(a, 1.0))
        pyro.sample("x", dist.Normal(b, 1.0), obs=x)

    def guide(x):
        pyro.sample("a", dist.Normal(pyro.param("a_loc", torch.tensor(0.0)), 1.0))
        pyro.sample("b", dist.Normal(pyro.param("b_loc", torch.tensor(0.0)), 1.0))

    x = torch.tensor(0.3)
    methods = {s.name: s.method for s in decompose(model, guide, x).sites}
    assert methods == {"a": "analytic", "b": "monte_carlo", "x": "monte_carlo"}
    assert choose_estimator("auto", model, guide, x) == "trace"


def test_check_bounds_flags_each_inequality():
    ok = check_bounds(-10.0, 0.01, -9.0, 0.01, 100, -8.5)
    assert ok.ok and ok.checked and "ok" in ok.lines()[0]
    assert not check_bounds(-8.0, 0.01, -9.0, 0.01, 100).ok  # ELBO above L_K
    assert check_bounds(-8.96, 0.01, -9.0, 0.01, 100).ok  # within 5 s.e.
    bad = check_bounds(-10.0, 0.01, -8.0, 0.01, 100, -8.5)  # L_K above log p(x)
    assert not bad.ok and any("BOUND VIOLATED" in line for line in bad.lines())


def test_report_particles_on_a_large_split_spend_as_many_draws_as_its_first_rows():
    """A batched split of more than BOUND_ROWS rows: the fewest draws per row (and at least 2,
    for an error bar) whose row-draws are at least the first BOUND_ROWS rows' own; global
    latents draw the whole data set EVAL_PARTICLES_GLOBAL times however many rows."""
    from inference.bounds import BOUND_ROWS, report_particles
    from inference.choices import EVAL_PARTICLES_GLOBAL, EVAL_PARTICLES_LOCAL

    budget = EVAL_PARTICLES_LOCAL * BOUND_ROWS
    for rows in (None, 1, BOUND_ROWS):
        assert report_particles(True, rows) == EVAL_PARTICLES_LOCAL
        assert report_particles(False, rows) == EVAL_PARTICLES_GLOBAL
    for rows in range(BOUND_ROWS + 1, 20 * BOUND_ROWS, 331):
        p = report_particles(True, rows)
        assert 2 <= p <= EVAL_PARTICLES_LOCAL and p * rows >= budget, rows
        assert p == 2 or (p - 1) * rows < budget, rows
    assert report_particles(True, 15000) == 2  # the MNIST-sized test split


def test_explain_reports_the_elbo_that_evaluate_reports_on_a_large_split(monkeypatch):
    """``explain`` and ``checked_metrics`` (``evaluate``, train's report) draw the ELBO alike on
    a batched split of more than BOUND_ROWS rows (fewer draws per row): the same number and
    standard error for the same pair, data and seed."""
    import inference.bounds as bounds
    from inference.explain import explain
    from models.vae import VAE

    monkeypatch.setattr(bounds, "BOUND_ROWS", 8)
    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = VAE(6, latent_dim=2, hidden_dims=(5,))
    x = torch.bernoulli(torch.full((30, 6), 0.4))
    c = bounds.checked_metrics(vae.model, vae.guide, x, estimator="meanfield", batched=True)
    e = explain(vae.model, vae.guide, x, num_samples=20)
    assert bounds.report_particles(True, 30) == 3 and e.n == 30
    assert (e.elbo, e.elbo_stderr) == (c.metrics.elbo, c.metrics.elbo_stderr)


def test_a_large_batched_split_checks_its_bounds_on_its_first_rows(monkeypatch):
    """``checked_metrics`` on a batched split of more than BOUND_ROWS rows: the metrics and
    Pyro's loss check cover every row; ELBO <= L_K is checked on the first BOUND_ROWS rows,
    the ELBO and L_K both computed on those rows (as ``evaluate`` and ``iwae`` compute them
    there), and the report says so. With an exact log p(x) (whose value is for all rows), or
    unbatched, all rows are checked."""
    import inference.bounds as bounds
    from inference.elbo import EVAL_SEED, evaluate
    from inference.io import seeded
    from models.vae import VAE

    monkeypatch.setattr(bounds, "BOUND_ROWS", 8)
    torch.manual_seed(0)
    vae = VAE(6, latent_dim=2, hidden_dims=(5,))
    x = torch.bernoulli(torch.full((30, 6), 0.4))
    c = bounds.checked_metrics(vae.model, vae.guide, x, estimator="meanfield", batched=True)
    assert c.metrics.n == 30 and (c.bounds.rows, c.bounds.of_rows) == (8, 30)
    first = evaluate(vae.model, vae.guide, x[:8], batch_size=1024, num_particles=10)
    assert (c.bounds.elbo, c.bounds.elbo_stderr) == (first.elbo, first.elbo_stderr)
    with seeded(EVAL_SEED + 1):
        assert c.bounds.lk == iwae(vae.model, vae.guide, x[:8], num_samples=100).lk / 8
    assert c.bounds.ok and c.bounds.lines()[0].startswith("  bounds on the first 8 of 30: ELBO")
    assert c.bounds.elbo != c.metrics.elbo  # the report's ELBO is all rows'
    # ... with fewer draws per row, as many in all as the first rows get, and Pyro's loss on
    # the same noise
    assert bounds.report_particles(True, 30) == 3
    everything = evaluate(vae.model, vae.guide, x, batch_size=1024, num_particles=3)
    assert c.metrics == everything
    assert abs(c.pyro_loss - (everything.kl - everything.reconstruction)) < 1e-5
    for options in (
        {"batched": False},
        {"batched": True, "exact_log_px": c.metrics.elbo + 50},  # log p(x) of all rows
        {"batched": True, "num_data": 30},  # keywords: which rows they go with is unknown
    ):
        whole = bounds.checked_metrics(vae.model, vae.guide, x, estimator="meanfield", **options)
        assert whole.bounds.rows is None and whole.bounds.elbo == whole.metrics.elbo
