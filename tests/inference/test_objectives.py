"""Each Pyro ELBO class's ``.loss`` is minus its stated objective (inference.objectives).

Models as Pyro's tutorials write them: SVI Part I's coin with its ``pyro.param`` Beta guide, a
Bayesian regression with an autoguide, a Gaussian mixture with enumerated assignments.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import (
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
    config_enumerate,
)
from pyro.infer.autoguide import AutoNormal
from torch.distributions import constraints

from inference.errors import OptionError
from inference.evidence import iwae
from inference.objectives import check_objective, check_objectives, objective_text

COIN = [torch.tensor(1.0)] * 6 + [torch.tensor(0.0)] * 4


def coin_model(data):
    f = pyro.sample("latent_fairness", dist.Beta(10.0, 10.0))
    for i in range(len(data)):
        pyro.sample(f"obs_{i}", dist.Bernoulli(f), obs=data[i])


def coin_guide(data):
    alpha_q = pyro.param("alpha_q", torch.tensor(15.0), constraint=constraints.positive)
    beta_q = pyro.param("beta_q", torch.tensor(15.0), constraint=constraints.positive)
    pyro.sample("latent_fairness", dist.Beta(alpha_q, beta_q))


class ScoreFunctionBeta(dist.Beta):
    """A Beta without reparameterized draws: TraceGraph_ELBO takes the REINFORCE path."""

    has_rsample = False


def reinforce_coin_guide(data):
    alpha_q = pyro.param("alpha_q", torch.tensor(15.0), constraint=constraints.positive)
    beta_q = pyro.param("beta_q", torch.tensor(15.0), constraint=constraints.positive)
    pyro.sample("latent_fairness", ScoreFunctionBeta(alpha_q, beta_q))


def switch_model(data):
    """A discrete latent sampled in the guide (not enumerated): which of two means."""
    which = pyro.sample("which", dist.Bernoulli(0.5))
    loc = 2.0 * which - 1.0
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)


def switch_guide(data):
    p = pyro.param("p", torch.tensor(0.7), constraint=constraints.unit_interval)
    pyro.sample("which", dist.Bernoulli(p))


def regression(x, y=None):
    weight = pyro.sample("weight", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    bias = pyro.sample("bias", dist.Normal(0.0, 3.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ weight + bias, 0.5), obs=y)


def regression_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 2, generator=g)
    y = x @ torch.tensor([1.0, -2.0]) + 0.3 + 0.5 * torch.randn(30, generator=g)
    return x, y


ESTIMATORS = {
    "Trace_ELBO": lambda: Trace_ELBO(),
    "Trace_ELBO-K4": lambda: Trace_ELBO(num_particles=4),
    "TraceMeanField_ELBO": lambda: TraceMeanField_ELBO(),
    "TraceGraph_ELBO": lambda: TraceGraph_ELBO(),
    "TraceGraph_ELBO-K3": lambda: TraceGraph_ELBO(num_particles=3),
    "RenyiELBO-0": lambda: RenyiELBO(alpha=0.0, num_particles=6),
    "RenyiELBO-0.5": lambda: RenyiELBO(alpha=0.5, num_particles=6),
    "RenyiELBO-minus1": lambda: RenyiELBO(alpha=-1.0, num_particles=4),
    "RenyiELBO-2-vectorized": lambda: RenyiELBO(
        alpha=2.0, num_particles=5, vectorize_particles=True
    ),
}


@pytest.mark.parametrize("make", ESTIMATORS.values(), ids=ESTIMATORS.keys())
def test_coin_loss_is_minus_the_objective(make):
    check = check_objective(make(), coin_model, coin_guide, COIN, seed=1)
    assert check.ok, check.line()
    assert check.residual < 1e-4
    assert check.loss == pytest.approx(check.minus_objective, abs=1e-4)
    assert check.loss_and_grads == pytest.approx(check.loss, abs=1e-5)


#: x @ weight does not broadcast over a particle plate: no vectorized particles here
PER_DRAW = {name: make for name, make in ESTIMATORS.items() if "vectorized" not in name}


@pytest.mark.parametrize("make", PER_DRAW.values(), ids=PER_DRAW.keys())
def test_regression_loss_is_minus_the_objective(make):
    x, y = regression_data()
    guide = AutoNormal(regression)
    check = check_objective(make(), regression, guide, x, y, seed=2)
    assert check.ok, check.line()


@pytest.mark.parametrize(
    "model, guide, data",
    [
        (coin_model, reinforce_coin_guide, COIN),
        (switch_model, switch_guide, torch.tensor([0.9, 1.3, 0.2, 1.1])),
    ],
    ids=["beta-without-rsample", "discrete-in-guide"],
)
@pytest.mark.parametrize("num_particles", [1, 5])
def test_tracegraph_with_non_reparameterized_sites(model, guide, data, num_particles):
    elbo = TraceGraph_ELBO(num_particles=num_particles)
    check = check_objective(elbo, model, guide, data, seed=3)
    assert check.ok, check.line()
    assert check.objective == "ELBO"
    assert "TraceGraph_ELBO.loss = -ELBO" in check.objective_text
    # the REINFORCE surrogate reached the guide's parameters, and the check left no gradient
    assert all(p.grad is None for _, p in pyro.get_param_store().named_parameters())


def test_trace_enum_on_an_enumerated_mixture():
    weights, locs = torch.tensor([0.4, 0.6]), torch.tensor([-1.0, 2.0])

    @config_enumerate
    def model(data):
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", len(data)):
            assignment = pyro.sample("assignment", dist.Categorical(weights))
            pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)

    def guide(data):
        loc = pyro.param("scale_loc", torch.tensor(0.0))
        pyro.sample("scale", dist.LogNormal(loc, 0.2))

    data = torch.tensor([-1.2, 2.1, 1.7, -0.4, 2.5])
    for elbo in (TraceEnum_ELBO(), TraceEnum_ELBO(num_particles=3)):
        check = check_objective(elbo, model, guide, data, seed=4)
        assert check.ok, check.line()
        assert "summed out exactly" in check.objective_text
    assert [c.estimator for c in check_objectives(model, guide, data)] == ["TraceEnum_ELBO()"]
    with pytest.raises(OptionError, match="only TraceEnum_ELBO sums out"):
        check_objective(Trace_ELBO(), model, guide, data)


def test_renyi_alpha_zero_is_the_iwae_bound_from_the_same_draws():
    k = 8
    check = check_objective(RenyiELBO(alpha=0.0, num_particles=k), coin_model, coin_guide, COIN)
    pyro.set_rng_seed(0)
    bound = iwae(coin_model, coin_guide, COIN, num_samples=k, chunk_size=1, compiled=False)
    assert check.minus_objective == pytest.approx(-bound.lk, abs=1e-6)
    assert check.objective == "L_0" and "L_K" in check.objective_text


def test_renyi_objectives_are_ordered_on_the_same_draws():
    """On shared weights, 1/(1-a) log mean_k w_k^(1-a) is a power mean: non-increasing in a,
    from L_K (a = 0) down to the ELBO's mean_k log w_k (a -> 1), and below it for a > 1."""
    values = {}
    for alpha in (-1.0, 0.0, 0.5, 0.9, 2.0):
        elbo = RenyiELBO(alpha=alpha, num_particles=16)
        values[alpha] = -check_objective(elbo, coin_model, coin_guide, COIN, seed=5).loss
    elbo = -check_objective(Trace_ELBO(num_particles=16), coin_model, coin_guide, COIN, seed=5).loss
    assert values[-1.0] >= values[0.0] >= values[0.5] >= values[0.9] >= elbo >= values[2.0]
    exact = math.lgamma(16) + math.lgamma(14) - math.lgamma(30)
    exact -= 2 * math.lgamma(10) - math.lgamma(20)  # log B(16, 14) - log B(10, 10)
    assert exact == pytest.approx(-7.069, abs=1e-3)


def test_meanfield_mismatch_is_reported_with_its_reason():
    """An autoguide's constrained site is a Delta carrying a log-Jacobian, which Pyro's
    KL(Delta || p) drops: TraceMeanField_ELBO.loss is then not minus the ELBO."""
    guide = AutoNormal(coin_model)
    check = check_objective(TraceMeanField_ELBO(), coin_model, guide, COIN)
    assert not check.ok
    assert "latent_fairness" in check.note and "log-Jacobian" in check.note
    assert "MISMATCH" in check.line()


def test_a_sign_bug_is_caught():
    """pyro#1982: TraceGraph_ELBO.loss_and_grads once returned +ELBO where .loss gave -ELBO."""

    class SignBug_ELBO(Trace_ELBO):
        def loss_and_grads(self, model, guide, *args, **kwargs):
            return -super().loss_and_grads(model, guide, *args, **kwargs)

    check = check_objective(SignBug_ELBO(), coin_model, coin_guide, COIN)
    assert check.loss == pytest.approx(check.minus_objective, abs=1e-4)
    assert check.loss_and_grads == pytest.approx(-check.loss, abs=1e-4)
    assert not check.ok


def test_objective_texts():
    assert objective_text(TraceGraph_ELBO())[1].startswith("TraceGraph_ELBO.loss = -ELBO")
    name, text = objective_text(RenyiELBO(alpha=0.5, num_particles=4))
    assert name == "L_0.5"
    assert text.startswith("RenyiELBO(alpha=0.5).loss = -L_0.5")
    assert "between the ELBO" in text and "Li & Turner 2016" in text
    assert "above log p(x)" in objective_text(RenyiELBO(alpha=-0.5))[1]
    with pytest.raises(OptionError, match="no stated objective"):
        objective_text(pyro.infer.TraceTailAdaptive_ELBO(vectorize_particles=True))
