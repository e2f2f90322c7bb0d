"""What ``torch.compile`` of the training step buys on this CPU: the plain VAE's step, eager
against compiled, before anyone builds it into ``fit``.

The step of ``benchmarks/plain_vae.py`` (BCE + analytic KL, batch 128, one thread) three ways,
each from the same initial weights:

    eager      forward, backward, ``torch.optim.Adam(fused=True)``: the reference
    fwd+bwd    ``torch.compile`` of the loss (inductor compiles its forward and backward
               through AOTAutograd), the fused Adam eager
    whole      also the optimizer's ``step`` compiled (Adam's default implementation, as
               ``torch.compile`` of an optimizer step requires), backward included above
    fwd+bwd-cpp  as fwd+bwd, with inductor's C++ wrapper (``options={"cpp_wrapper": True}``)
               calling the kernels instead of generated Python
    joint      one compiled call computes the loss and all its gradients
               (``torch.func.grad_and_value``: no autograd graph), the fused Adam eager;
    joint-cpp  the same with the C++ wrapper

Printed: the seconds the first two calls took (compiling), and the median over ``--reps``
rounds of the mean step time over ``--steps`` steps, with its ratio to eager. Before timing,
the compiled losses are checked against the eager loss for the same weights and noise
(``fallback_random``: the compiled loss draws ATen's noise, as elbo-lab's compiled graphs do).

    python benchmarks/compiled_step.py [--scale 64,200,10] [--steps 200] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.plain_vae import VAE, loss_function  # noqa: E402


def _model(d: int, h: int, latent: int) -> VAE:
    torch.manual_seed(0)
    return VAE(d, h, latent)


def _joint_step(vae: VAE, optimizer, loss_of, options: dict):
    """One compiled call for the loss and all its gradients (:func:`torch.func.grad_and_value`
    of the loss as a function of the weights, no autograd graph), then the fused Adam."""
    names = [name for name, _ in vae.named_parameters()]
    params = [p for _, p in vae.named_parameters()]

    def loss_of_weights(*weights):
        return loss_of(_Weights(vae, dict(zip(names, weights, strict=True))))

    joint = torch.compile(
        torch.func.grad_and_value(loss_of_weights, argnums=tuple(range(len(params)))),
        options=options,
    )

    def step() -> None:
        with torch.no_grad():
            grads, _ = joint(*(p.detach() for p in params))
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        optimizer.step()

    t0 = time.perf_counter()
    with torch.random.fork_rng():  # compiles; checked against the eager loss and gradients
        torch.manual_seed(1)
        want = loss_of(vae)
        want_grads = torch.autograd.grad(want, params)
        torch.manual_seed(1)
        with torch.no_grad():
            got_grads, got = joint(*(p.detach() for p in params))
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    step.compile_s = time.perf_counter() - t0
    return step


class _Weights:
    """``vae`` called with ``weights`` in place of its parameters (``functional_call``)."""

    def __init__(self, vae: VAE, weights: dict):
        self.vae, self.weights = vae, weights

    def __call__(self, x):
        return torch.func.functional_call(self.vae, self.weights, (x,))


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="64,200,10", help="data, hidden, latent sizes")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--ways", default="eager,fwd+bwd,whole")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    d, h, latent = (int(v) for v in args.scale.split(","))
    x = (torch.rand(128, d, generator=torch.Generator().manual_seed(0)) < 0.13).float()

    def loss_of(vae: VAE) -> torch.Tensor:
        logits, loc, log_scale = vae(x)
        return loss_function(logits, x, loc, log_scale) / x.shape[0]

    steps, compile_s = {}, {}
    for way in args.ways.split(","):
        vae = _model(d, h, latent)
        optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3, fused=way != "whole")
        # fallback_random: ATen's noise, so the compiled loss can be checked against eager's
        options = {"fallback_random": True, "cpp_wrapper": way.endswith("cpp")}
        compiled = torch.compile(loss_of, options=options)
        loss_fn = loss_of if way == "eager" else compiled
        update = torch.compile(optimizer.step) if way == "whole" else optimizer.step
        reference = _model(d, h, latent)
        with torch.random.fork_rng():  # the same weights and noise: the same loss
            torch.manual_seed(1)
            want = loss_of(reference)
            torch.manual_seed(1)
            got = loss_fn(vae)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

        def step(vae=vae, optimizer=optimizer, loss_fn=loss_fn, update=update) -> None:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(vae).backward()
            update()

        if way.startswith("joint"):
            step = _joint_step(vae, optimizer, loss_of, options)

        t0 = time.perf_counter()
        step(), step()
        compile_s[way] = time.perf_counter() - t0 + getattr(step, "compile_s", 0.0)
        steps[way] = step
    times: dict[str, list[float]] = {way: [] for way in steps}
    for _ in range(args.reps):
        for way, step in steps.items():  # interleaved
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[way].append((time.perf_counter() - t0) / args.steps * 1e3)
    base = statistics.median(times["eager"]) if "eager" in times else float("nan")
    print(f"VAE {d}-{h}-{latent}, batch 128, 1 thread: ms/step, median of {args.reps}")
    result = {}
    for way, ms in times.items():
        median = statistics.median(ms)
        result[way] = {"ms": median, "ratio": median / base, "compile_s": compile_s[way]}
        print(
            f"  {way:<8} {median:8.3f} ms  ratio {median / base:5.2f}  "
            f"first two calls {compile_s[way]:6.2f} s"
        )
    return result


if __name__ == "__main__":
    main()
