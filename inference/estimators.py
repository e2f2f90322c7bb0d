"""ELBO estimators by name, and the compiled forms of Pyro's ``Trace_ELBO`` and
``TraceMeanField_ELBO``.

The loss is exactly the plain estimator's (Kingma & Welling 2014, eq. 3):

    loss = -ELBO = -(1/S) sum_s [log p(x, z_s) - log q(z_s | x)],   z_s ~ q(z | x)

with the KL term in closed form for :class:`JitTraceMeanField_ELBO`. The whole loss (guide,
model replay, log-densities) runs through a :class:`~inference.traced_loss.TracedLoss`: eagerly
for the first :data:`EXPORT_AFTER_CALLS` calls of an argument shape, then as a graph recorded
by :func:`torch.export.export` and made lean by exact :mod:`torch.fx` rewrites
(:mod:`inference.lean_graph`), which removes Pyro's per-step Python work; a graph that keeps
being called (:data:`COMPILE_AFTER_CALLS`) is compiled with :func:`torch.compile` (inductor:
fused kernels, forward and backward), so that only long runs pay for compiling. Where the
caller states how many calls are to come (:func:`~inference.traced_loss.planned_calls`, as
``fit`` does), a shape is exported, and a CPU graph compiled, only if they pay for it. Only
public torch and Pyro APIs are used.

Differences from ``pyro.infer.JitTrace_ELBO`` / ``JitTraceMeanField_ELBO`` (Pyro 1.9.2), which
use the deprecated ``torch.jit.trace``:

* a graph is recorded once per model/guide pair, argument shapes and keyword values, so a
  ragged last mini-batch gets its own graph instead of reusing one recorded at another size;
* model and guide are identified by the function and, for bound methods, the instance, so
  ``vae.model`` (a new bound-method object at each attribute access) finds its graph again;
* recording runs under a forked random state, so the first call consumes the same noise as
  every later call and as the plain estimator: for shared noise the losses agree;
* a param-only ``poutine.trace`` around a call still sees the parameters.

Before it is compiled, a graph runs the eager estimator's own ATen ops on the same random
stream, less those the rewrites prove redundant: loss and gradients are bit-identical to the
eager estimator's for shared noise (tested with ``torch.equal`` for the built-in models and
guides, several particles, in-place edits and ``view(dtype)``; only the sign of an exactly zero
loss may differ). Compiled, inductor fuses elementwise ops and rounds differently: values and
gradients agree to float rounding (tested, with a check that the compiled function ran). The
noise stays ATen's (``fallback_random``), so the draws are the eager estimator's either way.

Like Pyro's JIT estimators they need models of static structure. A graph's inputs are the
positional arguments; a call with a tensor among its keyword arguments (``ind=`` subsample
indices, a keyword-only ``y``) runs eagerly, since a graph would keep the first call's values.

:data:`ESTIMATORS` names every estimator the command line offers (``--estimator``);
``renyi:ALPHA`` is Pyro's ``RenyiELBO(alpha=ALPHA)`` (Li & Turner 2016), ``renyi`` its default
alpha = 0. :func:`choose_estimator` and :func:`resolve_estimator` pick one for a model/guide pair.

References: D. P. Kingma and M. Welling, "Auto-Encoding Variational Bayes", ICLR 2014.
Y. Li and R. E. Turner, "Renyi Divergence Variational Inference", NeurIPS 2016.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from pyro.infer import (
    ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
)
from pyro.infer.util import (
    MultiFrameTensor,
    get_dependent_plate_dims,
    get_plate_stacks,
    is_identically_zero,
    torch_sum,
)

from .elbo import meanfield_violations
from .enumeration import TraceEnum_ELBO, enumeration, has_enumerated_sites
from .errors import OptionError
from .traced_loss import (
    COMPILE_AFTER_CALLS,
    EXPORT_AFTER_CALLS,
    RecentByFunction,
    TracedLoss,
    function_key,
    is_static_pair,
)

__all__ = [
    "AUTO",
    "COMPILED",
    "DifferentiableRenyiELBO",
    "ESTIMATORS",
    "ESTIMATOR_CHOICES",
    "JitTrace_ELBO",
    "JitTraceMeanField_ELBO",
    "RecentByFunction",
    "TracedLoss",
    "check_estimator",
    "choose_estimator",
    "estimator_label",
    "is_static_pair",
    "make_elbo",
    "plain_estimator",
    "resolve_estimator",
]


class _Compiled:
    """Mixin: ``differentiable_loss`` through one :class:`TracedLoss` per model/guide pair.

    ``export_after``: eager calls with one argument shape before its graph is exported (0: at
    the first call); ``compile_after``: calls of a graph before it is compiled with
    ``torch.compile`` (0: at once; None: never); the other arguments are the plain estimator's.
    """

    def __init__(
        self,
        *args,
        export_after: int = EXPORT_AFTER_CALLS,
        compile_after: int | None = COMPILE_AFTER_CALLS,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.export_after = export_after
        self.compile_after = compile_after

    def _traced(self, model: Callable, guide: Callable) -> TracedLoss:
        cache = self.__dict__.setdefault("_traced_losses", {})
        key = (function_key(model), function_key(guide))
        if key not in cache:
            # the cache holds model and guide, so their ids cannot be reused while it lives
            cache[key] = TracedLoss(
                lambda *a, **k: self._surrogate(model, guide, a, k),
                export_after=self.export_after,
                compile_after=self.compile_after,
            )
        return cache[key]

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The plain estimator's differentiable loss, computed by an exported graph."""
        return self._traced(model, guide)(*args, **kwargs)

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The plain estimator's loss value (no gradient), computed by the plain estimator: it
        adds particles up as Python floats, which a float32 graph would round."""
        return super().loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The loss value; its gradient is accumulated into the parameters' ``.grad``."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss)

    def traced_loss(self, model: Callable, guide: Callable) -> TracedLoss | None:
        """The :class:`TracedLoss` of this model/guide pair, None before its first call."""
        return self.__dict__.get("_traced_losses", {}).get(
            (function_key(model), function_key(guide))
        )

    def compilations(self, model: Callable, guide: Callable) -> int:
        """How many graphs were exported for this model/guide pair."""
        traced = self.traced_loss(model, guide)
        return 0 if traced is None else traced.compilations


def _log_ratio(model_trace, guide_trace) -> MultiFrameTensor:
    """log r = log p(x, z) - log q(z), per site and plate frames, without gradient: the
    weight of a score-function term (what ``Trace_ELBO`` computes, written with Pyro's public
    ``MultiFrameTensor`` and ``get_plate_stacks``)."""
    log_r = MultiFrameTensor()
    stacks = get_plate_stacks(model_trace)
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample":
            term = site["log_prob"]
            if not site["is_observed"]:
                term = term - guide_trace.nodes[name]["log_prob"]
            log_r.add((stacks[name], term.detach()))
    return log_r


class JitTrace_ELBO(_Compiled, Trace_ELBO):
    """``Trace_ELBO`` exported once: loss = -ELBO with Monte-Carlo log q - log p terms.

    The value is Trace_ELBO's loss, sum over sites of -log p + log q at z ~ q; the gradient is
    its surrogate's (reparameterized, plus score-function terms for non-reparameterized sites).
    """

    def _surrogate(self, model, guide, args, kwargs) -> torch.Tensor:
        # loss = -(1/S) sum_s [sum_model log p - sum_guide log q];  d(loss) = d(surrogate)
        # Trace_ELBO adds the site terms up as Python floats (float64) and rounds the total to
        # the surrogate's dtype at the end; so does this graph, for the same value to the bit.
        loss = surrogate = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            elbo = surrogate_elbo = 0.0
            for site in model_trace.nodes.values():
                if site["type"] == "sample":
                    elbo = elbo + site["log_prob_sum"].double()
                    surrogate_elbo = surrogate_elbo + site["log_prob_sum"]
            log_r = None
            for site in guide_trace.nodes.values():
                if site["type"] != "sample":
                    continue
                _, score_function_term, entropy_term = site["score_parts"]
                elbo = elbo - site["log_prob_sum"].double()
                if not is_identically_zero(entropy_term):
                    surrogate_elbo = surrogate_elbo - entropy_term.sum()
                if not is_identically_zero(score_function_term):
                    if log_r is None:
                        log_r = _log_ratio(model_trace, guide_trace)
                    log_r_site = log_r.sum_to(site["cond_indep_stack"])
                    surrogate_elbo = surrogate_elbo + (log_r_site * score_function_term).sum()
            loss = loss - elbo / self.num_particles
            surrogate = surrogate - surrogate_elbo / self.num_particles
        return loss.detach().to(surrogate.dtype) + (surrogate - surrogate.detach())


class JitTraceMeanField_ELBO(_Compiled, TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` exported once: loss = -ELBO with KL(q || p) in closed form."""

    def _surrogate(self, model, guide, args, kwargs) -> torch.Tensor:
        # loss = (1/S) sum_s [KL(q || p) - log p(x | z_s)]. Like Trace_ELBO, whose
        # differentiable_loss it inherits, TraceMeanField_ELBO averages the particles' values as
        # Python floats (float64) and their differentiable surrogates as tensors; so does this.
        if self.num_particles == 1:  # 0.0 + e / 1 is e (but for the sign of a zero loss)
            ((model_trace, guide_trace),) = self._get_traces(model, guide, args, kwargs)
            return self._differentiable_loss_particle(model_trace, guide_trace)[1]
        loss = surrogate = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            _, particle = self._differentiable_loss_particle(model_trace, guide_trace)
            loss = loss + particle.detach().double() / self.num_particles
            surrogate = surrogate + particle / self.num_particles
        return loss.to(surrogate.dtype) + (surrogate - surrogate.detach())


class DifferentiableTraceGraph_ELBO(TraceGraph_ELBO):  # noqa: N801 (Pyro's naming)
    """Pyro's ``TraceGraph_ELBO`` with a ``differentiable_loss``, so that it runs as a module
    ``loss = elbo(model, guide)`` in :func:`inference.train.fit` like every other estimator
    (Pyro's class has only ``loss`` and ``loss_and_grads``).

    The value is ``TraceGraph_ELBO.loss``'s, -ELBO; the gradient is that of the surrogate
    loss ``TraceGraph_ELBO.loss_and_grads`` differentiates: score-function (REINFORCE) terms
    with Rao-Blackwellized downstream costs and any baselines (Schulman et al. 2015), tested
    against it for shared noise.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        elbo, surrogate_loss = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        loss = -torch.as_tensor(elbo).detach()
        if not torch.is_tensor(surrogate_loss) or not surrogate_loss.requires_grad:
            return loss
        return surrogate_loss + (loss - surrogate_loss).detach()


DifferentiableTraceGraph_ELBO.__name__ = "TraceGraph_ELBO"  # as reports name the estimator


class DifferentiableRenyiELBO(RenyiELBO):
    """Pyro's ``RenyiELBO`` with a ``differentiable_loss``, so that it runs as a module
    ``loss = elbo(model, guide)`` in :func:`inference.train.fit` like every other estimator.

    The value is ``RenyiELBO.loss``'s, minus the Renyi bound with K = ``num_particles`` draws
    (Li & Turner 2016, eq. 11):

        loss = -1/(1 - alpha) * log (1/K) sum_k w_k^(1 - alpha),   w_k = p(x, z_k) / q(z_k | x)

    and its gradient is the surrogate that ``RenyiELBO.loss_and_grads`` differentiates: the
    particles' surrogate ELBOs weighted by the normalized w_k^(1 - alpha) (tested against it).
    """

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        elbos, surrogates = [], []
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
            elbo = surrogate = 0.0
            for site in model_trace.nodes.values():
                if site["type"] == "sample":
                    log_p = torch_sum(site["log_prob"], sum_dims)
                    elbo, surrogate = elbo + log_p.detach(), surrogate + log_p
            for site in guide_trace.nodes.values():
                if site["type"] != "sample":
                    continue
                _, score_function_term, entropy_term = site["score_parts"]
                log_q = torch_sum(site["log_prob"], sum_dims)
                elbo = elbo - log_q.detach()
                if not is_identically_zero(entropy_term):
                    if not is_identically_zero(score_function_term):
                        raise NotImplementedError("RenyiELBO: partly reparameterized sites")
                    surrogate = surrogate - log_q
                if not is_identically_zero(score_function_term):
                    surrogate = surrogate + (self.alpha / (1.0 - self.alpha)) * log_q
            elbos.append(torch.as_tensor(elbo))
            surrogates.append(torch.as_tensor(surrogate))
        vectorized = self.vectorize_particles and self.num_particles > 1
        elbo_k = elbos[0] if vectorized else torch.stack(elbos)
        surrogate_k = surrogates[0] if vectorized else torch.stack(surrogates)
        log_w = (1.0 - self.alpha) * elbo_k  # log w_k^(1 - alpha)
        log_mean_w = torch.logsumexp(log_w, dim=0, keepdim=True) - math.log(self.num_particles)
        loss = -log_mean_w.sum() / (1.0 - self.alpha)
        weights = (log_w - log_mean_w).exp()
        surrogate_loss = -(weights * surrogate_k).sum() / self.num_particles
        return loss + (surrogate_loss - surrogate_loss.detach())


# --- the estimators by name ----------------------------------------------------------------------

#: ELBO estimators by name: Monte-Carlo KL, analytic KL, and their compiled variants (traced
#: once per shape, same noise and gradients as the plain); ``graph`` (Trace_ELBO's loss,
#: Rao-Blackwellized score-function gradients), ``enum`` (the model's enumerated discrete sites
#: summed out, :mod:`inference.enumeration`) and ``renyi`` (the Renyi bound, ``renyi:ALPHA``).
ESTIMATORS: dict[str, type[ELBO]] = {
    "trace": Trace_ELBO,
    "meanfield": TraceMeanField_ELBO,
    "jit": JitTrace_ELBO,
    "jit-meanfield": JitTraceMeanField_ELBO,
    "graph": DifferentiableTraceGraph_ELBO,
    "enum": TraceEnum_ELBO,
    "renyi": DifferentiableRenyiELBO,
}

#: An estimator name may also be this: TraceMeanField_ELBO where its analytic KL is valid for
#: the model/guide pair (:func:`inference.elbo.meanfield_violations`), else Trace_ELBO.
AUTO = "auto"
ESTIMATOR_CHOICES = (AUTO, *ESTIMATORS)

#: The compiled counterpart of each plain estimator name.
COMPILED = {"trace": "jit", "meanfield": "jit-meanfield"}

#: The one estimator that takes a parameter: ``renyi:ALPHA``.
RENYI = "renyi"


def _split(name: str) -> tuple[str, str | None]:
    base, sep, parameter = name.partition(":")
    return base, (parameter if sep else None)


def check_estimator(name: str, num_particles: int = 1) -> None:
    """Raise an :class:`OptionError` (one line) unless ``name`` is an estimator name of
    :data:`ESTIMATOR_CHOICES` or ``renyi:ALPHA`` with ALPHA a finite number other than 1,
    and, for ``renyi``, ``num_particles`` > 1 (with one draw its bound is the ELBO)."""
    if not isinstance(name, str):
        raise OptionError(f"must be a name, got {name!r}", option="estimator")
    base, parameter = _split(name)
    if base not in ESTIMATOR_CHOICES or (parameter is not None and base != RENYI):
        raise OptionError(
            f"unknown estimator {name!r} "
            f"(choose from {', '.join(ESTIMATOR_CHOICES)}; renyi:ALPHA for RenyiELBO's alpha)",
            option="estimator",
        )
    if base != RENYI:
        return
    if parameter is not None:
        try:
            alpha = float(parameter)
        except ValueError:
            alpha = math.nan
        if not math.isfinite(alpha) or alpha == 1:
            raise OptionError(
                f"{name!r}: ALPHA must be a finite number other than 1 "
                "(alpha = 1 is the ELBO: use estimator='trace'), e.g. renyi:0.5",
                option="estimator",
            )
    if num_particles < 2:
        raise OptionError(
            f"{name!r}: the Renyi bound needs more than one draw, e.g. num_particles=8 (with "
            "one draw it is the ELBO)",
            option="estimator",
        )


def renyi_alpha(name: str) -> float:
    """ALPHA of ``renyi:ALPHA`` (Pyro's default 0 for a bare ``renyi``)."""
    _, parameter = _split(name)
    return 0.0 if parameter is None else float(parameter)


def make_elbo(name: str, num_particles: int = 1) -> ELBO:
    """Instantiate an estimator by name (particles drawn one at a time for > 1)."""
    check_estimator(name, num_particles if _split(name)[0] == RENYI else 2)
    base, _ = _split(name)
    if base == AUTO:
        raise OptionError("'auto': choose it for a model and guide first", option="estimator")
    if base == RENYI:
        return DifferentiableRenyiELBO(
            alpha=renyi_alpha(name), num_particles=num_particles, vectorize_particles=False
        )
    if num_particles == 1:
        return ESTIMATORS[base]()
    return ESTIMATORS[base](num_particles=num_particles, vectorize_particles=False)


def estimator_label(name: str) -> str:
    """The Pyro class an estimator name stands for: ``TraceMeanField_ELBO``,
    ``TraceMeanField_ELBO (JIT-compiled)`` for its compiled form, ``RenyiELBO(alpha=0.5)``."""
    base, _ = _split(name)
    if base == RENYI:
        return f"RenyiELBO(alpha={renyi_alpha(name):g})"
    plain = {compiled: plain for plain, compiled in COMPILED.items()}.get(base)
    if plain is not None:
        return f"{ESTIMATORS[plain].__name__} (JIT-compiled)"
    return ESTIMATORS[base].__name__


def plain_estimator(name: str) -> str:
    """The plain estimator whose ``.loss`` is -ELBO for ``name``: ``trace`` for ``jit`` and
    for ``renyi`` (whose loss is the Renyi bound, not the ELBO), ``meanfield`` for
    ``jit-meanfield``, else ``name``."""
    if _split(name)[0] == RENYI:
        return "trace"
    return {compiled: plain for plain, compiled in COMPILED.items()}.get(name, name)


def choose_estimator(name: str, model: Callable, guide: Callable, *args, **kwargs) -> str:
    """The plain estimator for ``name`` on this pair and arguments.

    ``"auto"`` is ``enum`` (TraceEnum_ELBO) when the model enumerates discrete sites
    (``@config_enumerate``; :func:`inference.enumeration.enumeration`), else ``meanfield``
    (TraceMeanField_ELBO) when its analytic KL is valid at every site
    (:func:`inference.elbo.meanfield_violations`), else ``trace`` (Trace_ELBO, valid for every
    pair). An explicit ``meanfield`` on a pair where it is not valid is an
    :class:`OptionError` naming the site: it would train on, and report, a wrong objective
    (e.g. an "ELBO" above log p(x) for an autoguide over a constrained latent); so is any
    estimator but ``enum`` on a model with enumerated sites, which it would sample from the
    prior with no guide term.
    """
    plain = {compiled: plain for plain, compiled in COMPILED.items()}
    base = plain.get(name, name)
    enumerable = base != "enum" and bool(args or kwargs)
    if enumerable and has_enumerated_sites(model, guide, *args, **kwargs):
        enumerated = enumeration(model, guide, *args, **kwargs).sites
        if enumerated and base == AUTO:
            return "enum"
        if enumerated:
            raise OptionError(
                f"{name!r}: the model enumerates {', '.join(enumerated)}, which only "
                "TraceEnum_ELBO sums out; use estimator='enum' or estimator='auto'",
                option="estimator",
            )
    if base not in (AUTO, "meanfield"):
        return name
    violations = meanfield_violations(model, guide, *args, **kwargs)
    if base == AUTO:
        return "trace" if violations else "meanfield"
    if violations:
        raise OptionError(
            f"{name!r}: TraceMeanField_ELBO's analytic KL is not valid for this pair "
            f"({violations[0]}); use estimator='trace' or estimator='auto'",
            option="estimator",
        )
    return name


def resolve_estimator(config: Any, model: Callable, guide: Callable, *args, **kwargs) -> str:
    """The estimator :func:`inference.train.fit` runs: ``config.estimator`` (``auto`` chosen
    for the pair on ``*args, **kwargs`` by :func:`choose_estimator`), compiled when
    ``config.jit`` says (a :class:`inference.train.TrainConfig`).

    ``jit="auto"`` compiles (``trace`` -> ``jit``, ``meanfield`` -> ``jit-meanfield``) when the
    model and the guide are both declared static (:func:`models.structure.static_structure`:
    every built-in model and guide is; a Pyro autoguide is as static as the model it was built
    from) and per-step validation is off, which needs the eager path. A compiled estimator
    computes the plain one's loss and gradients for shared noise (bit for bit for the built-in
    models, to rounding in general); it only removes Pyro's per-step Python work. Undeclared
    functions run eagerly: a recorded graph would silently freeze a data-dependent branch.
    ``jit="on"`` compiles any pair but one whose guide says ``static_structure = False``.
    """
    name = config.estimator
    if name in (AUTO, "meanfield", "jit-meanfield"):
        if not args and not kwargs:
            raise OptionError(
                f"{name!r}: choosing it needs the model's arguments", option="estimator"
            )
        name = choose_estimator(name, model, guide, *args, **kwargs)
    elif args or kwargs:  # any other name is checked too: enumerated sites need TraceEnum_ELBO
        name = choose_estimator(name, model, guide, *args, **kwargs)
    if name not in COMPILED:  # already a compiled estimator, or one without a compiled form
        return name
    untraceable = getattr(getattr(guide, "__self__", guide), "static_structure", None) is False
    if (config.jit == "on" and not untraceable) or (
        config.jit == "auto" and not config.validate and is_static_pair(model, guide)
    ):
        return COMPILED[name]
    return name
