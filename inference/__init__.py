"""Inference for elbo-lab: data, SVI training, ELBO decomposition, and the command line.

``__all__`` is what users import (what the README and the notebooks use); the command line's
machinery (``inference.cli`` and the modules it dispatches to, ``inference.run``,
``inference.rundir``, ``inference.distributed``'s torchrun glue) stays in its modules.

The public names below are imported on first use (PEP 562), so that ``import inference`` and
``elbo-lab --help`` do not pay for torch, Pyro and matplotlib before they are needed.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

#: Where each public name lives.
_SOURCES = {
    "Batching": "batching",
    "ModelArgs": "batching",
    "BoundCheck": "bounds",
    "check_bounds": "bounds",
    "compare": "compare",
    "CompareConfig": "compare",
    "Comparison": "compare",
    "ComparisonRow": "compare",
    "format_table": "compare",
    "write_comparison": "compare",
    "Dataset": "data",
    "load_data": "data",
    "load_model_data": "data",
    "ModelData": "data",
    "decompose": "elbo",
    "ElboDecomposition": "elbo",
    "evaluate": "elbo",
    "PerDatumElbo": "elbo",
    "SiteTerm": "elbo",
    "exact_evidence": "enumeration",
    "exact_log_evidence": "enumeration",
    "TraceEnum_ELBO": "enumeration",
    "DataError": "errors",
    "ElboLabError": "errors",
    "OptionError": "errors",
    "RunError": "errors",
    "effective_sample_size": "evidence",
    "EvidenceEstimate": "evidence",
    "iwae": "evidence",
    "log_weights": "evidence",
    "psis_khat": "evidence",
    "explain": "explain",
    "Explanation": "explain",
    "check_objective": "objectives",
    "check_objectives": "objectives",
    "ObjectiveCheck": "objectives",
    "plot_bound": "plots",
    "plot_comparison": "plots",
    "plot_reconstructions": "plots",
    "plot_training_curves": "plots",
    "posterior_draws": "posterior",
    "fit": "train",
    "init": "train",
    "step": "train",
    "StepInfo": "train",
    "SVIState": "train",
    "TrainConfig": "train",
    "TrainResult": "train",
    "Watch": "watch",
    "watch": "watch",
    "WatchConfig": "watch",
    "WatchedFit": "watch",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str):
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps ``inference.compare`` and ``inference.explain`` the functions of those names.

    Loading a submodule binds it on its package; where a public function shares the
    submodule's name, the function stays bound, as it was when this package imported eagerly.
    """

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _SOURCES.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # the names as static analysis sees them
    from .batching import Batching as Batching
    from .batching import ModelArgs as ModelArgs
    from .bounds import BoundCheck as BoundCheck
    from .bounds import check_bounds as check_bounds
    from .compare import CompareConfig as CompareConfig
    from .compare import Comparison as Comparison
    from .compare import ComparisonRow as ComparisonRow
    from .compare import compare as compare
    from .compare import format_table as format_table
    from .compare import write_comparison as write_comparison
    from .data import Dataset as Dataset
    from .data import ModelData as ModelData
    from .data import load_data as load_data
    from .data import load_model_data as load_model_data
    from .elbo import ElboDecomposition as ElboDecomposition
    from .elbo import PerDatumElbo as PerDatumElbo
    from .elbo import SiteTerm as SiteTerm
    from .elbo import decompose as decompose
    from .elbo import evaluate as evaluate
    from .enumeration import TraceEnum_ELBO as TraceEnum_ELBO
    from .enumeration import exact_evidence as exact_evidence
    from .enumeration import exact_log_evidence as exact_log_evidence
    from .errors import DataError as DataError
    from .errors import ElboLabError as ElboLabError
    from .errors import OptionError as OptionError
    from .errors import RunError as RunError
    from .evidence import EvidenceEstimate as EvidenceEstimate
    from .evidence import effective_sample_size as effective_sample_size
    from .evidence import iwae as iwae
    from .evidence import log_weights as log_weights
    from .evidence import psis_khat as psis_khat
    from .explain import Explanation as Explanation
    from .explain import explain as explain
    from .objectives import ObjectiveCheck as ObjectiveCheck
    from .objectives import check_objective as check_objective
    from .objectives import check_objectives as check_objectives
    from .plots import plot_bound as plot_bound
    from .plots import plot_comparison as plot_comparison
    from .plots import plot_reconstructions as plot_reconstructions
    from .plots import plot_training_curves as plot_training_curves
    from .posterior import posterior_draws as posterior_draws
    from .train import StepInfo as StepInfo
    from .train import SVIState as SVIState
    from .train import TrainConfig as TrainConfig
    from .train import TrainResult as TrainResult
    from .train import fit as fit
    from .train import init as init
    from .train import step as step
    from .watch import Watch as Watch
    from .watch import WatchConfig as WatchConfig
    from .watch import WatchedFit as WatchedFit
    from .watch import watch as watch
