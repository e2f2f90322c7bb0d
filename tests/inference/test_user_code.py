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
import pyro
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
    assert abs(e["lk"] * n - exact) < 5 * e["lk_stderr"] * n + 1e-3
    assert 0 <= e["gap"] * n < 0.05  # the gap goes to ~0 at the optimum
    assert e["bounds"]["ok"] and not e["warnings"]


def test_coin_compare_mixes_a_hand_written_guide_and_autoguides(tmp_path, capsys):
    out_dir = tmp_path / "cmp"
    argv = ["compare", "--model", f"{COIN}:model", "--data", f"{COIN}:data"]
    argv += ["--guides", f"{COIN}:guide,AutoNormal", "--epochs", "300", "--lr", "0.05"]
    argv += ["--num-samples", "200", "--eval-particles", "20", "--num-draws", "8"]
    argv += ["--json", "--run-dir", str(out_dir)]
    code, out = _run(argv, capsys)
    assert code == 0
    rows = {r["guide"]: r for r in json.loads(out)["rows"]}
    assert set(rows) == {"guide", "AutoNormal"}
    # compare trains every guide with Trace_ELBO unless --estimator says otherwise
    assert {r["estimator"] for r in rows.values()} == {"Trace_ELBO"}
    for row in rows.values():
        assert row["bounds_ok"] and row["lk"] * row["n"] <= coin_log_evidence() + 0.05


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
    assert abs(e["lk"] * n - exact) < 5 * e["lk_stderr"] * n + 0.02
    if guide == "AutoMultivariateNormal":  # contains the Gaussian posterior: the gap closes
        assert exact - e["elbo"] * n < 0.1


# --- (c) a Gaussian mixture with enumerated assignments ----------------------------------------

MIXTURE = HERE / "mixture.py"


def test_enumerated_mixture_has_an_exact_evidence(tmp_path, capsys):
    run_dir = tmp_path / "mixture"
    argv = ["train", "--model", f"{MIXTURE}:model", "--guide", f"{MIXTURE}:guide"]
    argv += ["--data", f"{MIXTURE}:data", "--epochs", "150", "--lr", "0.05", "--no-progress"]
    argv += ["--json", "--run-dir", str(run_dir)]
    code, out = _run(argv, capsys)
    assert code == 0, out
    report = json.loads(out)
    assert report["estimator"].startswith("TraceEnum_ELBO")
    train = report["train"]
    bounds = train["bounds"]
    # every latent summed out: ELBO = L_K = the exact log p(x), not merely bounded by it
    assert bounds["ok"] and bounds["exact_log_px"] is not None
    assert train["elbo"] == pytest.approx(bounds["exact_log_px"], abs=1e-5)
    code, out = _run(["explain", str(run_dir), "--json", "--num-samples", "50"], capsys)
    assert code == 0
    e = json.loads(out)
    assert e["exact_log_px"] == pytest.approx(e["lk"], abs=1e-5)
    assert e["exact_gap"] == pytest.approx(0.0, abs=1e-6) and e["objective"]["ok"]
    # the exact value by hand: sum_n logsumexp_k (log w_k + log N(x_n; mu_k, s))
    import pyro

    store = pyro.get_param_store()
    weights, locs = store["weights"].detach(), store["locs"].detach()
    scale = store["scale"].detach()
    import runpy

    (data,), _ = runpy.run_path(str(MIXTURE))["data"]()
    log_terms = torch.distributions.Normal(locs, scale).log_prob(data[:, None]) + weights.log()
    exact = float(torch.logsumexp(log_terms, -1).sum()) / len(data)
    assert e["exact_log_px"] == pytest.approx(exact, abs=1e-4)


# --- (d) the VAE class of Pyro's VAE tutorial ---------------------------------------------------

VAE_FILE = HERE / "vae.py"


def test_tutorial_vae_class_with_its_own_model_and_guide(tmp_path, capsys):
    run_dir = tmp_path / "vae"
    argv = ["train", "--model", f"{VAE_FILE}:vae.model", "--guide", f"{VAE_FILE}:vae.guide"]
    argv += ["--data", "digits", "--epochs", "30", "--lr", "0.01", "--no-progress"]
    argv += ["--json", "--run-dir", str(run_dir)]
    code, out = _run(argv, capsys)
    assert code == 0, out
    report = json.loads(out)
    train = report["train"]
    # a Normal guide for a Normal prior in one plate: TraceMeanField_ELBO is valid and chosen
    assert report["estimator"].startswith("TraceMeanField_ELBO")
    assert train["bounds"]["ok"] and train["pyro_loss"] == pytest.approx(train["loss"], rel=1e-5)
    code, out = _run(["explain", str(run_dir), "--json", "--num-samples", "50"], capsys)
    assert code == 0
    e = json.loads(out)
    assert e["latents"] == "local" and e["bounds"]["ok"] and e["gap"] > 0
    out_dir = tmp_path / "cmp"
    argv = ["compare", "--model", f"{VAE_FILE}:vae.model", "--data", "digits"]
    argv += ["--guides", f"{VAE_FILE}:vae.guide", "--epochs", "5", "--lr", "0.01"]
    argv += ["--num-samples", "20", "--eval-particles", "2", "--num-draws", "8"]
    argv += ["--json", "--run-dir", str(out_dir)]
    code, out = _run(argv, capsys)
    assert code == 0, out
    (row,) = json.loads(out)["rows"]
    assert row["guide"] == "vae.guide" and row["bounds_ok"]


# --- (e) a model that subsamples its own plate ---------------------------------------------------

MINIBATCH = HERE / "minibatch.py"


def minibatch_log_evidence() -> float:
    """log N(x; 0, I + 100 1 1^T) of mu ~ N(0, 10^2), x_n ~ N(mu, 1), all 200 rows."""
    import runpy

    (data,), _ = runpy.run_path(str(MINIBATCH))["data"]()
    covariance = torch.eye(len(data), dtype=torch.float64) + 100.0
    normal = torch.distributions.MultivariateNormal(torch.zeros(len(data)).double(), covariance)
    return float(normal.log_prob(data.double()))


@pytest.mark.parametrize("name", ["model", "indexed_model"], ids=["subsample_size", "subsample"])
def test_a_subsampled_plate_trains_and_explains_on_all_rows(name, tmp_path, capsys):
    """pyro.plate("data", 200, subsample_size=20) trains on its mini-batches; the report, the
    bound check and explain's evidence are those of all 200 rows (the plate covered chunk by
    chunk), against the closed-form log p(x). The plate that takes its indices from an
    argument (default None: all rows) goes the same way."""
    guide = "guide" if name == "model" else "indexed_guide"
    run_dir = tmp_path / "mb"
    argv = ["train", "--model", f"{MINIBATCH}:{name}", "--guide", f"{MINIBATCH}:{guide}"]
    argv += ["--data", f"{MINIBATCH}:data", "--epochs", "200", "--lr", "0.05", "--no-progress"]
    argv += ["--run-dir", str(run_dir)]
    code, out = _run(argv, capsys)
    assert code == 0, out
    assert "bounds: ELBO = " in out and "(ok, within 5 s.e.)" in out, out
    code, out = _run(["explain", str(run_dir), "--json", "--num-samples", "1000"], capsys)
    assert code == 0
    e = json.loads(out)
    n, exact = e["n"], minibatch_log_evidence()
    assert n == 200 and e["latents"] == "global" and e["bounds"]["ok"] and not e["warnings"]
    assert abs(e["lk"] * n - exact) < 5 * e["lk_stderr"] * n + 1e-3
    assert e["elbo"] * n <= exact + 5 * e["elbo_stderr"] * n
    assert e["gap"] >= -5 * e["gap_stderr"] and e["khat"] < 0.7 and e["objective"]["ok"]
    assert e["pyro_loss"] == pytest.approx(e["loss"], rel=1e-6)  # Pyro's own, on all rows


def test_compare_evaluates_a_subsampled_plate_on_all_rows(tmp_path, capsys):
    argv = ["compare", "--model", f"{MINIBATCH}:model", "--data", f"{MINIBATCH}:data"]
    argv += ["--guides", f"{MINIBATCH}:guide,AutoNormal", "--epochs", "100", "--lr", "0.05"]
    argv += ["--num-samples", "200", "--eval-particles", "10", "--num-draws", "8", "--json"]
    argv += ["--run-dir", str(tmp_path / "mb")]
    code, out = _run(argv, capsys)
    assert code == 0, out
    rows = json.loads(out)["rows"]
    exact = minibatch_log_evidence() / 200
    assert [r["guide"] for r in rows] == ["guide", "AutoNormal"]
    for row in rows:
        assert row["bounds_ok"] and not row["failed"] and row["khat_median"] < 0.5
        assert abs(row["lk"] - exact) < 5 * row["lk_stderr"] + 1e-5
        assert row["elbo"] <= exact + 5 * row["elbo_stderr"]


# --- (f) eight schools: a hand-written guide against autoguides ---------------------------------

SCHOOLS = HERE / "eight_schools.py"


def test_eight_schools_compares_a_hand_written_guide_with_autoguides(tmp_path, capsys):
    out_dir = tmp_path / "schools"
    guides = f"{SCHOOLS}:guide,AutoNormal,AutoMultivariateNormal,AutoIAFNormal"
    argv = ["compare", "--model", f"{SCHOOLS}:model", "--data", f"{SCHOOLS}:data"]
    argv += ["--guides", guides, "--epochs", "800", "--lr", "0.02", "--estimator", "auto"]
    argv += ["--num-samples", "500", "--eval-particles", "50", "--num-draws", "8"]
    argv += ["--json", "--run-dir", str(out_dir)]
    code, out = _run(argv, capsys)
    assert code == 0, out
    rows = {r["guide"]: r for r in json.loads(out)["rows"]}
    assert list(rows) == ["guide", "AutoNormal", "AutoMultivariateNormal", "AutoIAFNormal"]
    for row in rows.values():
        assert row["bounds_ok"], row  # ELBO <= L_K within 5 s.e., for every family
        assert row["khat_median"] is not None
    # tau is positive: the autoguides' Deltas carry a log-Jacobian, so Trace_ELBO is chosen
    assert rows["AutoNormal"]["estimator"] == "Trace_ELBO"
    # the same exact log p(y) bounds them all: L_K agree within their errors and the gaps
    lks = [r["lk"] for r in rows.values()]
    assert max(lks) - min(lks) < 0.1


# --- (g) logistic regression on scikit-learn's breast-cancer data -------------------------------

LOGISTIC = HERE / "logistic.py"


def test_logistic_regression_with_covariates(tmp_path, capsys):
    pytest.importorskip("sklearn")
    run_dir = tmp_path / "logistic"
    argv = ["train", "--model", f"{LOGISTIC}:model", "--guide", "AutoMultivariateNormal"]
    argv += ["--data", f"{LOGISTIC}:data", "--epochs", "600", "--lr", "0.03", "--no-progress"]
    argv += ["--json", "--run-dir", str(run_dir)]
    code, out = _run(argv, capsys)
    assert code == 0, out
    train = json.loads(out)["train"]
    assert train["n"] == 569 and train["bounds"]["ok"]
    code, out = _run(["explain", str(run_dir), "--json", "--num-samples", "500"], capsys)
    assert code == 0
    e = json.loads(out)
    assert e["bounds"]["ok"] and 0 <= e["gap"] * e["n"] < 1.0 and e["khat"] < 0.7


# --- compare on the regression (b), the mixture (c) and the logistic regression (g) --------------


def test_compare_runs_on_each_model(regression_npz, tmp_path, capsys):
    pytest.importorskip("sklearn")
    path, X, y = regression_npz
    runs = {
        "regression": (
            ["--model", f"{REGRESSION}:model", "--data", str(path)],
            f"{REGRESSION}:guide,AutoNormal,AutoMultivariateNormal",
            "trace",
        ),
        "mixture": (
            ["--model", f"{MIXTURE}:model", "--data", f"{MIXTURE}:data"],
            f"{MIXTURE}:guide",
            "auto",
        ),
        "logistic": (
            ["--model", f"{LOGISTIC}:model", "--data", f"{LOGISTIC}:data"],
            "AutoNormal,AutoMultivariateNormal",
            "trace",
        ),
    }
    for name, (model_args, guides, estimator) in runs.items():
        argv = ["compare", *model_args, "--guides", guides, "--estimator", estimator]
        argv += ["--epochs", "300", "--lr", "0.03", "--num-samples", "200"]
        argv += ["--eval-particles", "20", "--num-draws", "8", "--json"]
        argv += ["--run-dir", str(tmp_path / name)]
        code, out = _run(argv, capsys)
        assert code == 0, (name, out)
        rows = json.loads(out)["rows"]
        assert len(rows) == len(guides.split(",")) and all(r["bounds_ok"] for r in rows), name
    # the mixture's ELBO is its exact evidence, and the regression's exact evidence bounds all
    (mixture,) = json.loads((tmp_path / "mixture" / "comparison.json").read_text())["rows"]
    assert mixture["estimator"] == "TraceEnum_ELBO"
    assert mixture["gap"] == pytest.approx(0.0, abs=1e-6)
    exact = regression_log_evidence(X, y) / len(y)
    for row in json.loads((tmp_path / "regression" / "comparison.json").read_text())["rows"]:
        assert row["elbo"] <= exact + 5 * row["elbo_stderr"]


def test_trace_elbo_on_an_enumerated_model_is_refused_in_one_line(tmp_path, capsys):
    argv = ["train", "--model", f"{MIXTURE}:model", "--guide", f"{MIXTURE}:guide"]
    argv += ["--data", f"{MIXTURE}:data", "--estimator", "trace", "--epochs", "2"]
    argv += ["--run-dir", str(tmp_path / "refused")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only TraceEnum_ELBO sums out" in err[0]


def test_a_guide_that_enumerates_is_refused_in_one_line(tmp_path, capsys):
    argv = ["train", "--model", f"{MIXTURE}:model", "--guide", f"{MIXTURE}:enumerated_guide"]
    argv += ["--data", f"{MIXTURE}:data", "--epochs", "2", "--run-dir", str(tmp_path / "g")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "site 'assignment' is enumerated in the guide" in err[0]


# --- mini-batching declared on the command line -------------------------------------------------


@pytest.fixture(scope="module")
def indexed_run(tmp_path_factory):
    """SVI Part II's model(data, ind=None), pyro.plate("data", N, subsample=ind), trained on
    mini-batches of 20 of its 200 rows: no argument is cut, the plate takes the batch's rows."""
    run_dir = tmp_path_factory.mktemp("indexed") / "run"
    argv = ["train", "--model", f"{MINIBATCH}:indexed_model"]
    argv += ["--guide", f"{MINIBATCH}:indexed_guide", "--data", f"{MINIBATCH}:data"]
    argv += ["--batch-args", "", "--subsample-arg", "ind", "--batch-size", "20"]
    argv += ["--epochs", "20", "--lr", "0.05", "--no-progress", "--run-dir", str(run_dir)]
    assert main(argv) == 0
    return run_dir


def test_declared_subsample_is_recorded_and_unbiased(indexed_run):
    """The run records its batching; a mini-batch cut as training cuts it gives -loss whose
    mean over batches and draws is the whole data's ELBO, in closed form for q = N(m, s^2):
    sum_n E_q[log N(x_n; mu, 1)] - KL(q || N(0, 10^2))."""
    from pyro.infer import Trace_ELBO

    from inference import Batching
    from inference.batching import slicer
    from inference.run import load_run

    run = load_run(indexed_run)
    assert run.batching == Batching(args=(), size=None, subsample="ind")
    (data,), kwargs = run.data.train
    n = len(data)
    cut = slicer(run.model, (data,), kwargs, run.batching)
    generator = torch.Generator().manual_seed(1)
    elbos = []
    for _ in range(400):
        call = cut(torch.randperm(n, generator=generator)[:20], n)
        assert call.kwargs["ind"].shape == (20,) and call.args[0] is data
        elbos.append(-Trace_ELBO().loss(run.model, run.guide, *call.args, **call.kwargs))
    elbos = torch.tensor(elbos, dtype=torch.float64)
    m, s = float(pyro.param("loc").detach()), float(pyro.param("scale").detach())
    x = data.double()
    expected_log_lik = float((-0.5 * math.log(2 * math.pi) - 0.5 * ((x - m) ** 2 + s**2)).sum())
    q, prior = torch.distributions.Normal(m, s), torch.distributions.Normal(0.0, 10.0)
    exact_elbo = expected_log_lik - float(torch.distributions.kl_divergence(q, prior))
    stderr = float(elbos.std()) / math.sqrt(len(elbos))
    assert abs(float(elbos.mean()) - exact_elbo) < 5 * stderr
    assert stderr < 5.0  # about 1 nat of 280: the check has teeth


def test_declared_subsample_run_explains_and_resumes(indexed_run, capsys):
    """evaluate and explain rebuild the run with its batching, on all 200 rows; --resume
    continues it with the stored declaration."""
    code, out = _run(["explain", str(indexed_run), "--json", "--num-samples", "500"], capsys)
    assert code == 0
    e = json.loads(out)
    n, exact = e["n"], minibatch_log_evidence()
    assert n == 200 and e["bounds"]["ok"] and e["objective"]["ok"] and not e["warnings"]
    assert abs(e["lk"] * n - exact) < 5 * e["lk_stderr"] * n + 1e-3
    code, out = _run(["evaluate", str(indexed_run), "--json"], capsys)
    assert code == 0 and json.loads(out)["n"] == 200
    argv = ["train", "--resume", "--run-dir", str(indexed_run), "--epochs", "22", "--no-progress"]
    code, out = _run(argv, capsys)
    assert code == 0 and "(ok, within 5 s.e.)" in out
    argv += ["--subsample-arg", "other"]
    assert main(argv) == 2
    assert "--subsample-arg cannot change" in capsys.readouterr().err


def test_declared_batch_args_cut_X_and_y(regression_npz, tmp_path, capsys):
    """model(X, y, num_data=None): X and y are cut together, num_data scales the plate."""
    path, X, y = regression_npz
    run_dir = tmp_path / "run"
    argv = ["train", "--model", f"{REGRESSION}:batched_model"]
    argv += ["--guide", f"{REGRESSION}:batched_guide", "--data", str(path)]
    argv += ["--batch-args", "X,y", "--size-arg", "num_data", "--batch-size", "10"]
    argv += ["--epochs", "300", "--lr", "0.03", "--no-progress", "--run-dir", str(run_dir)]
    code, out = _run(argv, capsys)
    assert code == 0 and "VIOLATED" not in out, out
    code, out = _run(["explain", str(run_dir), "--json", "--num-samples", "2000"], capsys)
    e = json.loads(out)
    n, exact = e["n"], regression_log_evidence(X, y)
    assert code == 0 and n == 30 and e["bounds"]["ok"]
    assert abs(e["lk"] * n - exact) < 5 * e["lk_stderr"] * n + 0.02


@pytest.mark.parametrize(
    "options, message",
    [
        (
            ["--batch-args", "x", "--size-arg", "ind"],
            "--batch-args: the model has no parameter 'x' (its parameters: ",
        ),
        (["--batch-args", "data", "--size-arg", "n"], "--size-arg: the model has no parameter"),
        (["--size-arg", "ind"], "--batch-args: name the parameters that hold the data rows"),
        (["--batch-args", "data"], "--size-arg: the model must learn that data is a batch"),
        (["--batch-args", "data", "--size-arg", "ind"], "the model fails on a batch of 1"),
        (["--batch-args", "data,ind", "--subsample-arg", "ind"], "--batch-args: "),
        (["--batch-args", "", "--size-arg", "ind", "--subsample-arg", "data"], "fails on"),
        (["--batch-args", "data", "--subsample-arg", "ind", "--size-arg", "ind"], "unscaled"),
    ],
    ids=[
        "unknown-arg",
        "unknown-size",
        "no-args",
        "no-size",
        "fails",
        "no-rows",
        "wrong",
        "unscaled",
    ],
)
def test_a_wrong_batching_declaration_is_one_line_naming_the_option(
    options, message, tmp_path, capsys
):
    argv = ["train", "--model", f"{MINIBATCH}:indexed_model"]
    argv += ["--guide", f"{MINIBATCH}:indexed_guide", "--data", f"{MINIBATCH}:data", *options]
    argv += ["--epochs", "1", "--run-dir", str(tmp_path / "refused")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("elbo-lab: error: ") and message in err[0], err
    assert not (tmp_path / "refused").exists()
