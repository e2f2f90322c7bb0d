"""Full-batch training of a small Bayesian model: ``fit`` vs Pyro's own SVI loop, interleaved.

The coin of Pyro's SVI Part I (Beta(10, 10) prior, ten flips as an ``(N, 1)`` tensor) with an
autoguide, trained for the same number of steps, same learning rate and seed:

    pyro SVI   SVI(model, guide, pyro.optim.Adam, Trace_ELBO()).step(data), as the tutorial does
    fit        inference.train.fit(model, guide, data, config=TrainConfig(batch_size=None, ...))
               with its defaults: the estimator chosen for the pair (Trace_ELBO here, as the
               autoguide's latent is constrained), fused Adam, NaN checks and its default
               evaluation cadence (about 20 evaluations per run), no run directory

Each repetition runs both in turn; medians over repetitions, the ratio of medians, and the
median of the ratios taken within each repetition ("paired", robust to drift), are printed.

    python benchmarks/full_batch.py [--steps 2000] [--reps 5] [--guide AutoNormal] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO, autoguide

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.train import TrainConfig, fit  # noqa: E402

HEADS, TAILS = 6, 4


def model(data):
    alpha = torch.tensor(10.0, dtype=data.dtype)
    f = pyro.sample("latent_fairness", dist.Beta(alpha, alpha))
    with pyro.plate("flips", data.shape[0]):
        pyro.sample("obs", dist.Bernoulli(f), obs=data[:, 0])


def run_svi(data, guide_name: str, steps: int, lr: float) -> float:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = getattr(autoguide, guide_name)(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    start = time.perf_counter()
    for _ in range(steps):
        svi.step(data)
    return time.perf_counter() - start


def run_fit(data, guide_name: str, steps: int, lr: float) -> float:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = getattr(autoguide, guide_name)(model)
    config = TrainConfig(epochs=steps, batch_size=None, learning_rate=lr, progress=False)
    start = time.perf_counter()
    fit(model, guide, data, None, config)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--guide", default="AutoNormal")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = torch.tensor([[1.0]] * HEADS + [[0.0]] * TAILS)
    print(
        f"torch {torch.__version__}, pyro {pyro.__version__}, threads {args.threads}; coin with "
        f"{args.guide}, {args.steps} full-batch steps, {args.reps} repetitions"
    )
    times: dict[str, list[float]] = {"pyro SVI": [], "fit": []}
    for _ in range(args.reps):
        times["pyro SVI"].append(run_svi(data, args.guide, args.steps, args.lr))
        times["fit"].append(run_fit(data, args.guide, args.steps, args.lr))
    svi, ours = statistics.median(times["pyro SVI"]), statistics.median(times["fit"])
    paired = statistics.median(f / s for f, s in zip(times["fit"], times["pyro SVI"], strict=True))
    for name, values in times.items():
        spread = f"{min(values):.2f}-{max(values):.2f}"
        print(f"  {name:<9} median {statistics.median(values):7.2f} s  (range {spread} s)")
    print(f"fit / pyro SVI: ratio of medians {ours / svi:.2f}, paired {paired:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
