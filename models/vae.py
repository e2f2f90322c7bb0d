"""The variational autoencoder as a Pyro model/guide pair (Kingma & Welling 2014).

Generative model, for each image x_n in a plate over the data set:

    z_n ~ N(0, I_L),            x_n | z_n ~ Bernoulli(logits = decoder(z_n))

Guide (amortized, mean-field):  q(z_n | x_n) = N(z_loc(x_n), diag(z_scale(x_n)^2)), the
``diag`` family of :mod:`models.guides` (:class:`~models.guides.DiagonalNormalGuide`).

``model(x)`` and ``guide(x)`` share the signature and the site names ``"z"`` and ``"x"``. With
``num_data`` the plate is subsampled, so a mini-batch of B images is scaled by N / B and the ELBO
is an unbiased estimate for the whole data set.

Reference: D. P. Kingma and M. Welling, "Auto-Encoding Variational Bayes", ICLR 2014.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .guides import DiagonalNormalGuide, mlp
from .plate import data_plate
from .structure import static_structure

__all__ = ["VAE", "Decoder"]


class Decoder(nn.Module):
    """z ``(B, L)`` -> Bernoulli logits ``(B, D)``."""

    def __init__(self, data_dim: int, latent_dim: int, hidden_dims: Sequence[int]):
        super().__init__()
        self.net = mlp([latent_dim, *reversed(tuple(hidden_dims)), data_dim])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class VAE(nn.Module):
    """Bernoulli VAE with a diagonal-Normal amortized guide.

    ``encoder`` is that guide, a :class:`~models.guides.DiagonalNormalGuide` registered as
    ``"encoder"`` (``encoder.encode(x)`` gives z_loc, z_scale); ``decoder`` maps z to logits.

    Args:
        data_dim: D, pixels per image.
        latent_dim: L.
        hidden_dims: widths of the hidden layers of the encoder (the decoder mirrors them).
    """

    def __init__(self, data_dim: int, latent_dim: int = 10, hidden_dims: Sequence[int] = (200,)):
        super().__init__()
        self.data_dim, self.latent_dim = int(data_dim), int(latent_dim)
        self.hidden_dims = tuple(int(h) for h in hidden_dims)
        self.encoder = DiagonalNormalGuide(
            self.data_dim, self.latent_dim, self.hidden_dims, name="encoder"
        )
        self.decoder = Decoder(self.data_dim, self.latent_dim, self.hidden_dims)

    @static_structure
    def model(self, x: torch.Tensor, num_data: int | None = None) -> torch.Tensor:
        """p(x, z) = N(z; 0, I) Bernoulli(x; decoder(z)). ``x``: ``(B, D)``; returns z ``(B, L)``."""
        pyro.module("decoder", self.decoder)
        with data_plate(x, num_data):
            z_loc = x.new_zeros(x.shape[0], self.latent_dim)
            z = pyro.sample("z", dist.Normal(z_loc, torch.ones_like(z_loc)).to_event(1))
            logits = self.decoder(z)
            # validate_args=False admits grey-level x in [0, 1] as in Pyro's VAE example.
            pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(1), obs=x)
        return z

    @static_structure
    def guide(self, x: torch.Tensor, num_data: int | None = None) -> torch.Tensor:
        """q(z | x) = N(z; z_loc(x), diag z_scale(x)^2). ``x``: ``(B, D)``; returns z ``(B, L)``."""
        return self.encoder.guide(x, num_data)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Bernoulli means sigmoid(decoder(z_loc(x))) at the guide's mean, ``(B, D)``."""
        z_loc, _ = self.encoder.encode(x)
        return torch.sigmoid(self.decoder(z_loc))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Bernoulli means of n draws from the prior, ``(n, D)``."""
        p = next(self.parameters())
        z = torch.randn(n, self.latent_dim, generator=generator, dtype=p.dtype, device=p.device)
        return torch.sigmoid(self.decoder(z))
