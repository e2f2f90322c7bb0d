"""SIGKILL a training run at random moments, resume it each time, and check what is on disk.

After every kill: the checkpoint loads (its checksum holds), ``metrics.jsonl``/``metrics.csv`` up
to the lengths the checkpoint recorded hold exactly the rows of epochs 1..E (E = the
checkpoint's epoch), and anything after them belongs to later epochs (cut at the next start).
At the end: no temporary files are left, and the resumed run equals an uninterrupted one bit for
bit (parameters and every metrics row but its wall-clock ``seconds``).

Each run is a real process (forked from this one, so it starts without import time) killed
with SIGKILL: no handler runs, exactly as with ``kill -9`` or the OOM killer.

    python benchmarks/kill_loop.py [--kills 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: A small run with a checkpoint every 0.1 s: kills land between and during checkpoints.
TRAIN = [
    "train", "--batch-size", "32", "--hidden-dims", "16", "--latent-dim", "2", "--no-progress",
    "--checkpoint-every", "0.1", "--eval-every", "1",  # rows every epoch, to compare
]  # fmt: skip


def _child(argv: list[str], log: str) -> None:
    """Run the command line in this (forked) process, its output to ``log``; exit with its code."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - this process ends with os._exit
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    from inference.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)


def spawn(argv: list[str], log: Path) -> multiprocessing.Process:
    """Start ``elbo-lab ARGV`` as a forked process (no import time); ``.exitcode`` is its status."""
    process = multiprocessing.get_context("fork").Process(target=_child, args=(argv, str(log)))
    process.start()
    return process


def finish(process: multiprocessing.Process, timeout: float = 300) -> int:
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise TimeoutError("the training process did not finish")
    return process.exitcode


def temporary_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob(".*.tmp"))


def rows_without_seconds(text: str) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k != "seconds"} for line in text.splitlines()
    ]


def check_consistent(run_dir: Path, reference: list[dict] | None = None) -> int:
    """Assert that checkpoint and metrics describe the same step; return the checkpoint's epoch.

    The rows up to the lengths the checkpoint recorded are those of epochs 1..E (equal to the
    ``reference`` run's rows of those epochs, without seconds, when given); rows after them
    belong to later epochs.
    """
    from inference.io import load_checkpoint

    state = load_checkpoint(run_dir / "checkpoint.pt")  # verifies the checksum and contents
    epoch = state["position"]["epoch"]
    jsonl = (run_dir / "metrics.jsonl").read_bytes()
    csv_bytes = (run_dir / "metrics.csv").read_bytes()
    n_jsonl, n_csv = state["metrics"]["metrics.jsonl"], state["metrics"]["metrics.csv"]
    assert len(jsonl) >= n_jsonl and len(csv_bytes) >= n_csv, "metrics behind the checkpoint"
    kept = [json.loads(line) for line in jsonl[:n_jsonl].decode().splitlines()]
    assert all(r["epoch"] <= epoch for r in kept), (epoch, kept[-2:])
    if reference is not None:
        expected = [r for r in reference if r["epoch"] <= epoch]
        assert rows_without_seconds("\n".join(json.dumps(r) for r in kept)) == expected, epoch
    table = list(csv.DictReader(io.StringIO(csv_bytes[:n_csv].decode())))
    assert [(int(r["epoch"]), r["split"]) for r in table] == [
        (r["epoch"], r["split"]) for r in kept
    ]
    for line in jsonl[n_jsonl:].decode(errors="replace").splitlines():
        try:
            later = json.loads(line)
        except ValueError:  # the line being written when the process was killed
            continue
        assert later["epoch"] > epoch, "a row after the checkpoint's lengths is not newer"
    return epoch


def kill_loop(
    root: Path, kills: int = 20, seed: int = 0, epochs: int = 300, max_delay: float = 0.15
) -> dict:
    """Train once uninterrupted, then kill and resume a second run ``kills`` times; compare.

    The data: 200 random binary rows of 16 pixels (160 train: 5 steps an epoch).
    """
    import numpy as np

    from inference.io import load_checkpoint

    rng = random.Random(seed)
    data = root / "data.npy"
    np.save(data, (np.random.default_rng(seed).random((200, 16)) > 0.5) * 1.0)
    train = [*TRAIN, "--epochs", str(epochs), "--data", str(data)]
    reference, killed, log = root / "reference", root / "killed", root / "log.txt"
    assert finish(spawn([*train, "--run-dir", str(reference)], log)) == 0, log.read_text()
    expected = rows_without_seconds((reference / "metrics.jsonl").read_text())
    positions, leftovers, done = [], 0, 0
    for _ in range(kills):
        checkpoint = killed / "checkpoint.pt"
        if checkpoint.exists():  # resume; nothing else may be given
            argv = ["train", "--resume", "--run-dir", str(killed), "--epochs", str(epochs)]
            argv += ["--no-progress", "--checkpoint-every", "0.1"]
        else:  # killed before its first checkpoint: a plain re-run is accepted
            argv = [*train, "--run-dir", str(killed)]
        before = checkpoint.stat().st_mtime_ns if checkpoint.exists() else 0
        process = spawn(argv, log)
        deadline = time.monotonic() + 120
        while process.is_alive() and time.monotonic() < deadline:
            if checkpoint.exists() and checkpoint.stat().st_mtime_ns != before:
                break  # training is under way
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, max_delay))
        if not process.is_alive():
            assert process.exitcode == 0, log.read_text()[-2000:]
            done += 1
            break
        os.kill(process.pid, signal.SIGKILL)
        assert finish(process) == -signal.SIGKILL
        leftovers += len(temporary_files(killed))
        if (killed / "checkpoint.pt").exists():
            positions.append(check_consistent(killed, expected))
        else:
            positions.append(None)
    argv = ["train", "--resume", "--run-dir", str(killed), "--epochs", str(epochs), "--no-progress"]
    assert finish(spawn(argv, log)) == 0, log.read_text()[-2000:]
    assert temporary_files(killed) == [], temporary_files(killed)
    ref, got = load_checkpoint(reference / "checkpoint.pt"), load_checkpoint(checkpoint)
    identical = ref["params"].keys() == got["params"].keys() and all(
        bool((ref["params"][k] == got["params"][k]).all()) for k in ref["params"]
    )
    same_rows = rows_without_seconds((reference / "metrics.jsonl").read_text()) == (
        rows_without_seconds((killed / "metrics.jsonl").read_text())
    )
    return {
        "kills": len(positions),
        "checkpoint_epochs": positions,
        "temporary_files_after_kills": leftovers,
        "finished_before_a_kill": done,
        "parameters_bit_identical": identical,
        "metrics_identical": same_rows,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=300)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        result = kill_loop(Path(root), kills=args.kills, seed=args.seed, epochs=args.epochs)
        result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["parameters_bit_identical"] and result["metrics_identical"] else 1)
