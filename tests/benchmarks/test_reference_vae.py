"""Smoke run of the reference benchmark: one epoch, both VAEs trained and evaluated alike."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "reference_vae.py"


def _load():
    spec = importlib.util.spec_from_file_location("reference_vae", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "options",
    [[], ["--estimator", "trace"], ["--estimator", "trace", "--plain-kl", "sampled"]],
    ids=["meanfield-vs-analytic", "trace-vs-analytic", "trace-vs-sampled"],
)
def test_reference_vae_one_epoch(capsys, options):
    reference_vae = _load()
    threads = torch.get_num_threads()
    argv = ["--epochs", "1", "--tolerance", "inf", "--threads", "1", "--json", *options]
    assert reference_vae.main(argv) == 0
    assert torch.get_num_threads() == threads  # restored
    figures = json.loads(capsys.readouterr().out)
    assert figures["identical_start"] is True
    # after one epoch both are far from converged but in the same place (about -30 nats/image)
    for key in ("pyro_test_elbo", "plain_test_elbo"):
        assert -60 < figures[key] < -20, figures
    assert figures["difference"] == figures["pyro_test_elbo"] - figures["plain_test_elbo"]
    if options == ["--estimator", "trace"]:  # two gradient estimators: close, not equal
        assert abs(figures["difference"]) < 1.0
    else:  # one gradient estimator, one noise stream: one trajectory up to rounding
        assert abs(figures["difference"]) < 1e-3


def test_plain_evaluation_matches_elbo_lab_evaluate():
    """The benchmark's hand-written evaluation equals inference.train.evaluate on one network."""
    reference_vae = _load()
    from inference.data import load_digits
    from inference.train import evaluate
    from models.vae import VAE

    test = load_digits().test.float()
    torch.manual_seed(0)
    vae = VAE(64, 10, (200,))
    torch.manual_seed(0)
    plain = reference_vae.PlainVAE(64, 10, 200)
    assert reference_vae.same_init(plain, vae)
    expected = evaluate(vae.model, vae.guide, test).elbo
    assert abs(reference_vae.evaluate_plain(plain, test) - expected) <= 1e-5 * abs(expected)
