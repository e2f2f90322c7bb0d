"""The SVI loop: reproducibility, resume, the sign identities in every row, and evaluation
checked against a plain-PyTorch ELBO (Kingma & Welling 2014, eq. 10) on a trained checkpoint."""

import csv
import json
import math
from dataclasses import replace

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.distributions import constraints

from inference.data import load_digits
from inference.errors import NumericalError, OptionError
from inference.io import load_checkpoint
from inference.run import ModelSpec, build_model, load_run
from inference.train import (
    CHECKPOINT,
    EVAL_SEED,
    TrainConfig,
    evaluate,
    fit,
    pyro_loss,
    resolve_estimator,
)
from models.vae import VAE

# every epoch evaluated: the tests compare histories row by row
TINY = TrainConfig(
    epochs=2, batch_size=64, seed=3, progress=False, eval_batch_size=100, eval_every=1
)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def small(digits):
    """(train, test): 192 and 64 float32 rows of the binarized digits."""
    return digits.train[:192].float(), digits.test[:64].float()


def _vae(seed=0, dtype=torch.float32, hidden=(16,)):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    return VAE(64, latent_dim=2, hidden_dims=hidden).to(dtype)


def _params(vae):
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}


def _numbers(history):
    """History without wall-clock time."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def _assert_sign_identities(row):
    # loss = -elbo and elbo = reconstruction - kl, to float precision
    scale = max(1.0, abs(row["elbo"]))
    assert row["loss"] == -row["elbo"]
    assert abs(row["elbo"] - (row["reconstruction"] - row["kl"])) <= 1e-12 * scale


def test_same_seed_same_numbers(small):
    train, test = small
    runs = []
    for _ in range(2):
        vae = _vae()
        result = fit(vae.model, vae.guide, train, test=test, config=TINY)
        runs.append((_numbers(result.history), _params(vae), result.final))
    (h1, p1, f1), (h2, p2, f2) = runs
    assert h1 == h2 and f1 == f2
    for k in p1:
        assert torch.equal(p1[k], p2[k]), k
    # a different seed gives different numbers
    vae = _vae()
    other = fit(
        vae.model, vae.guide, train, test=test, config=TrainConfig(**{**TINY.__dict__, "seed": 4})
    )
    assert _numbers(other.history) != h1


def test_evaluations_run_with_the_threads_eval_threads_returns(small, monkeypatch):
    """``fit(eval_threads=f)`` asks ``f`` before each due evaluation and evaluates both splits
    with the threads it returns; the steps run with the training's threads, restored after
    each evaluation. The numbers are those of a run without it."""
    import inference.train as train_module

    train, test = small
    before = torch.get_num_threads()
    seen, asked = [], []
    evaluate = train_module.evaluate

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return evaluate(*args, **kwargs)

    def threads() -> int:
        asked.append(torch.get_num_threads())  # the training's count, when asked
        return 2

    monkeypatch.setattr(train_module, "evaluate", recording)
    config = TrainConfig(**{**TINY.__dict__, "epochs": 3, "eval_every": 2})
    torch.set_num_threads(1)
    try:
        vae = _vae()
        plain = fit(vae.model, vae.guide, train, test=test, config=config)
        assert seen == [1] * 4
        seen.clear()
        vae = _vae()
        given = fit(vae.model, vae.guide, train, test=test, config=config, eval_threads=threads)
        assert asked == [1, 1]  # epochs 2 and 3 (the last)
        assert seen == [2] * 4  # both splits, each evaluation
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert _numbers(given.history) == _numbers(plain.history)
    assert given.final == plain.final


def test_every_row_satisfies_the_sign_identities(small, tmp_path):
    train, test = small
    vae = _vae()
    result = fit(vae.model, vae.guide, train, test=test, config=TINY, run_dir=tmp_path)
    assert [(r["epoch"], r["split"]) for r in result.history] == [
        (1, "train"),
        (1, "test"),
        (2, "train"),
        (2, "test"),
    ]
    for row in result.history:
        _assert_sign_identities(row)
        assert row["kl"] > 0 and row["reconstruction"] < 0
        assert row["n"] == (192 if row["split"] == "train" else 64)
    assert tuple(result.final) == tuple(
        result.history[-1][k] for k in ("loss", "elbo", "reconstruction", "kl", "n", "elbo_stderr")
    )
    # the files hold the same rows
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert jsonl == result.history
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    for row, expected in zip(rows, result.history, strict=True):
        assert float(row["elbo"]) == expected["elbo"] and row["split"] == expected["split"]
        _assert_sign_identities(
            {k: float(row[k]) for k in ("loss", "elbo", "reconstruction", "kl")}
        )
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["train"]["epochs"] == 2 and config["train"]["batch_size"] == 64
    state = load_checkpoint(tmp_path / CHECKPOINT)
    assert state["position"] == {"epoch": 2, "step": 0, "loss_sum": 0.0}
    # the checkpoint covers exactly the rows on disk: their lengths are recorded in it
    assert state["metrics"]["metrics.jsonl"] == (tmp_path / "metrics.jsonl").stat().st_size
    for name, value in zip(state["param_names"], state["params"].values(), strict=True):
        assert torch.equal(value, pyro.get_param_store().get_param(name).detach()), name


def test_default_eval_every_keeps_evaluation_within_its_share_of_training():
    """Without ``eval_every``: about EVALUATIONS_PER_RUN evaluations a run and, given rows,
    evaluations no more often than keeps their estimated cost (draw cost x draws x the rows
    evaluated, in training row-draws) within EVAL_SHARE of what the epochs between them train
    (particles x training rows each); the fewest epochs that satisfy both."""
    from inference.choices import (
        EVAL_GLOBAL_DRAW_COST,
        EVAL_ROW_COST,
        EVAL_SHARE,
        EVALUATIONS_PER_RUN,
    )
    from inference.train import default_eval_every

    draws = ((1, 1, EVAL_ROW_COST), (10, 1, EVAL_GLOBAL_DRAW_COST), (10, 4, 0.7), (1, 3, 0.6))
    for epochs in (1, 2, 7, 8, 40, 161, 200, 1000, 5000):
        per_run = math.ceil(epochs / EVALUATIONS_PER_RUN)
        for train_rows, other in ((1438, 359), (60000, 15000), (100, 0), (50, 500), (7, 1)):
            for eval_draws, train_draws, draw_cost in draws:
                options = dict(eval_draws=eval_draws, train_draws=train_draws, draw_cost=draw_cost)
                every = default_eval_every(epochs, train_rows, other, **options)
                cost = draw_cost * eval_draws * (train_rows + other)  # training row-draws
                per_epoch = train_draws * train_rows
                within = [
                    cost <= EVAL_SHARE * k * per_epoch * (1 + 1e-12) for k in (every - 1, every)
                ]
                case = (epochs, train_rows, other, options)
                assert every >= per_run and within[1], case
                assert every - 1 < per_run or not within[0], case
        assert default_eval_every(epochs) == per_run  # no rows given: about 20 a run
    assert default_eval_every(200, 1438, 359) == 10  # the default digits run, as before
    assert default_eval_every(2, 60000, 15000) == 8  # a 2-epoch MNIST-sized run: its end only


def test_fit_evaluates_at_the_default_cadence(small):
    """``fit`` without ``eval_every`` evaluates every :func:`default_eval_every` epochs of the
    training and test rows, and after the last epoch; with one, as told. Rows in chunks (the
    VAE) cost one draw each, global latents ``eval_particles`` whole-data draws."""
    from inference.choices import EVAL_GLOBAL_DRAW_COST
    from inference.train import default_eval_every

    train, test = small
    every = default_eval_every(20, len(train), len(test))
    assert every == 8
    for eval_every, epochs in ((None, [8, 16, 20]), (None, [3]), (5, [5, 10, 15, 20])):
        config = TrainConfig(
            epochs=epochs[-1], batch_size=96, progress=False, eval_every=eval_every
        )
        vae = _vae()
        history = fit(vae.model, vae.guide, train, test=test, config=config).history
        assert [(r["epoch"], r["split"]) for r in history] == [
            (e, split) for e in epochs for split in ("train", "test")
        ]

    def model(x):  # a global latent: no declared rows, the whole data in each step
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample(
            "mu",
            dist.Normal(loc, pyro.param("scale", torch.tensor(1.0), dist.constraints.positive)),
        )

    x = torch.linspace(-1.0, 3.0, 12)
    config = TrainConfig(epochs=230, batch_size=None, progress=False, eval_particles=3, jit="off")
    every = default_eval_every(
        230, 12, eval_draws=3, train_draws=1, draw_cost=EVAL_GLOBAL_DRAW_COST
    )
    assert every == 30
    pyro.clear_param_store()
    history = fit(model, guide, x, config=config).history
    assert [r["epoch"] for r in history] == [30, 60, 90, 120, 150, 180, 210, 230]


def _mean_guide(x):
    loc = pyro.param("loc", torch.tensor(0.0))
    pyro.sample(
        "mu", dist.Normal(loc, pyro.param("scale", torch.tensor(1.0), constraints.positive))
    )


def test_default_cadence_of_a_self_subsampling_plate_and_of_vectorized_particles():
    """A plate that subsamples itself trains B of its N rows a step but evaluates all N (in
    ceil(N / B) chunks of B), eval_particles times: the default cadence counts B rows trained,
    not N. Vectorized particles run in one pass: they count as one training draw, not K."""
    from pyro.infer import Trace_ELBO

    from inference.choices import EVAL_GLOBAL_DRAW_COST
    from inference.train import default_eval_every

    def subsampling(x):  # B = 20 of N = 60 rows a step
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", x.shape[0], subsample_size=20) as ind:
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x[ind])

    x = torch.linspace(-1.0, 3.0, 60)
    config = TrainConfig(epochs=130, batch_size=None, progress=False, eval_particles=2, jit="off")
    every = default_eval_every(130, 20, 40, eval_draws=2, draw_cost=EVAL_GLOBAL_DRAW_COST)
    assert every == 60  # with N = 60 rows trained a step it would be 20
    pyro.clear_param_store()
    history = fit(subsampling, _mean_guide, x, config=config).history
    assert [r["epoch"] for r in history] == [60, 120, 130]

    def whole(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    x = torch.linspace(-1.0, 3.0, 12)
    for vectorize, expected in ((True, 30), (False, 12)):  # 4 particles: one draw, or four
        elbo = Trace_ELBO(num_particles=4, vectorize_particles=vectorize, max_plate_nesting=1)
        config = TrainConfig(
            epochs=230, batch_size=None, progress=False, eval_particles=3, estimator=elbo
        )
        pyro.clear_param_store()
        history = fit(whole, _mean_guide, x, config=config).history
        epochs = [r["epoch"] for r in history]
        assert epochs == [*range(expected, 230, expected), 230], (vectorize, epochs)


def test_resume_at_an_epoch_boundary_is_bit_identical(small, tmp_path):
    train, test = small
    four = TrainConfig(**{**TINY.__dict__, "epochs": 4})
    vae = _vae()
    whole = fit(vae.model, vae.guide, train, test=test, config=four)
    whole_params = _params(vae)

    vae = _vae()
    fit(vae.model, vae.guide, train, test=test, config=TINY, run_dir=tmp_path)
    vae = _vae(seed=99)  # fresh, differently initialized networks: the checkpoint overwrites them
    torch.manual_seed(12345)  # and disturbed global RNG: the checkpoint restores it
    resumed = fit(
        vae.model, vae.guide, train, test=test, config=four, run_dir=tmp_path, resume=True
    )
    assert _numbers(resumed.history) == _numbers(whole.history)
    assert resumed.final == whole.final
    for k, v in _params(vae).items():
        assert torch.equal(v, whole_params[k]), k


def _plain_elbo(vae, x, batch_size):
    """Per-image ELBO by hand: -BCE-with-logits(sum) - KL(N(m, s^2) || N(0, 1)), same noise."""
    total = 0.0
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(EVAL_SEED)
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size]
            z_loc, z_scale = vae.encoder.encode(xb)
            z = z_loc + z_scale * torch.randn_like(z_loc)  # reparameterized draw, as rsample
            log_p_x_given_z = -F.binary_cross_entropy_with_logits(
                vae.decoder(z), xb, reduction="sum"
            )
            # KL(N(m, s^2) || N(0, 1)) = 1/2 (s^2 + m^2 - 1) - log s
            kl = (0.5 * (z_scale**2 + z_loc**2 - 1) - torch.log(z_scale)).sum()
            total += (log_p_x_given_z - kl).item()
    return total / x.shape[0]


@pytest.mark.parametrize("batch_size", [100, 1024], ids=["batched", "one-batch"])
def test_evaluate_on_a_checkpoint_equals_plain_pytorch(digits, tmp_path_factory, batch_size):
    run_dir = tmp_path_factory.getbasetemp() / "trained"
    if not run_dir.exists():
        spec = ModelSpec(hidden_dims=(16,), data_dim=64)
        pyro.clear_param_store()
        _, model, guide = build_model(spec, digits.to("cpu", torch.float32))
        config = TrainConfig(epochs=1, progress=False)
        fit(
            model,
            guide,
            digits.train.float(),
            test=digits.test.float(),
            config=config,
            run_dir=run_dir,
            metadata={"model_spec": spec.to_dict()},
        )
    run = load_run(run_dir)
    x = run.data.test
    m = evaluate(run.model, run.guide, x, batch_size=batch_size)
    plain = _plain_elbo(run.module, x, batch_size)
    assert m.n == 359
    assert abs(m.elbo - plain) <= 1e-4 * abs(plain)
    assert pyro_loss(run.model, run.guide, x, batch_size=batch_size) == pytest.approx(
        m.loss, rel=1e-6
    )
    # evaluation leaves the caller's random stream where it was
    torch.manual_seed(0)
    evaluate(run.model, run.guide, x, batch_size=batch_size)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))


@pytest.mark.parametrize(
    "estimator, compiled",
    [("trace", "jit"), ("meanfield", "jit-meanfield")],
    ids=["trace", "meanfield"],
)
def test_fit_with_every_estimator_in_float64(small, estimator, compiled, exports):
    """Each estimator trains in float64; a JIT estimator gives its plain twin's numbers, bit
    for bit (same noise, same operations in the same order)."""
    train, test = (t.double() for t in small)
    histories = {}
    for name in (estimator, compiled):
        vae = _vae(dtype=torch.float64, hidden=(8,))
        config = TrainConfig(  # a ragged last batch; the plain estimator run eagerly
            epochs=6, batch_size=80, estimator=name, jit="off", progress=False
        )
        with pyro.validation_enabled(not name.startswith("jit")):
            result = fit(vae.model, vae.guide, train, test=test, config=config)
        assert all(p.dtype == torch.float64 for p in vae.parameters())
        for row in result.history:
            _assert_sign_identities(row)
        assert math.isfinite(result.history[0]["svi_loss"]) and result.final.n == 64
        histories[name] = _numbers(result.history)
    assert exports == [80]  # 12 steps of 80 rows: the last ones ran the graph
    for a, b in zip(histories[estimator], histories[compiled], strict=True):
        assert a.keys() == b.keys() and a["split"] == b["split"]
        assert a == b


def test_default_training_is_compiled_and_identical_to_eager(small, exports):
    """``fit``'s default compiles the built-in VAE's estimator; the history and the trained
    parameters are those of Pyro's eager TraceMeanField_ELBO, bit for bit, in float32."""
    train, test = small
    config = TrainConfig(epochs=6, batch_size=80, progress=False)  # 12 steps of 80 rows
    vae = _vae()
    assert resolve_estimator(config, vae.model, vae.guide, train[:80]) == "jit-meanfield"
    results = {}
    for jit in ("auto", "off"):
        vae = _vae()
        result = fit(vae.model, vae.guide, train, test=test, config=replace(config, jit=jit))
        results[jit] = (_numbers(result.history), _params(vae))
    assert exports == [80]  # the full batches ran a graph at the end (the ragged 32 rows: 6 calls)
    assert results["auto"][0] == results["off"][0]
    for name, value in results["auto"][1].items():
        assert torch.equal(value, results["off"][1][name]), name


def test_a_shape_is_exported_only_when_the_rest_of_the_run_pays_for_it(
    small, monkeypatch, recorded_exports
):
    """``fit`` tells the estimator how many more steps each batch shape gets: a shape is
    exported (after ``EXPORT_AFTER_CALLS`` eager steps) only if that many steps pay for the
    export, and the run's numbers are the same either way."""
    import inference.traced_loss as traced_loss

    train, _ = small  # 192 rows: batches of 48 (4 a run-epoch) or of 40 (4, then 32)
    monkeypatch.setattr(traced_loss, "FIRST_EXPORT_PAYS_AFTER_CALLS", 25)
    monkeypatch.setattr(traced_loss, "EXPORT_PAYS_AFTER_CALLS", 25)
    histories = {}
    for epochs, batch_size, exported in [
        (8, 48, []),  # 32 steps: at the 11th, 22 to come < 25
        (9, 48, [48]),  # 36 steps: 26 to come at the 11th
        (9, 40, [40]),  # 36 full batches pay; 9 ragged ones never reach the 11th call
        (30, 40, [40]),  # 30 ragged batches: at the 11th, only 20 to come
        (40, 40, [40, 32]),  # 40: 30 to come
    ]:
        config = TrainConfig(epochs=epochs, batch_size=batch_size, progress=False, eval_every=100)
        recorded_exports.clear()
        for jit in ("auto", "off"):
            vae = _vae()
            result = fit(vae.model, vae.guide, train, config=replace(config, jit=jit))
            histories[jit] = _numbers(result.history)
        assert recorded_exports == exported, (epochs, batch_size)
        assert histories["auto"] == histories["off"]


def test_the_steps_left_of_a_shape_are_counted_as_the_run_will_take_them():
    """``_Batches.calls_left`` (what ``fit`` tells the loss at every step) against a count of
    the steps themselves: every (epoch, step) of runs with N divisible by B or not, B >= N,
    one epoch or several, one rank or one of several (whose shares of a full and of the
    ragged batch can have the same rows)."""
    from inference.batching import default_batching
    from inference.distributed import World
    from inference.train import _Batches

    vae = VAE(3, latent_dim=1, hidden_dims=(2,))
    checked = 0
    for n in (1, 5, 9, 12, 13):
        x = torch.zeros(n, 3)
        for size in (1, 2, 4, 5, 12, 20):
            for ranks in (1, 2, 3):
                for rank in range(ranks):
                    config = TrainConfig(epochs=3, batch_size=size, progress=False)
                    try:
                        batches = _Batches(
                            vae.model,
                            (x,),
                            {},
                            default_batching(vae.model),
                            config,
                            World(rank=rank, size=ranks),
                        )
                    except OptionError:  # a rank without rows in some batch
                        continue
                    steps = [
                        (epoch, index, mine)
                        for epoch in range(3)
                        for index, _, mine, _ in batches.steps(epoch, 0)
                    ]
                    for i, (epoch, index, mine) in enumerate(steps):
                        want = sum(rows == mine for _, _, rows in steps[i:])
                        assert batches.calls_left(epoch, index, 3) == want, (n, size, ranks)
                        checked += 1
    assert checked > 500


def _plain_model(x):
    pyro.sample("x", dist.Normal(0.0, 1.0).expand(x.shape).to_event(2), obs=x)


def _plain_guide(x):
    pass


@pytest.mark.parametrize(
    "pair, jit, validate, expected",
    [
        ("vae", "auto", False, "jit-meanfield"),
        ("vae", "off", False, "meanfield"),
        ("vae", "auto", True, "meanfield"),  # per-step validation needs the eager path
        ("undeclared", "auto", False, "meanfield"),  # never traced by guessing
        ("undeclared model", "auto", False, "meanfield"),
        ("undeclared", "on", False, "jit-meanfield"),
        ("guide object", "auto", False, "jit-meanfield"),
        ("guide says not static", "auto", False, "meanfield"),
    ],
)
def test_resolve_estimator(pair, jit, validate, expected):
    from models.guides import DiagonalNormalGuide

    vae = _vae()
    unstatic = DiagonalNormalGuide(64, 2, (16,))
    unstatic.static_structure = False  # e.g. a subclass whose distribution branches on values
    model, guide = {
        "vae": (vae.model, vae.guide),
        "undeclared": (_plain_model, _plain_guide),
        "undeclared model": (_plain_model, vae.guide),
        "guide object": (vae.model, DiagonalNormalGuide(64, 2, (16,))),
        "guide says not static": (vae.model, unstatic.guide),
    }[pair]
    config = TrainConfig(jit=jit, validate=validate)
    x = torch.zeros(3, 64)
    assert resolve_estimator(config, model, guide, x) == expected
    assert resolve_estimator(replace(config, estimator="jit"), model, guide, x) == "jit"


def test_a_non_finite_gradient_stops_before_the_update(float64):
    """A finite loss whose gradient is infinite (d sqrt(u)/du at u = 0) is refused."""

    def model(x):
        c = pyro.param("c", torch.tensor(1.0, dtype=x.dtype))
        shift = torch.sqrt(c - c.detach())  # 0 in value, infinite derivative
        pyro.sample("x", dist.Normal(shift, 1.0).expand(x.shape).to_event(2), obs=x)

    def guide(x):
        pass

    data = torch.zeros(4, 2, dtype=torch.float64)
    config = TrainConfig(epochs=1, batch_size=None, progress=False)
    with pytest.raises(NumericalError, match=r"epoch 1, step 1: the gradient is not"):
        fit(model, guide, data, config=config)
    assert pyro.param("c").item() == 1.0  # not updated


# --- a user's own model: Bayesian linear regression with global latents -------------------------

SIGMA = 0.5  # known observation noise


def _regression_data(n=40, p=2, seed=0):
    """Columns: p features, then the target y = X w + b + noise."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.5, -2.0], dtype=torch.float64) + 0.5
    y = y + SIGMA * torch.randn(n, generator=g, dtype=torch.float64)
    return torch.cat([X, y[:, None]], dim=1)


def regression_model(data):
    """w ~ N(0, I), b ~ N(0, 1), y_n ~ N(x_n . w + b, SIGMA^2)."""
    X, y = data[:, :-1], data[:, -1]
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(X.new_zeros(()), 1.0))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w + b, SIGMA), obs=y)


def regression_guide(data):
    p = data.shape[1] - 1
    w_loc = pyro.param("w_loc", data.new_zeros(p))
    w_scale = pyro.param("w_scale", data.new_ones(p), constraint=constraints.positive)
    b_loc = pyro.param("b_loc", data.new_zeros(()))
    b_scale = pyro.param("b_scale", data.new_ones(()), constraint=constraints.positive)
    pyro.sample("w", dist.Normal(w_loc, w_scale).to_event(1))
    pyro.sample("b", dist.Normal(b_loc, b_scale))


def test_a_user_model_with_global_latents_trains_full_batch(float64):
    data = _regression_data()
    config = TrainConfig(
        epochs=60,
        batch_size=None,
        learning_rate=0.1,
        estimator="meanfield",
        progress=False,
        eval_every=3,
    )
    result = fit(regression_model, regression_guide, data[:32], test=data[32:], config=config)
    # one step per epoch, evaluated every 3rd
    assert [r["epoch"] for r in result.history[::2]] == list(range(3, 61, 3))
    for row in result.history:
        _assert_sign_identities(row)
    first, last = result.history[0], result.history[-2]
    assert last["split"] == "train" and last["elbo"] > first["elbo"]
    # The exact posterior is Gaussian and a mean-field Gaussian guide's optimum has its mean;
    # the single-sample SVI iterate fluctuates about it by a fraction of a posterior sd.
    # Posterior precision A = I + Phi^T Phi / sigma^2, mean = A^{-1} Phi^T y / sigma^2.
    phi = torch.cat([data[:32, :-1], torch.ones(32, 1, dtype=torch.float64)], dim=1)
    precision = torch.eye(3, dtype=torch.float64) + phi.T @ phi / SIGMA**2
    mean = torch.linalg.solve(precision, phi.T @ data[:32, -1] / SIGMA**2)
    store = pyro.get_param_store()
    fitted = torch.cat([store["w_loc"], store["b_loc"][None]]).detach()
    posterior_sd = torch.linalg.inv(precision).diagonal().sqrt()
    assert torch.all((fitted - mean).abs() < 2 * posterior_sd)


def test_minibatches_need_num_data():
    data = _regression_data()
    config = TrainConfig(epochs=1, batch_size=10, progress=False)
    with pytest.raises(OptionError, match="num_data"):
        fit(regression_model, regression_guide, data, config=config)


@pytest.mark.parametrize(
    "options",
    [
        {"epochs": 0},
        {"learning_rate": -1.0},
        {"estimator": "nope"},
        {"batch_size": 0},
        {"jit": "yes"},
    ],
    ids=["epochs", "lr", "estimator", "batch-size", "jit"],
)
def test_bad_config_raises_option_error(options):
    with pytest.raises(OptionError):
        TrainConfig(**options)


def test_a_declared_static_user_model_with_an_autoguide_compiles_and_matches_eager(
    float64, exports
):
    """An autoguide is as static as its model: declared, the pair trains compiled, with the
    eager run's numbers bit for bit."""
    from pyro.infer.autoguide import AutoNormal

    from models.structure import static_structure

    model = static_structure(lambda data: regression_model(data))
    data = _regression_data()
    config = TrainConfig(epochs=12, batch_size=None, learning_rate=0.05, progress=False)
    pyro.clear_param_store()
    # Normal priors: the autoguide's Deltas carry no log-Jacobian, analytic KL is valid
    assert resolve_estimator(config, model, AutoNormal(model), data) == "jit-meanfield"
    assert (
        resolve_estimator(config, regression_model, AutoNormal(regression_model), data)
        == "meanfield"
    )
    runs = {}
    for jit in ("auto", "off"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        result = fit(model, AutoNormal(model), data, config=replace(config, jit=jit))
        runs[jit] = _numbers(result.history)
    assert exports == [len(data)]  # the parameter set-up was call 1: steps 10-12 ran the graph
    assert runs["auto"] == runs["off"]


@pytest.mark.cuda
def test_default_training_on_cuda_is_compiled_and_identical_to_eager(small, exports):
    """On a GPU too the compiled step gives the eager estimator's numbers (same CUDA noise)."""
    train, test = (t.cuda() for t in small)
    config = TrainConfig(epochs=6, batch_size=80, progress=False)  # 12 steps of 80 rows
    results = {}
    for jit in ("auto", "off"):
        vae = _vae().cuda()
        torch.cuda.manual_seed_all(0)
        result = fit(vae.model, vae.guide, train, test=test, config=replace(config, jit=jit))
        results[jit] = (_numbers(result.history), _params(vae))
    assert exports == [80]
    assert results["auto"][0] == results["off"][0]
    for name, value in results["auto"][1].items():
        assert torch.equal(value, results["off"][1][name]), name


@pytest.mark.parametrize("optimizer, lr", [("adam", 0.05), ("adamw", 0.05), ("sgd", 1e-3)])
def test_a_pyro_elbo_object_and_an_optimizer_choice(optimizer, lr, float64):
    """``TrainConfig(estimator=<a Pyro ELBO object>)`` runs that object as given; its
    ``.loss`` for shared noise is minus what ``decompose`` gives with Monte-Carlo KL."""
    from pyro.infer import Trace_ELBO

    from inference.elbo import decompose

    data = _regression_data()
    elbo = Trace_ELBO(num_particles=3, vectorize_particles=False)
    config = TrainConfig(
        epochs=30, batch_size=None, learning_rate=lr, estimator=elbo, optimizer=optimizer,
        progress=False, eval_every=10,
    )  # fmt: skip
    result = fit(regression_model, regression_guide, data, config=config)
    assert result.estimator == "trace"
    pyro.set_rng_seed(5)
    loss = elbo.loss(regression_model, regression_guide, data)
    pyro.set_rng_seed(5)
    d = decompose(regression_model, regression_guide, data, num_particles=3, analytic_kl=False)
    assert d.loss == pytest.approx(loss, rel=1e-9)
    first, last = result.history[0], result.history[-1]
    assert last["elbo"] > first["elbo"]  # and every row is signed as the sign identities say
    for row in result.history:
        _assert_sign_identities(row)


def test_a_latent_site_missing_from_the_guide_is_refused_in_one_line():
    """Pyro's estimators would sample 's' from the prior and count log p(s) with no log q(s):
    no ELBO at all. init refuses the pair before any step, naming the site."""
    import pyro.distributions as dist

    from inference.errors import OptionError
    from inference.train import init

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mu, s), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    pyro.clear_param_store()
    with pytest.raises(OptionError, match="latent site 's' of the model has no site") as info:
        init(model, guide, torch.randn(20))
    assert info.value.option == "guide" and "\n" not in str(info.value)
