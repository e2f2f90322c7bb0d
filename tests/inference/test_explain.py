"""`elbo-lab explain`: the ELBO anatomy of trained runs, checked against its own identities."""

import json
import math

import numpy as np
import pytest

from inference.cli import main
from inference.explain import Explanation, explain


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
