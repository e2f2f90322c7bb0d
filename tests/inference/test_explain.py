"""`elbo-lab explain`: the ELBO anatomy of trained runs, checked against its own identities."""

import json
import math
import runpy
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

from inference.cli import main
from inference.explain import Explanation, explain
from inference.run import load_run


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """A tiny VAE trained for a few epochs on the digits."""
    run_dir = tmp_path_factory.mktemp("runs") / "vae"
    argv = ["train", "--run-dir", str(run_dir), "--latent-dim", "2", "--hidden-dims", "16"]
    argv += ["--epochs", "3", "--batch-size", "256", "--lr", "0.01", "--no-progress"]
    assert main(argv) == 0
    return run_dir


@pytest.fixture(scope="module")
def ppca_run(tmp_path_factory):
    """pPCA trained briefly on 5-dimensional data from a 2-factor model."""
    root = tmp_path_factory.mktemp("ppca")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 2)) @ rng.normal(size=(5, 2)).T + 0.4 * rng.normal(size=(150, 5))
    np.savez(root / "data.npz", x=x)
    run_dir = root / "run"
    argv = ["train", "--model", "ppca", "--data", str(root / "data.npz"), "--latent-dim", "2"]
    argv += ["--run-dir", str(run_dir), "--epochs", "20", "--lr", "0.05", "--no-progress"]
    argv += ["--batch-size", "64", "--dtype", "float64"]
    assert main(argv) == 0
    return run_dir


def test_vae_explanation_orders_elbo_below_lk(vae_run):
    """loss = -ELBO = KL - reconstruction, and ELBO <= L_K with a positive gap."""
    e = explain(vae_run, num_samples=200)
    assert e.model == "vae" and e.split == "test" and e.num_samples == 200
    assert e.elbo == pytest.approx(e.reconstruction - e.kl)
    assert e.pyro_loss == pytest.approx(e.loss, rel=1e-5)
    assert e.kl > 0 and e.reconstruction < 0
    assert e.lk >= e.elbo_mc and e.gap > 0
    assert e.gap > 5 * e.gap_stderr
    assert e.lk > e.elbo  # the evaluate() ELBO too
    assert abs(e.elbo_mc - e.elbo) < 5 * math.hypot(e.elbo_mc_stderr, 0.05)
    assert 1 <= e.ess <= 200
    assert e.exact_log_px is None and e.exact_gap is None
    # what TraceMeanField_ELBO.loss is minus, checked from the same draws
    assert e.objective["ok"] and e.objective["objective"] == "ELBO"
    assert "what .loss is minus: TraceMeanField_ELBO.loss = -(" in e.report()


def test_ppca_explanation_has_exact_evidence(ppca_run):
    """For pPCA, L_K is within 5 stderr of the exact log p(x), and gap = log p(x) - ELBO."""
    e = explain(ppca_run, num_samples=500)
    assert abs(e.lk - e.exact_log_px) < 5 * e.lk_stderr + 1e-6
    assert e.exact_gap == pytest.approx(e.exact_log_px - e.exact_elbo, abs=1e-8)
    assert e.exact_gap >= 0 and e.gap <= e.exact_gap + 5 * e.gap_stderr
    assert abs(e.elbo_mc - e.exact_elbo) < 5 * e.elbo_mc_stderr
    assert "Exact" in e.report()


def test_explain_json_has_named_fields(vae_run, capsys):
    assert main(["explain", str(vae_run), "--json", "--num-samples", "20"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record) == set(Explanation._fields)
    assert record["num_samples"] == 20 and record["loss"] == -record["elbo"]


def test_explain_text_names_the_sign_convention(vae_run, capsys):
    assert main(["explain", str(vae_run), "--num-samples", "20", "--split", "train"]) == 0
    out = capsys.readouterr().out
    for phrase in ("loss = -ELBO", "E_q[log p(x|z)]", "L_K", "KL(q(z|x) || p(z|x))", "train split"):
        assert phrase in out


def test_explain_missing_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["explain", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("elbo-lab: error:") and err.count("\n") == 1


# --- the pair form: explain(model, guide, *args, **kwargs) ----------------------------------------

USER_CODE = Path(__file__).parent / "user_code"


def _user_code(name: str) -> dict:
    return runpy.run_path(str(USER_CODE / f"{name}.py"))


def _coin_log_evidence(heads: int, tails: int) -> float:
    """log p(x) = log B(10 + h, 10 + t) - log B(10, 10), Beta(10, 10) prior, one sequence."""

    def log_beta(a, b):
        return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    return log_beta(10 + heads, 10 + tails) - log_beta(10, 10)


@pytest.mark.parametrize("alpha, beta", [(16.0, 14.0), (15.0, 15.0)], ids=["optimum", "initial"])
def test_pair_form_on_the_coin_against_the_beta_bernoulli_evidence(float64, alpha, beta):
    """SVI Part I's coin and its pyro.param Beta guide: L_K is the closed-form evidence; the
    ELBO is log p(x) - KL(q || Beta(16, 14)), which is 0 at the optimum (gap exactly 0)."""
    coin = _user_code("coin")
    (data,), _ = coin["data"]()
    positive = torch.distributions.constraints.positive
    pyro.param("alpha_q", torch.tensor(alpha), constraint=positive)
    pyro.param("beta_q", torch.tensor(beta), constraint=positive)
    e = explain(coin["model"], coin["guide"], data, num_samples=2000)
    n, exact = 10, _coin_log_evidence(6, 4)
    q, posterior = torch.distributions.Beta(alpha, beta), torch.distributions.Beta(16.0, 14.0)
    exact_gap = float(torch.distributions.kl_divergence(q, posterior))  # log p(x) - ELBO
    assert e.n == n and e.latents == "global" and e.model == "model" and e.guide == "guide"
    assert e.estimator == "TraceMeanField_ELBO" and e.objective["ok"] and e.bounds["ok"]
    assert e.pyro_loss == pytest.approx(e.loss, rel=1e-9)
    assert abs(e.lk * n - exact) < 5 * e.lk_stderr * n + 1e-9
    assert abs(e.elbo * n - (exact - exact_gap)) < 5 * e.elbo_stderr * n + 1e-9
    assert e.gap * n <= exact_gap + 5 * e.gap_stderr * n + 1e-9
    if alpha == 16.0:  # q is the posterior: every log-weight is log p(x)
        assert exact_gap == pytest.approx(0.0, abs=1e-12)
        assert e.lk * n == pytest.approx(exact, abs=1e-9)
        assert e.gap == pytest.approx(0.0, abs=1e-9) and e.ess == pytest.approx(2000)
    assert e.report().startswith("model with guide guide, 10 data points")


def test_pair_form_on_the_regression_against_the_gaussian_evidence(float64):
    """model(X, y) as Pyro users write it; the guide at the mean-field optimum of the exact
    Gaussian posterior N(m, S) over (w, b): means m, variances 1 / (S^-1)_ii. Then L_K is
    log N(y; 0, sigma^2 I + X X^T + 100 1 1^T) and the ELBO that minus KL(q || N(m, S))."""
    regression = _user_code("regression")
    sigma = regression["SIGMA"]
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 2, generator=g)
    y = X @ torch.tensor([1.0, -2.0]) + 0.5 + sigma * torch.randn(40, generator=g)
    phi = torch.cat([X, torch.ones(40, 1)], dim=1)  # theta = (w, b)
    prior_precision = torch.diag(torch.tensor([1.0, 1.0, 1e-2]))
    precision = prior_precision + phi.T @ phi / sigma**2
    covariance = torch.linalg.inv(precision)
    mean = covariance @ phi.T @ y / sigma**2
    scale = precision.diagonal().rsqrt()
    positive = torch.distributions.constraints.positive
    pyro.param("w_loc", mean[:2].clone())
    pyro.param("w_scale", scale[:2].clone(), constraint=positive)
    pyro.param("b_loc", mean[2].clone())
    pyro.param("b_scale", scale[2].clone(), constraint=positive)
    e = explain(regression["model"], regression["guide"], X, y, num_samples=2000)
    evidence = torch.distributions.MultivariateNormal(
        torch.zeros(40), sigma**2 * torch.eye(40) + X @ X.T + 100.0
    )
    exact = float(evidence.log_prob(y))
    q = torch.distributions.MultivariateNormal(mean, torch.diag(scale**2))
    exact_gap = float(
        torch.distributions.kl_divergence(
            q, torch.distributions.MultivariateNormal(mean, covariance)
        )
    )
    n = 40
    assert e.n == n and e.latents == "global" and e.bounds["ok"] and e.objective["ok"]
    assert e.pyro_loss == pytest.approx(e.loss, rel=1e-9)
    assert abs(e.lk * n - exact) < 5 * e.lk_stderr * n + 1e-6
    assert abs(e.elbo * n - (exact - exact_gap)) < 5 * e.elbo_stderr * n + 1e-6
    assert exact_gap > 0 and e.gap * n <= exact_gap + 5 * e.gap_stderr * n


@pytest.fixture(scope="module")
def coin_run(tmp_path_factory):
    """The coin trained briefly by the command line, with its own Beta guide."""
    coin = USER_CODE / "coin.py"
    run_dir = tmp_path_factory.mktemp("coin") / "run"
    argv = ["train", "--model", f"{coin}:model", "--guide", f"{coin}:guide"]
    argv += ["--data", f"{coin}:data", "--epochs", "30", "--lr", "0.05", "--no-progress"]
    assert main([*argv, "--run-dir", str(run_dir)]) == 0
    return run_dir


@pytest.mark.parametrize("which", ["coin_run", "ppca_run", "vae_run"])
def test_pair_form_and_run_directory_form_agree(which, request):
    """explain(run_dir) is the pair form on the run's model, guide and split: the same numbers
    for the same trained parameters and seed (local latents in chunks, global all at once;
    pPCA's exact evidence from the module the model belongs to)."""
    run_dir = request.getfixturevalue(which)
    from_run = explain(run_dir, num_samples=300)
    run = load_run(run_dir)
    call = run.split(from_run.split)
    from_pair = explain(run.model, run.guide, *call.args, num_samples=300, **call.kwargs)
    labels = {"run_dir", "model", "guide", "data", "split"}
    numbers = {k: v for k, v in from_run.to_dict().items() if k not in labels}
    assert {k: v for k, v in from_pair.to_dict().items() if k not in labels} == numbers
    assert from_pair.run_dir == "" and from_pair.split == ""
    assert (from_run.exact_log_px is not None) == (which == "ppca_run")
