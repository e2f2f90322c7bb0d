"""Every user mistake and every fault is one clear line with its exit status; nothing is lost.

Issue 6 (bad input) and issue 17 (races, full and read-only disks, hostile run directories):
each row of :data:`CASES` gives a command, the text its one line must hold and exit 2, and the
test asserts the inputs (every other run included) are byte-identical afterwards.
"""

import fcntl
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

from inference.cli import main
from inference.errors import NumericalError
from inference.io import load_checkpoint, save_checkpoint
from inference.train import TrainConfig, fit
from models.vae import VAE

# every epoch evaluated (a resume keeps it): rows are counted per epoch
TINY = [
    "--epochs", "1", "--hidden-dims", "8", "--latent-dim", "2", "--no-progress", "--eval-every", "1",
]  # fmt: skip

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
    _hostile_inputs(d, run)
    return d


#: A model whose import leaves a trace: it must never run from a run directory.
PLANTED_MODEL = (
    USER_MODEL
    + """
import pathlib
pathlib.Path(__file__).with_name("IMPORTED").write_text("planted code ran")
"""
)


def _craft(run: Path, dest: Path, edit) -> None:
    """A copy of ``run`` whose checkpoint was edited by ``edit(state)`` and saved with a valid
    checksum: a checkpoint that is well-formed on disk but wrong inside."""
    shutil.copytree(run, dest)
    state = load_checkpoint(dest / "checkpoint.pt")
    edit(state)
    save_checkpoint(dest / "checkpoint.pt", state)


def _hostile_inputs(d: Path, run: Path) -> None:
    """Corrupt, incomplete and hostile run directories, and inputs changed after training."""
    rng = np.random.default_rng(0)
    np.save(d / "zero_width.npy", np.zeros((10, 0)))
    np.save(d / "zero_width_images.npy", np.zeros((10, 8, 0)))
    np.save(d / "overflow32.npy", np.full((10, 3), 1e39))
    mnist = d / "mnist_zero_width"
    mnist.mkdir()
    for prefix, n in (("train", 4), ("t10k", 2)):
        head = b"\x00\x00\x08\x03" + n.to_bytes(4, "big") + (8).to_bytes(4, "big") + bytes(4)
        (mnist / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(head))
        labels = b"\x00\x00\x08\x01" + n.to_bytes(4, "big") + bytes(n)
        (mnist / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    (d / "no_latent.py").write_text(
        "import pyro, pyro.distributions as dist\n"
        "def model(data):\n"
        "    with pyro.plate('data', data.shape[0]):\n"
        "        pyro.sample('y', dist.Normal(0.0, 1.0), obs=data[:, 0])\n"
    )
    (d / "exits.py").write_text("import sys\nsys.exit(3)\n")
    (d / "not_a_run").mkdir()
    (d / "not_a_run" / "precious.txt").write_text("keep me")
    (d / "link_to_run").symlink_to(run)
    (d / "dangling").symlink_to(d / "nowhere_at_all")

    state = load_checkpoint(run / "checkpoint.pt")
    name = state["param_names"][0]
    _craft(run, d / "missing_key", lambda s: s.pop("optimizer"))
    _craft(run, d / "missing_param", lambda s: s["params"].pop(name))
    _craft(run, d / "nan_param", lambda s: s["params"][name].fill_(float("nan")))
    # one flipped bit inside a parameter's bytes: torch's zip reader does not check CRCs
    (d / "flipped").mkdir()
    shutil.copytree(run, d / "flipped", dirs_exist_ok=True)
    raw = bytearray((run / "checkpoint.pt").read_bytes())
    tensor = max(state["params"].values(), key=lambda t: t.numel())
    at = raw.find(tensor.numpy().tobytes()[:64])
    assert at > 0
    raw[at + 40] ^= 0x01
    (d / "flipped" / "checkpoint.pt").write_bytes(bytes(raw))

    # a user model's run, then its model file and its data changed
    x = rng.normal(size=(30, 3))
    np.save(d / "reg.npy", np.column_stack([x @ [1.0, -1.0, 0.5] + rng.normal(size=30), x]))
    (d / "changing_model.py").write_text(USER_MODEL)
    shutil.copy(d / "reg.npy", d / "changing.npy")
    user_run = d / "user_run"
    assert main(["train", "--model", f"{d}/changing_model.py:model", "--data",
                 str(d / "changing.npy"), "--epochs", "1", "--no-progress",
                 "--run-dir", str(user_run)]) == 0  # fmt: skip
    (d / "changing_model.py").write_text(USER_MODEL + "# edited after training\n")
    (d / "data_changed_run").mkdir()
    shutil.copytree(user_run, d / "data_changed_run", dirs_exist_ok=True)
    np.save(d / "changing.npy", np.load(d / "reg.npy") + 1.0)  # same shape, other values

    # a run whose recorded model file lies inside the run directory, or is relative
    def planted(s):
        s["metadata"]["provenance"]["model"]["path"] = str(d / "planted_run" / "model.py")

    _craft(user_run, d / "planted_run", planted)
    (d / "planted_run" / "model.py").write_text(PLANTED_MODEL)
    _craft(
        user_run,
        d / "relative_run",
        lambda s: s["metadata"]["provenance"]["model"].update(path="changing_model.py"),
    )


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
    # --- issue 17: bounds ---
    ("seed-negative", ["train", "--seed", "-1"], "--seed"),
    ("seed-huge", ["train", "--seed", "1e23"], "--seed"),
    ("seed-too-large", ["train", "--seed", str(2**32)], "--seed"),
    ("hidden-empty", ["train", "--hidden-dims", ""], "--hidden-dims"),
    ("hidden-empty-item", ["train", "--hidden-dims", "10,,5"], "--hidden-dims"),
    ("hidden-zero", ["train", "--hidden-dims", "0"], "--hidden-dims"),
    ("threads-too-many", ["train", "--threads", "100000"], "--threads"),
    (
        "model-too-large",
        ["train", "--hidden-dims", "2000000000", "--data", "{D}/good.npy"],
        "GB",
    ),
    ("explain-K-too-large", ["explain", "{D}/run", "--num-samples", "100000000000"], "GB"),
    (
        "compare-K-too-large",
        ["compare", "--num-samples", "100000000000", "--run-dir", "{D}/cmp-big"],
        "GB",
    ),
    ("zero-width", ["train", "--data", "{D}/zero_width.npy"], "zero columns"),
    ("zero-width-images", ["train", "--data", "{D}/zero_width_images.npy"], "zero columns"),
    ("zero-width-mnist", ["train", "--data", "mnist:{D}/mnist_zero_width"], "zero-size"),
    ("overflow-float32", ["train", "--model", "ppca", "--data", "{D}/overflow32.npy"], "overflow"),
    (
        "user-model-no-latents",
        ["train", "--model", "{D}/no_latent.py:model", "--data", "{D}/reg.npy"],
        "no latent",
    ),  # fmt: skip
    ("user-model-sys-exit", ["train", "--model", "{D}/exits.py:model"], "sys.exit(3)"),
    # --- run directories that are not ours to replace ---
    ("force-empty-string", ["train", "--run-dir", "", "--force"], "refusing"),
    ("force-dot", ["train", "--run-dir", ".", "--force"], "refusing"),
    ("force-dotdot", ["train", "--run-dir", "..", "--force"], "refusing"),
    ("force-root", ["train", "--run-dir", "/", "--force"], "refusing"),
    ("force-home", ["train", "--run-dir", "{HOME}", "--force"], "refusing"),
    ("force-not-a-run", ["train", "--run-dir", "{D}/not_a_run", "--force"], "not an elbo-lab"),
    ("force-symlink", ["train", "--run-dir", "{D}/link_to_run", "--force"], "symbolic link"),
    ("run-dir-symlink", ["train", "--run-dir", "{D}/link_to_run", "--resume"], "symbolic link"),
    ("run-dir-dangling", ["train", "--run-dir", "{D}/dangling"], "symbolic link"),
    ("run-dir-proc", ["train", "--run-dir", "/proc/self/elbo-lab-run"], "/proc/self"),
    ("run-dir-too-long", ["train", "--run-dir", "{D}/" + "x" * 300], "too long"),
    ("compare-run-dir-empty-force", ["compare", "--run-dir", "", "--force"], "refusing"),
    (
        "compare-run-dir-not-ours",
        ["compare", "--run-dir", "{D}/not_a_run", "--force"],
        "not an elbo-lab",
    ),
    # --- resume says what it does ---
    (
        "resume-with-data",
        ["train", "--resume", "--run-dir", "{D}/run", "--data", "digits"],
        "--data cannot change",
    ),  # fmt: skip
    (
        "resume-with-seed-model",
        ["train", "--resume", "--run-dir", "{D}/run", "--seed", "0", "--model", "ppca"],
        "--model, --seed cannot change",
    ),  # fmt: skip
    ("resume-with-force", ["train", "--resume", "--force", "--run-dir", "{D}/run"], "--force"),
    # --- malformed, partial, corrupt checkpoints ---
    ("evaluate-missing-key", ["evaluate", "{D}/missing_key"], "'optimizer'"),
    ("evaluate-missing-param", ["evaluate", "{D}/missing_param"], "is missing"),
    ("evaluate-nan-param", ["evaluate", "{D}/nan_param"], "NaN"),
    ("evaluate-flipped-bit", ["evaluate", "{D}/flipped"], "checksum mismatch"),
    ("resume-missing-param", ["train", "--resume", "--run-dir", "{D}/missing_param"], "missing"),
    ("resume-flipped-bit", ["train", "--resume", "--run-dir", "{D}/flipped"], "checksum"),
    # --- provenance: changed inputs, and code a run directory names ---
    ("evaluate-model-changed", ["evaluate", "{D}/user_run"], "changed since training"),
    ("explain-model-changed", ["explain", "{D}/user_run"], "changed since training"),
    (
        "resume-model-changed",
        ["train", "--resume", "--run-dir", "{D}/user_run"],
        "changed since training",
    ),  # fmt: skip
    ("evaluate-data-changed", ["evaluate", "{D}/data_changed_run"], "changed since training"),
    ("evaluate-model-in-run-dir", ["evaluate", "{D}/planted_run"], "inside the run directory"),
    ("evaluate-model-relative", ["evaluate", "{D}/relative_run"], "not an absolute path"),
    # --force keeps the old run until the new one has its first checkpoint
    (
        "force-bad-data",
        ["train", "--run-dir", "{D}/run", "--force", "--data", "{D}/nan.npy"],
        "NaN/Inf",
    ),  # fmt: skip
    (
        "force-bad-model",
        ["train", "--run-dir", "{D}/run", "--force", "--model", "{D}/exits.py:model"],
        "sys.exit",
    ),  # fmt: skip
]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("argv, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    files, argv, expected, capsys, tmp_path, monkeypatch
):
    # a scratch working directory and home, each with a canary, in case a refusal failed
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    for p in (cwd, home):
        p.mkdir()
        (p / "canary").write_text("alive")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    argv = [a.replace("{D}", str(files)).replace("{HOME}", str(home)) for a in argv]
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
    assert sorted(os.listdir(cwd)) == ["canary"] and sorted(os.listdir(home)) == ["canary"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp siblings


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
    with pytest.raises(
        NumericalError,
        match=r"epoch 3, step 3: loss is nan; stopped; its checkpoint of epoch 2, step 0 is kept",
    ):
        fit(model, vae.guide, x, config=config, run_dir=tmp_path)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["position"] == {"epoch": 2, "step": 0, "loss_sum": 0.0}
    assert all(torch.isfinite(p).all() for p in state["params"].values())


def test_nan_loss_on_command_line_exits_nonzero_with_message(tmp_path, capsys):
    rc = main(["train", *TINY, "--lr", "1e30", "--epochs", "3", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 1 and "loss is" in err and "epoch" in err and "step" in err
    assert "Traceback" not in err


# --- real processes: signals, SIGKILL, two writers at once --------------------------------------

KILL_LOOP = Path(__file__).resolve().parents[1] / "benchmarks" / "kill_loop.py"


@pytest.fixture(scope="module")
def kill_loop_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("kill_loop_benchmark", KILL_LOOP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sigkill_loop_keeps_checkpoint_and_metrics_consistent_and_resume_bit_identical(
    kill_loop_module, tmp_path
):
    """Fewer kills than ``python benchmarks/kill_loop.py`` (20), same checks after each."""
    result = kill_loop_module.kill_loop(tmp_path, kills=3, seed=1, epochs=40, max_delay=0.1)
    assert result["parameters_bit_identical"] and result["metrics_identical"], result
    assert result["kills"] + result["finished_before_a_kill"] >= 1


@pytest.fixture(scope="module")
def signal_reference(kill_loop_module, tmp_path_factory):
    """An uninterrupted run for the signal tests to equal: its training arguments and directory."""
    km, root = kill_loop_module, tmp_path_factory.mktemp("signals")
    data = root / "data.npy"
    np.save(data, (np.random.default_rng(0).random((1000, 16)) > 0.5) * 1.0)
    train = [*km.TRAIN, "--epochs", "8", "--batch-size", "8", "--data", str(data)]
    assert km.finish(km.spawn([*train, "--run-dir", str(root / "ref")], root / "log.txt")) == 0
    return train, root / "ref"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signalled_run_checkpoints_mid_epoch_and_resumes_bit_identical(
    kill_loop_module, signal_reference, tmp_path, signum
):
    """SIGTERM/SIGINT finish the step, checkpoint (mid-epoch, as a rule), exit 128 + N; resume
    is exact."""
    km, (train, reference) = kill_loop_module, signal_reference
    log = tmp_path / "log.txt"
    killed = tmp_path / "killed"
    process = km.spawn([*train, "--run-dir", str(killed)], log)
    deadline = time.monotonic() + 60
    metrics = killed / "metrics.jsonl"
    while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.005)  # the first epoch is done: the handlers are installed
    time.sleep(random.Random(int(signum)).uniform(0.0, 0.2))
    os.kill(process.pid, signum)
    assert km.finish(process) == 128 + int(signum), log.read_text()
    assert "interrupted" in log.read_text() and "--resume" in log.read_text()
    position = load_checkpoint(killed / "checkpoint.pt")["position"]
    assert (position["epoch"], position["step"]) > (1, 0)  # written by the handler
    resume = ["train", "--resume", "--run-dir", str(killed), "--epochs", "8", "--no-progress"]
    assert km.finish(km.spawn(resume, log)) == 0, log.read_text()
    ref, got = (load_checkpoint(d / "checkpoint.pt") for d in (reference, killed))
    for name in ref["params"]:
        assert torch.equal(ref["params"][name], got["params"][name]), name
    assert km.rows_without_seconds(metrics.read_text()) == km.rows_without_seconds(
        (reference / "metrics.jsonl").read_text()
    )


def test_two_processes_into_one_new_run_dir_one_is_refused_at_once(kill_loop_module, tmp_path):
    """Two real processes start training into the same new directory: one trains, the other
    exits 2 at once with one line; the directory holds one complete, consistent run."""
    km = kill_loop_module
    data = tmp_path / "data.npy"
    np.save(data, (np.random.default_rng(0).random((200, 16)) > 0.5) * 1.0)
    run = tmp_path / "run"
    argv = [*km.TRAIN, "--epochs", "20", "--data", str(data), "--run-dir", str(run)]
    logs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    processes = [km.spawn(argv, log) for log in logs]
    codes = [km.finish(p) for p in processes]
    assert sorted(codes) == [0, 2], codes
    loser = logs[codes.index(2)].read_text().strip().splitlines()
    assert len(loser) == 1 and loser[0].startswith("elbo-lab: error:"), loser
    assert "exists" in loser[0] or "in use" in loser[0]
    assert km.check_consistent(run) == 20
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_run_in_use_is_refused_to_resume_force_and_train(tmp_path, files, capsys):
    """While a process holds a run (its lock), --resume, --force and a plain run are refused."""
    run = tmp_path / "run"
    shutil.copytree(files / "run", run)
    before = _snapshot(run)
    fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a training process holds it
    try:
        for extra in (["--resume", "--epochs", "2", "--no-progress"], [*TINY, "--force"]):
            assert main(["train", "--run-dir", str(run), *extra]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "in use by another elbo-lab process" in err[0], err
    finally:
        os.close(fd)
    assert _snapshot(run) == before


WORKER = Path(__file__).resolve().parent / "filesystem_worker.py"


def test_full_and_read_only_file_system_lose_nothing(files, tmp_path):
    """On a real tmpfs (a private mount namespace): with the disk full, --force, --resume and a
    new run each end in one line, exit 2, the existing run byte-identical and evaluating to the
    same numbers; read-only, the same, and explain still prints its report (figure: a warning)."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("unshare/mount not available")
    mount = tmp_path / "mnt"
    mount.mkdir()
    script = 'mount -t tmpfs -o size=400k tmpfs "$1" || exit 77; shift; exec "$@"'
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(mount),
         sys.executable, str(WORKER), str(mount), str(files / "run"), str(files / "good.npy")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )  # fmt: skip
    if proc.returncode == 77 or "RESULTS " not in proc.stdout and "unshare" in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["name"]: r for r in json.loads(proc.stdout.split("RESULTS ", 1)[1])}
    for name, problem in [
        ("full-force", "No space left"),
        ("full-resume", "No space left"),
        ("full-new", "No space left"),
        ("ro-new", "not writable"),  # os.access says so before anything is tried
        ("ro-resume", "Read-only file system"),
        ("ro-force", "not writable"),
    ]:
        r = results[name]
        assert r["code"] == 2 and len(r["stderr"]) == 1, r
        assert r["stderr"][0].startswith("elbo-lab: error: ") and problem in r["stderr"][0], r
        if name != "full-resume":  # a resume may append rows past its checkpoint: cut on resume
            assert r["identical"], r
    assert results["full-leftovers"]["entries"] == ["A", "filler"]  # no half-made runs
    assert results["full-evaluate-same"]["same"]
    assert results["freed-resume"]["code"] == 0, results["freed-resume"]
    assert results["freed-rows"]["epochs"] == [1, 1, 2, 2, 3, 3]
    assert results["ro-evaluate"]["code"] == 0 and results["ro-evaluate"]["identical"]
    explained = results["ro-explain"]
    assert explained["code"] == 0 and results["ro-explain-report"]["printed"], explained
    assert len(explained["stderr"]) == 1 and "warning" in explained["stderr"][0], explained


# --- in-process: what --force, --resume, --json and figures do ---------------------------------


def _copy_run(files, tmp_path, name="run") -> Path:
    run = tmp_path / name
    shutil.copytree(files / "run", run)
    return run


def test_force_replaces_a_run_only_with_a_started_one_and_leaves_no_siblings(files, tmp_path):
    run = _copy_run(files, tmp_path)
    (run / "old-only.txt").write_text("from the old run")
    old = load_checkpoint(run / "checkpoint.pt")["sha256"]
    argv = ["train", *TINY, "--data", str(files / "good.npy"), "--run-dir", str(run)]
    assert main([*argv, "--force", "--seed", "1"]) == 0
    assert not (run / "old-only.txt").exists()
    assert load_checkpoint(run / "checkpoint.pt")["sha256"] != old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no .run.new-*/.old-*


def test_a_run_killed_before_its_first_checkpoint_can_be_rerun_or_resumed(files, tmp_path):
    """A directory elbo-lab made whose process died before writing anything is not a run to
    protect: a plain re-run (no --force) and --resume (from scratch) both accept it."""
    argv = ["train", *TINY, "--data", str(files / "good.npy")]
    for name, extra in (("rerun", []), ("resume", ["--resume"])):
        run = _copy_run(files, tmp_path, name)
        (run / "checkpoint.pt").unlink()
        (run / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
        assert main([*argv, *extra, "--run-dir", str(run)]) == 0, name
        assert load_checkpoint(run / "checkpoint.pt")["position"]["epoch"] == 1
        assert not list(run.glob(".*.tmp"))


def test_resume_cleans_temporary_files_and_cuts_rows_past_its_checkpoint(files, tmp_path):
    run = _copy_run(files, tmp_path)
    (run / ".metrics.csv.abc123.tmp").write_text("killed mid-write")
    with open(run / "metrics.jsonl", "a") as f:  # a row appended, then killed before the checkpoint
        f.write('{"epoch": 2, "split": "train", "loss": 1.0}\n{"epoch": 2, "spl')
    assert main(["train", "--resume", "--run-dir", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert not list(run.glob(".*.tmp"))
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["split"]) for r in rows] == [
        (1, "train"),
        (1, "test"),
        (2, "train"),
        (2, "test"),
    ]
    assert rows[2]["loss"] != 1.0


def test_resume_applies_lr_clip_norm_epochs_and_records_them(files, tmp_path):
    run = _copy_run(files, tmp_path)
    argv = ["train", "--resume", "--run-dir", str(run), "--epochs", "2", "--no-progress"]
    assert main([*argv, "--lr", "0.01", "--clip-norm", "5"]) == 0
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["config"]["learning_rate"] == 0.01 and state["config"]["clip_norm"] == 5.0
    assert all(g["lr"] == 0.01 for g in state["optimizer"]["param_groups"])
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["learning_rate"] == 0.01
    assert config["changes"] == [
        {
            "epoch": 1,
            "step": 0,
            "changed": {"epochs": [1, 2], "learning_rate": [0.001, 0.01], "clip_norm": [None, 5.0]},
        }
    ]


def test_allow_changed_uses_a_changed_run_with_a_loud_warning(files, capsys):
    before = _snapshot(files)
    assert main(["evaluate", str(files / "user_run"), "--allow-changed", "--json"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("elbo-lab: warning: ") for w in warnings)
    assert "model file" in warnings[0] and "data" in warnings[1]
    assert _snapshot(files) == before


def test_a_run_records_absolute_data_and_the_hashes_of_model_and_data(files, tmp_path, monkeypatch):
    monkeypatch.chdir(files)
    run = tmp_path / "run"
    argv = ["train", "--model", "changing_model.py:model", "--data", "reg.npy", "--epochs", "1"]
    assert main([*argv, "--no-progress", "--run-dir", str(run)]) == 0
    metadata = load_checkpoint(run / "checkpoint.pt")["metadata"]
    assert metadata["model_spec"]["data"] == str(files / "reg.npy")
    assert metadata["model_spec"]["model"] == f"{files / 'changing_model.py'}:model"
    provenance = metadata["provenance"]
    assert provenance["model"]["path"] == str(files / "changing_model.py")
    assert provenance["data"]["size"] == (files / "reg.npy").stat().st_size
    assert len(provenance["data"]["sha256"]) == 64


PRINTING_MODEL = USER_MODEL.replace(
    "def model(data):", "print('importing!')\n\n\ndef model(data):\n    print('called!')"
)


def test_json_stays_json_whatever_the_model_prints(files, tmp_path, capsys):
    (tmp_path / "printing.py").write_text(PRINTING_MODEL)
    run = tmp_path / "run"
    argv = ["train", "--model", f"{tmp_path}/printing.py:model", "--data", str(files / "reg.npy")]
    assert main([*argv, "--epochs", "1", "--no-progress", "--json", "--run-dir", str(run)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["run_dir"] == str(run)
    assert "importing!" in captured.err and "called!" in captured.err
    for command in (["evaluate", str(run), "--json"], ["explain", str(run), "--json",
                                                       "--num-samples", "10"]):  # fmt: skip
        assert main(command) == 0
        json.loads(capsys.readouterr().out)


def test_a_figure_that_cannot_be_written_is_a_warning_after_the_report(
    files, tmp_path, capsys, monkeypatch
):
    run = _copy_run(files, tmp_path)
    (run / "bound.png").mkdir()  # explain cannot write its figure there
    assert main(["explain", str(run), "--num-samples", "10"]) == 0
    captured = capsys.readouterr()
    assert "L_K" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("elbo-lab: warning: ") and "bound.png" in err[0]

    def no_figures(*args, **kwargs):
        raise OSError(28, "No space left on device", "curves.png")

    monkeypatch.setattr("inference.train_command.draw", no_figures)
    argv = ["train", *TINY, "--data", str(files / "good.npy"), "--run-dir", str(tmp_path / "t")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "Pyro minimized loss" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "figures not written" in err[0] and "No space" in err[0]


def test_checkpoints_follow_the_clock_and_do_not_grow_with_the_epochs(tmp_path, monkeypatch):
    """--checkpoint-every: one checkpoint at the start and one at the end for a short run (not
    one per epoch); the checkpoint holds no history, so its size does not grow with epochs."""
    import inference.train

    writes = []
    real = inference.train.save_checkpoint
    monkeypatch.setattr(
        inference.train, "save_checkpoint", lambda p, s: (writes.append(s["position"]), real(p, s))
    )
    x = (torch.rand(64, 6, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    sizes = {}
    for epochs, every in ((1, 1e9), (6, 1e9), (6, 0)):
        writes.clear()
        pyro.clear_param_store()
        vae = VAE(6, latent_dim=2, hidden_dims=(4,))
        config = TrainConfig(epochs=epochs, batch_size=16, progress=False, checkpoint_every=every)
        fit(vae.model, vae.guide, x, test=x, config=config, run_dir=tmp_path / f"{epochs}-{every}")
        sizes[epochs, every] = (tmp_path / f"{epochs}-{every}" / "checkpoint.pt").stat().st_size
        expected = epochs + 1 if every == 0 else 2
        assert len(writes) == expected, (epochs, every, writes)
    assert abs(sizes[6, 1e9] - sizes[1, 1e9]) < 64


def test_memory_exhausted_during_a_run_is_one_line_exit_1(files, tmp_path, capsys, monkeypatch):
    def allocator_fails(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1907348632800 bytes.\nmore"
        )

    monkeypatch.setattr("inference.train_command.fit", allocator_fails)
    argv = ["train", *TINY, "--data", str(files / "good.npy"), "--run-dir", str(tmp_path / "r")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("elbo-lab: error: out of memory"), err
    assert not (tmp_path / "r").exists()  # nothing was written before the failure


def test_an_interrupt_while_the_library_loads_is_exit_130(monkeypatch, capsys):
    """Ctrl-C while torch and Pyro are still being imported (the imports run inside ``main``)
    ends with the one-line message and 130, not a traceback."""
    import inference.cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(inference.cli, "_load_library", interrupted)
    assert main(["train", "--epochs", "1"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "elbo-lab: interrupted"


def test_permission_denied_is_one_line(tmp_path, monkeypatch, capsys):
    """EACCES (root ignores file modes, so the error is raised where the run directory is
    made): one line naming the path, exit 2, nothing left behind."""
    import errno
    import os as os_module

    real_mkdir = os_module.mkdir

    def denied(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os_module, "mkdir", denied)
    run_dir = tmp_path / "denied"
    assert main(["train", "--epochs", "1", "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("elbo-lab: error: ")
    assert "Permission denied" in err[0] and str(run_dir) in err[0]
    assert not run_dir.exists()
