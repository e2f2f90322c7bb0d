"""One rank of the data-parallel checks in ``test_distributed.py``: ``distributed_worker.py OUT``.

Launched with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` set, as
``torchrun`` sets them. Rank 0 saves to ``OUT/results.pt``:

- ``gradient``: one step on an uneven split (32 + 31 rows) of a global batch of 63 rows, with
  the noise of each row carried in the data, so every rank uses the noise a single process
  would; the reduced gradient sum_r (b_r / B) grad loss_r;
- ``resume``: history and parameters of a 2-process run of 3 epochs, and of 2 epochs resumed to 3;

then all ranks run ``elbo-lab train`` (``inference.cli.main``) into ``OUT/cli``; last, rank 1
crashes (``os._exit(3)``) in a step and rank 0 writes the seconds until the error it got, and the
error, to ``OUT/dead_rank.txt`` (exit 2).
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import AffineTransform
from pyro.infer import Trace_ELBO

from inference.data import load_digits
from inference.distributed import DistributedError, World, init_from_env
from inference.train import TrainConfig, _collect_params, fit
from models.plate import data_plate
from models.vae import VAE

DATA_DIM, LATENT_DIM, GLOBAL_BATCH = 64, 2, 63
TINY = TrainConfig(  # every epoch evaluated: histories are compared row by row
    epochs=3, batch_size=64, seed=3, progress=False, eval_batch_size=100, eval_every=1
)


def shared_noise_pair(vae: VAE):
    """Model and guide on rows ``[pixels (D) | eps (L)]``: z = z_loc + z_scale * eps.

    The guide is q(z | x) = N(z_loc(x), z_scale(x)^2) written as an affine map of a point mass
    at the row's own standard-normal noise eps, with log q(z) = log N(eps; 0, I) - sum log z_scale;
    its reparameterized gradient is the VAE's for that eps, whichever process holds the row.
    """

    def model(x, num_data=None):
        return vae.model(x[:, :DATA_DIM], num_data)

    def guide(x, num_data=None):
        pyro.module("encoder", vae.encoder)
        pixels, eps = x[:, :DATA_DIM], x[:, DATA_DIM:]
        with data_plate(x, num_data):
            z_loc, z_scale = vae.encoder.encode(pixels)
            log_density = dist.Normal(0.0, 1.0).log_prob(eps).sum(-1)
            base = dist.Delta(eps, log_density=log_density, event_dim=1)
            q = dist.TransformedDistribution(base, [AffineTransform(z_loc, z_scale, event_dim=1)])
            return pyro.sample("z", q)

    return model, guide


def gradient_data() -> tuple[torch.Tensor, int]:
    """(global batch ``(63, D + L)`` in float64, N): digits with their rows' noise appended."""
    train = load_digits().train
    eps = torch.randn(GLOBAL_BATCH, LATENT_DIM, generator=torch.Generator().manual_seed(11))
    return torch.cat([train[:GLOBAL_BATCH], eps.double()], dim=1), train.shape[0]


def step_gradients(world: World) -> dict[str, torch.Tensor]:
    """Gradients of one step of the global batch, this rank's shard, reduced over ranks."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = VAE(DATA_DIM, LATENT_DIM, hidden_dims=(16,)).double()
    model, guide = shared_noise_pair(vae)
    x, n = gradient_data()
    loss_fn = Trace_ELBO()(model, guide)
    names, params = _collect_params(loss_fn, (x,), {"num_data": n})
    world.broadcast_(params)
    rows = torch.arange(GLOBAL_BATCH)
    mine = x[world.shard(rows)]
    loss_fn(mine, num_data=n).backward()
    world.all_reduce_gradients(params, weight=mine.shape[0] / GLOBAL_BATCH)
    return {name: p.grad.clone() for name, p in zip(names, params, strict=True)}


def small_digits() -> tuple[torch.Tensor, torch.Tensor]:
    digits = load_digits()
    return digits.train[:192].float(), digits.test[:64].float()


def train_small(world: World, config: TrainConfig, run_dir: Path, resume: bool = False):
    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)
    vae = VAE(DATA_DIM, LATENT_DIM, hidden_dims=(16,))
    train, test = small_digits()
    result = fit(
        vae.model,
        vae.guide,
        train,
        test=test,
        config=config,
        run_dir=run_dir,
        resume=resume,
        world=world,
    )
    params = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    return result.history, params


TRAIN_ARGS = ["--hidden-dims", "64", "--latent-dim", "4", "--epochs", "3", "--lr", "3e-3"]
TRAIN_ARGS += ["--seed", "1", "--no-progress", "--json", "--force"]


def main(out: Path) -> None:
    """Gradient, resume, ``elbo-lab train``, then the crash of rank 1 (exit codes 2 and 3)."""
    world = init_from_env("cpu", timeout=timedelta(seconds=30))
    results: dict[str, object] = {"world_size": world.size, "gradient": step_gradients(world)}
    straight = train_small(world, TINY, out / "straight")
    train_small(world, TrainConfig(**{**TINY.__dict__, "epochs": 2}), out / "resumed")
    resumed = train_small(world, TINY, out / "resumed", resume=True)
    results["resume"] = {"straight": straight, "resumed": resumed}
    if world.is_writer:
        torch.save(results, out / "results.pt")

    from inference import cli  # the command line joins this process group and leaves it open

    if cli.main(["train", *TRAIN_ARGS, "--run-dir", str(out / "cli")]) != 0:
        sys.exit(1)
    dead_rank(world, out)


def dead_rank(world: World, out: Path) -> None:
    """Rank 1 crashes in its first step; rank 0 writes the seconds and the error it got."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = VAE(DATA_DIM, LATENT_DIM, hidden_dims=(16,))
    calls = 0

    def dying_guide(x, num_data=None):
        nonlocal calls
        calls += 1
        # setup runs the guide 3 times (the guide-enumeration check, the estimator's choice,
        # the parameters' creation): call 4 is in the first step, after the broadcast
        if world.rank == 1 and calls == 4:
            os._exit(3)  # a crash: no exception, no goodbye to the process group
        return vae.guide(x, num_data)

    train, test = small_digits()
    start = time.perf_counter()
    try:
        fit(vae.model, dying_guide, train, test=test, config=TINY, world=world)
    except DistributedError as exc:
        (out / "dead_rank.txt").write_text(f"{time.perf_counter() - start:.2f}\n{exc}\n")
        # the process group's threads still wait on the dead peer: leave without tearing them
        # down (gloo may abort with "terminate called" at interpreter exit), as the CLI does
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
