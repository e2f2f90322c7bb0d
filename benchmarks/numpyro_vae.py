"""The peer a user would pick for speed: the same VAE trained by NumPyro's jitted SVI.

NumPyro's ``examples/vae.py`` shape on elbo-lab's default problem: encoder 64-200-(10, 10) and
decoder 10-200-64 with softplus (``jax.example_libraries.stax``), z scale = exp(log-scale head),
``TraceMeanField_ELBO`` (analytic KL), ``numpyro.optim.Adam(1e-3)``, batch 128 with the ragged
last batch (a second compiled shape), the mini-batch scaled to the whole data (N / B), and a
test-loss pass (``svi.evaluate``, jitted) every epoch. ``--synthetic ROWS`` trains on ROWS x
``--data-dim`` Bernoulli(0.13) pixels instead (MNIST-sized with ``--synthetic 60000 --data-dim
784 --hidden 400 --latent 20``); ``--time-steps K`` prints the mean (and median) of K jitted steps
after compilation instead of training. ``--threads 1`` restricts XLA's CPU backend to one thread
and pins the process to one core (XLA still runs large matrix products on a second thread).
``--device cuda`` runs on JAX's GPU backend (the CPU is the default, also where JAX has a GPU).

An optional extra (``pip install -e .[bench]``, ``make bench``): without NumPyro and JAX the
script says so and exits with status 0.

    python benchmarks/numpyro_vae.py [--epochs 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--latent", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="1: one XLA CPU thread")
    parser.add_argument("--synthetic", type=int, default=0, help="rows of synthetic data")
    parser.add_argument("--data-dim", type=int, default=784, help="columns of synthetic data")
    parser.add_argument("--time-steps", type=int, default=0, help="time K steps, do not train")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="cpu or cuda (JAX's GPU backend)"
    )
    args = parser.parse_args(argv)
    if args.threads == 1:  # before JAX starts its CPU client
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
        # JAX 0.10's CPU runtime still runs large matrix products on a second thread (CPU time
        # twice the wall time at the MNIST size): pinning the process to one core makes it
        # one core's worth, as the PyTorch programs' one thread is.
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    try:
        import jax
        import jax.numpy as jnp
        import numpy as np
        import numpyro
        import numpyro.distributions as dist
        from jax.example_libraries import stax
        from numpyro.infer import SVI, TraceMeanField_ELBO
    except ImportError as exc:
        print(
            f"numpyro_vae: skipped, NumPyro/JAX not installed ({exc.name}); pip install -e .[bench]"
        )
        return 0
    # before JAX starts its backends; "cuda", the platform's name (NumPyro 0.22 refuses "gpu")
    numpyro.set_platform(args.device)

    if args.synthetic:
        rng = np.random.default_rng(args.seed)
        rows = args.synthetic + args.synthetic // 6
        x = (rng.random((rows, args.data_dim), dtype=np.float32) < 0.13).astype(np.float32)
        train_x, test_x = x[: args.synthetic], x[args.synthetic :]
    else:
        from inference.data import load_digits

        digits = load_digits()
        train_x = digits.train.numpy().astype(np.float32)
        test_x = digits.test.numpy().astype(np.float32)
    n, d, batch = len(train_x), train_x.shape[1], args.batch_size
    hidden, latent = args.hidden, args.latent

    encoder_nn = stax.serial(
        stax.Dense(hidden),
        stax.Softplus,
        stax.FanOut(2),
        stax.parallel(stax.Dense(latent), stax.Dense(latent)),
    )
    decoder_nn = stax.serial(stax.Dense(hidden), stax.Softplus, stax.Dense(d))

    def model(x):
        decode = numpyro.module("decoder", decoder_nn, (batch, latent))
        with numpyro.handlers.scale(scale=n / x.shape[0]), numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(0, 1).expand([latent]).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=decode(z)).to_event(1), obs=x)

    def guide(x):
        encode = numpyro.module("encoder", encoder_nn, (batch, d))
        with numpyro.handlers.scale(scale=n / x.shape[0]), numpyro.plate("data", x.shape[0]):
            loc, log_scale = encode(x)
            numpyro.sample("z", dist.Normal(loc, jnp.exp(log_scale)).to_event(1))

    svi = SVI(model, guide, numpyro.optim.Adam(1e-3), TraceMeanField_ELBO())
    state = svi.init(jax.random.PRNGKey(args.seed), jnp.asarray(train_x[:batch]))
    update = jax.jit(svi.update)
    evaluate = jax.jit(svi.evaluate)

    if args.time_steps:
        xb = jnp.asarray(train_x[:batch])
        for _ in range(5):
            state, loss = update(state, xb)
        loss.block_until_ready()
        times = []
        for _ in range(args.time_steps):
            t0 = time.perf_counter()
            state, loss = update(state, xb)
            loss.block_until_ready()
            times.append(time.perf_counter() - t0)
        # the mean, as elbo-lab's per-epoch seconds give it; the median beside it
        print(f"median_ms {1e3 * statistics.median(times):.4f}")
        print(f"step_ms {1e3 * statistics.fmean(times):.4f}")
        return 0

    train_j, test_j = jnp.asarray(train_x), jnp.asarray(test_x)
    rng = np.random.default_rng(args.seed)
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(n)
        train_loss = 0.0
        for start in range(0, n, batch):
            xb = train_j[order[start : start + batch]]
            state, loss = update(state, xb)
            train_loss += float(loss) * xb.shape[0] / n  # loss is scaled to N: the batch's share
        test_loss = 0.0
        for start in range(0, len(test_x), batch):
            xb = test_j[start : start + batch]
            test_loss += float(evaluate(state, xb)) * xb.shape[0] / n
        train_loss, test_loss = train_loss / n, test_loss / len(test_x)
        if not args.quiet:
            print(f"====> Epoch: {epoch} train loss: {train_loss:.4f} test loss: {test_loss:.4f}")
    print(f"final test loss {test_loss:.4f} nats/image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
