"""Benchmark: importance-sampled evidence L_K, elbo-lab's Pyro version against plain PyTorch.

Both compute, for the first ``--num-images`` digits test images and K draws per image,

    log w_k = log p(x | z_k) + log N(z_k; 0, I) - log N(z_k; m(x), diag s(x)^2),
    L_K     = logsumexp_k(log w_k) - log K        (Burda et al. 2016)

with the same VAE (64-200-10 by default) and the same chunking (``chunk`` draws of all images
at once, chunk = CHUNK_ROWS // N unless ``--chunk-size``):

    elbo-lab:       inference.evidence.iwae(vae.model, vae.guide, x, num_samples=K)
                    (model and guide inside a particle plate; the VAE is declared static,
                    so each chunk runs as a traced graph, the same draws and values as eager)
    plain PyTorch:  encoder once, then per chunk z = m + s * eps, decoder, BCE-with-logits

Throughput (images/s = N / seconds) is timed in this process, the two implementations and the
values of K interleaved within each repeat; medians over repeats and the ratio elbo-lab / plain
are reported. Peak extra memory is measured in a fresh subprocess per (implementation, K): the
resident set size just before the call against ``ru_maxrss`` after it (warm-up run first, so
library initialization is not counted).

    .venv/bin/python benchmarks/evidence.py                     # fresh VAE, K = 1000 and 5000
    .venv/bin/python benchmarks/evidence.py --run-dir runs/default   # a trained VAE
    .venv/bin/python benchmarks/evidence.py --ks 10 --num-images 20 --repeats 1 --no-memory

Reference: Y. Burda, R. Grosse and R. Salakhutdinov, "Importance Weighted Autoencoders", 2016.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time

import pyro
import torch
import torch.nn.functional as F

from inference.data import load_digits
from inference.evidence import CHUNK_ROWS, iwae
from inference.run import load_run
from models.vae import VAE

IMPLEMENTATIONS = ("elbo-lab", "plain")


def setup(run_dir: str | None, num_images: int, seed: int) -> tuple[VAE, torch.Tensor, str]:
    """The VAE (trained from ``run_dir`` or freshly initialized with ``seed``) and N test images."""
    if run_dir:
        run = load_run(run_dir)
        vae, x, what = run.module, run.data.test, f"trained VAE from {run_dir}"
    else:
        pyro.set_rng_seed(seed)
        data = load_digits()
        vae, x = VAE(data.data_dim), data.test.to(torch.float32)
        what = f"freshly initialized VAE (seed {seed})"
    if num_images > x.shape[0]:
        raise SystemExit(f"--num-images: the test split has only {x.shape[0]} images")
    return vae, x[:num_images].contiguous(), what


@torch.no_grad()
def plain_iwae(vae: VAE, x: torch.Tensor, num_samples: int, chunk_size: int) -> torch.Tensor:
    """Per-image L_K ``(N,)`` in plain PyTorch, ``chunk_size`` draws of every image at a time."""
    loc, scale = vae.encoder.encode(x)  # (N, L)
    log_norm = 0.5 * math.log(2 * math.pi) * loc.shape[-1]
    chunks = []
    for start in range(0, num_samples, chunk_size):
        eps = torch.randn((min(chunk_size, num_samples - start), *loc.shape), dtype=loc.dtype)
        z = loc + scale * eps  # (c, N, L)
        log_q = -0.5 * (eps**2).sum(-1) - scale.log().sum(-1) - log_norm
        log_p_z = -0.5 * (z**2).sum(-1) - log_norm
        logits = vae.decoder(z)  # (c, N, D)
        bce = F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
        chunks.append((log_p_z - bce.sum(-1) - log_q).to(torch.float64))
    log_w = torch.cat(chunks)  # (K, N)
    return torch.logsumexp(log_w, 0) - math.log(num_samples)


def run_once(impl: str, vae: VAE, x: torch.Tensor, k: int, chunk: int) -> float:
    """L_K summed over images, in nats."""
    if impl == "plain":
        return float(plain_iwae(vae, x, k, chunk).sum())
    return iwae(vae.model, vae.guide, x, num_samples=k, chunk_size=chunk).lk


def _status_bytes(key: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS: resident now, VmHWM: its peak), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory(impl: str, k: int, args) -> dict:
    """In this (fresh) process: peak resident memory added by one call, in MiB.

    After a warm-up call the peak (VmHWM) is reset to the current RSS, so the peak after the
    call minus the RSS before it is what the call added. Without a resettable peak,
    ``ru_maxrss`` is used and the figure is exact only if the call set a new peak.
    """
    vae, x, _ = setup(args.run_dir, args.num_images, args.seed)
    chunk = args.chunk_size or max(1, CHUNK_ROWS // x.shape[0])
    run_once(impl, vae, x, min(k, 2 * chunk), chunk)  # warm-up: allocator and kernels
    resettable = _reset_peak()
    rss_before = _status_bytes("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run_once(impl, vae, x, k, chunk)
    if resettable:
        peak, exact = _status_bytes("VmHWM"), True
    else:
        maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak, exact = max(maxrss_before, maxrss_after), maxrss_after > maxrss_before
    mib = 2**20
    return {
        "implementation": impl,
        "num_samples": k,
        "extra_mib": (peak - rss_before) / mib,
        "exact": exact,  # False: only an upper bound
        "rss_before_mib": rss_before / mib,
    }


def _memory_in_subprocess(impl: str, k: int, args) -> dict:
    argv = [
        sys.executable,
        __file__,
        "--_memory",
        impl,
        str(k),
        "--num-images",
        str(args.num_images),
    ]
    argv += ["--seed", str(args.seed), "--threads", str(args.threads)]
    if args.run_dir:
        argv += ["--run-dir", args.run_dir]
    if args.chunk_size:
        argv += ["--chunk-size", str(args.chunk_size)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default=None, help="a trained VAE run (default: fresh VAE)")
    p.add_argument("--num-images", type=int, default=300)
    p.add_argument("--ks", type=int, nargs="+", default=[1000, 5000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--_memory", nargs=2, metavar=("IMPL", "K"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args._memory:
            print(json.dumps(measure_memory(args._memory[0], int(args._memory[1]), args)))
            return 0
        return _benchmark(args)
    finally:
        torch.set_num_threads(threads)


def _benchmark(args) -> int:
    vae, x, what = setup(args.run_dir, args.num_images, args.seed)
    n = x.shape[0]
    chunk = args.chunk_size or max(1, CHUNK_ROWS // n)
    seconds = {(impl, k): [] for impl in IMPLEMENTATIONS for k in args.ks}
    values = {(impl, k): [] for impl in IMPLEMENTATIONS for k in args.ks}
    run_once("elbo-lab", vae, x, chunk, chunk)  # warm-up
    run_once("plain", vae, x, chunk, chunk)
    for r in range(args.repeats):
        for k in args.ks:
            order = IMPLEMENTATIONS if r % 2 == 0 else IMPLEMENTATIONS[::-1]
            for impl in order:
                pyro.set_rng_seed(args.seed + r)
                t0 = time.perf_counter()
                values[impl, k].append(run_once(impl, vae, x, k, chunk))
                seconds[impl, k].append(time.perf_counter() - t0)
    rows = []
    for k in args.ks:
        row = {"num_samples": k, "chunk_size": chunk}
        for impl in IMPLEMENTATIONS:
            s = statistics.median(seconds[impl, k])
            row[f"{impl}_seconds"] = s
            row[f"{impl}_images_per_s"] = n / s
            row[f"{impl}_lk_per_image"] = statistics.median(values[impl, k]) / n
            if not args.no_memory:
                row[f"{impl}_extra_mib"] = _memory_in_subprocess(impl, k, args)["extra_mib"]
        row["throughput_ratio"] = row["elbo-lab_images_per_s"] / row["plain_images_per_s"]
        # the same repeat's two timings side by side: drifts of the machine cancel
        paired = [p / e for e, p in zip(seconds["elbo-lab", k], seconds["plain", k], strict=True)]
        row["paired_ratio_median"] = statistics.median(paired)
        row["paired_ratio_range"] = [min(paired), max(paired)]
        rows.append(row)
    figures = {
        "model": what,
        "num_images": n,
        "repeats": args.repeats,
        "threads": args.threads,
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(
        f"L_K on {n} digits test images, {what}; torch {torch.__version__}, pyro "
        f"{pyro.__version__}, {args.threads} threads, median of {args.repeats} interleaved repeats"
    )
    for row in rows:
        k = row["num_samples"]
        print(f"K = {k} (chunks of {row['chunk_size']} draws):")
        for impl in IMPLEMENTATIONS:
            mem = row.get(f"{impl}_extra_mib")
            mem_text = f", peak extra memory {mem:7.1f} MiB" if mem is not None else ""
            print(
                f"  {impl:<9} {row[f'{impl}_images_per_s']:9.1f} images/s "
                f"({row[f'{impl}_seconds']:.2f} s){mem_text}, "
                f"L_K = {row[f'{impl}_lk_per_image']:.3f} nats/image"
            )
        low, high = row["paired_ratio_range"]
        print(
            f"  elbo-lab / plain throughput: {row['throughput_ratio']:.2f} (ratio of medians); "
            f"{row['paired_ratio_median']:.3f} median of {args.repeats} paired repeats "
            f"(range {low:.3f}-{high:.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
