"""decompose() against Pyro's own estimators: same noise, same loss, for local and global latents."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from equivalence import assert_compiled_matches_eager
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import constraints

import inference.elbo as elbo_module
from inference.elbo import decompose
from models.vae import VAE


def vae_case():
    vae = VAE(16, latent_dim=3, hidden_dims=(8,))
    x = torch.bernoulli(torch.full((10, 16), 0.4))
    return vae.model, vae.guide, (x,), {}


def vae_subsampled_case():
    """A mini-batch of 10 scaled to 100 data points by the plate's subsampling."""
    model, guide, args, _ = vae_case()
    return model, guide, args, {"num_data": 100}


def regression_case():
    """Bayesian linear regression: global latents w (D,) and log-noise, no local ones."""
    X = torch.randn(20, 3)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * torch.randn(20)

    def model(X, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        log_sigma = pyro.sample("log_sigma", dist.Normal(-1.0, 1.0))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Normal(X @ w, log_sigma.exp()), obs=y)

    def guide(X, y):
        loc = pyro.param("w_loc", torch.randn(3))
        scale = pyro.param("w_scale", torch.full((3,), 0.3), constraint=constraints.positive)
        pyro.sample("w", dist.Normal(loc, scale).to_event(1))
        pyro.sample("log_sigma", dist.Normal(pyro.param("s_loc", torch.tensor(-0.5)), 0.2))

    return model, guide, (X, y), {}


def global_and_local_case():
    """Factor analysis with a prior on the loadings: global W (D, Q), local z_n (Q,)."""
    x = torch.randn(12, 4)

    def model(x):
        W = pyro.sample("W", dist.Normal(torch.zeros(4, 2), 1.0).to_event(2))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T, 0.5).to_event(1), obs=x)

    def guide(x):
        W_loc = pyro.param("W_loc", 0.1 * torch.randn(4, 2))
        pyro.sample("W", dist.Normal(W_loc, 0.3).to_event(2))
        z_loc = pyro.param("z_loc", torch.zeros(x.shape[0], 2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(z_loc, 0.5).to_event(1))

    return model, guide, (x,), {}


def hierarchical_case():
    """Local z_n whose prior depends on a global latent m: analytic KL does not apply to z."""
    x = torch.randn(8)

    def model(x):
        m = pyro.sample("m", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(m, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        pyro.sample("m", dist.Normal(pyro.param("m_loc", torch.tensor(0.2)), 0.5))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(pyro.param("z_loc", torch.zeros(x.shape[0])), 0.4))

    return model, guide, (x,), {}


CASES = {
    "vae": vae_case,
    "vae-subsampled": vae_subsampled_case,
    "bayesian-linear-regression": regression_case,
    "global-and-local": global_and_local_case,
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", list(CASES) + ["hierarchical"])
def test_monte_carlo_loss_equals_trace_elbo(case, seed):
    """analytic_kl=False: decompose's loss is Trace_ELBO().loss for the same noise."""
    model, guide, args, kwargs = (CASES.get(case) or hierarchical_case)()
    pyro.set_rng_seed(seed)
    d = decompose(model, guide, *args, analytic_kl=False, **kwargs)
    pyro.set_rng_seed(seed)
    expected = Trace_ELBO().loss(model, guide, *args, **kwargs)
    assert d.loss == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert all(s.method == "monte_carlo" for s in d.sites)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", list(CASES))
def test_analytic_loss_equals_trace_mean_field_elbo(case, seed):
    """analytic_kl=True: decompose's loss is TraceMeanField_ELBO().loss for the same noise."""
    model, guide, args, kwargs = CASES[case]()
    pyro.set_rng_seed(seed)
    d = decompose(model, guide, *args, analytic_kl=True, **kwargs)
    pyro.set_rng_seed(seed)
    expected = TraceMeanField_ELBO().loss(model, guide, *args, **kwargs)
    assert d.loss == pytest.approx(expected, rel=1e-6, abs=1e-6)
    methods = {s.name: s.method for s in d.sites if s.kind == "latent"}
    assert set(methods.values()) == {"analytic"}


def test_conditioned_prior_falls_back_to_monte_carlo():
    """z's prior depends on the latent m, so its KL is Monte Carlo; m's is analytic."""
    model, guide, args, _ = hierarchical_case()
    d = decompose(model, guide, *args, analytic_kl=True)
    assert {s.name: s.method for s in d.sites} == {
        "m": "analytic",
        "z": "monte_carlo",
        "x": "monte_carlo",
    }


def test_latent_parents_are_found_once_per_static_model_and_shape(monkeypatch):
    """Provenance tracking runs once for a declared-static model and argument shape, at every
    call for any other model; the decomposition is the same either way."""
    from models.vae import VAE

    calls = []
    real = elbo_module.latent_parents

    def counting(model, *args, **kwargs):
        calls.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(elbo_module, "latent_parents", counting)
    elbo_module._PARENTS.clear()
    torch.manual_seed(0)
    vae = VAE(6, latent_dim=2, hidden_dims=(4,))
    x = torch.bernoulli(torch.full((5, 6), 0.5))

    def undeclared(x):
        return vae.model(x)

    results = []
    for model in (vae.model, vae.model, undeclared, undeclared):
        pyro.set_rng_seed(1)
        results.append(elbo_module.decompose(model, vae.guide, x))
    assert len(calls) == 3  # once for the static model, twice for the undeclared one
    assert results[0] == results[1] == results[2] == results[3]


@pytest.fixture
def export_at_once(monkeypatch):
    """decompose exports each draw's graph at its first call (not after EXPORT_AFTER_DRAWS)."""
    monkeypatch.setattr(elbo_module, "EXPORT_AFTER_DRAWS", 0)
    elbo_module._TERMS.clear()
    yield
    elbo_module._TERMS.clear()


def _graph_calls():
    return sum(traced.graph_calls for traced, _ in elbo_module._TERMS.values())


def _assert_decompositions_match(model, guide, x, exact=True, **options):
    """decompose compiled (a graph per draw, which must run) equals decompose eager, twice:
    the first compiled call exports the graph, the second replays it."""
    assert_compiled_matches_eager(
        lambda: decompose(model, guide, x, compiled=False, **options),
        lambda: decompose(model, guide, x, compiled=True, **options),
        _graph_calls,
        seeds=(3, 3),
        exact=exact,
        rtol=1e-6,
        atol=1e-4,
    )


@pytest.mark.parametrize("analytic_kl", [True, False])
@pytest.mark.parametrize("family", ["own", "diag", "full", "flow"])
def test_compiled_decomposition_is_the_eager_one(export_at_once, family, analytic_kl):
    """Exported per-site terms: every number of the decomposition equals the eager one."""
    from models.guides import make_guide

    torch.manual_seed(0)
    vae = VAE(10, latent_dim=3, hidden_dims=(6,))
    guide = vae.guide if family == "own" else make_guide(family, 10, 3, (6,))
    x = torch.bernoulli(torch.full((9, 10), 0.4))
    # A recorded MultivariateNormal.log_prob (torch's _batch_mahalanobis) can differ from the
    # eager one in the last bit of float32: equal to rounding, not bit for bit.
    _assert_decompositions_match(
        vae.model,
        guide,
        x,
        exact=family != "full",
        num_particles=3,
        analytic_kl=analytic_kl,
        num_data=30,
    )
    pyro.set_rng_seed(3)
    eager = decompose(vae.model, guide, x, num_particles=3, analytic_kl=analytic_kl, num_data=30)
    methods = {s.name: s.method for s in eager.sites}
    analytic = analytic_kl and family in ("own", "diag")  # no registered KL(MVN || Normal)
    assert methods["z"] == ("analytic" if analytic else "monte_carlo")


def test_compiled_decomposition_of_linear_gaussian_and_a_static_user_model(float64, export_at_once):
    from pyro.infer.autoguide import AutoNormal

    from models.linear_gaussian import LinearGaussian
    from models.structure import static_structure

    torch.manual_seed(0)
    lg = LinearGaussian(5, 2, noise="diagonal").double()
    y = torch.randn(7, 5, dtype=torch.float64)
    _assert_decompositions_match(lg.model, lg.guide, y, num_particles=2)

    @static_structure
    def regression(data):
        w = pyro.sample("w", dist.Normal(data.new_zeros(2), 1.0).to_event(1))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("y", dist.Normal(data[:, :2] @ w, 0.5), obs=data[:, 2])

    pyro.clear_param_store()
    data = torch.randn(11, 3, dtype=torch.float64)
    guide = AutoNormal(regression)
    guide(data)  # create the guide's parameters
    _assert_decompositions_match(regression, guide, data, num_particles=2)


def test_evaluate_is_decompose_per_datum_under_its_seed():
    """One chunk: evaluate's numbers are decompose's totals over the seeded draws, / N."""
    from inference.elbo import evaluate
    from inference.io import seeded

    model, guide, (x,), _ = vae_case()
    m = evaluate(model, guide, x, batch_size=None, seed=7, num_particles=3)
    with seeded(7):
        d = decompose(model, guide, x, num_particles=3)
    n = x.shape[0]
    assert m.n == n
    assert (m.reconstruction, m.kl, m.elbo) == (d.reconstruction / n, d.kl / n, d.elbo / n)
    assert m.loss == pytest.approx(d.kl / n - d.reconstruction / n, rel=1e-12)
    assert m.elbo_stderr == pytest.approx(d.elbo_stderr / n, rel=1e-12)


def test_evaluate_in_chunks_sums_the_chunks():
    """Local latents: chunks of 4, 4 and 2 rows in order, each a full plate (no num_data), and
    the split's ELBO is the sum of theirs; the same seed gives the same numbers again."""
    from inference.batching import chunks, default_batching, device_of
    from inference.elbo import PerDatumElbo, evaluate
    from inference.io import seeded

    model, guide, (x,), _ = vae_case()
    batching = default_batching(model)
    parts = list(chunks(model, (x,), {}, batching, 4))
    assert [p.args[0].shape[0] for p in parts] == [4, 4, 2]
    assert torch.equal(torch.cat([p.args[0] for p in parts]), x)
    assert all("num_data" not in p.kwargs for p in parts)
    assert device_of((x,), {}) == x.device and device_of((), {"n": 3}) == torch.device("cpu")
    assert len(list(chunks(model, (x,), {}, batching, None))) == 1

    m = evaluate(model, guide, x, batch_size=4, seed=3)
    recon = kl = 0.0
    with seeded(3):
        for p in parts:
            d = decompose(model, guide, *p.args, **p.kwargs)
            recon, kl = recon + d.reconstruction, kl + d.kl
    assert m == PerDatumElbo.from_totals(recon, kl, 10, m.elbo_stderr)
    assert m.elbo_stderr is None  # one draw per chunk: no error bar
    assert evaluate(model, guide, x, batch_size=4, seed=3) == m
    assert evaluate(model, guide, x, batch_size=4, seed=4) != m


def test_evaluate_does_not_cut_global_latents_into_chunks():
    """A declared batching on a model with a global latent: evaluation in chunks would count
    KL(q(mu) || p(mu)) once per chunk (here 3 chunks, 2 extra KLs of about 4.5 nats). The ELBO
    is evaluated on all rows at once and agrees with its closed form within 5 s.e.

        ELBO = sum_i E_q[log N(x_i; mu, 1)] - KL(N(m, s^2) || N(0, 1))
    """
    from inference.batching import Batching
    from inference.elbo import evaluate

    n, m, s = 2100, 2.0, 0.05

    def model(x, num_data=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", num_data or x.shape[0], subsample_size=x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x, num_data=None):
        pyro.sample(
            "mu", dist.Normal(pyro.param("m", torch.tensor(m)), pyro.param("s", torch.tensor(s)))
        )

    pyro.clear_param_store()
    x = m + torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    x64 = x.double()
    recon = float((-0.5 * math.log(2 * math.pi) - 0.5 * ((x64 - m) ** 2 + s**2)).sum())
    kl = 0.5 * (s**2 + m**2 - 1.0 - math.log(s**2))
    exact = (recon - kl) / n
    batching = Batching(args=("x",), size="num_data")
    got = evaluate(model, guide, x, batch_size=1024, batching=batching, num_particles=100)
    assert abs(got.elbo - exact) < 5 * got.elbo_stderr
    assert 2 * kl / n > 10 * got.elbo_stderr  # a chunked evaluation would be far outside


def test_whether_latents_are_local_is_asked_once_per_static_pair_and_shapes(monkeypatch):
    """``eval_chunk_rows`` runs the pair to learn whether its latents are local before an
    evaluation in several chunks; ``fit`` asks before every evaluation. A static pair's
    answer cannot change for arguments of the same shapes: it is found once, and a pair not
    declared static is asked every time."""
    from inference.batching import default_batching
    from inference.elbo import eval_chunk_rows
    from models.structure import static_structure

    asked = []
    original = elbo_module.latents_are_local

    def counted(*args, **kwargs):
        asked.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(elbo_module, "latents_are_local", counted)
    vae = VAE(16, latent_dim=3, hidden_dims=(8,))
    x = torch.bernoulli(torch.full((30, 16), 0.4))
    batching = default_batching(vae.model)
    unmarked = lambda x, num_data=None: vae.model(x, num_data)  # noqa: E731
    marked = static_structure(lambda x, num_data=None: vae.model(x, num_data))
    for model, times in [(vae.model, 1), (unmarked, 3), (marked, 1)]:
        asked.clear()
        rows = [eval_chunk_rows(model, vae.guide, (x,), {}, batching, 8) for _ in range(3)]
        assert rows == [8, 8, 8]  # one z per row: chunks of 8 rows
        assert len(asked) == times
    asked.clear()
    assert eval_chunk_rows(vae.model, vae.guide, (x[:20],), {}, batching, 8) == 8
    assert not asked  # the same first chunk of 8 rows: its structure is known
    assert eval_chunk_rows(vae.model, vae.guide, (x,), {}, batching, 10) == 10
    assert len(asked) == 1  # chunks of another shape
