"""Marking Pyro functions whose structure does not depend on data values.

A model or guide has *static structure* when every call with arguments of the same shapes runs
the same sample sites, with the same distributions, through the same tensor operations: no
Python ``if`` or loop on tensor values. Such a function can be recorded once as a graph
(:func:`torch.export.export`, as :mod:`inference.estimators` does) and replayed, which is also
what Pyro's ``JitTrace_ELBO`` requires. elbo-lab's training compiles the ELBO of a model/guide
pair when both are marked, and runs it eagerly otherwise; a recorded graph of a function that
is *not* static would silently freeze one branch, so nothing is marked by guessing.

    @static_structure
    def model(x, num_data=None): ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["has_static_structure", "static_structure"]

F = TypeVar("F", bound=Callable)

ATTRIBUTE = "static_structure"


def static_structure(fn: F) -> F:
    """Declare that ``fn`` (a model or guide, function or method) has static structure."""
    setattr(fn, ATTRIBUTE, True)
    return fn


def has_static_structure(fn: Callable) -> bool:
    """Whether ``fn`` was declared static: a decorated function or method, or a callable object
    whose class (or instance) says ``static_structure = True``. An object that says
    ``static_structure = False`` overrides the decorated methods it inherits."""
    owner = getattr(fn, "__self__", None)
    if owner is not None and getattr(owner, ATTRIBUTE, None) is False:
        return False
    return getattr(fn, ATTRIBUTE, False) is True
