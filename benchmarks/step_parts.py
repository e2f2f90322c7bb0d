"""Where one training step of ``fit`` goes: the loss graph, backward, the optimizer, the loop.

In one process (one torch thread), the default VAE (``--scale D,H,L``; digits 64-200-10 by
default) on one batch of 128 rows cut as ``fit`` cuts it (``num_data`` = the training rows),
its loss exported first (as a run of a few hundred epochs is): the microseconds of the whole
step of :func:`inference.train.step` (loss, ``.item()``, finiteness checks, ``zero_grad``,
backward, ``Adam.step``) and of each part alone: the loss's forward, forward and backward, the
optimizer's step, ``zero_grad``, slicing the batch and the two context managers ``fit`` opens
per step. Each is the best of ``--reps`` rounds of ``--calls`` calls; the share column is of
the whole step. The parts overlap (forward is inside forward and backward), so they do not sum.

    python benchmarks/step_parts.py [--scale 64,200,10] [--reps 5] [--calls 2000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _best_us(call, reps: int, calls: int) -> float:
    """Microseconds per ``call()``, the best of ``reps`` rounds of ``calls`` calls."""
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - t) / calls * 1e6)
    return best


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="64,200,10", help="D,H,L of the VAE")
    parser.add_argument("--rows", type=int, default=1438, help="training rows (num_data)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)

    import pyro
    import torch

    import inference.traced_loss as traced_loss
    from inference.batching import default_batching, slicer
    from inference.train import TrainConfig, init, step
    from models.vae import VAE

    torch.set_num_threads(1)
    d, h, latent = (int(v) for v in args.scale.split(","))
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(args.rows, d, generator=g) < 0.13).float()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = VAE(d, latent_dim=latent, hidden_dims=(h,))
    cut = slicer(vae.model, (x,), {}, default_batching(vae.model))
    rows = torch.randperm(args.rows, generator=g)[: min(128, args.rows)]
    call = cut(rows, args.rows)
    state = init(vae.model, vae.guide, *call.args, config=TrainConfig(), **call.kwargs)
    with traced_loss.planned_calls(10**9):  # export after the eager calls, as a long run does
        for _ in range(20):
            state, _ = step(state, *call.args, **call.kwargs)
    traced = state.loss_fn.elbo.traced_loss(vae.model, vae.guide)  # the exported loss
    assert traced is not None and traced.graphs(), "the loss was not exported"

    def whole():
        step(state, *call.args, **call.kwargs)

    def forward():
        state.loss_fn(*call.args, **call.kwargs).item()

    def forward_backward():
        state.loss_fn(*call.args, **call.kwargs).backward()

    def contexts():
        with pyro.validation_enabled(False), traced_loss.planned_calls(1000):
            pass

    parts = {
        "whole step (inference.train.step)": whole,
        "loss forward and .item()": forward,
        "loss forward and backward": forward_backward,
        "optimizer.step (fused Adam)": state.optimizer.step,
        "optimizer.zero_grad": lambda: state.optimizer.zero_grad(set_to_none=True),
        "slicing the batch (fit's cut)": lambda: cut(rows, args.rows),
        "fit's two context managers": contexts,
    }
    before = traced.graph_calls
    us = {name: _best_us(f, args.reps, args.calls) for name, f in parts.items()}
    assert traced.graph_calls - before == 3 * args.reps * args.calls, "eager losses were timed"
    total = us["whole step (inference.train.step)"]
    print(
        f"VAE {d}-{h}-{latent}, batch {len(rows)}, one thread, best of {args.reps} x {args.calls}"
    )
    print(f"{'part':40s} {'us':>9s} {'share':>7s}")
    for name, value in us.items():
        print(f"{name:40s} {value:9.1f} {value / total:7.2f}")
    return us


if __name__ == "__main__":
    main()
