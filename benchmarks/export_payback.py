"""When exporting a loss graph pays: the export's cost against what each graph call saves.

In one fresh process (one torch thread), for the default digits VAE (64-200-10) trained as
``fit`` trains it (TraceMeanField_ELBO, ``num_data`` = 1438), at batch 128 and at the ragged
batch of 30: the seconds of the first :func:`torch.export` in the process (it also imports
the tracer; ``torch._dynamo`` is already loaded, as in ``fit``, by constructing the
optimizer) and of a later one, and the time of one loss and backward run eagerly (Pyro's
Python) and as the exported graph, median of ``--reps`` rounds of ``--calls`` calls each,
the two interleaved. Prints the calls after which an export pays for itself, to compare
with :data:`inference.traced_loss.FIRST_EXPORT_PAYS_AFTER_CALLS` and
:data:`~inference.traced_loss.EXPORT_PAYS_AFTER_CALLS`. With ``--compile``, the same for
``torch.compile`` of the batch-128 graph (its first two calls, forward and backward, with
inductor's cache in a fresh temporary directory: cold) against
:data:`~inference.traced_loss.COMPILE_PAYS_AFTER_CALLS`.

    python benchmarks/export_payback.py [--reps 7] [--calls 200] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _interleaved(ways: dict, call, args) -> dict[str, float]:
    """Median ms per ``call(way)`` over ``args.reps`` rounds of ``args.calls`` calls, the ways
    interleaved, after 20 warm-up calls of each."""
    for _ in range(20):
        for way in ways.values():
            call(way)
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.reps):
        for name, way in ways.items():
            t = time.perf_counter()
            for _ in range(args.calls):
                call(way)
            times[name].append((time.perf_counter() - t) / args.calls)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument(
        "--scale",
        default=None,
        help="D,H,L: a VAE of that size on 60,000 synthetic Bernoulli(0.13) rows, e.g. "
        "784,400,20 (MNIST-sized); default: the digits VAE",
    )
    args = parser.parse_args(argv)
    if args.compile:  # a cold cache: what a first long run on a machine pays
        import os
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")

    import pyro
    import torch

    from inference.data import load_digits
    from inference.estimators import JitTraceMeanField_ELBO
    from models.vae import VAE

    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    if args.scale:
        d, h, latent = (int(v) for v in args.scale.split(","))
        x_all = (torch.rand(60000, d, generator=torch.Generator().manual_seed(0)) < 0.13).float()
        vae = VAE(d, latent_dim=latent, hidden_dims=(h,))
    else:
        x_all = load_digits().train.float()
        vae = VAE(x_all.shape[1])
    n = len(x_all)
    params = list(vae.parameters())
    torch.optim.Adam(params)  # as fit does before the first step: it imports torch._dynamo
    figures: dict[str, float] = {}
    for rows, label in ((128, "batch 128"), (30, "batch 30")):
        x = x_all[:rows]
        eager = JitTraceMeanField_ELBO(export_after=10**9)
        graph = JitTraceMeanField_ELBO(export_after=0)

        def call(elbo, x=x):
            loss = elbo.differentiable_loss(vae.model, vae.guide, x, num_data=n)
            torch.autograd.grad(loss, params)

        t = time.perf_counter()
        call(graph)  # the export
        which = "first export" if not figures else "later export"
        figures[f"{which} (s)"] = time.perf_counter() - t
        for name, ms in _interleaved({"eager": eager, "graph": graph}, call, args).items():
            figures[f"{label}, {name} (ms)"] = ms
        figures[f"{label}, saved per call (ms)"] = (
            figures[f"{label}, eager (ms)"] - figures[f"{label}, graph (ms)"]
        )
    if args.compile:
        x = x_all[:128]
        graph = JitTraceMeanField_ELBO(export_after=0)
        compiled = JitTraceMeanField_ELBO(export_after=0, compile_after=1)

        def call(elbo, x=x):
            loss = elbo.differentiable_loss(vae.model, vae.guide, x, num_data=n)
            torch.autograd.grad(loss, params)

        call(graph), call(compiled)  # exports; the compiled one compiles at its second call
        t = time.perf_counter()
        call(compiled), call(compiled)
        figures["compile, cold cache (s)"] = time.perf_counter() - t
        assert compiled.traced_loss(vae.model, vae.guide).compiled == 1, "did not compile"
        ways = {"graph": graph, "compiled": compiled}
        for name, ms in _interleaved(ways, call, args).items():
            figures[f"batch 128 (compile run), {name} (ms)"] = ms
        saved = (
            figures["batch 128 (compile run), graph (ms)"]
            - figures["batch 128 (compile run), compiled (ms)"]
        )
        figures["batch 128, compiling saves per call (ms)"] = saved
        figures["compile pays after (calls; negative: never)"] = (
            figures["compile, cold cache (s)"] / saved * 1e3 if saved else float("inf")
        )
    for label in ("batch 128", "batch 30"):
        saved = figures[f"{label}, saved per call (ms)"] / 1e3
        figures[f"{label}: first export pays after (calls)"] = figures["first export (s)"] / saved
        figures[f"{label}: later export pays after (calls)"] = figures["later export (s)"] / saved
    for key, value in figures.items():
        print(f"{key:<45} {value:9.3f}")
    return figures


if __name__ == "__main__":
    main()
