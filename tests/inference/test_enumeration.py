"""Discrete latents summed out exactly (inference.enumeration), against closed forms.

The models are written as Pyro's Gaussian-mixture and HMM tutorials write them: the discrete
sites marked by ``@config_enumerate`` and absent from the guide.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import config_enumerate
from pyro.infer.autoguide import AutoNormal
from pyro.ops.indexing import Vindex
from torch.distributions import constraints

from inference.bounds import checked_metrics
from inference.elbo import decompose
from inference.enumeration import (
    TraceEnum_ELBO,
    enumeration,
    exact_evidence,
    exact_log_evidence,
)
from inference.errors import OptionError
from inference.evidence import iwae
from inference.train import choose_estimator, make_elbo

WEIGHTS = torch.tensor([0.3, 0.7])
LOCS = torch.tensor([-2.0, 1.5])
SCALE = 0.8


def mixture_data(n: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    z = torch.multinomial(WEIGHTS, n, replacement=True, generator=g)
    return LOCS[z] + SCALE * torch.randn(n, generator=g)


@config_enumerate
def fixed_mixture(data):
    """Every latent enumerated: the mixture's assignments, parameters known."""
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(WEIGHTS))
        pyro.sample("obs", dist.Normal(LOCS[assignment], SCALE), obs=data)


@config_enumerate
def learned_mixture(data):
    """Every latent enumerated, parameters learned by maximum likelihood (``pyro.param``)."""
    weights = pyro.param("weights", WEIGHTS.clone(), constraint=constraints.simplex)
    locs = pyro.param("locs", LOCS.clone())
    scale = pyro.param("scale", torch.tensor(SCALE), constraint=constraints.positive)
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


def empty_guide(data):
    pass


def exact_mixture(data: torch.Tensor) -> float:
    """log p(x) = sum_n logsumexp_k(log pi_k + log N(x_n; mu_k, sigma))."""
    log_joint = WEIGHTS.log() + dist.Normal(LOCS, SCALE).log_prob(data[:, None])
    return float(torch.logsumexp(log_joint.double(), -1).sum())


@pytest.mark.parametrize("model", [fixed_mixture, learned_mixture], ids=["fixed", "pyro-param"])
def test_mixture_all_enumerated_is_exact(model):
    data = mixture_data()
    exact = exact_mixture(data)
    assert enumeration(model, empty_guide, data).sites == ("assignment",)
    assert exact_log_evidence(model, data) == pytest.approx(exact, abs=1e-4)
    d = decompose(model, empty_guide, data, num_particles=3)
    assert d.enumerated == ("assignment",)
    assert [(s.name, s.kind, s.method) for s in d.sites] == [("assignment", "enumerated", "exact")]
    assert d.elbo == pytest.approx(exact, abs=1e-4)  # an empty guide's ELBO is log p(x)
    assert d.elbo_stderr == 0.0 and d.kl == 0.0
    assert TraceEnum_ELBO(max_plate_nesting=1).loss(model, empty_guide, data) == pytest.approx(
        -exact, abs=1e-4
    )
    estimate = iwae(model, empty_guide, data, num_samples=16)
    assert estimate.lk == pytest.approx(exact, abs=1e-4)  # every weight is p(x)
    assert exact_evidence(model, empty_guide, data) == pytest.approx(
        {"exact_log_px": exact, "exact_elbo": exact, "exact_gap": 0.0}, abs=1e-4
    )


@config_enumerate
def mixture(data):
    """Learned component locations with a Normal prior; assignments enumerated."""
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(0.0, 5.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(WEIGHTS))
        pyro.sample("obs", dist.Normal(locs[assignment], SCALE), obs=data)


@config_enumerate
def vindex_mixture(data):
    """The same model written to broadcast over particles: locs as one event, indexed with
    ``Vindex`` (as Pyro's enumeration tutorial advises)."""
    locs = pyro.sample("locs", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(WEIGHTS))
        pyro.sample("obs", dist.Normal(Vindex(locs)[..., assignment], SCALE), obs=data)


def exact_mixture_locs(data: torch.Tensor) -> float:
    """log p(x) = log int p(mu) prod_n sum_k pi_k N(x_n; mu_k, sigma) dmu, on a 2-D grid."""
    grid = torch.linspace(-12.0, 12.0, 961, dtype=torch.float64)
    step = float(grid[1] - grid[0])
    x = data.double()
    log_lik_k = dist.Normal(grid, SCALE).log_prob(x[:, None])  # (N, G): component at mu
    log_w = WEIGHTS.double().log()
    # log sum_k pi_k N(x_n; mu_k): (G, G, N) over (mu_0, mu_1, n)
    per_point = torch.logaddexp(
        log_w[0] + log_lik_k.T[:, None, :], log_w[1] + log_lik_k.T[None, :, :]
    )
    log_prior = dist.Normal(0.0, 5.0).log_prob(grid)
    log_integrand = per_point.sum(-1) + log_prior[:, None] + log_prior[None, :]
    return float(torch.logsumexp(log_integrand.flatten(), 0) + 2 * math.log(step))


def trained_mixture_guide(data: torch.Tensor, model=mixture) -> AutoNormal:
    guide = AutoNormal(poutine.block(model, expose=["locs"]))
    guide(data)
    with torch.no_grad():  # near the posterior mode the data came from, as training would go
        pyro.param("AutoNormal.locs.locs").copy_(LOCS)
        pyro.param("AutoNormal.scales.locs").fill_(0.25)
    return guide


@pytest.mark.parametrize("num_particles", [1, 3])
def test_mixture_with_continuous_latent_equals_trace_enum(num_particles):
    data = mixture_data()
    guide = trained_mixture_guide(data)
    pyro.set_rng_seed(3)
    d = decompose(mixture, guide, data, num_particles=num_particles, analytic_kl=False)
    pyro.set_rng_seed(3)
    loss = TraceEnum_ELBO(max_plate_nesting=1, num_particles=num_particles).loss(
        mixture, guide, data
    )
    assert d.loss == pytest.approx(loss, rel=1e-6, abs=1e-4)
    assert d.enumerated == ("assignment",)
    kinds = {s.name: s.kind for s in d.sites}
    assert kinds["assignment"] == "enumerated" and kinds["locs"] == "latent"
    # our TraceEnum_ELBO finds max_plate_nesting without drawing noise: the same number
    pyro.set_rng_seed(3)
    assert make_elbo("enum", num_particles).loss(mixture, guide, data) == pytest.approx(loss)


@pytest.mark.parametrize(
    "model, vectorized", [(mixture, False), (vindex_mixture, True)], ids=["tutorial", "vindex"]
)
def test_mixture_bounds_with_continuous_latent(model, vectorized, caplog):
    data = mixture_data()
    guide = trained_mixture_guide(data, model)
    exact = exact_mixture_locs(data)
    assert exact_log_evidence(model, data) is None  # locs is not enumerated
    d = decompose(model, guide, data, num_particles=100, analytic_kl=False)
    # the tutorial's locs[assignment] does not broadcast over particles: one draw at a time
    estimate = iwae(model, guide, data, num_samples=200)
    assert ("does not vectorize" in caplog.text) is not vectorized
    assert d.elbo <= estimate.lk + 5 * math.hypot(d.elbo_stderr, estimate.stderr)
    assert estimate.lk <= exact + 5 * estimate.stderr
    # L_K marginalizes the assignments: its draws average to the same ELBO
    mean_log_w = float(estimate.log_weights.mean())
    se = float(estimate.log_weights.std()) / math.sqrt(200)
    assert abs(mean_log_w - d.elbo) < 5 * math.hypot(se, d.elbo_stderr)


def test_auto_estimator_is_enum_and_others_refused():
    data = mixture_data()
    guide = trained_mixture_guide(data)
    assert choose_estimator("auto", mixture, guide, data) == "enum"
    assert choose_estimator("auto", fixed_mixture, empty_guide, data) == "enum"
    for name in ("trace", "meanfield"):
        with pytest.raises(OptionError, match="enumerates assignment"):
            choose_estimator(name, mixture, guide, data)


def test_checked_metrics_use_the_exact_evidence():
    data = mixture_data()
    checked = checked_metrics(
        fixed_mixture, empty_guide, data, estimator="enum", batched=False, num_particles=2
    )
    n = len(data)
    assert checked.bounds.exact_log_px == pytest.approx(exact_mixture(data) / n, abs=1e-5)
    assert checked.bounds.ok and checked.bounds.checked
    assert checked.metrics.elbo == pytest.approx(exact_mixture(data) / n, abs=1e-5)
    assert checked.pyro_loss == pytest.approx(checked.metrics.loss, abs=1e-5)


def test_guide_enumeration_is_refused():
    data = mixture_data()

    @config_enumerate
    def guide(data):
        with pyro.plate("data", len(data)):
            pyro.sample("assignment", dist.Categorical(WEIGHTS))

    with pytest.raises(OptionError, match="'assignment' is enumerated in the guide"):
        decompose(fixed_mixture, guide, data)


TRANS = torch.tensor([[0.8, 0.15, 0.05], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
EMIT_LOCS = torch.tensor([-2.0, 0.0, 2.5])


@config_enumerate
def hmm(sequences):
    """Pyro's HMM tutorial shape: sequences ``(T, S)`` in a plate, a Markov chain over time."""
    length, num_sequences = sequences.shape
    with pyro.plate("sequences", num_sequences):
        x = 0
        for t in pyro.markov(range(length)):
            x = pyro.sample(f"x_{t}", dist.Categorical(TRANS[x]))
            pyro.sample(f"y_{t}", dist.Normal(EMIT_LOCS[x], 1.0), obs=sequences[t])


def forward_algorithm(sequences: torch.Tensor) -> float:
    """log p(y_{1:T}) by the forward recursion, summed over independent sequences."""
    log_trans = TRANS.double().log()
    total = 0.0
    for y in sequences.double().T:
        emit = dist.Normal(EMIT_LOCS.double(), 1.0).log_prob(y[:, None])  # (T, 3)
        alpha = log_trans[0] + emit[0]
        for t in range(1, len(y)):
            alpha = torch.logsumexp(alpha[:, None] + log_trans, 0) + emit[t]
        total += float(torch.logsumexp(alpha, 0))
    return total


def test_hmm_exact_evidence_is_the_forward_algorithm():
    g = torch.Generator().manual_seed(2)
    sequences = 2.0 * torch.randn(15, 2, generator=g)
    exact = forward_algorithm(sequences)
    assert len(enumeration(hmm, empty_guide, sequences).sites) == 15
    assert exact_log_evidence(hmm, sequences) == pytest.approx(exact, abs=1e-3)
    d = decompose(hmm, empty_guide, sequences)
    assert d.elbo == pytest.approx(exact, abs=1e-3)
    assert d.sites[0].name == "x_0+...+x_14 (15 sites)"
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(hmm, empty_guide, sequences)
    assert loss == pytest.approx(-exact, abs=1e-3)
    assert iwae(hmm, empty_guide, sequences, num_samples=4).lk == pytest.approx(exact, abs=1e-3)


def test_subsampled_enumeration_scales_as_trace_enum():
    """A mini-batch of the mixture: the enumerated term is scaled by N / B outside the log,
    as TraceEnum_ELBO scales it; evidence covers all rows, chunk by chunk, with the weights of
    the model without subsampling, draw for draw."""
    data = mixture_data(40)

    @config_enumerate
    def model(data):
        locs = pyro.sample("locs", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
        with pyro.plate("data", len(data), subsample_size=8) as idx:
            assignment = pyro.sample("assignment", dist.Categorical(WEIGHTS))
            pyro.sample("obs", dist.Normal(Vindex(locs)[..., assignment], SCALE), obs=data[idx])

    guide = AutoNormal(poutine.block(model, expose=["locs"]))
    guide(data)
    for seed in (0, 1):
        pyro.set_rng_seed(seed)
        d = decompose(model, guide, data, num_particles=2, analytic_kl=False)
        pyro.set_rng_seed(seed)
        loss = TraceEnum_ELBO(max_plate_nesting=1, num_particles=2).loss(model, guide, data)
        assert d.loss == pytest.approx(loss, rel=1e-6, abs=1e-4)
    assert exact_log_evidence(model, data) is None

    @config_enumerate
    def whole(data):
        locs = pyro.sample("locs", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
        with pyro.plate("data", len(data)):
            assignment = pyro.sample("assignment", dist.Categorical(WEIGHTS))
            pyro.sample("obs", dist.Normal(Vindex(locs)[..., assignment], SCALE), obs=data)

    pyro.set_rng_seed(2)
    chunked = iwae(model, guide, data, num_samples=4).log_weights
    pyro.set_rng_seed(2)
    assert torch.allclose(chunked, iwae(whole, guide, data, num_samples=4).log_weights, atol=1e-4)
