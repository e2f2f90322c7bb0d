"""Pyro code as Pyro's own tutorials write it, through train, evaluate, explain and compare.

The files in ``tests/inference/user_code/`` are written the way a Pyro user writes them, not
reshaped for elbo-lab: the coin of SVI Part I with its hand-written ``pyro.param`` Beta guide
and a list of scalar tensors as data; Bayesian regression ``model(X, y=None)`` as plain sample
sites and as a ``PyroModule``, its data a ``.npz`` whose arrays are named after the model's
parameters. Each is checked against its closed-form evidence:

    coin:        log p(x) = log B(16, 14) - log B(10, 10)            (Beta-Bernoulli)
    regression:  log p(y) = log N(y; 0, sigma^2 I + X X^T + 100 1 1^T) (PRML §3.5.1)
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.cli import main

HERE = Path(__file__).parent / "user_code"
COIN = HERE / "coin.py"
REGRESSION = HERE / "regression.py"


def coin_log_evidence() -> float:
    def log_beta(a, b):
        return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    return log_beta(16, 14) - log_beta(10, 10)


def _run(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().out


# --- (a) the coin with its hand-written Beta guide ---------------------------------------------


@pytest.fixture(scope="module")
def coin_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("coin") / "run"
    argv = ["train", "--model", f"{COIN}:model", "--guide", f"{COIN}:guide"]
    argv += ["--data", f"{COIN}:data", "--epochs", "800", "--lr", "0.05", "--no-progress"]
    argv += ["--json", "--run-dir", str(run_dir)]
    assert main(argv) == 0
    return run_dir


def test_coin_guide_trains_to_the_exact_posterior(coin_run, capsys):
    code, out = _run(["evaluate", str(coin_run), "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    # a Beta guide for a Beta prior: the analytic KL is valid, TraceMeanField_ELBO is chosen
    assert report["estimator"] == "TraceMeanField_ELBO" and report["n"] == 10
    assert report["pyro_loss"] == pytest.approx(report["loss"], rel=1e-6)
    exact = coin_log_evidence()
    elbo = report["elbo"] * report["n"]
    assert elbo <= exact + 5 * report["elbo_stderr"] * report["n"]
    assert exact - elbo < 0.05  # the family contains the posterior Beta(16, 14)
    from pyro import get_param_store

    store = get_param_store()
    a, b = float(store["alpha_q"].detach()), float(store["beta_q"].detach())
    assert abs(a / (a + b) - 16 / 30) < 0.02


def test_coin_explain_agrees_with_the_closed_form_evidence(coin_run, capsys):
    code, out = _run(["explain", str(coin_run), "--json", "--num-samples", "2000"], capsys)
    assert code == 0
    e = json.loads(out)
    n, exact = e["n"], coin_log_evidence()
    assert e["latents"] == "global" and e["guide"].endswith("coin.py:guide")
    assert abs(e["log_px"] * n - exact) < 5 * e["log_px_stderr"] * n + 1e-3
    assert 0 <= e["gap"] * n < 0.05  # the gap goes to ~0 at the optimum
    assert e["bounds"]["ok"] and not e["warnings"]


def test_coin_compare_mixes_a_hand_written_guide_and_autoguides(tmp_path, capsys):
    out_dir = tmp_path / "cmp"
    argv = ["compare", "--model", f"{COIN}:model", "--data", f"{COIN}:data"]
    argv += ["--guides", f"{COIN}:guide,AutoNormal", "--epochs", "300", "--lr", "0.05"]
    argv += ["--num-samples", "200", "--elbo-particles", "20", "--num-draws", "8"]
    argv += ["--json", "--out", str(out_dir)]
    code, out = _run(argv, capsys)
    assert code == 0
    rows = {r["guide"]: r for r in json.loads(out)["rows"]}
    assert set(rows) == {"guide", "AutoNormal"}
    # compare trains every guide with Trace_ELBO unless --estimator says otherwise
    assert {r["estimator"] for r in rows.values()} == {"Trace_ELBO"}
    for row in rows.values():
        assert row["bounds_ok"] and row["log_px"] * row["n"] <= coin_log_evidence() + 0.05


# --- (b) Bayesian regression model(X, y) -------------------------------------------------------


def regression_data(n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, generator=g)
    y = X @ torch.tensor([1.5, -0.7]) + 0.3 + 0.5 * torch.randn(n, generator=g)
    return X, y


def regression_log_evidence(X, y) -> float:
    covariance = 0.25 * torch.eye(len(y)) + X @ X.T + 100.0 * torch.ones(len(y), len(y))
    mvn = torch.distributions.MultivariateNormal(torch.zeros(len(y)), covariance.double())
    return float(mvn.log_prob(y.double()))


@pytest.fixture(scope="module")
def regression_npz(tmp_path_factory):
    X, y = regression_data()
    path = tmp_path_factory.mktemp("reg") / "regression.npz"
    np.savez(path, X=X.numpy(), y=y.numpy())  # named after the model's parameters
    return path, X, y


@pytest.mark.parametrize(
    "model, guide",
    [("model", "guide"), ("module_model", "AutoMultivariateNormal")],
    ids=["sample-sites", "PyroModule"],
)
def test_regression_of_X_and_y_against_the_exact_evidence(
    regression_npz, model, guide, tmp_path, capsys
):
    path, X, y = regression_npz
    guide_spec = f"{REGRESSION}:{guide}" if guide == "guide" else guide
    run_dir = tmp_path / "run"
    argv = ["train", "--model", f"{REGRESSION}:{model}", "--guide", guide_spec]
    argv += ["--data", str(path), "--epochs", "1500", "--lr", "0.03"]
    argv += ["--no-progress", "--run-dir", str(run_dir)]
    code, out = _run(argv, capsys)
    assert code == 0, out
    assert "bounds:" in out and "VIOLATED" not in out
    code, out = _run(["explain", str(run_dir), "--json", "--num-samples", "2000"], capsys)
    assert code == 0
    e = json.loads(out)
    n, exact = e["n"], regression_log_evidence(X, y)
    assert n == 30 and e["bounds"]["ok"]
    assert e["elbo"] * n <= exact + 5 * e["elbo_stderr"] * n
    assert abs(e["log_px"] * n - exact) < 5 * e["log_px_stderr"] * n + 0.02
    if guide == "AutoMultivariateNormal":  # contains the Gaussian posterior: the gap closes
        assert exact - e["elbo"] * n < 0.1
