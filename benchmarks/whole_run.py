"""Whole runs as a user sees them: ``elbo-lab train`` against plain PyTorch and NumPyro, by process.

Whole-run mode (default): each program trains the default problem (digits 64-200-10, batch 128,
Adam 1e-3, a test-loss pass every epoch) as a fresh process, for N and for 2N epochs; programs
and epoch counts are interleaved, in a rotated order each round. Printed per program: the median
(min-max) wall time and CPU time (user + system, of the process and its children) of the N-
and 2N-epoch runs, the marginal time of N more epochs (T(2N) - T(N), paired within a round),
and the ratios of those medians to plain PyTorch's. On a machine that others share, wall time
measures the machine as much as the program; CPU time much less so.

    elbo-lab   ``python -m inference.cli train --epochs E`` with every default (threads included)
    plain      ``benchmarks/plain_vae.py --epochs E --threads 1`` (pytorch/examples' shape)
    numpyro    ``benchmarks/numpyro_vae.py --epochs E --threads 1`` (skipped if not installed)
    plain@default, numpyro@default   the same with the library's own threads (torch: one per
               core, spinning while they wait; XLA: its thread pool over every core)

Step mode (``--steps K``): the mean time of one training step after warm-up, each program in
its own process with one thread (``@default``: the threads it picks itself; for elbo-lab, the
program's environment and its step threads, :class:`inference.threads.StepThreads`), at two
scales: digits 64-200-10 and an MNIST-sized 784-400-20
on 60,000 synthetic binarized rows, both batch 128. elbo-lab's step is timed from ``fit``'s own
per-epoch ``seconds`` (a second and third epoch of K steps on K x 128 synthetic rows, after the
first epoch compiled the estimator), so it includes the loop's shuffling and checks; the peers
time ``K`` calls of their step function on one batch.

    python benchmarks/whole_run.py [--epochs 50] [--rounds 3] [--programs elbo-lab,plain,numpyro]
    python benchmarks/whole_run.py --mnist-sized --epochs 2 [--rounds 2]   (784-400-20, 60,000 rows)
    python benchmarks/whole_run.py --device cuda --programs elbo-lab,plain@default,numpyro@default
    python benchmarks/whole_run.py --steps 100 [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCALES = {"digits 64-200-10": (64, 200, 10, 0), "MNIST-sized 784-400-20": (784, 400, 20, 60000)}


def has_numpyro() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("numpyro", "jax"))


def _env(root: Path = ROOT) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root)}


#: ``--mnist-sized``: rows of Bernoulli(0.13) pixels the peers draw (``--synthetic``), and the
#: 784-400-20 VAE. elbo-lab reads the same number of training rows from a .npy file of
#: ROWS / (1 - TEST_FRACTION) rows (its 80/20 split: 60,000 train, 15,000 test rows; the peers
#: test on 10,000).
MNIST_ROWS = 60000


def _mnist_file(work: Path) -> Path:
    """The .npy file elbo-lab trains on with ``--mnist-sized`` (written once per benchmark)."""
    import numpy as np

    from inference.data import TEST_FRACTION

    path = work / "mnist-sized.npy"
    if not path.exists():
        rows = round(MNIST_ROWS / (1 - TEST_FRACTION))
        rng = np.random.default_rng(0)
        np.save(path, (rng.random((rows, 784), dtype=np.float32) < 0.13).astype(np.float32))
    return path


def run_program(
    program: str,
    epochs: int,
    work: Path,
    baseline: Path | None = None,
    mnist: bool = False,
    device: str = "cpu",
) -> tuple[float, float]:
    """(wall, CPU) seconds of one whole run of ``program`` for ``epochs`` epochs on ``device``."""
    root = ROOT
    if program.startswith("elbo-lab"):  # "elbo-lab@base": the checkout in --baseline
        root = baseline if program == "elbo-lab@base" else ROOT
        cmd = ["-m", "inference.cli", "train", "--epochs", str(epochs), "--no-progress"]
        cmd += ["--force", "--run-dir", str(work / "run")]
        if mnist:
            cmd += ["--data", str(_mnist_file(work)), "--latent-dim", "20", "--hidden-dims", "400"]
    else:
        name, _, variant = program.partition("@")  # "@default": the library's own threads
        script = {"plain": "plain_vae.py", "numpyro": "numpyro_vae.py"}[name]
        cmd = [str(BENCH / script), "--epochs", str(epochs), "--quiet"]
        cmd += [] if variant == "default" else ["--threads", "1"]
        if mnist:
            cmd += ["--synthetic", str(MNIST_ROWS), "--data-dim", "784"]
            cmd += ["--hidden", "400", "--latent", "20"]
    if device != "cpu":  # on the CPU, each program's command line as a user types it
        cmd += ["--device", device]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, *cmd], check=True, cwd=root, env=_env(root), stdout=subprocess.DEVNULL
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.2f} ({min(values):.2f}-{max(values):.2f})"


def whole_runs(
    programs: list[str],
    epochs: int,
    rounds: int,
    baseline: Path | None,
    mnist: bool = False,
    device: str = "cpu",
) -> dict:
    times = {(p, e): [] for p in programs for e in (epochs, 2 * epochs)}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = programs[r % len(programs) :] + programs[: r % len(programs)]
            print(f"round {r + 1}: load average {os.getloadavg()[0]:.2f}", flush=True)
            for e in (epochs, 2 * epochs) if r % 2 == 0 else (2 * epochs, epochs):
                for p in order:
                    wall, cpu = run_program(p, e, Path(tmp), baseline, mnist, device)
                    times[p, e].append((wall, cpu))
                    print(
                        f"  {p:<14} {e:>4} epochs {wall:8.2f} s wall {cpu:8.2f} s CPU", flush=True
                    )
    result = {p: {} for p in programs}
    for k, clock in enumerate(("wall", "CPU")):
        print(f"\n{clock} seconds, {rounds} rounds: median (min-max)")
        print(
            f"{'program':<14} {f'{epochs} epochs':>26} {f'{2 * epochs} epochs':>26} {'marginal':>26}"
        )
        for p in programs:
            n1 = [t[k] for t in times[p, epochs]]
            n2 = [t[k] for t in times[p, 2 * epochs]]
            marginal = [b - a for a, b in zip(n1, n2, strict=True)]  # paired within a round
            result[p][clock] = {
                "total": statistics.median(n1),
                "total_2n": statistics.median(n2),
                "marginal": statistics.median(marginal),
                "runs": {str(epochs): n1, str(2 * epochs): n2},
            }
            print(f"{p:<14} {_spread(n1):>26} {_spread(n2):>26} {_spread(marginal):>26}")
        if "plain" in result:
            base = result["plain"][clock]
            print(f"ratios to plain PyTorch ({clock}: total N, total 2N, marginal N epochs):")
            for p in programs:
                ratios = [result[p][clock][q] / base[q] for q in ("total", "total_2n", "marginal")]
                result[p][clock]["ratios"] = ratios
                print(f"  {p:<14} " + "  ".join(f"{r:.2f}" for r in ratios))
    return result


def _elbo_lab_step(
    data_dim: int, hidden: int, latent: int, steps: int, default: bool = False
) -> float:
    """Seconds per step of ``fit``'s default training, from its per-epoch times: one thread,
    or (``default``) the program's environment and the step threads ``elbo-lab train`` uses."""
    if default:
        from inference.cli import process_environment

        process_environment()  # before torch loads

    import pyro
    import torch

    import inference.traced_loss as traced_loss
    from inference.resources import step_threads
    from inference.train import TrainConfig, fit
    from models.vae import VAE

    torch.set_num_threads(1)
    spec = {"model": "vae", "data_dim": data_dim, "latent_dim": latent, "hidden_dims": [hidden]}
    chooser = step_threads(argparse.Namespace(threads=None), spec, 128) if default else None
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(steps * 128, data_dim, generator=g) < 0.13).float()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = VAE(data_dim, latent, (hidden,))
    config = TrainConfig(epochs=3, progress=False, eval_every=1)  # "seconds": per epoch
    # The steady state of a long run: these 3 epochs of K steps would not pay for an export,
    # and fit would keep them eager; a default digits run exports in its first epoch.
    pays = traced_loss.FIRST_EXPORT_PAYS_AFTER_CALLS, traced_loss.EXPORT_PAYS_AFTER_CALLS
    traced_loss.FIRST_EXPORT_PAYS_AFTER_CALLS = traced_loss.EXPORT_PAYS_AFTER_CALLS = 0
    try:
        history = fit(vae.model, vae.guide, x, config=config, step_threads=chooser).history
    finally:
        traced_loss.FIRST_EXPORT_PAYS_AFTER_CALLS, traced_loss.EXPORT_PAYS_AFTER_CALLS = pays
    seconds = {row["epoch"]: row["seconds"] for row in history if "seconds" in row}
    return statistics.median([seconds[2], seconds[3]]) / steps if seconds else float("nan")


def step_times(programs: list[str], steps: int, rounds: int) -> dict:
    out: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds):
        print(f"round {r + 1}: load average {os.getloadavg()[0]:.2f}", flush=True)
        for scale, (d, h, latent, rows) in SCALES.items():
            for p in programs:
                name, _, variant = p.partition("@")
                if name == "elbo-lab":
                    sizes = f"{d},{h},{latent},{steps},{int(variant == 'default')}"
                    cmd = [str(Path(__file__)), "--elbo-lab-step", sizes]
                else:
                    script = {"plain": "plain_vae.py", "numpyro": "numpyro_vae.py"}[name]
                    cmd = [str(BENCH / script), "--time-steps", str(steps)]
                    cmd += [] if variant == "default" else ["--threads", "1"]
                    cmd += ["--hidden", str(h), "--latent", str(latent)]
                    if rows:
                        cmd += ["--synthetic", str(rows), "--data-dim", str(d)]
                res = subprocess.run(
                    [sys.executable, *cmd],
                    check=True,
                    cwd=ROOT,
                    env=_env(),
                    capture_output=True,
                    text=True,
                )
                ms = float(res.stdout.split("step_ms")[-1].split()[0])
                out.setdefault((scale, p), []).append(ms)
    print(
        f"\nstep time, batch 128, {rounds} rounds (one thread; @default: the program's own): "
        "ms, median (min-max); ratio to plain"
    )
    result = {}
    for scale in SCALES:
        print(scale)
        base = statistics.median(out[scale, "plain"]) if (scale, "plain") in out else None
        for p in programs:
            ms = out[scale, p]
            ratio = statistics.median(ms) / base if base else float("nan")
            result[f"{scale}/{p}"] = {"ms": statistics.median(ms), "ratio": ratio}
            print(f"  {p:<10} {_spread(ms)}  {ratio:.2f}")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50, help="N: runs of N and 2N epochs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--programs", default="elbo-lab,plain,numpyro")
    parser.add_argument("--steps", type=int, default=0, help="step mode: K timed steps")
    parser.add_argument("--elbo-lab-step", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a checkout of an earlier elbo-lab, run as program elbo-lab@base",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--mnist-sized",
        action="store_true",
        help="whole runs of the 784-400-20 VAE on 60,000 synthetic rows instead of the digits",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="whole runs on this device: cpu, or cuda (each program's own GPU path; NumPyro's "
        "needs JAX's CUDA backend)",
    )
    args = parser.parse_args(argv)
    if args.elbo_lab_step:  # the child process of step mode
        d, h, latent, steps, *default = map(int, args.elbo_lab_step.split(","))
        print(f"step_ms {1e3 * _elbo_lab_step(d, h, latent, steps, any(default)):.4f}")
        return {}
    programs = args.programs.split(",")
    if args.steps and args.device != "cpu":
        parser.error("--device: step mode times the CPU (benchmarks/step_time.py --device cuda)")
    if args.steps and "elbo-lab@base" in programs:
        parser.error("--steps: elbo-lab@base is for whole runs (step mode times this checkout)")
    if not has_numpyro():
        for p in [p for p in programs if p.partition("@")[0] == "numpyro"]:
            print(f"whole_run: NumPyro/JAX not installed, {p} skipped (pip install -e .[bench])")
            programs.remove(p)
    if args.steps:
        result = step_times(programs, args.steps, args.rounds)
    else:
        if args.baseline is not None and "elbo-lab@base" not in programs:
            programs.insert(1, "elbo-lab@base")
        result = whole_runs(
            programs, args.epochs, args.rounds, args.baseline, args.mnist_sized, args.device
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
