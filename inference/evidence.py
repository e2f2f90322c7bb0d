"""Importance-sampled evidence: the IWAE bound L_K on log p(x) (Burda et al. 2016).

For K draws z_k ~ q(z | x) from the guide,

    log w_k = log p(x, z_k) - log q(z_k | x)
    L_K     = log (1/K) sum_k w_k = logsumexp_k(log w_k) - log K

Discrete sites that the model enumerates (``@config_enumerate``, absent from the guide) are
summed out inside each weight, log p(x, z_k) = log sum_{z_d} p(x, z_d, z_k)
(:mod:`inference.enumeration`), so L_K is still a bound on log p(x).

E[L_1] = ELBO <= E[L_K] <= E[L_{K+1}] <= log p(x), and L_K -> log p(x) as K -> infinity; the
gap log p(x) - ELBO is KL(q(z | x) || p(z | x)) (Kingma & Welling 2014, eq. 1).

*Local* models, whose every sample site (model and guide) lies in one plate over the data (the
VAE's ``"data"`` plate), factorize over data points, so L_K is computed per datum and summed.
Any other model gets one weight per draw for the whole data set (*global*).

A plate that subsamples itself (``pyro.plate("data", N, subsample_size=B)``) is run over all
its N rows, B at a time, one draw of the latents outside it serving every chunk
(:mod:`inference.subsample`): the weights are those of the whole data, never of a mini-batch.

Particles are vectorized: model and guide run inside a ``pyro.plate`` of ``chunk_size`` draws at
dim ``-(max_plate_nesting + 1)``, as Pyro's ``vectorize_particles`` does, one chunk at a time so
memory stays bounded. A model that does not broadcast over that leftmost dim falls back to one
draw at a time.

Reference: Y. Burda, R. Grosse and R. Salakhutdinov, "Importance Weighted Autoencoders",
ICLR 2016.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites, site_is_subsample

from .enumeration import enumerated_log_joint, enumeration_in
from .errors import OptionError, renamed_field
from .subsample import RowChunk, SubsampledPlate, chunk_rows, trace_pair
from .traced_loss import RecentByFunction, TracedLoss, is_static_pair

__all__ = [
    "latents_are_local",
    "EvidenceEstimate",
    "KHAT_THRESHOLD",
    "PARTICLE_PLATE",
    "effective_sample_size",
    "iwae",
    "log_weights",
    "psis_khat",
]

log = logging.getLogger(__name__)

#: Name of the plate that vectorizes draws from the guide.
PARTICLE_PLATE = "_evidence_particles"

#: Default work per chunk: particles x data rows (a float32 hidden layer of width 200 is 3 MB:
#: small enough for the caches, large enough that a chunk's fixed costs do not matter).
CHUNK_ROWS = 4096


def deprecated_alias(new: str, old: str) -> property:
    """A read-only property ``old`` that returns the field ``new`` with a DeprecationWarning:
    ``log_px`` named L_K as if it were log p(x), which L_K only bounds from below."""

    return renamed_field(
        old, new, ": it holds L_K, the importance-weighted bound on log p(x), not log p(x)"
    )


class EvidenceEstimate(NamedTuple):
    """L_K with its Monte-Carlo standard error, effective sample size and log-weights.

    Attributes:
        lk: L_K, the K-sample importance-weighted bound on log p(x) (L_K <= log p(x) in
            expectation), nats: the sum of per-datum L_K for local models, else the whole-data
            value.
        stderr: Monte-Carlo standard error of ``lk`` (delta method, see :func:`iwae`).
        per_datum: ``(N,)`` per-datum L_K for local models, else None.
        ess: effective sample size (sum w)^2 / sum w^2 of the weights, ``(N,)`` local or ``()``.
        log_weights: ``(K, N)`` local or ``(K,)`` global, log p(x, z_k) - log q(z_k | x), float64.
        num_samples: K.
    """

    lk: float
    stderr: float
    per_datum: torch.Tensor | None
    ess: torch.Tensor
    log_weights: torch.Tensor
    num_samples: int

    log_px = deprecated_alias("lk", "log_px")


class _Layout(NamedTuple):
    """How a model/guide pair's log-densities are laid out: plate nesting and the data plate."""

    max_plate_nesting: int
    data_plate: str | None  # the plate every site lies in, or None (global)
    data_dim: int | None  # its dim (negative)
    data_size: int  # rows per draw: the data plate's (subsample) size, else the largest plate's
    data_scale: float  # full_size / subsample size of the data plate (1 if not subsampled)
    enumerated: bool = False  # the model enumerates sites, summed out in each weight
    subsample: SubsampledPlate | None = None  # a plate drawing its own rows: run over all


def latents_are_local(model: Callable, guide: Callable, *args, **kwargs) -> bool:
    """Whether one plate holds every site of the pair (one z per row), so that its rows can be
    evaluated in separate chunks; False for global latents, whose KL a chunked evaluation
    would count once per chunk, and for pairs whose layout evidence refuses."""
    try:
        return _layout(model, guide, args, kwargs).data_plate is not None
    except OptionError:
        return False


def _sample_sites(trace) -> list[dict]:
    """Sample sites of a trace, without the sites that plates record for their subsample."""
    return [s for s in trace.nodes.values() if s["type"] == "sample" and not site_is_subsample(s)]


def _layout(model: Callable, guide: Callable, args, kwargs) -> _Layout:
    """Run the pair once (drawing none of the caller's noise) to find the plate nesting, the
    enumerated sites and whether one plate holds every site."""
    guide_trace, model_trace, own = trace_pair(model, guide, args, kwargs)
    enumerated = set(enumeration_in(model_trace, guide_trace).sites)
    outside = sorted(
        name
        for name in enumerated
        if own is not None
        and all(f.name != own.name for f in model_trace.nodes[name]["cond_indep_stack"])
    )
    if outside:  # summed once per chunk, it would count once per chunk
        raise OptionError(
            f"plate {own.name!r} subsamples {own.size} of its {own.full_size} rows and the "
            f"model enumerates {', '.join(outside)} outside it: evidence over all rows is "
            "summed out only for sites inside such a plate; give it subsample_size=None"
        )
    sites = _sample_sites(model_trace) + _sample_sites(guide_trace)
    guide_names = {s["name"] for s in _sample_sites(guide_trace)}
    for site in _sample_sites(model_trace):
        if site["is_observed"] or site["name"] in guide_names or site["name"] in enumerated:
            continue
        raise OptionError(f"latent site {site['name']!r} of the model has no site in the guide")
    frames = [[f for f in s["cond_indep_stack"] if f.vectorized] for s in sites]
    all_frames = [f for fs in frames for f in fs]
    nesting = max((-f.dim for f in all_frames), default=0)
    common = set(frames[0]) if frames else set()
    for fs in frames[1:]:
        common &= set(fs)
    if common:
        named = [f for f in common if f.name == "data"]
        plate = named[0] if named else min(common, key=lambda f: f.dim)  # outermost
        full = plate.full_size if plate.full_size is not None else plate.size
        if own is not None and own.name == plate.name:  # every row, chunk by chunk
            return _Layout(
                nesting, plate.name, plate.dim, own.full_size, 1.0, bool(enumerated), own
            )
        scale = full / plate.size
        return _Layout(
            nesting, plate.name, plate.dim, int(plate.size), scale, bool(enumerated), own
        )
    subsampled = [
        f
        for f in all_frames
        if f.full_size is not None and f.full_size > f.size and (own is None or f.name != own.name)
    ]
    if subsampled:  # global latents: one weight needs every row, never a mini-batch
        f = subsampled[0]
        raise OptionError(
            f"plate {f.name!r} subsamples {f.size} of its {f.full_size} rows, its indices given "
            "by the model's arguments: a bound on log p(x) needs one weight of all the rows (a "
            "mini-batch weight scaled by N / B is no evidence); call the model without them"
        )
    size = max((int(f.size) for f in all_frames), default=1)
    return _Layout(nesting, None, None, size, 1.0, bool(enumerated), own)


def _reduce(log_p: torch.Tensor, layout: _Layout, particles: int | None) -> torch.Tensor:
    """Sum a site's log-density over every batch dim except the particle and data dims.

    ``log_p`` has up to ``max_plate_nesting (+ 1 with particles)`` dims, right-aligned. Returns
    ``(particles or 1, N)`` for local layouts and ``(particles or 1,)`` for global ones.
    """
    width = layout.max_plate_nesting + (1 if particles is not None else 0)
    if log_p.dim() > width:
        raise ValueError(
            f"log-density of shape {tuple(log_p.shape)} has batch dims outside any plate"
        )
    log_p = log_p.reshape((1,) * (width - log_p.dim()) + tuple(log_p.shape))
    keep = [0] if particles is not None else []
    if layout.data_dim is not None:
        keep.append(width + layout.data_dim)
    summed = [d for d in range(width) if d not in keep]
    if summed:
        log_p = log_p.sum(dim=summed)
    target = ((particles,) if particles is not None else (1,)) + (
        (layout.data_size,) if layout.data_dim is not None else ()
    )
    if particles is None:
        log_p = log_p.unsqueeze(0)
    if any(s not in (1, t) for s, t in zip(log_p.shape, target, strict=True)):
        raise ValueError(f"log-density of shape {tuple(log_p.shape)} does not match {target}")
    return log_p.expand(target)


def _draw(
    model: Callable, guide: Callable, args, kwargs, layout: _Layout, particles: int | None
) -> torch.Tensor:
    """log w for ``particles`` vectorized draws (or one unvectorized draw when None)."""
    if layout.subsample is None:
        return _draw_once(model, guide, args, kwargs, layout, particles)[0]
    return _draw_all_rows(model, guide, args, kwargs, layout, particles)


def _draw_all_rows(
    model: Callable, guide: Callable, args, kwargs, layout: _Layout, particles: int | None
) -> torch.Tensor:
    """log w of the whole data for a plate that subsamples itself: the sum over chunks of B
    rows (:mod:`inference.subsample`), chunk 0 drawing the latents outside the plate and
    counting their terms, the other chunks taking those values with the terms masked.

        log w = sum_c [log p(x_{R_c}, z_{R_c} | z_g) - log q(z_{R_c} | z_g)] + log p(z_g) - log q(z_g)
    """
    plate = layout.subsample
    local = layout.data_dim is not None
    chunk_layout = layout._replace(data_size=plate.size, data_scale=1.0)
    total, columns, values = 0.0, [], None
    for rows, real in chunk_rows(plate):
        first = values is None
        chunk = RowChunk(plate, rows, real, 1.0 if first else 0.0, values)
        log_w, guide_trace = _draw_once(
            chunk(model), chunk(guide), args, kwargs, chunk_layout, particles
        )
        if first:  # the global latents of this draw, for the other chunks
            values = {
                s["name"]: s["value"]
                for s in _sample_sites(guide_trace)
                if all(f.name != plate.name for f in s["cond_indep_stack"])
            }
        if local:
            columns.append(log_w[:, :real])
        else:
            total = total + log_w
    return torch.cat(columns, dim=1) if local else total


def _draw_once(
    model: Callable, guide: Callable, args, kwargs, layout: _Layout, particles: int | None
):
    """(log w, the guide's trace) for ``particles`` vectorized draws (or one when None)."""

    def run(fn):
        if particles is None:
            return poutine.trace(fn)
        dim = -(layout.max_plate_nesting + 1)

        def vectorized(*a, **k):
            with pyro.plate(PARTICLE_PLATE, particles, dim=dim):
                return fn(*a, **k)

        return poutine.trace(vectorized)

    guide_trace = run(guide).get_trace(*args, **kwargs)
    replayed = poutine.replay(model, trace=guide_trace)
    if layout.enumerated:  # enumeration dims left of the plates and the particle plate
        first = -1 - layout.max_plate_nesting - (0 if particles is None else 1)
        replayed = poutine.enum(replayed, first_available_dim=first)
    model_trace = run(replayed).get_trace(*args, **kwargs)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    # log w = sum over model sites log p - sum over guide sites log q (scaled as in the ELBO);
    # with enumeration, log p(x, z_c) = log sum_{z_d} p(x, z_d, z_c) for the sites touching z_d
    log_w = 0.0
    summed: set[str] = set()
    if layout.enumerated:
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        guide_trace.pack_tensors()
        model_trace.pack_tensors(guide_trace.plate_to_symbol)
        keep = (PARTICLE_PLATE,) + ((layout.data_plate,) if layout.data_plate else ())
        term = enumerated_log_joint(model_trace, keep)
        log_w = _reduce(term.value, layout, particles)
        summed = set(term.sites)
    for site in _sample_sites(model_trace):
        if site["name"] in summed:
            continue
        log_w = log_w + _reduce(site["log_prob"], layout, particles)
    # a messenger guide (Pyro's AutoMessenger) runs the model inside itself: its trace holds
    # the model's observed sites too, which are no part of q (Pyro's get_traces drops them)
    messenger = isinstance(poutine.unwrap(guide), poutine.messenger.Messenger)
    for site in _sample_sites(guide_trace):
        if messenger and site["is_observed"]:
            continue
        log_w = log_w - _reduce(site["log_prob"], layout, particles)
    if not torch.is_tensor(log_w):  # a pair without sites: p(x) = 1
        shape = (particles or 1,) + ((layout.data_size,) if layout.data_dim is not None else ())
        log_w = torch.zeros(shape)
    # per-datum weights carry no subsampling scale N / B
    return log_w.to(torch.float64) / layout.data_scale, guide_trace


@torch.no_grad()
def log_weights(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int,
    chunk_size: int | None = None,
    compiled: bool | None = None,
    **kwargs,
) -> torch.Tensor:
    """Importance log-weights log w_k = log p(x, z_k) - log q(z_k | x), z_k ~ q(z | x).

    Args:
        model, guide: Pyro functions with the same signature; ``*args, **kwargs`` go to both.
        num_samples: K, independent draws from the guide.
        chunk_size: draws vectorized at once; default keeps chunk_size x N near
            :data:`CHUNK_ROWS`, N the data plate's size.
        compiled: run each chunk as a traced graph (same noise, same values); default: when
            model and guide are declared static (:func:`models.structure.static_structure`).

    Returns:
        float64 ``(K, N)`` for local models (one column per row of the data plate, subsampling
        scale removed), ``(K,)`` for global models.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise OptionError(f"num_samples must be a positive integer, got {num_samples!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise OptionError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    layout = _layout(model, guide, args, kwargs)  # refuses a global model's mini-batch
    rows = layout.subsample.size if layout.subsample is not None else layout.data_size
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ROWS // max(rows, 1))
    chunks: list[torch.Tensor] = []
    vectorize = True
    draw = _drawer(model, guide, layout, compiled, chunk_rows=chunk_size * max(rows, 1))
    done = 0
    # The probe above ran under the caller's validation setting; repeating Pyro's argument
    # checks on every chunk of draws costs time and finds nothing new.
    with pyro.validation_enabled(False):
        while done < num_samples:
            size = min(chunk_size, num_samples - done)
            if vectorize:
                state = _rng_state()
                try:
                    if size == chunk_size:
                        chunks.append(draw(args, kwargs, size))
                    else:  # the one ragged last chunk: not worth a graph (nor its tracing)
                        chunks.append(_draw(model, guide, args, kwargs, layout, size))
                    done += size
                    continue
                except (RuntimeError, ValueError) as exc:
                    # Pyro appends a trace-shape dump to the message: only its first line
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    log.warning(
                        "model does not vectorize over particles (%s); one draw at a time", first
                    )
                    vectorize = False
                    _set_rng_state(state)  # the draws one at a time are those of a plain run
            chunks.append(_draw(model, guide, args, kwargs, layout, None))
            done += 1
    return torch.cat(chunks, dim=0)


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _drawer(
    model: Callable, guide: Callable, layout: _Layout, compiled: bool | None, chunk_rows: int
) -> Callable[[tuple, dict, int], torch.Tensor]:
    """``draw(args, kwargs, particles)`` -> log w of one chunk: eager, or for a pair declared
    static a graph exported per chunk size once it recurs (:class:`~inference.traced_loss.
    TracedLoss`, after :data:`EXPORT_AFTER_CHUNKS` chunks of :data:`CHUNK_ROWS` rows or the
    same rows in fewer, larger chunks), which draws the same noise and computes the same
    log-weights without Pyro's Python work (bit for bit, except that a recorded
    MultivariateNormal log-density can differ in the last bit)."""
    if compiled is None:
        compiled = is_static_pair(model, guide)
    if not compiled or layout.enumerated or layout.subsample is not None:
        return lambda args, kwargs, particles: _draw(model, guide, args, kwargs, layout, particles)
    traced = _GRAPHS.get(
        (model, guide),
        layout,
        lambda: TracedLoss(
            lambda *args, particles, **kwargs: _draw(model, guide, args, kwargs, layout, particles),
            differentiable=False,  # log_weights runs without gradients
            hoist=True,
            export_after=EXPORT_AFTER_CHUNKS,
            # wider models' chunks cost more than their rows say (the encoder reruns on every
            # eager chunk): slow ones are exported once they have taken this long
            export_after_seconds=EXPORT_AFTER_EAGER_SECONDS,
        ),
    )
    # A chunk of more rows than CHUNK_ROWS (one draw of N > CHUNK_ROWS rows) costs as much more
    # eagerly, and its graph saves as much more (the noise-free part, the encoder, is computed
    # once per call instead of once per chunk): export after as many rows, not chunks.
    traced.export_after = math.ceil(EXPORT_AFTER_CHUNKS * CHUNK_ROWS / max(chunk_rows, CHUNK_ROWS))
    memo: dict = {}  # what draws no noise is computed once per call of log_weights
    return lambda args, kwargs, particles: traced.call(memo, *args, particles=particles, **kwargs)


#: Traced log-weight graphs of the most recently used static model/guide pairs.
_GRAPHS = RecentByFunction(4)

#: Chunks of one size drawn eagerly before their graph is exported
#: (:class:`~inference.traced_loss.TracedLoss`): exporting costs about as much as 100 eager
#: digits chunks, so an ``iwae`` at K = 1000 (77 chunks) runs eagerly, a second call or a
#: larger K switches to the graph. Chunks of more than :data:`CHUNK_ROWS` rows (one draw of a
#: larger data set) are exported after proportionally fewer: 28 for 15,000 rows.
EXPORT_AFTER_CHUNKS = 100
#: ... or, where they take :data:`~inference.traced_loss.SLOW_CALL_SECONDS` or more each, once
#: the eager chunks of one size have taken this many seconds, whichever comes first. An export
#: costs 0.15-0.35 s; each eager chunk of a wide model reruns its encoder, which the graph
#: computes once per call. The report's L_100 on 2,000 MNIST-sized rows (50 chunks of 2 draws,
#: 55 ms each eagerly, 34 ms as the graph) took 2.8 s all eager and 2.2-2.3 s exported after
#: 10 chunks; the digits' chunks (about 5 ms) keep the chunk count.
EXPORT_AFTER_EAGER_SECONDS = 0.5


def _log_mean_exp(log_w: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


def thread_independent_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum of ``values`` with the same bits whatever torch's thread count: torch splits a
    sum of :data:`~inference.threads.SPLIT_SUM_ELEMENTS` elements or more between its
    threads, so its last bits follow the count (which a probe chooses by the machine's load);
    summed in pieces below that, in order. One piece (fewer elements): ``values.sum()``."""
    from .threads import SPLIT_SUM_ELEMENTS

    pieces = values.reshape(-1).split(SPLIT_SUM_ELEMENTS - 1)
    return torch.stack([p.sum() for p in pieces]).sum() if len(pieces) > 1 else values.sum()


def iwae(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1000,
    chunk_size: int | None = None,
    compiled: bool | None = None,
    **kwargs,
) -> EvidenceEstimate:
    """The importance-weighted bound L_K on log p(x) with its standard error.

        L_K = logsumexp_k(log w_k) - log K,   per datum for local models, summed over data.

    The standard error is the delta method for the log of a sample mean of K weights,
    Var[log mean w] ~ s_w^2 / (K mean(w)^2) = (K / ESS - 1) / (K - 1), summed over data points
    (independent); NaN when K = 1. It ignores the O(1/K) bias of L_K, which is negative.

    Args: as :func:`log_weights`.

    Returns:
        An :class:`EvidenceEstimate`; ``log_weights`` ``(K, N)`` local, ``(K,)`` global.

    Reference: Burda, Grosse & Salakhutdinov (2016), eq. (8).
    """
    log_w = log_weights(
        model,
        guide,
        *args,
        num_samples=num_samples,
        chunk_size=chunk_size,
        compiled=compiled,
        **kwargs,
    )
    bound = _log_mean_exp(log_w)  # (N,) or ()
    ess = effective_sample_size(log_w)
    k = log_w.shape[0]
    if k > 1:
        variance = ((k / ess - 1) / (k - 1)).clamp(min=0)
        stderr = float(thread_independent_sum(variance).sqrt())
    else:
        stderr = math.nan
    local = log_w.dim() == 2
    return EvidenceEstimate(
        lk=float(thread_independent_sum(bound)),
        stderr=stderr,
        per_datum=bound if local else None,
        ess=ess,
        log_weights=log_w,
        num_samples=k,
    )


# --- diagnostics of the log-weights: is q a good importance proposal? --------------------------

#: Pareto k̂ above this makes importance sampling with q unreliable (Yao et al. 2018).
KHAT_THRESHOLD = 0.7


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """Kish's effective sample size of importance weights along dim 0, in log space:

        ESS = (sum_k w_k)^2 / sum_k w_k^2 = exp(2 logsumexp(log w) - logsumexp(2 log w))

    ``(K, N)`` -> ``(N,)``, ``(K,)`` -> ``()``; 1 <= ESS <= K, K for equal weights.
    """
    return torch.exp(2 * torch.logsumexp(log_w, dim=0) - torch.logsumexp(2 * log_w, dim=0))


def psis_khat(log_weights: torch.Tensor) -> np.ndarray:
    """Pareto k̂ of importance log-weights by ArviZ's PSIS: ``(K, N)`` -> ``(N,)``, ``(K,)`` -> ``()``.

    k̂ < 0.5 good, 0.5-0.7 usable, > :data:`KHAT_THRESHOLD` unreliable. Draws are independent,
    so the relative efficiency is 1. One draw has no tail to fit: k̂ is NaN (undefined), where
    ArviZ would index past its single weight.

    References: Yao, Vehtari, Simpson & Gelman (2018), "Yes, but did it work?: Evaluating
    variational inference"; Vehtari, Simpson, Gelman, Yao & Gabry (2024), "Pareto smoothed
    importance sampling".
    """
    lw = log_weights.detach().cpu().numpy().astype(np.float64)
    lw = lw.T if lw.ndim == 2 else lw  # ArviZ wants draws last
    if lw.shape[-1] < 2:  # K = 1 (--num-samples 1)
        return np.full(lw.shape[:-1], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        import arviz as az  # imported when needed: it costs 1.7 s at start-up of every command

        _, khat = az.psislw(lw, reff=1.0)
    return np.asarray(khat, dtype=np.float64)
