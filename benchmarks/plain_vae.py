"""The peer a PyTorch user writes: pytorch/examples ``vae/main.py``'s shape, on elbo-lab's VAE.

As in pytorch/examples (``train(epoch)`` then ``test(epoch)`` every epoch, ``optim.Adam(lr=1e-3)``
with torch's defaults, one line printed per epoch), but with elbo-lab's default model and data:
the binarized digits split (1438 train / 359 test), encoder 64-200-(10, 10) and decoder
10-200-64 with softplus, z scale = exp(log-scale head), batch 128 with the ragged last batch,
and the loss per mini-batch scaled to the whole data as Pyro's plate does:

    loss_B = N/B * sum_{n in B} [BCE-with-logits(decoder(z_n), x_n) + KL(N(m_n, s_n^2) || N(0, I))]

Batches are slices of a shuffled tensor, not a ``DataLoader`` over single rows: the faster of
the two, so the stricter baseline. ``--synthetic ROWS`` trains instead on ROWS x ``--data-dim``
Bernoulli(0.13) pixels (MNIST's mean intensity), e.g. an MNIST-sized 60000 x 784 with
``--hidden 400 --latent 20``. ``--time-steps K`` prints the mean (and median) time of K training
steps after warm-up instead of training (step-level comparison; each step ends with the
loss's ``.item()``, which waits for a GPU). ``--device cuda`` trains on the GPU.

    python benchmarks/plain_vae.py [--epochs 200] [--threads 1] [--synthetic 60000 --data-dim 784]
        [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class VAE(nn.Module):
    def __init__(self, data_dim: int, hidden: int, latent: int):
        super().__init__()
        self.fc1 = nn.Linear(data_dim, hidden)
        self.fc21 = nn.Linear(hidden, latent)  # location of q(z | x)
        self.fc22 = nn.Linear(hidden, latent)  # log-scale of q(z | x)
        self.fc3 = nn.Linear(latent, hidden)
        self.fc4 = nn.Linear(hidden, data_dim)

    def encode(self, x):
        h = F.softplus(self.fc1(x))
        return self.fc21(h), self.fc22(h)

    def forward(self, x):
        loc, log_scale = self.encode(x)
        z = loc + torch.exp(log_scale) * torch.randn_like(loc)
        return self.fc4(F.softplus(self.fc3(z))), loc, log_scale


def loss_function(logits, x, loc, log_scale):
    """-ELBO of the batch: BCE (sum) + KL(N(m, s^2) || N(0, 1)) = sum((m^2 + s^2 - 1) / 2 - log s)."""
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    kl = (0.5 * (loc**2 + torch.exp(2 * log_scale) - 1) - log_scale).sum()
    return bce + kl


def load(args) -> tuple[torch.Tensor, torch.Tensor]:
    if args.synthetic:
        g = torch.Generator().manual_seed(args.seed)
        rows = args.synthetic + args.synthetic // 6  # MNIST's 60000 / 10000 proportion
        x = (torch.rand(rows, args.data_dim, generator=g) < 0.13).float()
        return x[: args.synthetic], x[args.synthetic :]
    from inference.data import load_digits

    digits = load_digits()
    return digits.train.float(), digits.test.float()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--latent", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (torch's default)")
    parser.add_argument("--synthetic", type=int, default=0, help="rows of synthetic data")
    parser.add_argument("--data-dim", type=int, default=784, help="columns of synthetic data")
    parser.add_argument("--time-steps", type=int, default=0, help="time K steps, do not train")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train_x, test_x = (x.to(device) for x in load(args))
    n, batch = len(train_x), args.batch_size
    model = VAE(train_x.shape[1], args.hidden, args.latent).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(x):
        optimizer.zero_grad()
        logits, loc, log_scale = model(x)
        loss = loss_function(logits, x, loc, log_scale) * (n / len(x))
        loss.backward()
        optimizer.step()
        return loss.item()

    if args.time_steps:
        x = train_x[:batch]
        for _ in range(5):
            step(x)
        times = []
        for _ in range(args.time_steps):
            t0 = time.perf_counter()
            step(x)
            times.append(time.perf_counter() - t0)
        # the mean, as elbo-lab's per-epoch seconds give it; the median beside it
        print(f"median_ms {1e3 * statistics.median(times):.4f}")
        print(f"step_ms {1e3 * statistics.fmean(times):.4f}")
        return

    def train(epoch):
        model.train()
        order = torch.randperm(n, device=device)
        total = 0.0
        for start in range(0, n, batch):
            x = train_x[order[start : start + batch]]
            total += step(x) * len(x) / n
        return total / n

    @torch.no_grad()
    def test(epoch):
        model.eval()
        total = 0.0
        for start in range(0, len(test_x), batch):
            x = test_x[start : start + batch]
            logits, loc, log_scale = model(x)
            total += loss_function(logits, x, loc, log_scale).item()
        return total / len(test_x)

    for epoch in range(1, args.epochs + 1):
        train_loss, test_loss = train(epoch), test(epoch)
        if not args.quiet:
            print(f"====> Epoch: {epoch} train loss: {train_loss:.4f} test loss: {test_loss:.4f}")
    print(f"final test loss {test_loss:.4f} nats/image")


if __name__ == "__main__":
    main()
