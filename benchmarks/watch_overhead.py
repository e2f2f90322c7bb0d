"""Benchmark: what ``elbo-lab watch`` costs a script, against the same script run alone.

The script is the VAE of Pyro's tutorial (its own ``model``/``guide`` methods, ``SVI`` with
``Trace_ELBO`` and ``pyro.optim.Adam``) on the binarized digits, mini-batches of 128, ``--steps``
steps. Each repetition runs, in fresh processes and in turn (the order alternating),

    python SCRIPT.py                                  (plain)
    python -m inference.cli watch SCRIPT.py           (watched, default cadence and K)

and records the whole process's wall time and the training loop's own time (the script prints
it; it is the only line whose text differs between the two runs), and from the run directory
the time ``watch`` spent observing against the time spent in ``svi.step`` (immune to the
machine's drift, which between processes is large on a shared machine): the script times its
own ``svi.step`` calls, which under ``watch`` include the observation, and ``watch`` times the
same calls without it; their ratio is the cost of watching the loop, measured in one process. Medians over repetitions, the
ratio watched / plain of each, and the paired ratio (median of the per-repetition ratios,
robust to the machine's drift) are printed. The whole-process figure includes what only
``watch`` does once: importing elbo-lab, L_K with K = 1000 on the last step's arguments, and the
figures.

    .venv/bin/python benchmarks/watch_overhead.py [--steps 2000] [--reps 5]
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

SCRIPT = """
import sys
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch import nn

from inference.data import load_digits

torch.set_num_threads(1)
pyro.set_rng_seed(0)
data = load_digits().train.float()


class Encoder(nn.Module):
    def __init__(self, x_dim, z_dim, hidden_dim):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(x_dim, hidden_dim), nn.Softplus())
        self.loc = nn.Linear(hidden_dim, z_dim)
        self.log_scale = nn.Linear(hidden_dim, z_dim)

    def forward(self, x):
        hidden = self.hidden(x)
        return self.loc(hidden), torch.exp(self.log_scale(hidden))


class VAE(nn.Module):
    def __init__(self, x_dim=64, z_dim=10, hidden_dim=200):
        super().__init__()
        self.encoder = Encoder(x_dim, z_dim, hidden_dim)
        self.decoder = nn.Sequential(
            nn.Linear(z_dim, hidden_dim), nn.Softplus(), nn.Linear(hidden_dim, x_dim), nn.Sigmoid()
        )
        self.z_dim = z_dim

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            probs = self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(probs, validate_args=False).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


vae = VAE()
svi = SVI(vae.model, vae.guide, Adam({"lr": 1.0e-3}), loss=Trace_ELBO())
steps = int(sys.argv[1])
start = time.perf_counter()
step, in_step = 0, 0.0
while step < steps:
    for x in torch.split(data[torch.randperm(len(data))], 128):
        t = time.perf_counter()
        loss = svi.step(x)
        in_step += time.perf_counter() - t
        step += 1
        if step == steps:
            break
    print(f"step {step} loss {loss:.4f}")
print(f"loop seconds {time.perf_counter() - start:.3f} in svi.step {in_step:.4f}")
"""


def _run(argv: list[str], cwd: str) -> tuple[float, float, float, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    start = time.perf_counter()
    out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    lines = out.stdout.splitlines()
    words = lines[-1].split()
    return wall, float(words[2]), float(words[-1]), "\n".join(lines[:-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="SVI steps of the script (2000)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (5)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "vae_script.py"
        script.write_text(SCRIPT)
        plain_cmd = [sys.executable, str(script), str(args.steps)]
        results: dict[str, list[tuple[float, float]]] = {"plain": [], "watched": []}
        shares, inner = [], []
        for rep in range(args.reps):
            run_dir = Path(tmp) / f"run{rep}"
            watch_cmd = [sys.executable, "-m", "inference.cli", "watch", "--run-dir", str(run_dir)]
            watch_cmd += [str(script), str(args.steps)]
            order = [("plain", plain_cmd), ("watched", watch_cmd)]
            outputs = {}
            for name, cmd in order if rep % 2 == 0 else order[::-1]:
                wall, loop, in_step, stdout = _run(cmd, tmp)
                results[name].append((wall, loop))
                if name == "watched":
                    watched_in_step = in_step
                outputs[name] = stdout
            if outputs["plain"] != outputs["watched"]:
                raise SystemExit("the watched script printed other numbers than the plain one")
            rows = (run_dir / "metrics.jsonl").read_text().count("\n")
            (fit,) = json.loads((run_dir / "watch.json").read_text())["fits"]
            shares.append(fit["observe_seconds"] / fit["seconds"])
            # one process, one moment: svi.step as the script timed it (observation included)
            # against the same steps as watch timed them (observation excluded)
            inner.append(watched_in_step / fit["seconds"])
            print(
                f"rep {rep}: plain {results['plain'][-1][0]:.2f} s (loop "
                f"{results['plain'][-1][1]:.2f}), watched {results['watched'][-1][0]:.2f} s "
                f"(loop {results['watched'][-1][1]:.2f}), {rows} rows, observing "
                f"{shares[-1]:.1%} of the steps' time",
                flush=True,
            )
    print(f"\n{args.steps} steps, {args.reps} repetitions, medians (seconds):")
    print("| | plain | watched | ratio | paired ratio |")
    print("|---|---:|---:|---:|---:|")
    for i, what in enumerate(("whole process", "training loop")):
        plain = [r[i] for r in results["plain"]]
        watched = [r[i] for r in results["watched"]]
        paired = statistics.median(w / p for w, p in zip(watched, plain, strict=True))
        mp, mw = statistics.median(plain), statistics.median(watched)
        print(f"| {what} | {mp:.2f} | {mw:.2f} | {mw / mp:.3f} | {paired:.3f} |")
    print(
        f"observing (decompositions and row writes, timed inside the watched process): "
        f"median {statistics.median(shares):.1%} of the time in svi.step"
    )
    print(
        "svi.step as the watched script timed it / the same steps without observation, in one "
        f"process: median {statistics.median(inner):.3f} (range {min(inner):.3f}-{max(inner):.3f})"
    )


if __name__ == "__main__":
    main()
