"""JIT-compiled ELBO estimators: Pyro's ``Trace_ELBO`` and ``TraceMeanField_ELBO``, traced once.

The loss is exactly the plain estimator's (Kingma & Welling 2014, eq. 3):

    loss = -ELBO = -(1/S) sum_s [log p(x, z_s) - log q(z_s | x)],   z_s ~ q(z | x)

with the KL term in closed form for :class:`JitTraceMeanField_ELBO`. The whole loss (guide,
model replay, log-densities) is recorded once with :func:`torch.jit.trace` and then run as one
graph, which removes Pyro's per-step Python work.

Differences from ``pyro.infer.JitTrace_ELBO`` / ``JitTraceMeanField_ELBO`` (Pyro 1.9.2):

* a graph is traced once per model/guide pair, argument shapes and keyword values, so a
  ragged last mini-batch gets its own graph instead of reusing one traced at another size;
  Pyro's ``JitTraceMeanField_ELBO`` looks up ``_loss_and_surrogate_loss`` but stores
  ``_differentiable_loss`` and so re-traces on every call;
* model and guide are identified by the function and, for bound methods, the instance, so
  ``vae.model`` (a new bound-method object at each attribute access) finds its graph again;
* tracing runs under a forked random state, so the first call consumes the same noise as
  every later call and as the plain estimator: for shared noise the losses agree;
* a param-only ``poutine.trace`` around a call still sees the parameters.

Like Pyro's JIT estimators they need models of static structure whose tensor inputs are
positional arguments and whose other inputs are keyword arguments.

Reference: D. P. Kingma and M. Welling, "Auto-Encoding Variational Bayes", ICLR 2014.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable
from contextlib import contextmanager
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.trace_elbo import _compute_log_r
from pyro.infer.util import is_identically_zero
from pyro.poutine.runtime import _PYRO_STACK

__all__ = ["JitTrace_ELBO", "JitTraceMeanField_ELBO", "TracedLoss"]


def _identity(fn: Callable) -> Hashable:
    """A key for ``fn`` that is stable across accesses of the same bound method."""
    owner = getattr(fn, "__self__", None)
    if owner is not None and hasattr(fn, "__func__"):
        return (id(owner), id(fn.__func__))
    return id(fn)


def _freeze(value: Any) -> Hashable:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device, value.requires_grad)
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    hash(value)
    return value


class TracedLoss:
    """``fn(*args, **kwargs)`` run as a graph traced once per argument shapes and keywords.

    ``fn`` is a Pyro function returning a scalar tensor. Its parameters (``pyro.param`` and
    ``pyro.module`` sites) become inputs of the graph, so gradients flow to the param store.
    ``compilations`` counts the graphs traced so far.
    """

    def __init__(self, fn: Callable[..., torch.Tensor]):
        self.fn = fn
        self.compilations = 0
        self._graphs: dict[Hashable, tuple[list[str], Any]] = {}

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        key = (_freeze(args), _freeze(kwargs))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._trace(args, kwargs)
        names, graph = entry
        if _PYRO_STACK:  # let enclosing handlers (e.g. a param-only trace) see the parameters
            params = [pyro.param(name).unconstrained() for name in names]
        else:
            store = dict(pyro.get_param_store().named_parameters())
            params = [store[name] for name in names]
        return graph(*params, *args)

    def _trace(self, args: tuple, kwargs: dict) -> tuple[list[str], Any]:
        devices = sorted({a.device.index or 0 for a in args if _is_cuda(a)})
        with torch.random.fork_rng(devices=devices):
            # one eager run (validated if validation is on) creates and names the parameters
            with poutine.trace(param_only=True) as capture:
                self.fn(*args, **kwargs)
            names = sorted(capture.trace.nodes)
            params = tuple(pyro.param(name).unconstrained() for name in names)

            def replayed(*params_and_args):
                constrained = {name: pyro.param(name) for name in names}
                return poutine.replay(self.fn, params=constrained)(
                    *params_and_args[len(names) :], **kwargs
                )

            with (
                pyro.validation_enabled(False),
                warnings.catch_warnings(),
                _default_dtype(args),
            ):
                warnings.simplefilter("ignore")  # TracerWarnings on Python ints from shapes
                graph = torch.jit.trace(replayed, params + tuple(args), check_trace=False)
        self.compilations += 1
        return names, graph


@contextmanager
def _default_dtype(args: tuple):
    """Trace in the data's float dtype: a traced plate computes its scale N / B as a tensor of
    the default dtype, where the eager plate uses a Python float."""
    dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}
    old = torch.get_default_dtype()
    if len(dtypes) == 1 and dtypes <= {torch.float32, torch.float64}:
        torch.set_default_dtype(dtypes.pop())
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _is_cuda(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_cuda


class _Compiled:
    """Mixin: ``differentiable_loss`` through one :class:`TracedLoss` per model/guide pair."""

    def _traced(self, model: Callable, guide: Callable) -> TracedLoss:
        cache = self.__dict__.setdefault("_traced_losses", {})
        key = (_identity(model), _identity(guide))
        if key not in cache:
            # the cache holds model and guide, so their ids cannot be reused while it lives
            cache[key] = TracedLoss(lambda *a, **k: self._surrogate(model, guide, a, k))
        return cache[key]

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The plain estimator's differentiable loss, computed by a traced graph."""
        return self._traced(model, guide)(*args, **kwargs)

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The plain estimator's loss value (no gradient)."""
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The loss value; its gradient is accumulated into the parameters' ``.grad``."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss)

    def compilations(self, model: Callable, guide: Callable) -> int:
        """How many graphs were traced for this model/guide pair."""
        cache = self.__dict__.get("_traced_losses", {})
        traced = cache.get((_identity(model), _identity(guide)))
        return 0 if traced is None else traced.compilations


class JitTrace_ELBO(_Compiled, Trace_ELBO):
    """``Trace_ELBO`` traced once: loss = -ELBO with Monte-Carlo log q - log p terms.

    The value is Trace_ELBO's loss, sum over sites of -log p + log q at z ~ q; the gradient is
    its surrogate's (reparameterized, plus score-function terms for non-reparameterized sites).
    """

    def _surrogate(self, model, guide, args, kwargs) -> torch.Tensor:
        # loss = -(1/S) sum_s [sum_model log p - sum_guide log q];  d(loss) = d(surrogate)
        loss = surrogate = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            elbo = surrogate_elbo = 0.0
            for site in model_trace.nodes.values():
                if site["type"] == "sample":
                    elbo = elbo + site["log_prob_sum"]
                    surrogate_elbo = surrogate_elbo + site["log_prob_sum"]
            log_r = None
            for site in guide_trace.nodes.values():
                if site["type"] != "sample":
                    continue
                _, score_function_term, entropy_term = site["score_parts"]
                elbo = elbo - site["log_prob_sum"]
                if not is_identically_zero(entropy_term):
                    surrogate_elbo = surrogate_elbo - entropy_term.sum()
                if not is_identically_zero(score_function_term):
                    if log_r is None:
                        log_r = _compute_log_r(model_trace, guide_trace)
                    log_r_site = log_r.sum_to(site["cond_indep_stack"])
                    surrogate_elbo = surrogate_elbo + (log_r_site * score_function_term).sum()
            loss = loss - elbo / self.num_particles
            surrogate = surrogate - surrogate_elbo / self.num_particles
        return loss.detach() + (surrogate - surrogate.detach())


class JitTraceMeanField_ELBO(_Compiled, TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` traced once: loss = -ELBO with KL(q || p) in closed form."""

    def _surrogate(self, model, guide, args, kwargs) -> torch.Tensor:
        # loss = (1/S) sum_s [KL(q || p) - log p(x | z_s)]
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            _, loss_particle = self._differentiable_loss_particle(model_trace, guide_trace)
            loss = loss + loss_particle / self.num_particles
        return loss
