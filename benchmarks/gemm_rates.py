"""The matrix products of one VAE training step, library by library, on one core.

Why NumPyro's jitted step is faster than ours at the MNIST size: for the VAE D-H-L
(``--scale``; by default the digits' 64-200-10 and the MNIST-sized 784-400-20) at batch 128, each
matrix product of one training step is timed alone, in the layout the step uses it:

* forward, ``x @ W.T + b`` for each layer (``torch.addmm``, as ``F.linear`` runs it);
* backward, the weight gradient ``g.T @ x`` of each layer and the input gradient ``g @ W`` of
  each layer but the first (its input is the data).

Each product runs through:

* **torch**: PyTorch's own call (``torch.addmm`` / ``torch.mm``: the BLAS of the wheel, MKL on
  x86), as the eager step, plain PyTorch and elbo-lab's exported graph all run it;
* **numpy**: ``numpy.matmul`` on the same arrays (OpenBLAS in NumPy's wheels);
* **onednn**: forward products only, through PyTorch's oneDNN layout (``Tensor.to_mkldnn``,
  then ``F.linear``, then ``to_dense``; the conversions are timed in). Measured, not used by
  elbo-lab: see BENCHMARKS.md;
* **xla**: ``jax.jit`` of the same expression (what NumPyro's step compiles to), when JAX is
  installed (the benchmark extra, ``make bench``); otherwise the column says so.

The process is pinned to one core and every library runs one thread, as the step benchmarks
do. Each figure is the best of ``--reps`` rounds of ``--calls`` calls, the libraries interleaved
round by round. Prints microseconds per product, GFLOP/s, and for the whole step the total time
of its products per library and its ratio to torch's.

    python benchmarks/gemm_rates.py [--scale 64,200,10 --scale 784,400,20] [--reps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.step_parts import _best_us  # noqa: E402

SCALES = ("64,200,10", "784,400,20")
BATCH = 128


@contextlib.contextmanager
def _one_core():
    """One core and one thread for every library (set before JAX starts its CPU client, and
    before NumPy's OpenBLAS counts its cores when this runs as a program); the process's
    environment, affinity and torch threads are restored after. What reads its settings once
    keeps them: a JAX CPU client first started here stays single-threaded (``XLA_FLAGS``), and
    threads started here (XLA's, OpenBLAS's) stay on the one core."""
    environ = dict(os.environ)
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    threads = None
    try:  # everything changed below is restored, also when a step of it fails
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(name, "1")
        if cores is not None:
            os.sched_setaffinity(0, {min(cores)})
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
    finally:
        if threads is not None:
            torch.set_num_threads(threads)
        if cores is not None:
            os.sched_setaffinity(0, cores)
        os.environ.clear()
        os.environ.update(environ)


def step_products(d: int, h: int, latent: int, batch: int = BATCH) -> list[tuple[str, int, int]]:
    """The VAE's training-step products as ``(what, n_in, n_out)``, ``what`` one of
    ``fwd``/``dW``/``dX``: encoder D->H, its two heads H->L (location, log-scale), decoder
    L->H and H->D, as :class:`models.vae.VAE` builds them."""
    layers = [("encoder", d, h, False), ("loc", h, latent, True), ("log-scale", h, latent, True)]
    layers += [("decoder 1", latent, h, True), ("decoder 2", h, d, True)]
    products = []
    for name, n_in, n_out, input_grad in layers:
        products.append((f"fwd {name}", n_in, n_out))
        products.append((f"dW {name}", n_in, n_out))
        if input_grad:
            products.append((f"dX {name}", n_in, n_out))
    return products


def mkn(what: str, n_in: int, n_out: int, batch: int = BATCH) -> tuple[int, int, int]:
    """``(m, k, n)`` of the product ``what`` of a layer ``n_in -> n_out``: an ``(m, k)`` matrix
    times a ``(k, n)`` one."""
    return {
        "fwd": (batch, n_in, n_out),
        "dW": (n_out, batch, n_in),
        "dX": (batch, n_out, n_in),
    }[what.split()[0]]


def _callables(what: str, n_in: int, n_out: int, batch: int, jax_mods) -> dict:
    """The product ``what`` (``fwd ...``, ``dW ...``, ``dX ...``) per library, on the same values."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, n_in, generator=g)
    w = torch.randn(n_out, n_in, generator=g)
    b = torch.randn(n_out, generator=g)
    grad = torch.randn(batch, n_out, generator=g)
    xn, wn, bn, gn = x.numpy(), w.numpy(), b.numpy(), grad.numpy()
    kind = what.split()[0]
    calls: dict = {}
    if kind == "fwd":
        calls["torch"] = lambda: torch.addmm(b, x, w.t())
        calls["numpy"] = lambda: np.matmul(xn, wn.T) + bn
        calls["onednn"] = lambda: F.linear(x.to_mkldnn(), w, b).to_dense()
    elif kind == "dW":
        calls["torch"] = lambda: torch.mm(grad.t(), x)
        calls["numpy"] = lambda: np.matmul(gn.T, xn)
    else:
        calls["torch"] = lambda: torch.mm(grad, w)
        calls["numpy"] = lambda: np.matmul(gn, wn)
    if jax_mods is not None:
        jax, jnp = jax_mods
        xj, wj, bj, gj = (jnp.asarray(a) for a in (xn, wn, bn, gn))
        if kind == "fwd":
            fn, args = jax.jit(lambda x, w, b: x @ w.T + b), (xj, wj, bj)
        elif kind == "dW":
            fn, args = jax.jit(lambda g, x: g.T @ x), (gj, xj)
        else:
            fn, args = jax.jit(lambda g, w: g @ w), (gj, wj)
        calls["xla"] = lambda: fn(*args).block_until_ready()
    return calls


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", action="append", help="D,H,L of the VAE (repeatable)")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--calls", type=int, default=0, help="calls per round (0: by size)")
    args = parser.parse_args(argv)
    with _one_core():
        return _measure(args)


def _measure(args: argparse.Namespace) -> dict:
    import torch

    try:
        import jax
        import jax.numpy as jnp

        jax_mods = (jax, jnp)
    except ImportError:
        jax_mods = None
        print("JAX is not installed (make bench installs it): no xla column")
    libraries = ["torch", "numpy", "onednn"] + (["xla"] if jax_mods else [])
    print(
        f"one core, one thread; torch {torch.__version__}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}; batch {args.batch}; best of {args.reps}"
    )
    results: dict = {}
    for scale in args.scale or SCALES:
        d, h, latent = (int(v) for v in scale.split(","))
        print(f"\nVAE {d}-{h}-{latent}: microseconds per product (GFLOP/s)")
        print(f"{'product':22s} {'m x k x n':>16s}" + "".join(f"{n:>16s}" for n in libraries))
        totals = dict.fromkeys(libraries, 0.0)
        fwd_totals = dict.fromkeys(libraries, 0.0)
        for what, n_in, n_out in step_products(d, h, latent, args.batch):
            calls = _callables(what, n_in, n_out, args.batch, jax_mods)
            flops = 2.0 * args.batch * n_in * n_out
            n = args.calls or max(3, min(2000, int(4e8 / flops)))
            for call in calls.values():  # warm: JAX compiles, oneDNN creates its primitive
                for _ in range(3):
                    call()
            rounds: dict = {name: [] for name in calls}
            for _ in range(args.reps):  # libraries interleaved round by round
                for name, call in calls.items():
                    rounds[name].append(_best_us(call, 1, n))  # one round's microseconds
            best = {name: min(v) for name, v in rounds.items()}
            kind = what.split()[0]
            shape = mkn(what, n_in, n_out, args.batch)
            cells = []
            for name in libraries:
                if name in best:
                    us = best[name]
                    totals[name] += us
                    if kind == "fwd":
                        fwd_totals[name] += us
                    cells.append(f"{us:8.1f} ({flops / us / 1e3:4.0f})")
                else:
                    cells.append(f"{'-':>15s}")
            print(
                f"{what:22s} {'x'.join(map(str, shape)):>16s}" + "".join(f"{c:>16s}" for c in cells)
            )
            results[(scale, what)] = best
        whole = {n: t for n, t in totals.items() if n != "onednn"}
        print(
            f"{'all products of a step':39s}"
            + "".join(f"{whole[n]:16.1f}" if n in whole else f"{'-':>16s}" for n in libraries)
        )
        print(
            f"{'  / torch':39s}"
            + "".join(
                f"{whole[n] / whole['torch']:16.2f}" if n in whole else f"{'-':>16s}"
                for n in libraries
            )
        )
        print(
            f"{'forward products only':39s}" + "".join(f"{fwd_totals[n]:16.1f}" for n in libraries)
        )
        print(
            f"{'  / torch':39s}"
            + "".join(f"{fwd_totals[n] / fwd_totals['torch']:16.2f}" for n in libraries)
        )
        results[(scale, "step")] = whole
        results[(scale, "forward")] = fwd_totals
    return results


if __name__ == "__main__":
    main()
