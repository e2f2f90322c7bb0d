"""Torch threads for the default run: 1 against 2 threads, on a quiet machine and beside a busy core.

Each configuration trains the default VAE (``elbo-lab train``, digits 64-200-10, batch 128) for
``--epochs`` epochs in a fresh process, interleaved round by round; "under load" means one more
process spinning a core (``python -c "while True: pass"``) for the length of the run. Printed:
the median over rounds of the time the steps took (``seconds`` summed over ``metrics.jsonl``) and
of the whole process's wall time, and the spread (min-max). The load average before each round
says how quiet "quiet" was.

Configurations: ``--threads 1``, ``--threads 2``, and ``--threads 2`` with
``OMP_WAIT_POLICY=PASSIVE`` (OpenMP threads sleep instead of spinning while they wait), and
elbo-lab's default (its ``OMP_WAIT_POLICY=PASSIVE`` and threads from the work per step).

``--step D,H,L`` times instead one step of the plain-PyTorch VAE (``benchmarks/plain_vae.py
--time-steps``) of sizes D-H-L at batch 128 on synthetic rows, for a model larger than the
default one (``--step 784,400,20``: MNIST-sized).

    python benchmarks/threads.py [--epochs 30] [--rounds 3]
    python benchmarks/threads.py --step 784,400,20 --configs "1 thread,2 threads,2 threads passive"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUSY = [sys.executable, "-c", "while True: pass"]
CONFIGS = {
    "1 thread": ({"threads": "1"}, {}),
    "2 threads": ({"threads": "2"}, {}),
    "2 threads passive": ({"threads": "2"}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "default": ({}, {}),
}


def train_once(epochs: int, threads: str | None, env: dict[str, str], extra: list[str]):
    """(step seconds, wall seconds) of one ``elbo-lab train`` process."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "inference.cli", "train", "--epochs", str(epochs)]
        # every epoch evaluated, so that its "seconds" row exists: the steps of every epoch
        cmd += ["--run-dir", str(run_dir), "--no-progress", "--eval-every", "1", *extra]
        if threads is not None:
            cmd += ["--threads", threads]
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = sum(r["seconds"] for r in rows if r.get("split") == "train")
        return steps, wall


def step_once(sizes: str, threads: str | None, env: dict[str, str]):
    """(median step seconds, wall seconds) of the plain VAE of ``sizes`` = "D,H,L"."""
    d, h, latent = sizes.split(",")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "plain_vae.py"), "--time-steps", "30"]
    cmd += ["--synthetic", "2000", "--data-dim", d, "--hidden", h, "--latent", latent]
    if threads is not None:
        cmd += ["--threads", threads]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, check=True, cwd=ROOT, env=full_env, capture_output=True, text=True)
    return float(res.stdout.split("step_ms")[-1]) / 1e3, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loads", default="quiet,busy", help="quiet,busy (both)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names")
    parser.add_argument("--extra", default="", help="more train options, space-separated")
    parser.add_argument("--step", default=None, help="D,H,L: time a plain VAE step instead")
    args = parser.parse_args(argv)
    configs = args.configs.split(",")
    loads = args.loads.split(",")
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        for load in loads:
            busy = subprocess.Popen(BUSY) if load == "busy" else None
            try:
                print(f"round {r + 1}, {load}: load average {os.getloadavg()[0]:.2f}", flush=True)
                for name in configs:
                    opts, env = CONFIGS[name]
                    if args.step:
                        got = step_once(args.step, opts.get("threads"), env)
                    else:
                        got = train_once(args.epochs, opts.get("threads"), env, args.extra.split())
                    results.setdefault((load, name), []).append(got)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    what = f"one step of {args.step}" if args.step else f"{args.epochs} epochs"
    unit = 1e3 if args.step else 1.0  # a step in ms, a run's steps in s
    print(f"\n{what}, {args.rounds} rounds; medians (min-max)")
    label = "step (ms)" if args.step else "steps (s)"
    print(f"{'load':<6} {'configuration':<26} {label:>18} {'whole process (s)':>20}")
    summary = {}
    for (load, name), runs in results.items():
        steps, walls = [s * unit for s, _ in runs], [w for _, w in runs]
        summary[f"{load}/{name}"] = {
            "steps": statistics.median(steps) / unit,
            "wall": statistics.median(walls),
        }
        print(
            f"{load:<6} {name:<26} {statistics.median(steps):7.3f} ({min(steps):.3f}-{max(steps):.3f})"
            f" {statistics.median(walls):8.2f} ({min(walls):.2f}-{max(walls):.2f})"
        )
    return summary


if __name__ == "__main__":
    main()
