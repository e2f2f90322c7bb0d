"""ELBO decomposition for any Pyro model/guide pair (Kingma & Welling 2014, eqs. 1-3).

    ELBO = E_q[log p(x, z) - log q(z | x)]
         = E_q[log p(x | z)] - KL(q(z | x) || p(z))          (reconstruction - kl)
    loss = -ELBO = kl - reconstruction                        (what SVI minimizes)

:func:`decompose` traces the guide, replays the model against it exactly as Pyro's
``Trace_ELBO`` does (plates, subsampling scale and ``poutine.scale`` included), and splits the
result by site: observed sites make up ``reconstruction``, latent sites make up ``kl``.
:func:`evaluate` sums it over a split's rows under a fixed seed and reports it per datum
(:class:`PerDatumElbo`), as training does after each epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import pyro.distributions as dist
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.enum import get_importance_trace
from pyro.infer.inspect import get_dependencies
from torch.distributions import kl_divergence

from models.structure import has_static_structure

from .batching import Batching, chunks, default_batching, num_rows
from .choices import EVAL_BATCH_SIZE
from .enumeration import (
    Enumeration,
    enumerated_log_joint,
    enumerated_traces,
    enumeration,
    has_enumerated_sites,
)
from .errors import OptionError
from .evidence import latents_are_local
from .io import seeded
from .subsample import full_data_pairs
from .traced_loss import RecentByFunction, TracedLoss, freeze, is_static_pair

__all__ = [
    "EVAL_SEED",
    "ElboDecomposition",
    "PerDatumElbo",
    "SiteTerm",
    "decompose",
    "decompose_all_rows",
    "eval_chunk_rows",
    "elbo_and_loss",
    "evaluate",
    "kl_method",
    "latent_parents",
    "meanfield_violations",
]


#: The noise of every :func:`evaluate` by default: common random numbers across epochs and runs.
EVAL_SEED = 20140101


def elbo_and_loss(reconstruction: float, kl: float) -> tuple[float, float]:
    """The ELBO, which is maximized, and the loss, which is minimized, from their two terms.

        elbo = reconstruction - kl,    loss = -elbo = kl - reconstruction

    The one place elbo-lab turns the maximized ELBO into the minimized loss.
    """
    elbo = reconstruction - kl
    loss = -elbo
    return elbo, loss


class SiteTerm(NamedTuple):
    """One sample site's contribution, in nats (scaled as in the ELBO).

    ``kind`` is ``"observed"`` (value = E_q[log p(x | .)], part of reconstruction), ``"latent"``
    (value = E_q[log q(z) - log p(z | .)], part of kl), ``"auxiliary"`` (a guide-only site,
    value = E_q[log q], part of kl) or ``"enumerated"`` (the sites that touch the model's
    enumerated discrete latents z_d, summed out: value = E_q[log sum_{z_d} prod_s p_s], part of
    reconstruction, method ``"exact"``; its name lists the enumerated sites). ``method`` is
    ``"analytic"``, ``"monte_carlo"`` or ``"exact"``.
    """

    name: str
    kind: str
    method: str
    value: float
    stderr: float


class ElboDecomposition(NamedTuple):
    """ELBO = reconstruction - kl and loss = -ELBO, with Monte-Carlo standard errors.

    All values are totals in nats over what the model's plates cover (divide by the number of
    data points for per-datum values). Standard errors are over particles (NaN for one particle;
    zero for terms computed in closed form).
    """

    elbo: float
    loss: float
    reconstruction: float
    kl: float
    elbo_stderr: float
    reconstruction_stderr: float
    kl_stderr: float
    num_particles: int
    sites: tuple[SiteTerm, ...]
    enumerated: tuple[str, ...] = ()  # the model's sites summed out exactly

    def to_dict(self) -> dict[str, Any]:
        d = self._asdict()
        d["sites"] = [s._asdict() for s in self.sites]
        return d


def latent_parents(model: Callable, *args, **kwargs) -> dict[str, set[str]]:
    """For each latent site of ``model``, the other latent sites its prior depends on.

    Uses Pyro's provenance tracking (:func:`pyro.infer.inspect.get_dependencies`).
    """
    deps = get_dependencies(model, args, kwargs)["prior_dependencies"]
    return {name: {p for p in parents if p != name and p in deps} for name, parents in deps.items()}


#: latent_parents of recently used static models: their dependencies cannot change between
#: calls on arguments of the same shapes.
_PARENTS = RecentByFunction(8)


def _latent_parents_once(model: Callable, args: tuple, kwargs: dict) -> dict | None:
    """:func:`latent_parents` (None where provenance tracking fails), computed once per static
    model and argument shapes: it runs the model under provenance tracking, which costs as
    much as the rest of a decomposition."""

    def find() -> dict | None:
        try:
            with torch.random.fork_rng(devices=[]):  # leave the caller's noise untouched
                return latent_parents(model, *args, **kwargs)
        except Exception:  # provenance tracking fails on some models: fall back to Monte Carlo
            return None

    return _once_per_shapes(_PARENTS, (model,), has_static_structure(model), args, kwargs, find)


def _once_per_shapes(
    cache: RecentByFunction, fns: tuple, static: bool, args: tuple, kwargs: dict, find
) -> Any:
    """``find()``, kept in ``cache`` per functions and argument shapes where they are static
    (their structure cannot change between calls on arguments of the same shapes); computed
    afresh otherwise, or where an argument is unhashable."""
    if not static:
        return find()
    try:
        shapes = (freeze(args), freeze(kwargs))
    except TypeError:  # an unhashable argument
        return find()
    return cache.get(fns, shapes, find)


def kl_method(
    guide_site: dict, model_site: dict, parents: set[str] | None, has_auxiliary: bool
) -> tuple[str, str, torch.Tensor | float | None]:
    """How the KL term of one latent site may be computed: ``("analytic", "", kl)`` with the
    registered KL(q_s || p_s), or ``("monte_carlo", reason, None)``.

    The registered closed form is valid for the site's term E_q[log q(z_s | .) - log p(z_s | .)]
    only when

    - a KL is registered for the guide site's distribution against the model site's;
    - the guide site is not a ``Delta``: an autoguide samples a constrained latent as a Delta
      whose ``log_density`` carries the log-Jacobian of the transform, and Pyro's registered
      KL(Delta || p) = -log p(v) drops it (an "ELBO" above log p(x));
    - no auxiliary guide site (a guide-only site) may feed the site;
    - the site's prior depends on no other sampled latent (``parents`` is empty; None means
      the dependencies are unknown).

    Everywhere else the term is the Monte-Carlo log q - log p, as ``Trace_ELBO`` computes it.
    """
    q, p = guide_site["fn"], model_site["fn"]
    if isinstance(q, dist.Delta):
        return "monte_carlo", "the guide's site is a Delta (its log-density is in no KL)", None
    if has_auxiliary:
        return "monte_carlo", "auxiliary guide sites may feed it", None
    if parents is None:
        return "monte_carlo", "its dependence on other latents could not be traced", None
    if parents:
        return "monte_carlo", f"its prior depends on {', '.join(sorted(parents))}", None
    try:
        kl_qp = kl_divergence(q, p)
    except NotImplementedError:
        reason = f"no KL is registered for {type(q).__name__} against {type(p).__name__}"
        return "monte_carlo", reason, None
    return "analytic", "", kl_qp


@torch.no_grad()
def meanfield_violations(model: Callable, guide: Callable, *args, **kwargs) -> list[str]:
    """Sites where ``TraceMeanField_ELBO`` would estimate a wrong objective, with the reason.

    Pyro's ``TraceMeanField_ELBO`` uses the registered KL(q_s || p_s) at every latent site that
    has one. That is the site's term wherever :func:`kl_method` says ``analytic``, and also at
    a ``Delta`` guide site of zero log-density (KL(Delta || p) = -log p(v) is then exactly
    log q - log p). Anywhere else, e.g. at an autoguide's constrained latent, whose Delta
    carries a log-Jacobian, its estimate is not the ELBO. An empty list: the estimator is valid.
    """
    with torch.random.fork_rng(devices=[]):
        model_trace, guide_trace = get_importance_trace(
            "flat", math.inf, model, guide, args, kwargs
        )
    parents = _latent_parents_once(model, args, kwargs)
    has_auxiliary = any(
        s["type"] == "sample" and name not in model_trace.nodes
        for name, s in guide_trace.nodes.items()
    )
    violations = []
    for name, site in guide_trace.nodes.items():  # Pyro's check_fully_reparametrized
        if site["type"] == "sample" and not getattr(site["fn"], "has_rsample", True):
            violations.append(
                f"site {name!r}: the guide's {type(site['fn']).__name__} is not "
                "reparameterized, which TraceMeanField_ELBO needs at every guide site"
            )
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or name not in guide_trace.nodes:
            continue
        q = guide_trace.nodes[name]["fn"]
        try:
            kl_divergence(q, site["fn"])
        except NotImplementedError:
            continue  # Pyro falls back to log q - log p itself
        if isinstance(q, dist.Delta):
            if not torch.is_tensor(q.log_density) or not bool((q.log_density != 0).any()):
                continue
            violations.append(
                f"site {name!r}: the guide's Delta carries a log-Jacobian, which Pyro's "
                "KL(Delta || p) drops"
            )
            continue
        site_parents = None if parents is None else parents.get(name, set())
        method, reason, _ = kl_method(guide_trace.nodes[name], site, site_parents, has_auxiliary)
        if method != "analytic":
            violations.append(f"site {name!r}: {reason}")
    return violations


def _site_terms(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    analytic_kl: bool,
    parents: dict[str, set[str]] | None,
    layout: list[tuple[str, str, str]],
    max_plate_nesting: int | None = None,
) -> torch.Tensor:
    """One draw z ~ q: every site's term as a float64 tensor, in site order, and (filled into
    ``layout``) each term's (name, kind, method). Observed sites: log p(x | .); latent sites:
    the registered KL where :func:`kl_method` says it is valid, else log q - log p; guide-only
    sites: log q.

    With ``max_plate_nesting`` the model's marked sites are enumerated
    (:func:`inference.enumeration.enumerated_traces`): the sites that touch an enumerated
    value make up one ``"enumerated"`` term, log sum_{z_d} prod_s p_s (method ``"exact"``); a
    guide-sampled latent among them keeps only its log q, its log p being inside that sum."""
    if max_plate_nesting is None:
        model_trace, guide_trace = get_importance_trace(
            "flat", math.inf, model, guide, args, kwargs
        )
        in_sum: set[str] = set()
    else:
        model_trace, guide_trace = enumerated_traces(model, guide, args, kwargs, max_plate_nesting)
        enumerated = enumerated_log_joint(model_trace)
        in_sum = set(enumerated.sites)
    values: list[torch.Tensor] = []
    sites: list[tuple[str, str, str]] = []
    has_auxiliary = any(
        s["type"] == "sample" and name not in model_trace.nodes
        for name, s in guide_trace.nodes.items()
    )
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if name in in_sum:
            if not any(kind == "enumerated" for _, kind, _ in sites):
                values.append(_float64(enumerated.value.sum()))
                sites.append((_label(enumerated.enumerated), "enumerated", "exact"))
            if name in guide_trace.nodes:  # log p(z_s | .) is in the sum: only log q remains
                values.append(_float64(guide_trace.nodes[name]["log_prob_sum"]))
                sites.append((name, "latent", "monte_carlo"))
            continue
        if site["infer"].get("enumerate") and name not in guide_trace.nodes:
            raise OptionError(f"site {name!r} is marked for enumeration but was not enumerated")
        if site["is_observed"]:
            values.append(_float64(site["log_prob_sum"]))
            sites.append((name, "observed", "monte_carlo"))
            continue
        if name not in guide_trace.nodes:
            raise OptionError(f"latent site {name!r} of the model has no site in the guide")
        guide_site = guide_trace.nodes[name]
        method = "monte_carlo"
        if analytic_kl:
            site_parents = None if parents is None else parents.get(name, set())
            method, _, kl_qp = kl_method(guide_site, site, site_parents, has_auxiliary)
        if method == "analytic":
            kl_qp = scale_and_mask(kl_qp, guide_site["scale"], guide_site["mask"])
            value = _float64(kl_qp.sum() if torch.is_tensor(kl_qp) else kl_qp)
        else:
            value = _float64(guide_site["log_prob_sum"] - site["log_prob_sum"])
        values.append(value)
        sites.append((name, "latent", method))
    for name, guide_site in guide_trace.nodes.items():
        if guide_site["type"] == "sample" and name not in model_trace.nodes:
            values.append(_float64(guide_site["log_prob_sum"]))
            sites.append((name, "auxiliary", "monte_carlo"))
    layout[:] = sites
    if not values:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack(values)


def _label(enumerated: tuple[str, ...]) -> str:
    """The name of an enumerated term: its sites, or the first and last of a long chain."""
    if len(enumerated) <= 3:
        return "+".join(enumerated)
    return f"{enumerated[0]}+...+{enumerated[-1]} ({len(enumerated)} sites)"


def _float64(value: torch.Tensor | float) -> torch.Tensor:
    """A 0-dim float64 tensor: float(value), exactly (a float32 widens without rounding)."""
    if torch.is_tensor(value):
        return value.detach().to(torch.float64).reshape(())
    return torch.tensor(float(value), dtype=torch.float64)


#: Traced site terms of recently used static pairs, with the layout their tracing filled in.
_TERMS = RecentByFunction(8)

#: Draws with one argument shape that :func:`decompose` runs eagerly before it exports their
#: graph (:class:`~inference.traced_loss.TracedLoss`): exporting costs about as much as 50 eager
#: draws of a digits evaluation batch, so ``fit``'s default evaluations (about 20 a run) stay
#: eager, and evaluating every epoch, or many particles, switches to the graph.
EXPORT_AFTER_DRAWS = 50


def _terms_function(
    model: Callable,
    guide: Callable,
    analytic_kl: bool,
    parents: dict[str, set[str]] | None,
    compiled: bool | None,
    max_plate_nesting: int | None = None,
) -> Callable[[tuple, dict], tuple[torch.Tensor, list[tuple[str, str, str]]]]:
    """``terms(args, kwargs)`` -> (values, layout) of one draw, eager or traced (never traced
    with enumeration: ``max_plate_nesting`` given)."""
    if compiled is None:
        compiled = is_static_pair(model, guide)
    if not compiled or max_plate_nesting is not None:

        def eager(args, kwargs):
            layout: list[tuple[str, str, str]] = []
            values = _site_terms(
                model, guide, args, kwargs, analytic_kl, parents, layout, max_plate_nesting
            )
            return values, layout

        return eager
    frozen = (
        None
        if parents is None
        else tuple(sorted((k, tuple(sorted(v))) for k, v in parents.items()))
    )

    def make() -> tuple[TracedLoss, list[tuple[str, str, str]]]:
        layout: list[tuple[str, str, str]] = []
        traced = TracedLoss(
            lambda *args, **kwargs: _site_terms(
                model, guide, args, kwargs, analytic_kl, parents, layout
            ),
            differentiable=False,
            export_after=EXPORT_AFTER_DRAWS,
        )
        return traced, layout

    traced, layout = _TERMS.get((model, guide), (analytic_kl, frozen), make)

    def compiled_terms(args, kwargs):
        values = traced(*args, **kwargs)
        return values, list(layout)  # filled when the graph was traced (static structure)

    return compiled_terms


def _stderr(values: list[float]) -> float:
    if len(values) < 2:
        return math.nan
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.std(unbiased=True) / math.sqrt(len(values)))


@torch.no_grad()
def decompose(
    model: Callable,
    guide: Callable,
    *args,
    num_particles: int = 1,
    analytic_kl: bool = True,
    compiled: bool | None = None,
    **kwargs,
) -> ElboDecomposition:
    """Split the ELBO of a model/guide pair into reconstruction and KL, site by site.

    For each particle z ~ q(z | x) (guide traced, model replayed):

        reconstruction = sum over observed sites  log p(x_s | .)
        kl             = sum over latent sites    log q(z_s | .) - log p(z_s | .)
                         (or the registered KL(q_s || p_s) when ``analytic_kl`` and the site's
                         prior depends on no other latent site)
        elbo = reconstruction - kl,   loss = -elbo

    Discrete sites the model marks for enumeration (``@config_enumerate``, absent from the
    guide) are summed out exactly, as ``TraceEnum_ELBO`` does (:mod:`inference.enumeration`):
    the sites that touch them make one ``"enumerated"`` term of reconstruction,
    log sum_{z_d} prod_s p_s, so that

        elbo = E_q(z_c)[log sum_{z_d} p(x, z_d, z_c) - log q(z_c)]

    and ``enumerated`` names them. Then ``loss`` equals ``TraceEnum_ELBO(max_plate_nesting=
    ...).loss`` for the same noise (``analytic_kl=False``); with every latent enumerated and an
    empty guide it is exactly -log p(x).

    With ``analytic_kl=False`` the ``loss`` equals ``Trace_ELBO().loss`` for the same noise;
    with ``analytic_kl=True`` it equals ``TraceMeanField_ELBO().loss`` on models whose latent
    priors are not conditioned on other latents (Pyro applies its analytic KL regardless).

    Args:
        model, guide: Pyro functions with the same signature.
        *args, **kwargs: passed to both.
        num_particles: independent draws from the guide; standard errors are across them.
        analytic_kl: use closed-form KL terms where valid.
        compiled: run each draw as a traced graph (the same noise and the same numbers, bit
            for bit, without Pyro's Python work); default: for a pair declared static
            (:func:`inference.traced_loss.is_static_pair`).

    Reference: Kingma & Welling (2014), eq. (3).
    """
    if num_particles < 1:
        raise OptionError(f"num_particles must be positive, got {num_particles}")
    parents: dict[str, set[str]] | None = None
    if analytic_kl:
        parents = _latent_parents_once(model, args, kwargs)

    enumerated = Enumeration((), 0)
    if has_enumerated_sites(model, guide, *args, **kwargs):
        enumerated = enumeration(model, guide, *args, **kwargs)
    nesting = enumerated.max_plate_nesting if enumerated.sites else None
    terms = _terms_function(model, guide, analytic_kl, parents, compiled, nesting)
    per_site: dict[str, list[float]] = {}
    kinds: dict[str, tuple[str, str]] = {}
    recon_draws, kl_draws = [], []
    for _ in range(num_particles):
        values, layout = terms(args, kwargs)
        recon = kl = 0.0
        for (name, kind, method), value in zip(layout, values.tolist(), strict=True):
            if kind in ("observed", "enumerated"):
                recon += value
            else:
                kl += value
            per_site.setdefault(name, []).append(value)
            kinds[name] = (kind, method)
        recon_draws.append(recon)
        kl_draws.append(kl)

    reconstruction = sum(recon_draws) / num_particles
    kl = sum(kl_draws) / num_particles
    elbo, loss = elbo_and_loss(reconstruction, kl)
    sites = tuple(
        SiteTerm(
            name,
            kinds[name][0],
            kinds[name][1],
            sum(v) / len(v),
            0.0 if kinds[name][1] == "analytic" and len(v) > 1 and len(set(v)) == 1 else _stderr(v),
        )
        for name, v in per_site.items()
    )
    elbo_draws = [r - k for r, k in zip(recon_draws, kl_draws, strict=True)]
    return ElboDecomposition(
        elbo=elbo,
        loss=loss,
        reconstruction=reconstruction,
        kl=kl,
        elbo_stderr=_stderr(elbo_draws),
        reconstruction_stderr=_stderr(recon_draws),
        kl_stderr=_stderr(kl_draws),
        num_particles=num_particles,
        sites=sites,
        enumerated=enumerated.sites,
    )


class PerDatumElbo(NamedTuple):
    """The ELBO's terms on one split of the data, per datum, in nats (what :func:`evaluate`
    returns and training reports each epoch): loss = -elbo, elbo = reconstruction - kl.

    ``n`` is the number of data points N the totals were divided by; ``elbo_stderr`` the
    Monte-Carlo standard error of ``elbo`` (None from one draw).
    """

    loss: float
    elbo: float
    reconstruction: float
    kl: float
    n: int
    elbo_stderr: float | None = None

    @classmethod
    def from_totals(
        cls, reconstruction: float, kl: float, n: int, elbo_stderr: float | None = None
    ) -> PerDatumElbo:
        """From whole-split totals (:func:`elbo_and_loss`), each divided by ``n``."""
        elbo, loss = elbo_and_loss(reconstruction, kl)
        return cls(loss / n, elbo / n, reconstruction / n, kl / n, n, elbo_stderr)


def decompose_all_rows(
    model: Callable,
    guide: Callable,
    *args,
    num_particles: int = 1,
    analytic_kl: bool = True,
    **kwargs,
):
    """:func:`decompose` of the whole data: of the pair itself, or summed over
    the chunks of a self-subsampling plate (independent, so variances add)."""
    options = dict(num_particles=num_particles, analytic_kl=analytic_kl)
    pairs = full_data_pairs(model, guide, args, kwargs)
    parts = [decompose(m, g, *args, **options, **kwargs) for m, g in pairs]
    if len(parts) == 1:
        return parts[0]

    def total(name: str) -> float:
        return sum(getattr(p, name) for p in parts)

    def stderr(name: str) -> float:
        return math.sqrt(sum(getattr(p, name) ** 2 for p in parts))

    sites: dict[str, list[SiteTerm]] = {}
    for p in parts:
        for s in p.sites:
            sites.setdefault(s.name, []).append(s)
    elbo, loss = elbo_and_loss(total("reconstruction"), total("kl"))
    return ElboDecomposition(
        elbo=elbo,
        loss=loss,
        reconstruction=total("reconstruction"),
        kl=total("kl"),
        elbo_stderr=stderr("elbo_stderr"),
        reconstruction_stderr=stderr("reconstruction_stderr"),
        kl_stderr=stderr("kl_stderr"),
        num_particles=parts[0].num_particles,
        sites=tuple(
            SiteTerm(
                name,
                terms[0].kind,
                terms[0].method,
                sum(t.value for t in terms),
                math.sqrt(sum(t.stderr**2 for t in terms)),
            )
            for name, terms in sites.items()
        ),
        enumerated=parts[0].enumerated,
    )


def eval_chunk_rows(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    batching: Batching | None,
    batch_size: int | None,
) -> int | None:
    """The rows per chunk an evaluation may use: ``batch_size`` for local latents, None (all
    rows in one call) for global ones, whose KL(q(z) || p(z)) each chunk would count again
    (:func:`inference.evidence.latents_are_local`, run on the first chunk)."""
    if batch_size is None or batching is None or not batching.args:
        return batch_size
    if num_rows(model, args, kwargs, batching) <= batch_size:
        return batch_size  # one chunk: nothing is counted twice
    first = next(chunks(model, args, kwargs, batching, batch_size))
    return batch_size if _latents_are_local_once(model, guide, first) else None


#: latents_are_local of recently evaluated static pairs, by the first chunk's shapes: a
#: static pair's plates cannot change between calls on arguments of the same shapes.
_LOCAL = RecentByFunction(8)


def _latents_are_local_once(model: Callable, guide: Callable, chunk) -> bool:
    """:func:`inference.evidence.latents_are_local` on a chunk's arguments, computed once per
    static pair and argument shapes: it runs the pair (3 ms for the digits VAE's chunk of
    1024 rows), and ``fit`` asks before each of its evaluations."""

    def find() -> bool:
        return latents_are_local(model, guide, *chunk.args, **chunk.kwargs)

    static = is_static_pair(model, guide)
    return _once_per_shapes(_LOCAL, (model, guide), static, chunk.args, chunk.kwargs, find)


def evaluate(
    model: Callable,
    guide: Callable,
    *args,
    batch_size: int | None = EVAL_BATCH_SIZE,
    batching: Batching | None = None,
    analytic_kl: bool = True,
    seed: int = EVAL_SEED,
    num_particles: int = 1,
    **kwargs,
) -> PerDatumElbo:
    """Per-datum loss, ELBO, reconstruction and KL of the model's arguments under the guide.

    Sums :func:`decompose` (``num_particles`` draws) under a fixed seed, then divides by N
    (:func:`inference.batching.num_rows`). With a ``batching`` (default: a ``num_data``
    model's, :func:`~inference.batching.default_batching`) and ``batch_size``, the rows are
    evaluated in chunks, each a full plate (local latents sum over rows;
    :func:`~inference.batching.chunks`); ``batch_size=None`` or no batching evaluates
    everything in one call, as models with global latents need (and get, whatever
    ``batch_size`` says: :func:`eval_chunk_rows`). With several particles ``elbo_stderr`` is the
    standard error of the per-datum ELBO (chunks independent).
    """
    batching = batching if batching is not None else default_batching(model)
    n = num_rows(model, args, kwargs, batching)
    batch_size = eval_chunk_rows(model, guide, args, kwargs, batching, batch_size)
    recon = kl = variance = 0.0
    with seeded(seed):
        for call in chunks(model, args, kwargs, batching, batch_size):
            # undeclared batching: a plate that subsamples itself is run over all its rows
            d = (decompose if batching is not None else decompose_all_rows)(
                model,
                guide,
                *call.args,
                num_particles=num_particles,
                analytic_kl=analytic_kl,
                **call.kwargs,
            )
            recon += d.reconstruction
            kl += d.kl
            variance += d.elbo_stderr**2
    stderr = math.sqrt(variance) / n if math.isfinite(variance) else None
    return PerDatumElbo.from_totals(recon, kl, n, stderr)
