"""Generative models and the guides that serve them, as Pyro model/guide pairs."""

from .guides import DiagonalNormalGuide as DiagonalNormalGuide
from .guides import FlowGuide as FlowGuide
from .guides import FullNormalGuide as FullNormalGuide
from .guides import make_autoguide as make_autoguide
from .guides import make_guide as make_guide
from .linear_gaussian import LinearGaussian as LinearGaussian
from .structure import has_static_structure as has_static_structure
from .structure import static_structure as static_structure
from .vae import VAE as VAE
from .vae import Decoder as Decoder

__all__ = [
    "VAE",
    "Decoder",
    "DiagonalNormalGuide",
    "FlowGuide",
    "FullNormalGuide",
    "LinearGaussian",
    "make_autoguide",
    "has_static_structure",
    "make_guide",
    "static_structure",
]
