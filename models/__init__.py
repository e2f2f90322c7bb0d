"""Generative models and the guides that serve them, as Pyro model/guide pairs."""

from .vae import VAE as VAE
from .vae import Decoder as Decoder
from .vae import Encoder as Encoder

__all__ = ["VAE", "Decoder", "Encoder"]
