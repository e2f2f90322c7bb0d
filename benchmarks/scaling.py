"""Cost against data size: one epoch of ``fit`` (default options) on 1k to 100k images.

The digits are enlarged synthetically: rows are resampled with replacement and 3% of their
pixels flipped, so every size has the same distribution. For each size N the table gives the
training time per image (the step loop), the evaluation time per image (train split, per-epoch
``evaluate``), and the growth of the process's peak resident memory beyond the data tensor.
Linear cost means flat columns.

    python benchmarks/scaling.py [--sizes 1000,10000,100000] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.data import load_digits  # noqa: E402
from inference.train import TrainConfig, fit  # noqa: E402
from models.vae import VAE  # noqa: E402


def enlarge(x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """n rows drawn from x with replacement, each pixel flipped with probability 0.03."""
    g = torch.Generator().manual_seed(seed)
    rows = x[torch.randint(x.shape[0], (n,), generator=g)]
    flips = torch.rand(rows.shape, generator=g) < 0.03
    return torch.where(flips, 1 - rows, rows)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, 0 = default (1)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    digits = load_digits().train.float()
    config = TrainConfig(epochs=1, progress=False)
    print(
        f"one epoch of fit, batch {config.batch_size}, estimator {config.estimator} (--jit {config.jit}: compiled for the VAE), "
        f"threads {torch.get_num_threads()}, device {args.device}"
    )
    print(
        f"{'N':>8s} {'train us/img':>13s} {'eval us/img':>12s} {'peak RSS MB':>12s} "
        f"{'growth - data MB':>17s}"
    )
    for n in (int(s) for s in args.sizes.split(",")):
        x = enlarge(digits, n).to(args.device)
        before = peak_rss_mb()
        pyro.clear_param_store()
        torch.manual_seed(0)
        vae = VAE(x.shape[1]).to(args.device)
        t0 = time.perf_counter()
        result = fit(vae.model, vae.guide, x, config=config)
        total = time.perf_counter() - t0
        train_s = result.history[0]["seconds"]
        data_mb = x.numel() * x.element_size() / 2**20
        growth = peak_rss_mb() - before
        print(
            f"{n:8d} {train_s / n * 1e6:13.1f} {(total - train_s) / n * 1e6:12.1f} "
            f"{peak_rss_mb():12.0f} {max(growth - data_mb, 0.0):17.1f}"
        )


if __name__ == "__main__":
    main()
