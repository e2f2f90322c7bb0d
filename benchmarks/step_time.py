"""Training-step time: plain PyTorch vs elbo-lab's step vs stock Pyro SVI, interleaved.

One process, one data set (the binarized digits), the same VAE (64-200-10, softplus), Adam at
lr 1e-3, mini-batches of one shuffled epoch (the ragged last batch included) or full batch.
Each repetition runs one epoch of every implementation in turn; medians over repetitions, their
ratios to the plain-PyTorch step ("ratio") and the median of the ratios taken within each
repetition ("paired", robust to the machine's drift) are printed.

Implementations:
    torch          the reference: hand-written VAE, BCE-with-logits (sum) + analytic KL,
                   torch.optim.Adam with its defaults.
    torch fused    the same with torch.optim.Adam(fused=True), to show what the optimizer alone
                   is worth.
    elbo-lab       what ``fit`` runs by default (TrainConfig()): TraceMeanField_ELBO, compiled
                   because the VAE is declared static (``--jit auto``), as an ELBO module, one
                   fused Adam (``inference.train.adam``), loss and gradient-norm checks.
                   Each batch shape runs eagerly for its first ``EXPORT_AFTER_CALLS`` calls
                   (10), then as the exported graph, as in ``fit``; the warm-up epochs pass
                   that point for every batch shape, the ragged last one included, so the
                   timed epochs are those of ``fit`` from its 12th epoch on.
    elbo-lab eager the same with ``--jit off``: Pyro's TraceMeanField_ELBO run eagerly.
    pyro SVI       SVI + Trace_ELBO + pyro.optim.Adam, as in Pyro's tutorials.

Before timing, the losses of all implementations are checked for shared noise and parameters.

    python benchmarks/step_time.py [--reps 15] [--device cpu|cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.data import load_digits  # noqa: E402
from inference.train import (  # noqa: E402
    TrainConfig,
    _all_finite,
    _collect_params,
    adam,
    make_elbo,
    resolve_estimator,
)
from models.vae import VAE  # noqa: E402

LATENT, HIDDEN, LR = 10, 200, 1e-3
MIN_STEPS = 12  # steps per implementation and repetition (an epoch, repeated for full batch)
WARMUP_EPOCHS = 12


class TorchVAE(nn.Module):
    """The reference: the same networks written directly in PyTorch."""

    def __init__(self, data_dim: int):
        super().__init__()
        self.body = nn.Linear(data_dim, HIDDEN)
        self.loc = nn.Linear(HIDDEN, LATENT)
        self.log_scale = nn.Linear(HIDDEN, LATENT)
        self.dec_hidden = nn.Linear(LATENT, HIDDEN)
        self.dec_out = nn.Linear(HIDDEN, data_dim)

    def loss(self, x: torch.Tensor, num_data: int, analytic_kl: bool = True) -> torch.Tensor:
        """-ELBO of x (B, D), scaled by N / B: BCE(x; decoder(z)) + KL(q || N(0, I))."""
        h = F.softplus(self.body(x))
        loc, log_scale = self.loc(h), self.log_scale(h)
        scale = torch.exp(log_scale)
        z = loc + scale * torch.empty_like(loc).normal_()
        logits = self.dec_out(F.softplus(self.dec_hidden(z)))
        neg_log_px = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        if analytic_kl:  # KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1) / 2 - log s
            kl = (0.5 * (loc**2 + scale**2 - 1) - log_scale).sum()
        else:  # log q(z) - log p(z) at the drawn z
            eps = (z - loc) / scale
            kl = (0.5 * (z**2 - eps**2) - log_scale).sum()
        return (neg_log_px + kl) * (num_data / x.shape[0])


def copy_into(vae: VAE, ref: TorchVAE) -> None:
    """Give the Pyro VAE the reference's weights."""
    pairs = [
        (vae.encoder.body[0], ref.body),
        (vae.encoder.loc, ref.loc),
        (vae.encoder.log_scale, ref.log_scale),
        (vae.decoder.net[0], ref.dec_hidden),
        (vae.decoder.net[2], ref.dec_out),
    ]
    with torch.no_grad():
        for a, b in pairs:
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)


def same_vae(x_all: torch.Tensor, seed: int) -> VAE:
    """The Pyro VAE with the reference's initial weights for ``seed``: every implementation
    starts from the same point (and the cost of activations, which depends on their values,
    is compared like for like)."""
    torch.manual_seed(seed)
    ref = TorchVAE(x_all.shape[1]).to(x_all)
    vae = VAE(x_all.shape[1], LATENT, (HIDDEN,)).to(x_all)
    copy_into(vae, ref)
    return vae


def torch_step(x_all: torch.Tensor, seed: int, fused: bool = False) -> Callable:
    torch.manual_seed(seed)
    ref = TorchVAE(x_all.shape[1]).to(x_all)
    optimizer = torch.optim.Adam(ref.parameters(), lr=LR, fused=fused or None)
    n = x_all.shape[0]

    def step(x):
        loss = ref.loss(x, n)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


class _Store:
    """Each Pyro implementation keeps its own parameters in the global param store."""

    def __init__(self):
        self.state = pyro.get_param_store().get_state()

    def activate(self):
        store = pyro.get_param_store()
        store.clear()
        store.set_state(self.state)


def elbo_lab_step(x_all, batch, seed, **options) -> tuple[Callable, _Store]:
    """The step of ``inference.train.fit`` with ``TrainConfig(**options)``."""
    pyro.clear_param_store()
    config = TrainConfig(**options)
    torch.manual_seed(seed)
    vae = same_vae(x_all, seed)
    n = x_all.shape[0]
    kwargs = {"num_data": n}
    estimator = resolve_estimator(config, vae.model, vae.guide, x_all[:batch], **kwargs)
    loss_fn = make_elbo(estimator, config.num_particles)(vae.model, vae.guide)
    with pyro.validation_enabled(True):
        _, params = _collect_params(loss_fn, (x_all[:batch],), kwargs)
    optimizer = adam(params, LR)

    def step(x):
        with pyro.validation_enabled(config.validate):
            loss = loss_fn(x, **kwargs)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(loss_value)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not _all_finite([p.grad for p in params]):
            raise FloatingPointError("gradient")
        optimizer.step()
        return loss_value

    return step, _Store()


def svi_step(x_all, seed) -> tuple[Callable, _Store]:
    pyro.clear_param_store()
    torch.manual_seed(seed)
    vae = same_vae(x_all, seed)
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": LR}), pyro.infer.Trace_ELBO())
    n = x_all.shape[0]
    with pyro.validation_enabled(False):
        svi.step(x_all[:2], num_data=n)  # create the parameters
    return (lambda x: svi.step(x, num_data=n)), _Store()


def check_losses(x: torch.Tensor) -> list[tuple[str, float]]:
    """Relative differences of each Pyro loss from the reference's for shared noise (float64)."""
    x = x.double()
    n = x.shape[0]
    torch.manual_seed(0)
    ref = TorchVAE(x.shape[1]).double()
    vae = VAE(x.shape[1], LATENT, (HIDDEN,)).double()
    copy_into(vae, ref)
    rows = []
    for name in ("trace", "jit", "meanfield", "jit-meanfield", "svi"):
        pyro.clear_param_store()
        analytic = "meanfield" in name
        torch.manual_seed(1)
        expected = ref.loss(x, n, analytic_kl=analytic).item()
        torch.manual_seed(1)
        with pyro.validation_enabled(False):
            if name == "svi":
                svi = pyro.infer.SVI(
                    vae.model, vae.guide, pyro.optim.Adam({"lr": 0.0}), pyro.infer.Trace_ELBO()
                )
                got = svi.evaluate_loss(x, num_data=n)
            else:
                elbo = make_elbo(name)
                if hasattr(elbo, "export_after"):  # the compiled ones: check the graph itself
                    elbo.export_after = 0
                got = elbo(vae.model, vae.guide)(x, num_data=n).item()
        rows.append((name, abs(got - expected) / abs(expected)))
    return rows


def batches(n: int, batch: int, epoch: int, device) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).to(device)
    return [order[i : i + batch] for i in range(0, n, batch)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions (15)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, 0 = default (1)")
    parser.add_argument("--batch-sizes", default="128,full")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x_all = load_digits().train.float().to(device)
    n = x_all.shape[0]
    print(
        f"torch {torch.__version__}, pyro {pyro.__version__}, device {device}, "
        f"threads {torch.get_num_threads()}, digits train {tuple(x_all.shape)}"
    )

    print("\nloss vs the plain-PyTorch loss, shared noise and weights (float64, full batch):")
    for name, rel in check_losses(load_digits().train.to(device)):
        kl = "analytic KL" if "meanfield" in name else "Monte-Carlo KL"
        print(f"  {name:14s} |rel. diff| = {rel:.1e}  ({kl})")

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for spec in args.batch_sizes.split(","):
        batch = n if spec == "full" else int(spec)
        impls = {"torch": (torch_step(x_all, 0), None)}
        impls["torch fused"] = (torch_step(x_all, 0, fused=True), None)
        impls["elbo-lab"] = elbo_lab_step(x_all, batch, 0)
        impls["elbo-lab eager"] = elbo_lab_step(x_all, batch, 0, jit="off")
        impls["pyro SVI"] = svi_step(x_all, 0)
        times = {k: [] for k in impls}
        # warm-up epochs: past the first EXPORT_AFTER_CALLS (10) calls of every batch shape,
        # which run eagerly, and their export (caches, allocator)
        for rep in range(-WARMUP_EPOCHS, args.reps):
            rows = batches(n, batch, rep + WARMUP_EPOCHS, device)
            rows = (rows * math.ceil(MIN_STEPS / len(rows)))[: max(MIN_STEPS, len(rows))]
            for name, (step, store) in impls.items():
                if store is not None:
                    store.activate()
                sync()
                t0 = time.perf_counter()
                for r in rows:
                    step(x_all[r])
                sync()
                if rep >= 0:
                    times[name].append((time.perf_counter() - t0) / len(rows))
        base = statistics.median(times["torch"])
        # ratios within one repetition (the same moment of the machine), then their median
        paired = {
            k: statistics.median(a / b for a, b in zip(t, times["torch"], strict=True))
            for k, t in times.items()
        }
        label = f"full batch ({n})" if batch == n else f"batch {batch}"
        print(
            f"\n{label}: median ms/step over {args.reps} interleaved epochs "
            f"({max(MIN_STEPS, math.ceil(n / batch))} steps each)"
        )
        print(f"  {'implementation':16s} {'ms/step':>8s} {'IQR':>13s} {'ratio':>6s} {'paired':>6s}")
        for name, t in times.items():
            q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0], t[0], t[0]]
            med = statistics.median(t)
            print(
                f"  {name:16s} {med * 1e3:8.3f} {q[0] * 1e3:6.2f}-{q[2] * 1e3:<6.2f} "
                f"{med / base:6.2f} {paired[name]:6.2f}"
            )


if __name__ == "__main__":
    main()
