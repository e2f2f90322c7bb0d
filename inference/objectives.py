"""What each Pyro ELBO class's ``.loss`` returns minus, stated and checked on the user's pair.

Pyro's docstrings say every estimator "returns an estimate of the ELBO"; the number is the
*negative* of an objective, and not always of the ELBO. With w = p(x, z) / q(z | x), z ~ q:

    Trace_ELBO.loss          = -ELBO = -E_q[log p(x, z) - log q(z | x)]
    TraceMeanField_ELBO.loss = -(E_q[log p(x | z)] - sum_s KL(q_s || p_s)), the registered KL at
                               every latent site: -ELBO only where that KL is the site's term
                               (:func:`inference.elbo.meanfield_violations`)
    TraceGraph_ELBO.loss     = -ELBO; the surrogate with REINFORCE terms at non-reparameterized
                               sites only changes the gradient
    TraceEnum_ELBO.loss      = -E_q(z_c)[log sum_{z_d} p(x, z_d, z_c) - log q(z_c)], the model's
                               enumerated sites z_d summed out (:mod:`inference.enumeration`)
    RenyiELBO(a).loss        = -1/(1-a) log (1/K) sum_k w_k^(1-a), a K-draw estimate of the
                               Renyi bound L_a = 1/(1-a) log E_q[w^(1-a)]

``loss_and_grads`` must return the same number: pyro#1982 was ``TraceGraph_ELBO.loss_and_grads``
returning +ELBO, and pyro#2798 the same sign bug in ``JitTraceGraph_ELBO``.
:func:`check_objective` computes each objective independently, from the same draws
(:func:`inference.elbo.decompose`, :func:`inference.evidence.log_weights`), and compares.

References: Kingma & Welling (2014); Y. Li and R. E. Turner, "Renyi Divergence Variational
Inference", NeurIPS 2016; Burda, Grosse & Salakhutdinov (2016); J. Schulman, N. Heess, T. Weber
and P. Abbeel, "Gradient Estimation Using Stochastic Computation Graphs", NeurIPS 2015;
Obermeyer et al. (2019).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import pyro
import torch
from pyro.infer import (
    ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
    TraceTailAdaptive_ELBO,
)

from .elbo import decompose, meanfield_violations
from .enumeration import enumeration
from .errors import OptionError
from .evidence import log_weights

__all__ = ["ObjectiveCheck", "check_objective", "check_objectives", "objective_text"]

#: Tolerance of the identity: float32 sums of log-densities (Pyro) against float64 (ours).
RTOL = 1e-5
ATOL = 1e-4


class ObjectiveCheck(NamedTuple):
    """One estimator's ``.loss`` against minus its stated objective, from the same draws.

    Attributes:
        estimator: the class, with its options (``RenyiELBO(alpha=0.5, num_particles=8)``).
        objective: the objective's name (``ELBO``, ``L_0.5``).
        objective_text: what ``.loss`` returns minus, in words and math.
        loss: what ``.loss`` returned, nats (whole-data total).
        loss_and_grads: what ``.loss_and_grads`` returned from the same draws.
        minus_objective: minus the objective, computed independently from the same draws.
        residual: the larger of |loss - minus_objective| and |loss_and_grads - minus_objective|.
        ok: the identity holds within ``RTOL`` (relative) + ``ATOL``.
        note: why it does not hold where that is known (e.g. TraceMeanField's invalid KL).
    """

    estimator: str
    objective: str
    objective_text: str
    loss: float
    loss_and_grads: float
    minus_objective: float
    residual: float
    ok: bool
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()

    def line(self) -> str:
        """The check in one line for people."""
        verdict = "ok" if self.ok else f"MISMATCH{': ' + self.note if self.note else ''}"
        return (
            f"{self.estimator}.loss = {self.loss:.4f} = -{self.objective} "
            f"(-{self.objective} from the same draws = {self.minus_objective:.4f}, "
            f"loss_and_grads = {self.loss_and_grads:.4f}, residual {self.residual:.2g}): {verdict}"
        )


def _describe(elbo: ELBO) -> str:
    name = type(elbo).__name__
    options = []
    if isinstance(elbo, RenyiELBO):
        options.append(f"alpha={elbo.alpha:g}")
    if elbo.num_particles != 1:
        options.append(f"num_particles={elbo.num_particles}")
    return f"{name}({', '.join(options)})"


def _renyi_name(alpha: float) -> str:
    return f"L_{alpha:g}"


def objective_text(elbo: ELBO) -> tuple[str, str]:
    """(objective, text): the objective ``elbo.loss`` returns minus, and a statement of it.

    Raises :class:`OptionError` for an estimator whose objective is not stated here.
    """
    k = elbo.num_particles
    mc = f"a Monte-Carlo estimate from {k} draw{'s' if k != 1 else ''} z ~ q"
    if isinstance(elbo, TraceTailAdaptive_ELBO):  # a Trace_ELBO subclass of other objective
        raise OptionError(
            f"{type(elbo).__name__}: no stated objective (its loss is not implemented)"
        )
    if isinstance(elbo, TraceMeanField_ELBO):  # a subclass of Trace_ELBO: test it first
        return "ELBO", (
            f"{type(elbo).__name__}.loss = -(E_q[log p(x|z)] - sum_s KL(q_s || p_s)), the "
            "registered KL at every latent site that has one, else log q - log p; = -ELBO "
            "only where that KL is the site's whole term (not at an autoguide's Delta, whose "
            f"log-density carries a log-Jacobian, nor at a site with latent parents); {mc}"
        )
    if isinstance(elbo, Trace_ELBO):
        return "ELBO", (
            f"{type(elbo).__name__}.loss = -ELBO = -E_q[log p(x, z) - log q(z|x)], {mc} "
            "(Kingma & Welling 2014)"
        )
    if isinstance(elbo, TraceGraph_ELBO):
        return "ELBO", (
            f"{type(elbo).__name__}.loss = -ELBO = -E_q[log p(x, z) - log q(z|x)], {mc}; the "
            "surrogate with REINFORCE terms log q(z_s) (cost - baseline) at non-reparameterized "
            "sites only changes the gradient (Schulman et al. 2015); loss_and_grads returned "
            "+ELBO before pyro#1988 fixed pyro#1982"
        )
    if isinstance(elbo, TraceEnum_ELBO):
        return "ELBO", (
            f"{type(elbo).__name__}.loss = -ELBO = -E_q(z_c)[log sum_{{z_d}} p(x, z_d, z_c) - "
            f"log q(z_c)], the model's enumerated sites z_d summed out exactly, {mc}; with "
            "every latent enumerated it is -log p(x) exactly (Obermeyer et al. 2019)"
        )
    if isinstance(elbo, RenyiELBO):
        a = elbo.alpha
        name = _renyi_name(a)
        estimate = (
            f"{type(elbo).__name__}(alpha={a:g}).loss = -{name}, {name} = 1/(1-a) log (1/K) "
            f"sum_k w_k^(1-a), w_k = p(x, z_k) / q(z_k|x), K = {k} draws: an estimate of the "
            f"Renyi bound 1/(1-a) log E_q[w^(1-a)] (Li & Turner 2016, eq. 6)"
        )
        if a == 0:
            where = (
                "alpha = 0: it is L_K = log (1/K) sum_k w_k, the importance-weighted bound "
                "(Burda et al. 2016): ELBO <= E[L_K] <= log p(x)"
            )
        elif 0 < a < 1:
            where = (
                "0 < alpha < 1: the Renyi bound lies between the ELBO (alpha -> 1) and "
                "log p(x) (alpha = 0), and the K-draw estimate's mean lies below it, "
                "rising with K (Li & Turner 2016, Thms 1-2)"
            )
        elif a < 0:
            where = (
                "alpha < 0: the Renyi bound lies above log p(x), no lower bound (Li & Turner "
                "2016, Thm 1)"
            )
        else:
            where = "alpha > 1: the Renyi bound lies below the ELBO (Li & Turner 2016, Thm 1)"
        return name, f"{estimate}; {where}"
    raise OptionError(
        f"{type(elbo).__name__}: no stated objective (Trace_ELBO, TraceMeanField_ELBO, "
        "TraceGraph_ELBO, TraceEnum_ELBO and RenyiELBO have one)"
    )


def _seeded(seed: int, fn: Callable[[], Any]) -> Any:
    """fn() with torch's generator seeded, the caller's generator state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _loss_and_grads(elbo: ELBO, model, guide, args, kwargs) -> float:
    """``elbo.loss_and_grads``, restoring every parameter's ``.grad`` afterwards."""
    store = pyro.get_param_store()
    before = {name: param.grad for name, param in store.named_parameters()}
    try:
        return float(elbo.loss_and_grads(model, guide, *args, **kwargs))
    finally:
        for name, param in store.named_parameters():
            param.grad = before.get(name)


def _minus_objective(elbo: ELBO, model, guide, args, kwargs, enumerated: bool) -> float:
    """Minus the stated objective from the draws ``elbo`` makes under the same seed."""
    k = elbo.num_particles
    if isinstance(elbo, RenyiELBO):
        # -1/(1-a) sum_n [logsumexp_k((1-a) log w_kn) - log K]  (per datum for local models)
        log_w = log_weights(
            model,
            guide,
            *args,
            num_samples=k,
            chunk_size=k if elbo.vectorize_particles else 1,
            compiled=False,
            **kwargs,
        )
        scaled = (1.0 - elbo.alpha) * log_w
        log_mean = torch.logsumexp(scaled, dim=0) - math.log(k)
        return -float(log_mean.sum()) / (1.0 - elbo.alpha)
    analytic = isinstance(elbo, TraceMeanField_ELBO)
    return decompose(
        model, guide, *args, num_particles=k, analytic_kl=analytic, compiled=False, **kwargs
    ).loss


@torch.no_grad()
def _no_grad_loss(elbo: ELBO, model, guide, args, kwargs) -> float:
    return float(elbo.loss(model, guide, *args, **kwargs))


def check_objective(
    elbo: ELBO, model: Callable, guide: Callable, *args, seed: int = 0, **kwargs
) -> ObjectiveCheck:
    """Check that ``elbo.loss`` and ``elbo.loss_and_grads`` return minus the stated objective.

    Under one seed, three computations draw the same z_k ~ q: Pyro's ``.loss``, its
    ``.loss_and_grads`` (parameter gradients restored afterwards), and the objective computed
    here, from :func:`inference.elbo.decompose` (ELBO estimators: Monte-Carlo KL, analytic KL
    where valid for TraceMeanField_ELBO, enumerated sites summed out) or from
    :func:`inference.evidence.log_weights` (RenyiELBO, one weight per data point for a local
    model). Particles must be drawn one at a time (``vectorize_particles=False``), except for
    RenyiELBO, whose vectorized draws log_weights repeats. ``max_plate_nesting`` left at
    infinity is set on ``elbo`` from the pair, as Pyro sets it on its first call (Pyro's own
    guess would draw noise).

    Returns:
        An :class:`ObjectiveCheck`, whole-data values in nats.
    """
    objective, text = objective_text(elbo)
    found = enumeration(model, guide, *args, **kwargs)
    if found.sites and not isinstance(elbo, TraceEnum_ELBO):
        raise OptionError(
            f"{type(elbo).__name__}: the model enumerates {', '.join(found.sites)}, which only "
            "TraceEnum_ELBO sums out"
        )
    if elbo.vectorize_particles and elbo.num_particles > 1 and not isinstance(elbo, RenyiELBO):
        raise OptionError(
            f"{_describe(elbo)}: check with vectorize_particles=False, so the draws are shared"
        )
    if elbo.max_plate_nesting == math.inf:  # as Pyro's guess sets it, particle plate included
        vectorized = elbo.vectorize_particles and elbo.num_particles > 1
        elbo.max_plate_nesting = found.max_plate_nesting + (1 if vectorized else 0)
    loss = _seeded(seed, lambda: _no_grad_loss(elbo, model, guide, args, kwargs))
    with_grads = _seeded(seed, lambda: _loss_and_grads(elbo, model, guide, args, kwargs))
    minus = _seeded(
        seed,
        lambda: _minus_objective(elbo, model, guide, args, kwargs, bool(found.sites)),
    )
    residual = max(abs(loss - minus), abs(with_grads - minus))
    ok = residual <= ATOL + RTOL * max(abs(loss), abs(minus))
    note = ""
    if not ok and isinstance(elbo, TraceMeanField_ELBO):
        violations = meanfield_violations(model, guide, *args, **kwargs)
        if violations:
            note = f"its analytic KL is not the ELBO's term here ({'; '.join(violations)})"
    return ObjectiveCheck(
        estimator=_describe(elbo),
        objective=objective,
        objective_text=text,
        loss=loss,
        loss_and_grads=with_grads,
        minus_objective=minus,
        residual=residual,
        ok=ok,
        note=note,
    )


def check_objectives(
    model: Callable,
    guide: Callable,
    *args,
    estimators: Iterable[ELBO] | None = None,
    seed: int = 0,
    **kwargs,
) -> list[ObjectiveCheck]:
    """:func:`check_objective` for each estimator; by default every Pyro ELBO that applies to
    the pair: TraceEnum_ELBO alone for a model with enumerated sites, else Trace_ELBO,
    TraceMeanField_ELBO, TraceGraph_ELBO and RenyiELBO with alpha = 0 and 0.5 (K = 8)."""
    if estimators is None:
        if enumeration(model, guide, *args, **kwargs).sites:
            estimators = [TraceEnum_ELBO()]
        else:
            estimators = [
                Trace_ELBO(),
                TraceMeanField_ELBO(),
                TraceGraph_ELBO(),
                RenyiELBO(alpha=0.0, num_particles=8),
                RenyiELBO(alpha=0.5, num_particles=8),
            ]
    return [check_objective(e, model, guide, *args, seed=seed, **kwargs) for e in estimators]
