"""Issue 6: every user mistake is one clear line with exit 2 and nothing written; faults lose nothing."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.cli import main
from inference.errors import NumericalError
from inference.io import load_checkpoint
from inference.train import TrainConfig, fit
from models.vae import VAE

TINY = ["--epochs", "1", "--hidden-dims", "8", "--latent-dim", "2", "--no-progress"]

#: A user's regression model (target in column 0) whose prior fixes three features.
USER_MODEL = """
import pyro
import pyro.distributions as dist
import torch


def model(data):
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("y", dist.Normal((w * data[:, 1:]).sum(-1), 1.0), obs=data[:, 0])
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad and good inputs, and one small trained run to point evaluate/--resume at."""
    d = tmp_path_factory.mktemp("inputs")
    np.save(d / "nan.npy", np.array([[0.0, np.nan], [1.0, 0.0]]))
    np.save(d / "inf.npy", np.array([[0.0, np.inf], [1.0, 0.0]]))
    np.save(d / "big.npy", np.full((10, 4), 3.0))
    np.save(d / "rank1.npy", np.zeros(10))
    np.save(d / "rank4.npy", np.zeros((2, 2, 2, 2)))
    np.save(d / "empty.npy", np.zeros((0, 4)))
    np.save(d / "other_dim.npy", (np.random.default_rng(0).random((20, 5)) > 0.5) * 1.0)
    (d / "garbage.npy").write_bytes(b"this is not numpy")
    (d / "garbage.npz").write_bytes(b"PK\x03\x04 broken zip")
    (d / "data.csv").write_text("1,2\n")
    (d / "my_models.py").write_text(USER_MODEL)
    (d / "broken_model.py").write_text("import no_such_module_xyz\n")
    good = d / "good.npy"
    np.save(good, (np.random.default_rng(0).random((40, 64)) > 0.5) * 1.0)
    np.save(d / "truncated.npy", np.zeros((50, 64)))
    raw = (d / "truncated.npy").read_bytes()
    (d / "truncated.npy").write_bytes(raw[: len(raw) // 2])
    mnist = d / "mnist_bad"
    mnist.mkdir()
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        (mnist / name).write_bytes(b"\x00\x00\x07\x03" + b"\x00" * 12)  # type 0x07: unknown
    for name in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        (mnist / name).write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x00")
    run = d / "run"
    assert main(["train", *TINY, "--data", str(good), "--run-dir", str(run)]) == 0
    (d / "foreign").mkdir()
    torch.save({"hello": 1}, d / "foreign" / "checkpoint.pt")
    (d / "truncated_run").mkdir()
    raw = (run / "checkpoint.pt").read_bytes()
    (d / "truncated_run" / "checkpoint.pt").write_bytes(raw[: len(raw) // 3])
    (d / "no_checkpoint").mkdir()
    (d / "a_file").write_text("x")
    return d


# (id, argv built from the fixture dir D, substring the one-line message must contain)
CASES = [
    ("missing-data", ["train", "--data", "{D}/nope.npy"], "no such file"),
    ("data-is-dir", ["train", "--data", "{D}/no_checkpoint"], "no train-images"),
    ("garbage-npy", ["train", "--data", "{D}/garbage.npy"], "garbage.npy"),
    ("garbage-npz", ["train", "--data", "{D}/garbage.npz"], "garbage.npz"),
    ("truncated-npy", ["train", "--data", "{D}/truncated.npy"], "truncated.npy"),
    ("wrong-suffix", ["train", "--data", "{D}/data.csv"], "unsupported file type"),
    ("wrong-idx-magic", ["train", "--data", "mnist:{D}/mnist_bad"], "magic"),
    ("nan", ["train", "--data", "{D}/nan.npy"], "NaN/Inf"),
    ("inf", ["train", "--data", "{D}/inf.npy"], "NaN/Inf"),
    ("outside-0-1", ["train", "--data", "{D}/big.npy"], "outside [0, 1]"),
    ("rank-1", ["train", "--data", "{D}/rank1.npy"], "N x D"),
    ("rank-4", ["train", "--data", "{D}/rank4.npy"], "N x D"),
    ("zero-rows", ["train", "--data", "{D}/empty.npy"], "zero rows"),
    ("epochs-0", ["train", "--epochs", "0"], "--epochs"),
    ("batch-negative", ["train", "--batch-size", "-3"], "--batch-size"),
    ("lr-zero", ["train", "--lr", "0"], "--lr"),
    ("lr-nan", ["train", "--lr", "nan"], "--lr"),
    ("latent-0", ["train", "--latent-dim", "0"], "--latent-dim"),
    ("particles-0", ["train", "--num-particles", "0"], "--num-particles"),
    ("hidden-bad", ["train", "--hidden-dims", "10,x"], "--hidden-dims"),
    ("unknown-model", ["train", "--model", "gan"], "--model"),
    ("unknown-estimator", ["train", "--estimator", "elbo"], "--estimator"),
    ("unknown-dtype", ["train", "--dtype", "float16"], "--dtype"),
    ("bad-device", ["train", "--device", "tpu"], "--device"),
    ("run-dir-exists", ["train", "--run-dir", "{D}/run"], "exists"),
    ("run-dir-is-file", ["train", "--run-dir", "{D}/a_file/sub"], "not a directory"),
    ("resume-missing", ["train", "--resume", "--run-dir", "{D}/nowhere"], "no checkpoint"),
    ("resume-foreign", ["train", "--resume", "--run-dir", "{D}/foreign"], "not an elbo-lab"),
    ("resume-truncated", ["train", "--resume", "--run-dir", "{D}/truncated_run"], "truncated"),
    ("evaluate-missing", ["evaluate", "{D}/nowhere"], "no such run directory"),
    ("evaluate-no-checkpoint", ["evaluate", "{D}/no_checkpoint"], "no checkpoint"),
    ("evaluate-foreign", ["evaluate", "{D}/foreign"], "not an elbo-lab"),
    ("evaluate-truncated", ["evaluate", "{D}/truncated_run"], "truncated"),
    ("evaluate-other-dim", ["evaluate", "{D}/run", "--data", "{D}/other_dim.npy"], "columns"),
    ("user-model-no-file", ["train", "--model", "{D}/nope.py:model"], "no such file"),
    ("user-model-import-fails", ["train", "--model", "{D}/broken_model.py:model"], "import"),
    ("user-model-no-name", ["train", "--model", "{D}/my_models.py:nope"], "no attribute 'nope'"),
    (
        "user-model-unknown-guide",
        ["train", "--model", "{D}/my_models.py:model", "--guide", "AutoMagic"],
        "unknown autoguide",
    ),
    (
        "user-model-amortized-guide",
        ["train", "--model", "{D}/my_models.py:model", "--guide", "flow"],
        "amortized encoder",
    ),
    (
        "user-model-rejects-data",
        ["train", "--model", "{D}/my_models.py:model", "--data", "{D}/good.npy"],
        "rejected by the model",
    ),
    ("builtin-model-autoguide", ["train", "--guide", "AutoNormal"], "your own model"),
    ("builtin-model-flow-guide", ["train", "--guide", "flow"], "elbo-lab compare"),
    ("no-command", [], "required"),
    ("unknown-command", ["fly"], "invalid choice"),
]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("argv, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(files, argv, expected, capsys, tmp_path):
    argv = [a.replace("{D}", str(files)) for a in argv]
    if argv and argv[0] == "train" and "--run-dir" not in argv:
        argv += ["--run-dir", str(tmp_path / "out")]
    if argv and argv[0] == "train" and "--epochs" not in argv:
        argv += ["--epochs", "1"]
    before = _snapshot(files)
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("elbo-lab: error:"), err
    assert "Traceback" not in err
    if expected is not None:
        assert expected in lines[0]
    assert _snapshot(files) == before
    assert not (tmp_path / "out").exists()


def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_checkpoint(tmp_path):
    x = (torch.rand(64, 6, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    vae = VAE(6, latent_dim=2, hidden_dims=(4,))
    calls = {"n": 0}

    def model(x, num_data=None):
        calls["n"] += torch.is_grad_enabled()  # training calls only (evaluation runs without grad)
        if calls["n"] > 1 + 2 * 8 + 2:  # the parameter-creating call, two epochs of 8 steps, 2 more
            x = x * float("nan")
        return vae.model(x, num_data)

    config = TrainConfig(epochs=5, batch_size=8, progress=False, checkpoint_every=0)
    with pytest.raises(NumericalError, match=r"epoch 3, step 3: loss is nan"):
        fit(model, vae.guide, x, None, config, run_dir=tmp_path)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["position"] == {"epoch": 2, "step": 0, "loss_sum": 0.0}
    assert all(torch.isfinite(p).all() for p in state["params"].values())


def test_nan_loss_on_command_line_exits_nonzero_with_message(tmp_path, capsys):
    rc = main(["train", *TINY, "--lr", "1e30", "--epochs", "3", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 1 and "loss is" in err and "epoch" in err and "step" in err
    assert "Traceback" not in err


def _train_cmd(run_dir, *extra):
    return [
        sys.executable, "-m", "inference.cli", "train", "--epochs", "8", "--batch-size", "8",
        "--hidden-dims", "16", "--no-progress", "--run-dir", str(run_dir), *extra,
    ]  # fmt: skip


def _final(run_dir):
    state = load_checkpoint(run_dir / "checkpoint.pt")
    history = [{k: v for k, v in r.items() if k != "seconds"} for r in state["history"]]
    return state["params"], history


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_killed_run_resumes_bit_identical(tmp_path, signum):
    """Kill a training subprocess at a random step; resuming ends exactly where an uninterrupted run does."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    reference = tmp_path / "reference"
    subprocess.run(_train_cmd(reference), check=True, env=env, capture_output=True)
    ref_params, ref_history = _final(reference)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed), env=env, stderr=subprocess.PIPE, text=True)
    # wait until training has started (first epoch written), then a random moment later
    deadline = time.monotonic() + 60
    while not (killed / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(int(signum)).uniform(0.0, 0.4))
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + int(signum), err
    assert "interrupted" in err and "--resume" in err
    position = load_checkpoint(killed / "checkpoint.pt")["position"]
    assert (position["epoch"], position["step"]) > (0, 0)

    subprocess.run(_train_cmd(killed, "--resume"), check=True, env=env, capture_output=True)
    params, history = _final(killed)
    assert history == ref_history
    assert params.keys() == ref_params.keys()
    for name in params:
        assert torch.equal(params[name], ref_params[name]), name
