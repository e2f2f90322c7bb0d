"""A plate that subsamples itself, run over all its rows: the exact whole-data ELBO and evidence.

The model of SVI Part II, mu ~ N(0, 10^2), x_n ~ N(mu, 1) for n = 1..N, drawn through
``pyro.plate("data", N, subsample_size=20)``, has everything in closed form. For the guide
q(mu) = N(m, s^2):

    log p(x) = log N(x; 0, I + 100 1 1^T)
    ELBO     = sum_n [-1/2 log 2 pi - 1/2 ((x_n - m)^2 + s^2)] - KL(N(m, s^2) || N(0, 10^2))
    KL       = log(10 / s) + (s^2 + m^2) / 200 - 1/2

and at the posterior (s^2 = 1 / (N + 1/100), m = s^2 sum_n x_n) the ELBO is log p(x) and every
importance weight equals it. One run's ELBO is a mini-batch estimate, unbiased for the whole
data's; L_K and the bound check need all rows, which :mod:`inference.subsample` covers chunk by
chunk. N = 197 pads the last chunk of 20 with 3 masked rows.
"""

import math
import runpy
from pathlib import Path

import pyro
import pytest
import torch

from inference.elbo import decompose, decompose_all_rows
from inference.errors import OptionError
from inference.evidence import iwae, log_weights
from inference.subsample import chunk_rows, find_subsampled_plate
from inference.train import evaluate, pyro_loss

CODE = runpy.run_path(str(Path(__file__).parent / "user_code" / "minibatch.py"))


def rows(n):
    (data,), _ = CODE["data"]()
    return data[:n]


def exact_log_evidence(x):
    x = x.double()
    covariance = torch.eye(len(x), dtype=torch.float64) + 100.0
    normal = torch.distributions.MultivariateNormal(torch.zeros_like(x), covariance)
    return float(normal.log_prob(x))


def exact_elbo(x, m, s):
    x = x.double()
    reconstruction = float((-0.5 * math.log(2 * math.pi) - 0.5 * ((x - m) ** 2 + s**2)).sum())
    kl = math.log(10 / s) + (s**2 + m**2) / 200 - 0.5
    return reconstruction - kl


def posterior(x):
    variance = 1 / (len(x) + 1 / 100)
    return variance * float(x.sum()), variance**0.5


def set_guide(m, s):
    pyro.clear_param_store()
    pyro.param("loc", torch.tensor(m))
    pyro.param("scale", torch.tensor(s))


@pytest.mark.parametrize("n", [200, 197], ids=["chunks-of-20", "last-chunk-padded"])
def test_evidence_of_all_rows_is_the_closed_form(n):
    x = rows(n)
    set_guide(*posterior(x))
    plate = find_subsampled_plate(CODE["model"], CODE["guide"], (x,), {})
    assert (plate.name, plate.size, plate.full_size) == ("data", 20, n)
    covered = torch.cat([r[:real] for r, real in chunk_rows(plate)])
    assert covered.tolist() == list(range(n))  # a partition: every row once
    exact = exact_log_evidence(x)
    estimate = iwae(CODE["model"], CODE["guide"], x, num_samples=2000)
    # q is the posterior: every weight is log p(x) (float32 rounding of ~280 nats)
    assert estimate.lk == pytest.approx(exact, abs=2e-4)
    assert estimate.log_weights.shape == (2000,) and float(estimate.ess) > 1999
    # the same weights as the model without subsampling, draw for draw
    pyro.set_rng_seed(1)
    chunked = log_weights(CODE["model"], CODE["guide"], x, num_samples=8)
    pyro.set_rng_seed(1)
    full = log_weights(CODE["full_model"], CODE["guide"], x, num_samples=8)
    assert torch.allclose(chunked, full, atol=1e-3)


@pytest.mark.parametrize("n", [200, 197], ids=["chunks-of-20", "last-chunk-padded"])
def test_minibatch_elbo_is_unbiased_and_the_whole_data_elbo_is_exact(n):
    x = rows(n)
    m, s = 0.7, 0.3  # away from the posterior: a gap and a spread of weights
    set_guide(m, s)
    exact = exact_elbo(x, m, s)
    pyro.set_rng_seed(0)
    batch = decompose(CODE["model"], CODE["guide"], x, num_particles=500, analytic_kl=False)
    assert abs(batch.elbo - exact) < 5 * batch.elbo_stderr  # unbiased, a mini-batch's spread
    pyro.set_rng_seed(0)
    whole = decompose_all_rows(CODE["model"], CODE["guide"], x, num_particles=50)
    assert abs(whole.elbo - exact) < 5 * whole.elbo_stderr
    kl = exact - float((-0.5 * math.log(2 * math.pi) - 0.5 * ((x.double() - m) ** 2 + s**2)).sum())
    assert whole.kl == pytest.approx(-kl, abs=1e-4)  # the analytic KL, counted once
    # the headline: evaluate's per-datum ELBO and Pyro's own loss on the same noise
    metrics = evaluate(CODE["model"], CODE["guide"], x, batch_size=None, num_particles=50)
    assert metrics.n == n and abs(metrics.elbo * n - exact) < 5 * metrics.elbo_stderr * n
    loss = pyro_loss(CODE["model"], CODE["guide"], x, batch_size=None, estimator="meanfield")
    single = evaluate(CODE["model"], CODE["guide"], x, batch_size=None)
    assert loss == pytest.approx(single.loss, rel=1e-6)
    # and the bound: ELBO <= L_K <= log p(x)
    estimate = iwae(CODE["model"], CODE["guide"], x, num_samples=1000)
    assert exact < estimate.lk + 5 * estimate.stderr
    assert estimate.lk < exact_log_evidence(x) + 5 * estimate.stderr


def test_local_latents_get_one_weight_per_row():
    """z_n local to a self-subsampling plate in model and guide: (K, N) weights, row by row;
    the guide is the exact posterior, so each is log N(x_n; 0, 2)."""
    x = rows(197)
    estimate = iwae(CODE["local_model"], CODE["local_guide"], x, num_samples=16)
    assert estimate.log_weights.shape == (16, 197)
    exact = torch.distributions.Normal(0.0, 2**0.5).log_prob(x.double())
    assert torch.allclose(estimate.per_datum, exact, atol=1e-5)
    d = decompose_all_rows(
        CODE["local_model"], CODE["local_guide"], x, num_particles=4, analytic_kl=False
    )
    # log q - log p(x, z) is constant at the posterior: the Monte-Carlo ELBO is log p(x)
    assert d.elbo == pytest.approx(float(exact.sum()), abs=1e-3)


def test_indices_given_by_an_argument():
    """pyro.plate(..., subsample=ind): all rows when ind is None; a given subsample of a model
    with global latents is no evidence, refused in one line."""
    x = rows(200)
    set_guide(*posterior(x))
    model, guide = CODE["indexed_model"], CODE["indexed_guide"]
    assert find_subsampled_plate(model, guide, (x,), {}) is None
    estimate = iwae(model, guide, x, num_samples=100)
    assert estimate.lk == pytest.approx(exact_log_evidence(x), abs=2e-4)
    ind = torch.arange(20)
    with pytest.raises(OptionError, match="its indices given by the model's arguments"):
        iwae(model, guide, x, ind, num_samples=4)
    set_guide(0.7, 0.3)
    pyro.set_rng_seed(0)
    batches = [decompose(model, guide, x, torch.randperm(200)[:20], analytic_kl=False).elbo
               for _ in range(300)]  # fmt: skip
    mean = sum(batches) / len(batches)
    stderr = float(torch.tensor(batches).std()) / len(batches) ** 0.5
    assert abs(mean - exact_elbo(x, 0.7, 0.3)) < 5 * stderr


def test_an_enumerated_mixture_on_all_rows_is_its_exact_evidence():
    """Pyro's GMM with the assignments enumerated inside a plate of 100 rows that subsamples 30
    (the last chunk padded by 20): L_K, the ELBO and Pyro's TraceEnum_ELBO loss over the chunks
    are all the exact log p(x) of all rows, the assignments summed out."""
    import pyro.distributions as dist
    from pyro.infer import config_enumerate

    from inference.enumeration import exact_log_evidence

    mixture = runpy.run_path(str(Path(__file__).parent / "user_code" / "mixture.py"))
    (x,), _ = mixture["data"]()

    @config_enumerate
    def model(data):
        weights = pyro.param(
            "weights", torch.tensor([0.5, 0.5]), constraint=dist.constraints.simplex
        )
        locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
        scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
        with pyro.plate("data", len(data), subsample_size=30) as ind:
            assignment = pyro.sample("assignment", dist.Categorical(weights))
            pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data[ind])

    exact = exact_log_evidence(mixture["model"], x)  # the model without subsampling
    assert iwae(model, mixture["guide"], x, num_samples=2).lk == pytest.approx(exact, abs=1e-3)
    d = decompose_all_rows(model, mixture["guide"], x, analytic_kl=False)
    assert d.elbo == pytest.approx(exact, abs=1e-3) and d.enumerated == ("assignment",)
    loss = pyro_loss(model, mixture["guide"], x, batch_size=None, estimator="enum") * len(x)
    assert loss == pytest.approx(-exact, abs=1e-3)
