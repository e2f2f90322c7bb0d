"""Discrete latents summed out exactly: model-side enumeration, as ``TraceEnum_ELBO`` does it.

A discrete site of the model marked ``infer={"enumerate": "parallel"}`` (or by
``@config_enumerate``) and absent from the guide is not sampled: ``poutine.enum`` runs the model
on every value of it at once, along a dim left of the plates, and the sum over those values is
taken exactly. With z_d the enumerated sites and z_c the latents the guide samples,

    log p(x, z_c) = log sum_{z_d} p(x, z_d, z_c)
    ELBO          = E_q(z_c)[log sum_{z_d} p(x, z_d, z_c) - log q(z_c)]

and when every latent is enumerated (the guide samples nothing) the ELBO *is* the evidence,
log p(x) = log sum_z p(x, z), exactly. The sum is computed by tensor variable elimination over
the model's plates (``pyro.ops.contract.contract_to_tensor``), which is how ``TraceEnum_ELBO``
computes it, so a Gaussian mixture costs N x K terms and an HMM runs the forward algorithm.

Only the sites that depend on an enumerated value enter the sum, with their masks inside the log
and their (common) subsampling scale outside, as in ``TraceEnum_ELBO``. Enumeration in the guide
(``TraceEnum_ELBO``'s other mode, an exact expectation over q's discrete sites) is not supported.

Reference: F. Obermeyer, E. Bingham, M. Jankowiak, J. Chiu, N. Pradhan, A. Rush and
N. Goodman, "Tensor Variable Elimination for Plated Factor Graphs", ICML 2019.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import pyro.infer
import torch
from opt_einsum import shared_intermediates
from pyro import poutine
from pyro.infer.enum import get_importance_trace
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.util import prune_subsample_sites, site_is_subsample

from models.structure import has_static_structure

from .errors import OptionError
from .traced_loss import RecentByFunction, freeze

__all__ = [
    "EnumeratedTerm",
    "Enumeration",
    "TraceEnum_ELBO",
    "enumerated_log_joint",
    "enumerated_traces",
    "enumeration",
    "enumeration_in",
    "exact_evidence",
    "exact_log_evidence",
    "has_enumerated_sites",
    "refuse_uncovered_pair",
]


class Enumeration(NamedTuple):
    """How a model/guide pair enumerates: the model's enumerated sites (in order) and the
    plate nesting that ``poutine.enum`` must stay left of."""

    sites: tuple[str, ...]
    max_plate_nesting: int


def _probe(model: Callable, guide: Callable | None, args: tuple, kwargs: dict):
    """Traces of the guide and of the model replayed against it, without enumeration, drawing
    none of the caller's noise (and hidden from any handler around the call), without
    gradients."""
    with torch.random.fork_rng(devices=[]), poutine.block(), torch.no_grad():
        guide_trace = (
            poutine.Trace() if guide is None else poutine.trace(guide).get_trace(*args, **kwargs)
        )
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)


def _find(model: Callable, guide: Callable | None, args: tuple, kwargs: dict) -> Enumeration:
    return enumeration_in(*_probe(model, guide, args, kwargs))


def enumeration_in(model_trace: poutine.Trace, guide_trace: poutine.Trace) -> Enumeration:
    """:func:`enumeration` from traces of the guide and of the model replayed against it (run
    without enumeration)."""
    model_trace = prune_subsample_sites(model_trace)
    guide_trace = prune_subsample_sites(guide_trace)
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and site["infer"].get("enumerate"):
            raise OptionError(
                f"site {name!r} is enumerated in the guide: only enumeration in the model "
                "(a site the guide does not sample) is supported"
            )
    sites = []
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or name in guide_trace.nodes:
            continue
        how = site["infer"].get("enumerate")
        if how == "sequential":
            raise OptionError(
                f"site {name!r} is enumerated sequentially in the model: Pyro enumerates model "
                "sites in parallel only (infer={'enumerate': 'parallel'})"
            )
        if how:
            sites.append(name)
    dims = [
        f.dim
        for trace in (model_trace, guide_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for f in site["cond_indep_stack"]
        if f.vectorized
    ]
    return Enumeration(tuple(sites), -min(dims) if dims else 0)


def refuse_uncovered_pair(model: Callable, guide: Callable, *args, **kwargs) -> None:
    """Raise an :class:`OptionError` in one line for a pair no estimator trains correctly:
    the guide marks a site for enumeration (elbo-lab sums out only the model's enumerated
    sites; any estimator would sample it as if it were not marked), or a latent
    site of the model has no site in the guide and is not marked for enumeration (Pyro's
    estimators would sample it from the prior and count log p(z) with no log q(z): no ELBO).
    Runs the pair once, drawing none of the caller's noise, with the guide run only once."""
    with torch.random.fork_rng(devices=[]), poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        enumeration_in(poutine.Trace(), guide_trace)
        replayed = poutine.replay(model, trace=guide_trace)
        model_trace = poutine.trace(replayed).get_trace(*args, **kwargs)
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        if name in guide_trace.nodes or site["infer"].get("enumerate"):
            continue
        raise OptionError(
            f"latent site {name!r} of the model has no site in the guide: add it to the guide "
            "(or mark it for enumeration, if it is discrete)",
            option="guide",
        )


#: Enumerations of recently used static pairs: fixed for arguments of the same shapes.
_FOUND = RecentByFunction(8)


def enumeration(model: Callable, guide: Callable | None, *args, **kwargs) -> Enumeration:
    """The model's sites that ``TraceEnum_ELBO`` sums out, and the pair's plate nesting.

    A site counts when the model marks it for parallel enumeration and the guide does not
    sample it (``guide=None``: no guide, every marked site). Runs the pair once without
    enumeration (as Pyro's own ``max_plate_nesting`` guess does, but under a forked RNG, so
    the caller's noise is untouched); once per argument shapes for a model declared static.
    Raises :class:`OptionError` for enumeration in the guide, or sequential in the model.
    """
    if not has_static_structure(model) or (guide is not None and not has_static_structure(guide)):
        return _find(model, guide, args, kwargs)
    try:
        shapes = (freeze(args), freeze(kwargs))
    except TypeError:  # an unhashable argument
        return _find(model, guide, args, kwargs)
    fns = (model,) if guide is None else (model, guide)
    return _FOUND.get(fns, shapes, lambda: _find(model, guide, args, kwargs))


def has_enumerated_sites(model: Callable, guide: Callable | None, *args, **kwargs) -> bool:
    """Whether ``model`` marks a latent site for parallel enumeration (``@config_enumerate``).

    Runs the model alone (once per argument shapes for a static model), never the guide: a
    cheap gate before :func:`enumeration` of the pair. A model that cannot run without its
    guide is run against ``guide`` when one is given.
    """
    try:
        return bool(enumeration(model, None, *args, **kwargs).sites)
    except OptionError:
        raise
    except Exception:
        if guide is None:
            raise
        return bool(enumeration(model, guide, *args, **kwargs).sites)


def enumerated_traces(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, max_plate_nesting: int
) -> tuple[poutine.Trace, poutine.Trace]:
    """One draw z_c ~ q, and the model run against it with its marked sites enumerated.

    Exactly ``TraceEnum_ELBO``'s traces for a guide that enumerates nothing (the same noise):
    log-densities computed and packed (``Trace.pack_tensors``), enumeration dims left of
    ``max_plate_nesting`` plates.
    """
    enumerated = poutine.enum(model, first_available_dim=-1 - max_plate_nesting)
    model_trace, guide_trace = get_importance_trace(
        "flat", max_plate_nesting, enumerated, guide, args, kwargs
    )
    guide_trace.pack_tensors()
    model_trace.pack_tensors(guide_trace.plate_to_symbol)
    return model_trace, guide_trace


class EnumeratedTerm(NamedTuple):
    """The model's sites that touch an enumerated value, summed out: ``value`` is
    log sum_{z_d} prod_{s in sites} p_s, unpacked (plate dims right-aligned, summed over
    every plate outside ``keep``); ``sites`` all of them, ``enumerated`` the summed ones."""

    value: torch.Tensor
    sites: tuple[str, ...]
    enumerated: tuple[str, ...]


def enumerated_log_joint(model_trace: poutine.Trace, keep: tuple[str, ...] = ()) -> EnumeratedTerm:
    """Sum the enumerated values out of a packed, enumerated model trace
    (:func:`enumerated_traces`).

        log sum_{z_d} prod_{s touching z_d} p_s(. | .)

    by :func:`pyro.ops.contract.contract_to_tensor` down to the plates named in ``keep``
    (e.g. the particle plate and a data plate that every site lies in), the product over all
    other plates taken (a sum of logs). Masks apply inside the log, the sites' common
    subsampling scale outside, as in ``TraceEnum_ELBO`` (a scale that differs between them is
    an :class:`OptionError`). With no enumerated site the value is 0.
    """
    plate_to_symbol = model_trace.plate_to_symbol
    plate_symbols = set(plate_to_symbol.values())
    enum_symbols = set(model_trace.symbol_to_dim) - plate_symbols
    factors: OrderedDict[frozenset, list[torch.Tensor]] = OrderedDict()
    sites, enumerated, scales = [], [], set()
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        log_p = site["packed"]["log_prob"]
        is_enumerated = site["infer"].get("_enumerate_dim") is not None
        if not is_enumerated and enum_symbols.isdisjoint(log_p._pyro_dims):
            continue
        ordinal = frozenset(
            plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized
        )
        if is_enumerated:
            term = site["packed"]["unscaled_log_prob"]
            enumerated.append(name)
        else:
            term = packed.scale_and_mask(
                site["packed"]["unscaled_log_prob"], mask=site["packed"]["mask"]
            )
        factors.setdefault(ordinal, []).append(term)
        sites.append(name)
        scale = site["scale"]
        if torch.is_tensor(scale) and scale.dim():
            raise OptionError(f"site {name!r}: enumeration supports only a scalar scale")
        scales.add(float(scale))
    if len(scales) > 1:
        raise OptionError(
            f"sites {', '.join(sites)} touch an enumerated site but have different scales "
            f"({', '.join(f'{s:g}' for s in sorted(scales))}); enumeration needs a common one"
        )
    if not factors:
        return EnumeratedTerm(torch.zeros(()), (), ())
    target = frozenset(plate_to_symbol[name] for name in keep if name in plate_to_symbol)
    with shared_intermediates() as cache:
        value = contract_to_tensor(factors, enum_symbols, target_ordinal=target, cache=cache)
    value = packed.unpack(value, model_trace.symbol_to_dim)
    return EnumeratedTerm(value * scales.pop(), tuple(sites), tuple(enumerated))


class TraceEnum_ELBO(pyro.infer.TraceEnum_ELBO):
    """Pyro's ``TraceEnum_ELBO``; ``max_plate_nesting`` left at infinity is found from the pair
    on the first call by :func:`enumeration`, which draws none of the caller's noise (Pyro's
    own guess runs the guide once), so the loss matches :func:`inference.elbo.decompose`'s for
    the same seed. ``.loss`` returns -ELBO, the enumerated sites summed out exactly.
    """

    def _nesting(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> None:
        if self.max_plate_nesting == math.inf:
            self.max_plate_nesting = enumeration(model, guide, *args, **kwargs).max_plate_nesting

    def loss(self, model, guide, *args, **kwargs):
        self._nesting(model, guide, args, kwargs)
        return super().loss(model, guide, *args, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        self._nesting(model, guide, args, kwargs)
        return super().differentiable_loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        self._nesting(model, guide, args, kwargs)
        return super().loss_and_grads(model, guide, *args, **kwargs)


def _empty_guide(*args, **kwargs) -> None:
    """A guide that samples nothing: every latent of the model is enumerated."""


@torch.no_grad()
def exact_log_evidence(model: Callable, *args, **kwargs) -> float | None:
    """The exact log p(x) of a model whose every latent is enumerated, else None.

        log p(x) = log sum_z p(x, z)      (e.g. a mixture: sum_n logsumexp_k log pi_k p(x_n | k))

    summed by tensor variable elimination (:func:`enumerated_log_joint`): a mixture's N x K
    terms, an HMM's forward algorithm. None when some latent is not enumerated (the model has
    a site a guide would have to sample), or when the model subsamples a plate (a mini-batch
    has no evidence of the full data).
    """
    found = enumeration(model, None, *args, **kwargs)
    if not found.sites:
        return None
    model_trace, _ = _probe(model, None, args, kwargs)
    for site in model_trace.nodes.values():
        if site["type"] == "sample" and not site["is_observed"]:
            if site["name"] not in found.sites:
                return None
        for frame in site.get("cond_indep_stack", ()):
            if frame.full_size is not None and frame.full_size != frame.size:
                return None
    with torch.random.fork_rng(devices=[]):
        model_trace, _ = enumerated_traces(
            model, _empty_guide, args, kwargs, found.max_plate_nesting
        )
    term = enumerated_log_joint(model_trace)
    log_px = term.value.sum().to(torch.float64)
    for name, site in model_trace.nodes.items():  # observed sites no enumerated value touches
        if site["type"] == "sample" and name not in term.sites:
            log_px = log_px + site["log_prob_sum"].to(torch.float64)
    return float(log_px)


def exact_evidence(model: Callable, guide: Callable, *args, **kwargs) -> dict[str, float | None]:
    """Exact per-pair values where enumeration gives them: ``exact_log_px`` (all latents
    enumerated, :func:`exact_log_evidence`), and then ``exact_elbo`` = log p(x) and
    ``exact_gap`` = KL(q || p(z | x)) = 0 when the guide samples nothing (the ELBO of an
    empty guide is the evidence). Whole-data totals, nats; None where not exact.
    """
    log_px = exact_log_evidence(model, *args, **kwargs)
    none = {"exact_log_px": None, "exact_elbo": None, "exact_gap": None}
    if log_px is None:
        return none
    with torch.random.fork_rng(devices=[]), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    samples = [
        s for s in prune_subsample_sites(guide_trace).nodes.values() if s["type"] == "sample"
    ]
    if samples:
        return {**none, "exact_log_px": log_px}
    return {"exact_log_px": log_px, "exact_elbo": log_px, "exact_gap": 0.0}
