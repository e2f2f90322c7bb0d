"""Inference for elbo-lab: data, SVI training, ELBO decomposition, and the command line."""

from .data import Dataset as Dataset
from .data import load_data as load_data
from .elbo import ElboDecomposition as ElboDecomposition
from .elbo import SiteTerm as SiteTerm
from .elbo import decompose as decompose
from .errors import DataError as DataError
from .errors import ElboLabError as ElboLabError
from .errors import OptionError as OptionError
from .errors import RunError as RunError
from .train import Metrics as Metrics
from .train import TrainConfig as TrainConfig
from .train import TrainResult as TrainResult
from .train import evaluate as evaluate
from .train import fit as fit

__all__ = [
    "DataError",
    "Dataset",
    "ElboDecomposition",
    "ElboLabError",
    "Metrics",
    "OptionError",
    "RunError",
    "SiteTerm",
    "TrainConfig",
    "TrainResult",
    "decompose",
    "evaluate",
    "fit",
    "load_data",
]
