"""Benchmark: epoch time of data-parallel SVI with 1 and 2 processes (``torchrun``, gloo on CPU).

The data set is the binarized digits training split repeated ``--scale`` times (20: 28,760 rows of
64 pixels; the 359 test rows as they are), the model the default VAE (64-200-10), Trace_ELBO,
Adam, global batch ``--batch-size``. For each process count P the script launches

    python -m torch.distributed.run --nproc-per-node P benchmarks/distributed.py --worker ...

and each run trains ``--epochs`` epochs with :func:`inference.train.fit`; every rank takes B / P
rows of each global batch and gradients are all-reduced once per step. Reported per P (epoch 1,
with its one-off start-up, left out of the medians):

- ``steps s/epoch``: the training steps of an epoch (``seconds`` in the history);
- ``epoch s``: the whole epoch, steps plus the sharded evaluation of the train and test splits
  and rank 0's checkpoint-free bookkeeping (epoch 1 also holds start-up, hence left out);
- ``speed-up``: the 1-process figure over the P-process figure.

    .venv/bin/python benchmarks/distributed.py                     # P = 1, 2; scale 20
    .venv/bin/python benchmarks/distributed.py --procs 1,2,4 --batch-size 1024 --epochs 4

Every process gets ``--threads`` torch threads (1, as torchrun's own default for P > 1), so P
processes use P threads: on a loaded machine a 1-process run with several intra-op threads can be
many times slower than with one, which would flatter the speed-up. Only as many processes as free
cores run at once; on a machine shared with other work the speed-up is bounded by the free cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    """One rank: train on the enlarged digits and (rank 0) write the epoch times as JSON."""
    import pyro
    import torch

    from inference.data import load_digits
    from inference.distributed import init_from_env, shutdown
    from inference.train import TrainConfig, fit
    from models.vae import VAE

    world = init_from_env("cpu")
    data = load_digits()
    train = data.train.float().repeat(args.scale, 1)
    test = data.test.float()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = VAE(data.data_dim)
    config = TrainConfig(  # every epoch evaluated: each has its "seconds" row
        epochs=args.epochs, batch_size=args.batch_size, progress=False, eval_every=1
    )
    ends: list[float] = []

    class EpochClock(logging.Handler):  # fit logs "epoch k: ..." at the end of each epoch
        def emit(self, record):
            ends.append(time.perf_counter())

    train_log = logging.getLogger("inference.train")
    train_log.setLevel(logging.INFO)
    train_log.addHandler(EpochClock())
    ends.append(time.perf_counter())
    result = fit(vae.model, vae.guide, train, test=test, config=config, world=world)
    shutdown(world)
    if world.is_writer:
        record = {
            "procs": world.size,
            "threads": torch.get_num_threads(),
            "rows": train.shape[0],
            "steps_seconds": [r["seconds"] for r in result.history if r["split"] == "train"],
            "epoch_seconds": [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)],
            "test_elbo": result.final.elbo,
        }
        Path(args.out).write_text(json.dumps(record))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(procs: int, args, out: Path) -> dict:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={procs}",
        "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
        __file__,
        "--worker",
        f"--out={out}",
        f"--scale={args.scale}",
        f"--epochs={args.epochs}",
        f"--batch-size={args.batch_size}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(command, check=True, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", default="1,2", help="comma-separated process counts (1,2)")
    p.add_argument("--scale", type=int, default=20, help="copies of the digits train split (20)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (3; the first is warm-up)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size B (128)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads per process, for every P (1)"
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    import tempfile

    print(
        f"digits x{args.scale}, VAE 64-200-10, Trace_ELBO, global batch {args.batch_size}, "
        f"{args.epochs} epochs (epoch 1 left out); {os.cpu_count()} CPU cores visible, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'procs':>5} {'threads':>7} {'steps s/epoch':>13} {'epoch s':>8} {'speed-up':>8} {'test ELBO':>9}"
    )
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for procs in (int(s) for s in args.procs.split(",")):
            r = launch(procs, args, Path(tmp) / f"p{procs}.json")
            steps = statistics.median(r["steps_seconds"][1:] or r["steps_seconds"])
            epoch = statistics.median(r["epoch_seconds"][1:] or r["epoch_seconds"])
            base = base or steps
            print(
                f"{procs:>5} {r['threads']:>7} {steps:>13.2f} {epoch:>8.2f} "
                f"{base / steps:>8.2f} {r['test_elbo']:>9.2f}"
            )


if __name__ == "__main__":
    main()
