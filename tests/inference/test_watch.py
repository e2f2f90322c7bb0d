"""``elbo-lab watch``: tutorial scripts run unchanged (same stdout, losses, random stream, exit
status and traceback) while every row of their ELBO satisfies loss = -ELBO = KL - reconstruction,
and the coin's ELBO matches its closed form."""

import csv
import json
import math
import os
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.elbo import ELBOModule

from inference import Watch, WatchConfig, watch
from inference.cli import main
from inference.errors import OptionError, RunError
from inference.watch import explain_watched, run_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "watch_scripts"
#: small evaluation settings: these tests check identities, not precision
FAST = ["--num-samples", "64", "--eval-particles", "8", "--no-progress"]


def _start(*argv, cwd) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("MKL_CBWR", None)  # as a user's shell has it (the suite's conftest sets it)
    return subprocess.Popen(
        [sys.executable, *map(str, argv)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _watch_command(script: str, run_dir: Path, *options) -> list:
    return ["-m", "inference.cli", "watch", "--run-dir", run_dir, *FAST, *options, SCRIPTS / script]


def _plain_and_watched(script: str, tmp: Path, *options):
    """``python SCRIPT`` and ``python -m inference.cli watch ... SCRIPT``, run side by side."""
    run_dir = tmp / "run"
    plain = _start(SCRIPTS / script, cwd=tmp)
    watched = _start(*_watch_command(script, run_dir, *options), cwd=tmp)
    return _finish(plain), _finish(watched), run_dir


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> list[float]:
    with open(run_dir / "losses.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


#: the coin's last row decomposes the guide the script ends with: 256 draws for a small stderr
TUTORIALS = {
    "coin": ["--every", "100", "--eval-particles", "256"],
    "regression": ["--every", "25"],
    "vae": ["--every", "7"],
}


@pytest.fixture(scope="module", params=list(TUTORIALS))
def tutorial(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    plain, watched, run_dir = _plain_and_watched(
        f"{request.param}.py", tmp, *TUTORIALS[request.param]
    )
    return request.param, plain, watched, run_dir


def test_stdout_exit_status_and_losses_are_the_script_s_own(tutorial):
    name, plain, watched, run_dir = tutorial
    assert plain.returncode == 0, plain.stderr
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout == plain.stdout  # byte for byte: same noise, same numbers
    # what svi.step returned, as the script printed it (repr: every bit)
    printed = [
        float(line.rpartition(" ")[2]) for line in plain.stdout.splitlines() if "loss" in line
    ]
    if name == "vae":
        printed = [
            float(line.split()[-1]) for line in plain.stdout.splitlines() if "step loss" in line
        ]
    assert _losses(run_dir) == printed
    rows = _rows(run_dir)
    assert rows and rows[-1]["step"] == len(printed)
    for row in rows:
        assert row["svi_loss"] == printed[row["step"] - 1]
    assert "loss = -ELBO = KL - E[log p(x|z)]" in watched.stderr and "(ok)" in watched.stderr
    assert "MISMATCH" not in watched.stderr
    for figure in ("curves.png", "bound.png", "report.txt"):
        assert (run_dir / figure).is_file()


def test_every_row_is_loss_equals_minus_elbo_equals_kl_minus_reconstruction(tutorial):
    _, _, _, run_dir = tutorial
    for row in _rows(run_dir):
        assert row["loss"] == -row["elbo"]
        assert row["elbo"] == pytest.approx(row["reconstruction"] - row["kl"], rel=1e-12, abs=1e-12)
        assert row["residual"] == pytest.approx(0.0, abs=1e-9 * max(1.0, abs(row["loss"])))
        sites = [k for k in row if k.endswith("_method")]
        recon = sum(row[k.removesuffix("_method")] for k in sites if k.startswith("reconstruction"))
        kl = sum(row[k.removesuffix("_method")] for k in sites if k.startswith("kl"))
        assert recon == pytest.approx(row["reconstruction"], rel=1e-9, abs=1e-9)
        assert kl == pytest.approx(row["kl"], rel=1e-9, abs=1e-9)
        assert row["elbo_stderr"] > 0


def _coin_elbo(a: float, b: float) -> float:
    """ELBO of Beta(a, b) for 6 heads and 4 tails under a Beta(10, 10) prior, in closed form:
    E_q[log p(x|f)] + E_q[log Beta(f; 10, 10)] + H[Beta(a, b)]."""
    from scipy.special import betaln, digamma

    e_log_f, e_log_1mf = digamma(a) - digamma(a + b), digamma(b) - digamma(a + b)
    likelihood = 6 * e_log_f + 4 * e_log_1mf
    prior = 9 * e_log_f + 9 * e_log_1mf - betaln(10, 10)
    entropy = (
        betaln(a, b) - (a - 1) * digamma(a) - (b - 1) * digamma(b) + (a + b - 2) * digamma(a + b)
    )
    return float(likelihood + prior + entropy)


@pytest.mark.parametrize("tutorial", ["coin"], indirect=True)
def test_coin_elbo_matches_the_closed_form_for_the_learned_guide(tutorial):
    _, plain, _, run_dir = tutorial
    line = next(s for s in plain.stdout.splitlines() if s.startswith("alpha_q"))
    a, b = float(line.split()[1]), float(line.split()[3])
    last = _rows(run_dir)[-1]
    exact = _coin_elbo(a, b)
    assert abs(last["elbo"] - exact) < 5 * last["elbo_stderr"], (last["elbo"], exact)
    assert last["elbo_stderr"] < 0.05


def test_two_guides_in_one_loop_make_a_two_row_comparison(tmp_path):
    run_dir = tmp_path / "run"
    watched = _finish(_start(*_watch_command("two_guides.py", run_dir), cwd=tmp_path))
    assert watched.returncode == 0, watched.stderr
    with open(run_dir / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["guide"] for r in rows] == ["AutoNormal", "AutoMultivariateNormal"]
    for ext in ("md", "json", "png"):
        assert (run_dir / f"comparison.{ext}").is_file()
    assert {r["svi"] for r in _rows(run_dir)} == {"AutoNormal", "AutoMultivariateNormal"}


def test_a_failing_script_fails_the_same_and_keeps_its_rows(tmp_path):
    plain, watched, run_dir = _plain_and_watched("failing.py", tmp_path, "--every", "5")
    assert plain.returncode == watched.returncode == 1
    assert watched.stdout == plain.stdout
    assert watched.stderr.startswith(plain.stderr)  # the same traceback, then one line of ours
    assert watched.stderr[len(plain.stderr) :].count("\n") == 1
    rows = _rows(run_dir)
    assert rows and max(r["step"] for r in rows) <= 30
    assert len(_losses(run_dir)) == 30


def _module_loop(steps: int) -> list[float]:
    """A loop over an ELBO module with a torch optimizer, drawing from every random stream."""
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    x = torch.randn(20) + 1.0

    def model(x):
        loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
        with pyro.plate("data", 20):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    guide = AutoNormal(model)
    loss_fn = TraceMeanField_ELBO()(model, guide)
    loss_fn(x)  # creates the parameters
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(x)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    numpy_draw = float(np.random.rand())  # noqa: NPY002 (the global stream a script draws from)
    return losses + [torch.rand(()).item(), numpy_draw, random.random()]


def test_watching_changes_no_number_and_restores_pyro(tmp_path):
    np.random.seed(0)  # noqa: NPY002 (the global streams a script draws from)
    random.seed(0)
    plain = _module_loop(12)
    np.random.seed(0)  # noqa: NPY002
    random.seed(0)
    with watch(tmp_path / "run", every=1, eval_particles=4, num_samples=16) as w:
        watched = _module_loop(12)
    assert watched == plain  # losses, and the next draw of torch, numpy and random
    assert SVI.step.__module__ == "pyro.infer.svi"
    assert ELBOModule.forward.__module__ == "pyro.infer.elbo"
    # the call that created the parameters is step 1; every later call is observed too
    losses = w.losses()["AutoNormal"]
    assert len(losses) == 13 and losses[1:] == plain[:12]
    rows = w.rows()
    assert [r["step"] for r in rows] == list(range(1, 14))
    # an autoguide's site is a Delta: its KL term is log q - log p (inference.elbo.kl_method),
    # equal here to TraceMeanField_ELBO's KL(Delta || p), the latent being unconstrained
    assert all(r["kl[loc]_method"] == "monte_carlo" for r in rows)
    assert "TraceMeanField_ELBO().loss" in w.report() and "(ok)" in w.report()
    assert set(pyro.get_param_store().keys()) == {"AutoNormal.locs.loc", "AutoNormal.scales.loc"}


def test_a_watched_script_gets_no_setting_that_changes_its_numbers(tmp_path):
    """``train`` runs MKL in strict reproducible mode (``MKL_CBWR``), which changes the last
    bits of its products; a watched script computes as ``python SCRIPT`` would, so it does not
    get that setting (a value the user set is still the script's)."""
    script = tmp_path / "env.py"
    script.write_text("import os\nprint('MKL_CBWR', os.environ.get('MKL_CBWR'))\n")
    watched = _finish(_start("-m", "inference.cli", "watch", "--run-dir", tmp_path / "r", script,
                             cwd=tmp_path))  # fmt: skip
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout.split() == ["MKL_CBWR", "None"]


def test_explain_rebuilds_a_guarded_script_and_declines_an_unguarded_one(tmp_path, capsys):
    script = SCRIPTS / "guarded.py"
    run_dir = tmp_path / "guarded"
    with Watch(run_dir, WatchConfig(every=50, num_samples=500), script=script) as w:
        run_script(script, [])
    (fit,) = w.fits
    text = explain_watched(run_dir, num_samples=500).report()
    assert "model and guide rebuilt" in text and "(ok)" in text
    # the evidence in closed form: x ~ N(0, I + 100 11^T)
    x = torch.load(run_dir / "watch_state.pt", weights_only=True)["AutoNormal"]["args"][0]
    cov = torch.eye(30, dtype=torch.float64) + 100.0
    exact = float(
        dist.MultivariateNormal(torch.zeros(30, dtype=torch.float64), cov).log_prob(x.double())
    )
    assert fit.lk == pytest.approx(exact, abs=0.05)
    assert main(["explain", str(run_dir)]) == 0
    assert "L_1000" in capsys.readouterr().out
    assert main(["explain", "--json", str(run_dir)]) == 0
    (again,) = json.loads(capsys.readouterr().out)
    # the same guide, the same arguments and the same noise: the same decomposition
    assert again["decomposition"]["elbo"] == pytest.approx(fit.decomposition.elbo, abs=1e-6)

    coin_dir = tmp_path / "coin"
    with Watch(
        coin_dir, WatchConfig(every=100, num_samples=16, figures=False), script=SCRIPTS / "coin.py"
    ):
        run_script(SCRIPTS / "coin.py", ["20"])
    capsys.readouterr()
    with pytest.raises(RunError, match="cannot be rebuilt"):
        explain_watched(coin_dir)
    assert main(["explain", str(coin_dir)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_options_are_checked():
    """A Python caller's error names the parameter; the command line words it as the option."""
    with pytest.raises(OptionError, match="^every: must be a positive integer") as exc:
        WatchConfig(every=0)
    assert exc.value.option == "every"
    assert math.isfinite(WatchConfig().budget)


def test_num_particles_is_a_deprecated_name_of_eval_particles():
    with pytest.warns(DeprecationWarning, match="use eval_particles"):
        config = WatchConfig(num_particles=7)
    assert config.eval_particles == 7
    with pytest.warns(DeprecationWarning):
        assert config.num_particles == 7
    assert "num_particles" not in asdict(config)  # watch.json records the new name


@pytest.mark.parametrize(
    "argv, message",
    [
        (["watch", "no_such_script.py"], "no_such_script.py: no such script"),
        (["watch", "--every", "0", "x.py"], "--every: must be a positive integer"),
        (["watch", "--run-dir", "{existing}", str(SCRIPTS / "coin.py")], "exists (use --force"),
    ],
    ids=["missing-script", "bad-every", "existing-run-dir"],
)
def test_watch_mistakes_are_one_line_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{existing}", str(tmp_path)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_explain_imports_a_watched_script_only_while_it_is_unchanged(tmp_path, capsys):
    """What opening a watched run trusts: the script's recorded absolute path and its SHA-256
    (issue 17). An edited script is refused in one line, nothing of it imported."""
    import shutil

    script = tmp_path / "guarded.py"
    shutil.copy(SCRIPTS / "guarded.py", script)
    run_dir = tmp_path / "run"
    with Watch(run_dir, WatchConfig(every=50, num_samples=50, figures=False), script=script):
        run_script(script, [])
    summary = json.loads((run_dir / "watch.json").read_text())
    (sources,) = [f["sources"] for f in summary["fits"]]
    assert list(sources) == [str(script.resolve())]
    script.write_text(script.read_text() + "\nraise SystemExit('this code must not run')\n")
    capsys.readouterr()
    assert main(["explain", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "changed since training; not imported" in err and err.count("\n") == 1
