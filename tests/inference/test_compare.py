"""Comparing guides on a model with a known posterior, and the files it writes.

Conjugate Bayesian linear regression, y = X w + eps, w ~ N(0, I / alpha), eps ~ N(0, sigma^2):

    p(w | y)  = N(m, Lambda^{-1}),  Lambda = alpha I + X^T X / sigma^2,  m = Lambda^{-1} X^T y / sigma^2
    log p(y)  = log N(y; 0, sigma^2 I + X X^T / alpha)

AutoMultivariateNormal contains the posterior, so its ELBO reaches log p(y); AutoNormal, mean
field, stops short by 1/2 sum_j log Lambda_jj - 1/2 log |Lambda| (Bishop, PRML §10.1.2).
"""

import json
import math
import warnings
from dataclasses import replace

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from inference.batching import ModelArgs
from inference.compare import CompareConfig, check_guides, compare, write_comparison
from inference.data import ModelData
from inference.errors import OptionError
from inference.train import TrainConfig

SIGMA, ALPHA = 1.0, 1.0


def regression(data):
    """Bayesian linear regression on data = [X | y] ``(N, d + 1)``; broadcasts over draws of w."""
    X, y = data[:, :-1], data[:, -1]
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), ALPHA**-0.5).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((w * X).sum(-1), SIGMA), obs=y)


def regression_data(n=10, d=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, 1, generator=g)
    X = shared + 0.5 * torch.randn(n, d, generator=g)  # correlated columns: a tilted posterior
    y = X @ torch.tensor([1.0, -0.5, 0.3]) + SIGMA * torch.randn(n, generator=g)
    return torch.cat([X, y[:, None]], dim=1)


def exact_posterior(data):
    X, y = data[:, :-1], data[:, -1]
    n, d = X.shape
    precision = ALPHA * torch.eye(d) + X.T @ X / SIGMA**2
    covariance = torch.linalg.inv(precision)
    mean = covariance @ X.T @ y / SIGMA**2
    evidence = dist.MultivariateNormal(torch.zeros(n), SIGMA**2 * torch.eye(n) + X @ X.T / ALPHA)
    return mean, covariance, precision, float(evidence.log_prob(y))


@pytest.fixture(scope="module")
def regression_comparison(tmp_path_factory):
    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    try:
        pyro.clear_param_store()
        out = tmp_path_factory.mktemp("compare")
        data = regression_data()
        guides = {
            "AutoNormal": AutoNormal,
            "AutoMultivariateNormal": AutoMultivariateNormal(regression),
        }
        config = TrainConfig(epochs=1000, batch_size=None, learning_rate=0.01, progress=False)
        options = CompareConfig(num_samples=1000, eval_particles=300, num_draws=200)
        with pyro.validation_enabled(False):  # fit validates its first step; speed
            comparison = compare(
                regression, guides, data, config, options, out_dir=out, model_name="blr"
            )
        # the last guide's parameters are still in the param store
        posterior = guides["AutoMultivariateNormal"].get_posterior()
        fitted = (posterior.mean.detach(), posterior.covariance_matrix.detach())
        paths = write_comparison(comparison, out)
        return data, comparison, fitted, out, paths
    finally:
        torch.set_default_dtype(old)
        torch.set_num_threads(threads)
        pyro.clear_param_store()


def test_full_rank_autoguide_recovers_the_posterior(regression_comparison):
    data, comparison, (mean, covariance), _, _ = regression_comparison
    exact_mean, exact_cov, _, _ = exact_posterior(data)
    sd = exact_cov.diagonal().sqrt()
    assert ((mean - exact_mean).abs() < 0.15 * sd).all(), (mean, exact_mean)
    relative = torch.linalg.matrix_norm(covariance - exact_cov) / torch.linalg.matrix_norm(
        exact_cov
    )
    assert relative < 0.2, (covariance, exact_cov)


def test_full_rank_elbo_reaches_the_log_evidence(regression_comparison):
    data, comparison, _, _, _ = regression_comparison
    *_, log_evidence = exact_posterior(data)
    row = comparison.rows[1]
    n = row.n
    assert (row.guide, row.split, n) == ("AutoMultivariateNormal", "train", 10)
    # ELBO <= log p(y), closely; L_K within 5 standard errors of log p(y)
    assert -0.05 - 5 * row.elbo_stderr * n < row.elbo * n - log_evidence < 5 * row.elbo_stderr * n
    assert abs(row.lk * n - log_evidence) < 5 * row.lk_stderr * n + 1e-3
    assert row.khat_median < 0.5


def test_mean_field_autoguide_shows_the_mean_field_gap(regression_comparison):
    data, comparison, _, _, _ = regression_comparison
    _, _, precision, log_evidence = exact_posterior(data)
    expected = 0.5 * torch.log(precision.diagonal()).sum() - 0.5 * torch.logdet(precision)
    row = comparison.rows[0]
    gap = log_evidence - row.elbo * row.n
    assert expected > 0.3
    assert abs(gap - float(expected)) < 0.1 + 5 * row.elbo_stderr * row.n, (gap, expected)
    assert row.gap > comparison.rows[1].gap


def test_netcdf_posteriors_open_with_arviz(regression_comparison):
    data, _, _, out, _ = regression_comparison
    exact_mean, exact_cov, _, _ = exact_posterior(data)
    idata = az.from_netcdf(out / "posterior_AutoMultivariateNormal.nc")
    assert dict(idata.posterior.sizes) == {"chain": 4, "draw": 50, "w_dim_0": 3}
    assert idata.posterior.attrs["guide"] == "AutoMultivariateNormal"
    summary = az.summary(idata, kind="stats")
    assert list(summary.index) == ["w[0]", "w[1]", "w[2]"]
    draws = idata.posterior["w"].values.reshape(-1, 3)
    sd = exact_cov.diagonal().sqrt().numpy()
    # the fit is within 0.15 sd of the exact mean; the draws add 5 standard errors of their own
    tolerance = 0.15 * sd + 5 * sd / math.sqrt(draws.shape[0])
    assert (np.abs(draws.mean(0) - exact_mean.numpy()) < tolerance).all()


def test_written_tables_and_figure(regression_comparison):
    _, comparison, _, _, paths = regression_comparison
    record = json.loads(paths["json"].read_text())
    assert record["units"] == "nats per datum" and record["num_samples"] == 1000
    assert [r["guide"] for r in record["rows"]] == ["AutoNormal", "AutoMultivariateNormal"]
    header = paths["csv"].read_text().splitlines()[0].split(",")
    assert {"elbo", "lk", "gap", "khat_median", "khat_share_bad", "seconds"} <= set(header)
    assert "| AutoNormal |" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "names, amortized, estimator, message",
    [
        (["diag", "AutoNormal"], True, "trace", "autoguide"),
        (["diag"], False, "trace", "amortized encoder"),
        (["flow"], True, "meanfield", "analytic KL"),
        (["AutoIAFNormal"], False, "jit-meanfield", "analytic KL"),
        (["diag", "diag"], True, "trace", "named twice"),
        (["AutoLaplace"], False, "trace", "unknown autoguide"),
    ],
    ids=["vae-autoguide", "user-diag", "meanfield-flow", "meanfield-iaf", "twice", "unknown"],
)
def test_incompatible_guides_are_option_errors(names, amortized, estimator, message):
    """Worded in the library's parameters (``guides: ...``), not the command line's flags."""
    with pytest.raises(OptionError, match=message) as exc:
        check_guides(names, amortized=amortized, estimator=estimator)
    assert exc.value.option in ("guides", "estimator")
    assert str(exc.value).startswith(f"{exc.value.option}: ") and "--" not in str(exc.value)


def test_config_errors_name_the_parameter_and_elbo_particles_is_deprecated():
    with pytest.raises(OptionError, match=r"^num_draws: need at least one draw per chain"):
        CompareConfig(num_draws=2, num_chains=4)
    with pytest.raises(OptionError, match=r"^eval_particles: must be a positive integer, got 0"):
        CompareConfig(eval_particles=0)
    with pytest.warns(DeprecationWarning, match="use eval_particles"):
        options = CompareConfig(elbo_particles=7)
    assert options.eval_particles == 7 and options == CompareConfig(eval_particles=7)
    with pytest.warns(DeprecationWarning):
        assert options.elbo_particles == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fields know the new name only
        assert replace(options, num_samples=5).eval_particles == 7


def test_rows_carry_the_estimator_and_a_passed_bound_check(regression_comparison):
    _, comparison, _, _, _ = regression_comparison
    for row in comparison.rows:
        # Normal priors: the autoguides' Deltas have no log-Jacobian, meanfield is valid
        assert row.estimator == "TraceMeanField_ELBO" and row.bounds_ok is True, row


def test_a_failing_guide_is_a_failed_row_and_the_others_are_kept():
    """A NaN in one guide's training does not throw away the guides already compared."""

    calls = []

    def broken_guide(data):  # fine at first, NaN from the fifth call on
        calls.append(1)
        loc = pyro.param("broken_loc", torch.zeros(data.shape[1] - 1))
        pyro.sample("w", dist.Normal(loc * (math.nan if len(calls) > 4 else 1.0), 1.0).to_event(1))

    data = regression_data()
    config = TrainConfig(epochs=20, batch_size=None, learning_rate=0.05, progress=False)
    options = CompareConfig(num_samples=50, eval_particles=10, num_draws=8)
    comparison = compare(regression, {"AutoNormal": AutoNormal, "broken": broken_guide},
                         data, config, options)  # fmt: skip
    ok, broken = comparison.rows
    assert not ok.failed and math.isfinite(ok.elbo) and ok.bounds_ok
    assert "loss is nan" in broken.failed and math.isnan(broken.elbo)
    from inference.compare import format_table

    table = format_table(comparison)
    assert "| broken | failed |" in table and "broken: training failed: " in table
    json.dumps(comparison.to_dict(), allow_nan=False)  # JSON proper: NaN is null


def local_model(x):
    """z_n ~ N(0, 1), x_n ~ N(z_n, 1): a latent per row."""
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(z, 1.0), obs=x)


def local_encoder(x):
    """q(z_n) = N(a x_n, s): a function of the row, so it describes held-out rows too."""
    a = pyro.param("a", torch.tensor(0.3))
    s = pyro.param("s", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(a * x, s))


def test_a_guide_whose_evaluation_fails_is_a_failed_row_and_the_others_are_kept():
    """AutoNormal has one (loc, scale) per training row: it trains, but cannot describe the 10
    held-out rows it is evaluated on. Its row says why; the encoder's row is complete."""
    x = 2**0.5 * torch.randn(30, generator=torch.Generator().manual_seed(0))
    data = ModelData("rows", ModelArgs((x[:20],), {}), ModelArgs((x[20:],), {}))
    config = TrainConfig(epochs=20, batch_size=None, learning_rate=0.05, progress=False)
    options = CompareConfig(num_samples=50, eval_particles=10, num_draws=8, split="test")
    comparison = compare(local_model, {"encoder": local_encoder, "AutoNormal": AutoNormal},
                         data, config, options)  # fmt: skip
    encoder, auto = comparison.rows
    assert (encoder.split, encoder.n, auto.split, auto.n) == ("test", 10, "test", 10)
    assert auto.failed.startswith("evaluation: ValueError: ") and "'obs'" in auto.failed
    assert all(math.isnan(getattr(auto, k)) for k in ("elbo", "lk", "gap", "khat_median"))
    assert not encoder.failed and encoder.bounds_ok is True and encoder.estimator
    numbers = [v for v in encoder._asdict().values() if isinstance(v, float)]
    assert all(math.isfinite(v) for v in numbers)
    # the row's own identity: gap = L_K - ELBO
    assert encoder.gap == pytest.approx(encoder.lk - encoder.elbo)
    record = json.loads(json.dumps(comparison.to_dict(), allow_nan=False))  # NaN is null
    assert record["rows"][1]["elbo"] is None and record["rows"][1]["failed"] == auto.failed


USER_MODEL = """
import pyro, pyro.distributions as dist, torch

def model(data):
    X, y = data[:, :-1], data[:, -1]
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((w * X).sum(-1), 1.0), obs=y)
"""


def test_cli_compare_replaces_its_run_directory_only_once_done(tmp_path, capsys, monkeypatch):
    """The command line builds the configs, calls compare and owns --run-dir as train does
    (inference.rundir): --force writes beside the old comparison and renames it into place, so
    a comparison that fails on the way leaves the old one whole and nothing beside it."""
    import importlib

    from inference.cli import main

    compare_module = importlib.import_module("inference.compare")  # inference.compare: the function

    (tmp_path / "m.py").write_text(USER_MODEL)
    np.save(tmp_path / "data.npy", regression_data(n=12).numpy().astype(np.float32))
    out = tmp_path / "runs" / "cmp"
    argv = [
        "compare",
        "--model",
        f"{tmp_path / 'm.py'}:model",
        "--data",
        str(tmp_path / "data.npy"),
    ]
    argv += ["--guides", "AutoNormal", "--epochs", "2", "--num-samples", "8"]
    argv += ["--eval-particles", "2", "--num-draws", "8", "--run-dir", str(out)]

    def seed_of_the_comparison():
        return json.loads((out / "comparison.json").read_text())["train"]["seed"]

    assert main(argv) == 0 and seed_of_the_comparison() == 0
    assert main(argv + ["--force", "--seed", "1"]) == 0 and seed_of_the_comparison() == 1

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device", str(out / "comparison.csv"))

    monkeypatch.setattr(compare_module, "write_comparison", broken)
    assert main(argv + ["--force", "--seed", "2"]) == 2
    assert "No space left" in capsys.readouterr().err
    assert seed_of_the_comparison() == 1 and (out / "posterior_AutoNormal.nc").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["cmp"]  # no temporary siblings


def test_each_guides_evaluations_run_with_the_threads_eval_threads_returns(monkeypatch):
    """``compare(eval_threads=f)``: fit's last evaluation and the comparison's own run with
    the threads ``f`` returns, asked once per guide for each, the training with its own; the
    numbers are those of a comparison without it."""
    import importlib

    compare_module = importlib.import_module("inference.compare")  # not the package's function

    x = 2**0.5 * torch.randn(30, generator=torch.Generator().manual_seed(0))
    data = ModelData("rows", ModelArgs((x[:20],), {}), ModelArgs((x[20:],), {}))
    config = TrainConfig(epochs=5, batch_size=None, learning_rate=0.05, progress=False)
    options = CompareConfig(num_samples=20, eval_particles=4, num_draws=4, split="test")
    evaluate, seen, asked = compare_module._evaluate, [], []

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return evaluate(*args, **kwargs)

    def threads() -> int:
        asked.append(torch.get_num_threads())
        return 2

    monkeypatch.setattr(compare_module, "_evaluate", recording)
    guides = {"encoder": local_encoder, "again": local_encoder}
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = compare(local_model, guides, data, config, options)
        given = compare(local_model, guides, data, config, options, eval_threads=threads)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1, 2, 2]
    assert asked == [1] * 4  # per guide: fit's last evaluation, then the comparison's
    strip = ("seconds",)
    rows = [[{k: v for k, v in r._asdict().items() if k not in strip} for r in c.rows]
            for c in (plain, given)]  # fmt: skip
    assert rows[0] == rows[1]
