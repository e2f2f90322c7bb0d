"""Inference for elbo-lab: data, SVI training, ELBO decomposition, and the command line."""

from .compare import CompareConfig as CompareConfig
from .compare import Comparison as Comparison
from .compare import ComparisonRow as ComparisonRow
from .compare import compare as compare
from .compare import compare_guides as compare_guides
from .data import Dataset as Dataset
from .data import load_data as load_data
from .distributed import DistributedError as DistributedError
from .distributed import World as World
from .distributed import init_from_env as init_from_env
from .elbo import ElboDecomposition as ElboDecomposition
from .elbo import SiteTerm as SiteTerm
from .elbo import decompose as decompose
from .enumeration import TraceEnum_ELBO as TraceEnum_ELBO
from .enumeration import exact_evidence as exact_evidence
from .enumeration import exact_log_evidence as exact_log_evidence
from .errors import DataError as DataError
from .errors import ElboLabError as ElboLabError
from .errors import OptionError as OptionError
from .errors import RunError as RunError
from .evidence import EvidenceEstimate as EvidenceEstimate
from .evidence import iwae as iwae
from .evidence import log_weights as log_weights
from .explain import Explanation as Explanation
from .explain import explain as explain
from .objectives import ObjectiveCheck as ObjectiveCheck
from .objectives import check_objective as check_objective
from .objectives import check_objectives as check_objectives
from .train import Metrics as Metrics
from .train import TrainConfig as TrainConfig
from .train import TrainResult as TrainResult
from .train import evaluate as evaluate
from .train import fit as fit
from .watch import Watch as Watch
from .watch import WatchConfig as WatchConfig
from .watch import WatchedFit as WatchedFit
from .watch import watch as watch

__all__ = [
    "CompareConfig",
    "Comparison",
    "ComparisonRow",
    "DataError",
    "Dataset",
    "DistributedError",
    "ElboDecomposition",
    "ElboLabError",
    "EvidenceEstimate",
    "Explanation",
    "Metrics",
    "ObjectiveCheck",
    "OptionError",
    "RunError",
    "SiteTerm",
    "TraceEnum_ELBO",
    "TrainConfig",
    "TrainResult",
    "Watch",
    "WatchConfig",
    "WatchedFit",
    "World",
    "check_objective",
    "check_objectives",
    "compare",
    "compare_guides",
    "decompose",
    "evaluate",
    "exact_evidence",
    "exact_log_evidence",
    "explain",
    "fit",
    "init_from_env",
    "iwae",
    "load_data",
    "log_weights",
    "watch",
]
