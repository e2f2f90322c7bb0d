"""The user's own model end to end: train, evaluate and explain a Pyro model elbo-lab never saw.

The model file is written by the test: conjugate Bayesian linear regression with the target in
column 0 of the data tensor, y = X w + eps, w ~ N(0, I / alpha), eps ~ N(0, sigma^2 I), whose
evidence is known in closed form (Bishop, PRML §3.5.1):

    log p(y) = log N(y; 0, sigma^2 I + X X^T / alpha)

AutoMultivariateNormal contains the exact posterior N(m, Lambda^{-1}), so after training its ELBO
reaches log p(y) and explain's L_K estimates it within its standard error; ELBO <= L_K always.
The latents are global, so every per-datum value is the whole-data value divided by N.
"""

import json
import textwrap

import numpy as np
import pytest
import torch

from inference.cli import main
from inference.errors import DataError, OptionError
from inference.run import ModelSpec, load_run
from inference.user_model import load_user_model

SIGMA, ALPHA = 0.5, 1.0
N_TRAIN, N_TEST, FEATURES = 30, 5, 3

MODEL_FILE = f'''
    """Bayesian linear regression for elbo-lab, written by a user.

    The data tensor is (N, 1 + d): column 0 is the target y, columns 1..d the features X.
    w ~ N(0, I / alpha), y_n ~ N(x_n . w, sigma^2); alpha = {ALPHA}, sigma = {SIGMA}.
    """

    import pyro
    import pyro.distributions as dist
    import torch


    def model(data):
        y, X = data[:, 0], data[:, 1:]
        prior = dist.Normal(torch.zeros(X.shape[1], dtype=data.dtype), {ALPHA} ** -0.5)
        w = pyro.sample("w", prior.to_event(1))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Normal((w * X).sum(-1), {SIGMA}), obs=y)
'''


def regression_rows(n, seed=1):
    """[y | X] ``(n, 1 + d)`` with correlated features, so the posterior is tilted."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 1, generator=g) + 0.5 * torch.randn(n, FEATURES, generator=g)
    y = X @ torch.tensor([1.0, -0.5, 0.3]) + SIGMA * torch.randn(n, generator=g)
    return torch.cat([y[:, None], X], dim=1).double()


def exact_log_evidence(rows):
    """log N(y; 0, sigma^2 I + X X^T / alpha), the whole-data evidence in nats."""
    y, X = rows[:, 0], rows[:, 1:]
    covariance = SIGMA**2 * torch.eye(len(y), dtype=rows.dtype) + X @ X.T / ALPHA
    return float(
        torch.distributions.MultivariateNormal(torch.zeros_like(y), covariance).log_prob(y)
    )


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """A user model trained by ``elbo-lab train --model FILE.py:model`` with a full-rank autoguide."""
    root = tmp_path_factory.mktemp("user")
    (root / "my_models.py").write_text(textwrap.dedent(MODEL_FILE))
    rows = regression_rows(N_TRAIN + N_TEST)
    data = root / "regression.npz"
    np.savez(data, train=rows[:N_TRAIN].numpy(), test=rows[N_TRAIN:].numpy())
    run_dir = root / "run"
    argv = ["train", "--model", f"{root / 'my_models.py'}:model"]
    argv += ["--guide", "AutoMultivariateNormal", "--data", str(data), "--dtype", "float64"]
    argv += ["--epochs", "500", "--lr", "0.02", "--eval-every", "250", "--no-progress"]
    argv += ["--run-dir", str(run_dir)]
    assert main(argv) == 0
    return root, run_dir, rows[:N_TRAIN]


def test_train_stores_the_spec_and_fits_on_all_training_rows(user_run):
    root, run_dir, _ = user_run
    run = load_run(run_dir)
    assert run.spec.model == f"{(root / 'my_models.py').resolve()}:model"
    assert run.spec.guide == "AutoMultivariateNormal" and run.module is None
    assert run.state["config"]["batch_size"] is None  # no num_data: full batch
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the .npz holds train and test: both are evaluated; the guide fits the training rows
    assert {r["split"] for r in history} == {"train", "test"}
    assert [r["n"] for r in history[-2:]] == [N_TRAIN, N_TEST]
    assert (run_dir / "curves.png").exists()


def test_evaluate_json_is_the_whole_data_elbo_over_n(user_run, capsys):
    _, run_dir, train = user_run
    capsys.readouterr()
    assert main(["evaluate", str(run_dir), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert {"loss", "elbo", "elbo_stderr", "reconstruction", "kl", "n"} <= set(m)
    assert m["n"] == N_TRAIN and m["bounds"]["ok"] and m["estimator"] == "TraceMeanField_ELBO"
    assert m["pyro_loss"] == pytest.approx(m["loss"], rel=1e-9)  # same noise, same estimator
    assert m["loss"] == pytest.approx(-m["elbo"]) and m["kl"] > 0
    # one ELBO draw of the whole data set, / N: close to log p(y) / N when q is the posterior
    assert m["elbo"] == pytest.approx(exact_log_evidence(train) / N_TRAIN, abs=0.1)


def test_explain_lk_matches_the_exact_log_evidence(user_run, capsys):
    _, run_dir, train = user_run
    capsys.readouterr()
    assert main(["explain", str(run_dir), "--json", "--num-samples", "1000"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["latents"] == "global" and e["guide"] == "AutoMultivariateNormal"
    assert e["split"] == "train" and e["n"] == N_TRAIN and e["num_samples"] == 1000
    exact = exact_log_evidence(train) / N_TRAIN
    # L_K <= log p(y) in expectation; q ~ posterior makes the weights nearly equal
    assert abs(e["lk"] - exact) < 5 * e["lk_stderr"] + 1e-3, (e["lk"], exact)
    assert e["elbo_mc"] <= e["lk"] + 1e-12 and e["gap"] >= 0
    assert e["gap"] < 0.01  # the full-rank family contains the posterior
    assert e["pyro_loss"] == pytest.approx(e["loss"], abs=1e-9)
    assert e["exact_log_px"] is None  # no closed form known to elbo-lab for a user model


def test_explain_text_says_the_latents_are_global(user_run, capsys):
    _, run_dir, _ = user_run
    capsys.readouterr()
    assert main(["explain", str(run_dir), "--num-samples", "50"]) == 0
    text = capsys.readouterr().out
    assert "guide AutoMultivariateNormal" in text and "train split" in text
    assert f"global latents, shared by all N = {N_TRAIN} points" in text
    assert "one weight per draw" in text


def test_a_moved_model_file_is_one_line_error(user_run, tmp_path, capsys):
    root, run_dir, _ = user_run
    moved = root / "my_models.py"
    hidden = root / "hidden.py"
    moved.rename(hidden)
    try:
        assert main(["evaluate", str(run_dir)]) == 2
    finally:
        hidden.rename(moved)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0]


@pytest.mark.parametrize(
    "model, guide, error, message",
    [
        ("vae", "AutoNormal", OptionError, "autoguides are for your own model"),
        ("vae", "flow", OptionError, "elbo-lab compare"),
        ("{F}:model", "diag", OptionError, "amortized encoder"),
        ("{F}:model", "AutoMagic", OptionError, "unknown autoguide"),
        ("{F}:model", "multivariatenormal", None, "AutoMultivariateNormal"),
        ("{F}:model", None, None, "AutoNormal"),
        ("vae", None, None, "diag"),
    ],
    ids=[
        "builtin-autoguide",
        "builtin-flow",
        "user-diag",
        "user-unknown",
        "user-case-insensitive",
        "user-default",
        "builtin-default",
    ],
)
def test_guide_names(model, guide, error, message, tmp_path):
    path = tmp_path / "m.py"
    path.write_text(textwrap.dedent(MODEL_FILE))
    model = model.replace("{F}", str(path))
    if error is not None:
        with pytest.raises(error, match=message):
            ModelSpec(model=model, guide=guide)
    else:
        assert ModelSpec(model=model, guide=guide).guide == message


def test_data_the_model_rejects_is_a_data_error(tmp_path):
    from inference.data import load_data
    from inference.run import build_model

    path = tmp_path / "m.py"
    path.write_text(textwrap.dedent(MODEL_FILE))
    np.save(tmp_path / "wide.npy", np.zeros((10, 7)))  # 6 features
    spec = ModelSpec(model=f"{path}:model", data=str(tmp_path / "wide.npy"))
    build_model(spec, load_data(spec.data).to("cpu", torch.float32))  # the prior fits d = 6
    bad = tmp_path / "bad.py"  # a prior of fixed width 3 cannot meet 6 features
    bad.write_text(textwrap.dedent(MODEL_FILE).replace("X.shape[1]", "3"))
    spec = ModelSpec(model=f"{bad}:model", data=str(tmp_path / "wide.npy"))
    with pytest.raises(DataError, match=r"wide.npy: rejected by the model .*bad.py:model"):
        build_model(spec, load_data(spec.data).to("cpu", torch.float32))


def test_a_user_model_marked_static_trains_compiled_with_the_same_numbers(
    tmp_path, capsys, exports
):
    """``@static_structure`` in the user's file compiles the estimator (autoguide included); the
    run's metrics are those of the eager run, bit for bit."""
    source = textwrap.dedent(MODEL_FILE).replace(
        "import torch\n", "import torch\n\nfrom models import static_structure\n"
    )
    source = source.replace("def model(data):", "@static_structure\ndef model(data):")
    (tmp_path / "marked.py").write_text(source)
    rows = regression_rows(N_TRAIN)
    data = tmp_path / "rows.npy"
    np.save(data, rows.numpy())
    histories = {}
    for jit in ("auto", "off"):
        run_dir = tmp_path / f"run-{jit}"
        argv = ["train", "--model", f"{tmp_path / 'marked.py'}:model", "--data", str(data)]
        argv += ["--dtype", "float64", "--epochs", "20", "--lr", "0.02", "--no-progress"]
        argv += ["--jit", jit, "--run-dir", str(run_dir), "--eval-every", "10"]
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert ("(JIT-compiled)" in out) == (jit == "auto"), out
        rows_ = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        histories[jit] = [{k: v for k, v in r.items() if k != "seconds"} for r in rows_]
    assert len(exports) == 1  # the parameter set-up was call 1: the graph ran the last 11 steps
    assert histories["auto"] == histories["off"]


def test_load_user_model(tmp_path):
    path = tmp_path / "my_models.py"
    path.write_text(textwrap.dedent(MODEL_FILE))
    assert callable(load_user_model(f"{path}:model"))
    assert load_user_model("inference.train:fit").__name__ == "fit"
    for spec, message in [
        (f"{path}:nope", "no attribute 'nope'"),
        (f"{tmp_path}/missing.py:model", "no such file"),
        ("no_such_package_xyz:model", "cannot import"),
        (f"{path}", "expected FILE.py:NAME"),
    ]:
        with pytest.raises(OptionError, match=message):
            load_user_model(spec)


def test_a_failing_guide_is_blamed_on_the_guide_and_a_failing_model_on_the_data(tmp_path, capsys):
    """A hand-written guide that cannot take the model's arguments is the --guide's fault; a
    model that raises inside an autoguide's first run (which runs the model) is the model's."""
    path = tmp_path / "pair.py"
    path.write_text(
        textwrap.dedent(
            """
            import pyro, pyro.distributions as dist, torch

            def model(x):
                z = pyro.sample("z", dist.Normal(0.0, 1.0))
                with pyro.plate("data", x.shape[0]):
                    pyro.sample("obs", dist.Normal(z, 1.0), obs=x)

            def broken_model(x):
                raise KeyError("oops")

            def guide():  # takes none of the model's arguments
                pyro.sample("z", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

            def data():
                return (torch.zeros(5),), {}
            """
        )
    )
    argv = ["train", "--data", f"{path}:data", "--epochs", "1", "--no-progress"]
    argv += ["--run-dir", str(tmp_path / "run")]
    assert main([*argv, "--model", f"{path}:model", "--guide", f"{path}:guide"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("elbo-lab: error: --guide: the guide failed on the model's arguments")
    assert "TypeError" in line
    assert main([*argv, "--model", f"{path}:broken_model"]) == 2  # AutoNormal runs the model
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "rejected by the model" in line and "broken_model" in line and "KeyError" in line
    assert not (tmp_path / "run").exists()
