"""The must-show models (d)-(g) of ``tests/inference/user_code/`` through the Python API.

``fit(model, guide, *args, **kwargs)`` trains the pair on the model's own arguments,
``explain(run_dir)`` reads the run back, and ``compare(model, guides, data)`` trains and
evaluates several guides. The run directory's metadata names the model file, the guide and the
data function, as ``elbo-lab train`` records them (so ``explain`` can rebuild the pair). Each
model gets a mathematical anchor:

    (d) the VAE tutorial's class:  .loss = Pyro's TraceMeanField_ELBO().loss on the same noise
    (e) a self-subsampling plate:  L_K = log N(x; 0, I + 100 1 1^T), the closed form, all rows
    (f) eight schools:             ELBO <= L_K <= log p(y), by quadrature over tau:
                                   p(y) = int p(tau) N(y; 0, diag(sigma^2 + tau^2) + 25 1 1^T)
    (g) logistic regression:       .loss = Pyro's TraceMeanField_ELBO().loss; ELBO <= L_K

Few epochs and small K: these check the plumbing and the identities, not the optimum.
"""

import math
from pathlib import Path

import pyro
import pytest
import torch
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from inference import Batching, CompareConfig, ModelArgs, OptionError, TrainConfig, compare, fit
from inference.data import load_model_data
from inference.explain import explain
from inference.provenance import data_fingerprint, file_fingerprint
from inference.run import ModelSpec
from inference.user_model import load_user_guide, load_user_model

HERE = Path(__file__).parent / "user_code"


def fit_run(run_dir, file, model, guide, config, data="data"):
    """``fit`` from Python into ``run_dir``; returns (result, model, guide, model data)."""
    data_spec = data if data == "digits" else f"{HERE / file}:{data}"
    if not guide.startswith("Auto"):  # the file's own
        guide = f"{HERE / file}:{guide}"
    spec = ModelSpec(model=f"{HERE / file}:{model}", guide=guide, data=data_spec)
    model = load_user_model(spec.model)
    guide = load_user_guide(spec.guide, model)
    model_data = load_model_data(spec.data, model).to("cpu", torch.float32)
    provenance = {"model": file_fingerprint(HERE / file), "data": data_fingerprint(spec.data)}
    call = model_data.train
    result = fit(
        model,
        guide,
        *call.args,
        config=config,
        run_dir=run_dir,
        metadata={"model_spec": spec.to_dict(), "provenance": provenance},
        **call.kwargs,
    )
    return result, model, guide, model_data


def checked(e, n=None):
    """What every explanation must satisfy: Pyro's own loss, the bounds, the stated objective."""
    assert e.pyro_loss == pytest.approx(e.loss, rel=1e-5, abs=1e-6)
    assert e.bounds["ok"] and e.bounds["checked"] and e.objective["ok"]
    assert e.elbo_mc <= e.lk + 1e-9  # from the same draws: mean <= log-mean-exp
    if n is not None:
        assert e.n == n


# --- (d) the VAE class of Pyro's VAE tutorial ---------------------------------------------------


def test_vae_class(tmp_path):
    config = TrainConfig(epochs=3, batch_size=None, learning_rate=0.01, progress=False)
    result, model, guide, data = fit_run(
        tmp_path / "vae", "vae.py", "vae.model", "vae.guide", config, "digits"
    )
    assert result.estimator.endswith("meanfield")  # Normal guide, Normal prior, one plate
    e = explain(tmp_path / "vae", num_samples=20)
    checked(e)
    assert e.latents == "local" and e.estimator == "TraceMeanField_ELBO"
    x = data.train.args[0][:300]
    comparison = compare(
        model,
        {"vae.guide": guide},
        x,
        TrainConfig(epochs=2, batch_size=None, learning_rate=0.01, progress=False),
        CompareConfig(num_samples=10, eval_particles=2, num_draws=4, num_chains=1),
    )
    (row,) = comparison.rows
    assert not row.failed and row.bounds_ok and row.n == 300 and row.gap > 0


# --- (e) a plate that subsamples itself ---------------------------------------------------------


def minibatch_log_evidence(x) -> float:
    covariance = torch.eye(len(x), dtype=torch.float64) + 100.0
    normal = torch.distributions.MultivariateNormal(torch.zeros(len(x)).double(), covariance)
    return float(normal.log_prob(x.double()))


def test_minibatch_model(tmp_path):
    config = TrainConfig(epochs=300, batch_size=None, learning_rate=0.05, progress=False)
    _, model, guide, data = fit_run(tmp_path / "mb", "minibatch.py", "model", "guide", config)
    (x,) = data.train.args
    exact = minibatch_log_evidence(x)
    e = explain(tmp_path / "mb", num_samples=500)
    checked(e, n=200)
    assert abs(e.lk * 200 - exact) < 5 * e.lk_stderr * 200 + 1e-3
    comparison = compare(
        model,
        {"guide": guide, "AutoNormal": AutoNormal},
        x,
        TrainConfig(epochs=100, batch_size=None, learning_rate=0.05, progress=False),
        CompareConfig(num_samples=200, eval_particles=10, num_draws=4, num_chains=1),
    )
    for row in comparison.rows:
        assert not row.failed and row.bounds_ok
        assert abs(row.lk * 200 - exact) < 5 * row.lk_stderr * 200 + 1e-3
        assert row.elbo * 200 <= exact + 5 * row.elbo_stderr * 200


def test_indices_from_an_argument_are_declared_batching():
    """pyro.plate("data", N, subsample=ind): fit cuts mini-batches of 20 rows by passing ``ind``
    (the arguments stay whole); its evaluation runs on all rows (ind=None)."""
    model = load_user_model(f"{HERE / 'minibatch.py'}:indexed_model")
    guide = load_user_guide(f"{HERE / 'minibatch.py'}:indexed_guide", model)
    (x,), _ = load_model_data(f"{HERE / 'minibatch.py'}:data", model).train
    seen = []

    def spy(data, ind=None):
        seen.append(None if ind is None else len(ind))
        return model(data, ind)

    config = TrainConfig(epochs=30, batch_size=20, learning_rate=0.05, progress=False)
    result = fit(
        spy, guide, x, config=config, batching=Batching(args=(), size=None, subsample="ind")
    )
    assert 20 in seen and None in seen  # batches for the steps, all rows for the evaluation
    assert result.final.n == 200
    from inference.bounds import checked_metrics

    c = checked_metrics(model, guide, x, estimator="trace", batched=False, num_samples=200)
    assert c.bounds.ok and c.bounds.checked
    assert c.bounds.lk * 200 <= minibatch_log_evidence(x) + 5 * c.bounds.lk_stderr * 200


# --- (f) eight schools: a hand-written guide against autoguides ---------------------------------


def eight_schools_log_evidence(y, sigma) -> float:
    """log p(y) = log int p(tau) N(y; 0, diag(sigma^2 + tau^2) + 25 1 1^T) dtau, mu ~ N(0, 5)
    integrated in closed form; tau = 5 tan(theta) makes HalfCauchy(5)'s p(tau) dtau
    = (2 / pi) dtheta on (0, pi / 2), integrated by the midpoint rule."""
    y, sigma = y.double(), sigma.double()
    theta = (torch.arange(20000, dtype=torch.float64) + 0.5) * (math.pi / 2) / 20000
    tau = 5 * torch.tan(theta)
    covariance = torch.diag_embed(sigma**2 + tau[:, None] ** 2) + 25.0
    normal = torch.distributions.MultivariateNormal(torch.zeros(len(y)).double(), covariance)
    log_terms = normal.log_prob(y) + math.log(2 / math.pi) + math.log(math.pi / 2 / 20000)
    return float(torch.logsumexp(log_terms, 0))


def test_eight_schools(tmp_path):
    config = TrainConfig(epochs=300, batch_size=None, learning_rate=0.02, progress=False)
    _, model, guide, data = fit_run(tmp_path / "s", "eight_schools.py", "model", "guide", config)
    kwargs = data.train.kwargs
    exact = eight_schools_log_evidence(kwargs["y"], kwargs["sigma"])
    e = explain(tmp_path / "s", num_samples=500)
    checked(e, n=8)
    assert e.lk * 8 <= exact + 5 * e.lk_stderr * 8
    assert e.elbo * 8 <= exact + 5 * e.elbo_stderr * 8
    comparison = compare(
        model,
        {
            "guide": guide,
            "AutoNormal": AutoNormal,
            "AutoMultivariateNormal": AutoMultivariateNormal,
        },
        ModelArgs((), kwargs),
        TrainConfig(epochs=200, batch_size=None, learning_rate=0.02, progress=False),
        CompareConfig(num_samples=300, eval_particles=20, num_draws=4, num_chains=1),
    )
    for row in comparison.rows:
        assert not row.failed and row.bounds_ok, row
        assert row.lk * 8 <= exact + 5 * row.lk_stderr * 8
        assert row.elbo * 8 <= exact + 5 * row.elbo_stderr * 8


# --- (g) logistic regression on scikit-learn's breast-cancer data -------------------------------


def test_logistic_regression(tmp_path):
    pytest.importorskip("sklearn")
    config = TrainConfig(epochs=200, batch_size=None, learning_rate=0.03, progress=False)
    result, model, _, data = fit_run(
        tmp_path / "lr", "logistic.py", "model", "AutoMultivariateNormal", config
    )
    assert result.final.n == 569
    e = explain(tmp_path / "lr", num_samples=200)
    checked(e, n=569)
    # w and b are unconstrained: the Deltas of AutoMultivariateNormal carry no log-Jacobian,
    # so the analytic-KL estimator is valid and chosen
    assert e.estimator == "TraceMeanField_ELBO" and e.khat < 0.7
    comparison = compare(
        model,
        {"AutoNormal": AutoNormal, "AutoMultivariateNormal": AutoMultivariateNormal},
        data.train,
        TrainConfig(epochs=150, batch_size=None, learning_rate=0.03, progress=False),
        CompareConfig(num_samples=200, eval_particles=10, num_draws=4, num_chains=1),
    )
    assert [r.guide for r in comparison.rows] == ["AutoNormal", "AutoMultivariateNormal"]
    assert all(not r.failed and r.bounds_ok for r in comparison.rows)


# --- guide-side enumeration is refused in one line -----------------------------------------------


@pytest.mark.parametrize("estimator", ["auto", "trace", "enum"])
def test_a_guide_that_enumerates_is_refused_naming_the_site(estimator):
    model = load_user_model(f"{HERE / 'mixture.py'}:model")
    guide = load_user_guide(f"{HERE / 'mixture.py'}:enumerated_guide", model)
    (x,), _ = load_model_data(f"{HERE / 'mixture.py'}:data", model).train
    config = TrainConfig(epochs=1, batch_size=None, estimator=estimator, progress=False)
    with pytest.raises(OptionError) as raised:
        fit(model, guide, x, config=config)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("site 'assignment' is enumerated in the guide")
    assert pyro.get_param_store().keys() <= {"assignment_probs"}  # nothing trained


def test_a_guide_that_samples_a_discrete_site_gets_trace_elbo():
    """Without enumeration a Categorical guide site is sampled: TraceMeanField_ELBO cannot
    (Pyro requires every guide site reparameterized), so "auto" chooses Trace_ELBO."""
    import pyro.distributions as dist
    from torch.distributions import constraints

    from inference.train import choose_estimator

    model = load_user_model(f"{HERE / 'mixture.py'}:model")
    (x,), _ = load_model_data(f"{HERE / 'mixture.py'}:data", model).train

    def guide(data):
        probs = pyro.param("probs", torch.ones(len(data), 2) / 2, constraint=constraints.simplex)
        with pyro.plate("data", len(data)):
            pyro.sample("assignment", dist.Categorical(probs))

    assert choose_estimator("auto", model, guide, x) == "trace"
    with pytest.raises(OptionError, match="'assignment': the guide's Categorical is not rep"):
        choose_estimator("meanfield", model, guide, x)
