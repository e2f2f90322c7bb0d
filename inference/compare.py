"""Comparing guides: several variational families fitted to one model under the same budget.

Each guide is trained by :func:`inference.train.fit` with the same data, options and seed (the
model's own parameters restored to the same initial values first), then evaluated on one split:

    elbo = reconstruction - kl                        (K_elbo particles, analytic KL where valid)
    L_K  = log (1/K) sum_k p(x, z_k) / q(z_k | x)     (Burda et al. 2016; inference.evidence)
    gap  = L_K - elbo  ~  KL(q(z|x) || p(z|x))        (Kingma & Welling 2014, eq. 1)

and the reliability of q as an importance proposal by the Pareto-k̂ of its log-weights, from
ArviZ's own PSIS (:func:`arviz.psislw`): k̂ < 0.5 good, 0.5-0.7 usable, > 0.7 unreliable
(Yao, Vehtari, Simpson & Gelman 2018, "Yes, but did it work?: Evaluating variational inference").
All values are nats per datum. Amortized guides are evaluated on the test split; guides that
describe the posterior of the data they were fit to (autoguides) on the training data.

Draws from every guide's posterior are stored as an :class:`arviz.InferenceData` (posterior
group, named dims and coords) in ``posterior_<guide>.nc``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyro
import torch
from matplotlib.figure import Figure
from pyro import poutine
from pyro.infer import Predictive
from pyro.poutine.util import site_is_subsample
from torch import nn

from .batching import ModelArgs, num_rows, takes_num_data
from .bounds import check_bounds, is_point_estimate
from .data import Dataset, ModelData
from .elbo import decompose
from .errors import NumericalError, OptionError
from .evidence import iwae
from .io import atomic_write_text, write_csv, write_json
from .plots import save_figure
from .subsample import decompose_all_rows
from .train import ESTIMATORS, EVAL_SEED, TrainConfig, config_record, fit, seeded

if TYPE_CHECKING:
    import arviz

__all__ = [
    "CompareConfig",
    "Comparison",
    "ComparisonRow",
    "check_guides",
    "compare_guides",
    "compare",
    "format_table",
    "plot_comparison",
    "posterior_draws",
    "write_comparison",
]

log = logging.getLogger(__name__)

#: k̂ above this makes importance sampling with q unreliable (Yao et al. 2018).
KHAT_THRESHOLD = 0.7

#: Estimators with an analytic KL term; flows have no registered KL to use there.
ANALYTIC_ESTIMATORS = ("meanfield", "jit-meanfield")
FLOW_GUIDES = ("flow", "AutoIAFNormal")
#: Estimator names as Pyro calls them, for the table.
ESTIMATOR_NAMES = {name: cls.__name__ for name, cls in ESTIMATORS.items()}


@dataclass(frozen=True)
class CompareConfig:
    """Options of the evaluation in :func:`compare`.

    Attributes:
        num_samples: K of L_K.
        elbo_particles: draws per datum for the ELBO and its decomposition.
        num_draws, num_chains: posterior draws saved per guide, as ``num_chains`` chains of
            ``num_draws // num_chains`` independent draws (so ArviZ's multi-chain summaries run).
        split: ``"auto"`` (test for amortized guides, train otherwise), ``"test"`` or ``"train"``.
        chunk_size: particles vectorized at once in L_K (default: inference.evidence's choice).
        eval_batch_size: data rows per evaluation call for mini-batched models.
    """

    num_samples: int = 1000
    elbo_particles: int = 100
    num_draws: int = 200
    num_chains: int = 4
    split: str = "auto"
    chunk_size: int | None = None
    eval_batch_size: int = 512

    def __post_init__(self):
        for name in ("num_samples", "elbo_particles", "num_draws", "num_chains", "eval_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise OptionError(
                    f"--{name.replace('_', '-')}: must be a positive integer, got {v!r}"
                )
        if self.num_draws < self.num_chains:
            raise OptionError(
                f"--num-draws: need at least one draw per chain ({self.num_chains}), got {self.num_draws}"
            )
        if self.split not in ("auto", "test", "train"):
            raise OptionError(f"split: must be 'auto', 'test' or 'train', got {self.split!r}")


class ComparisonRow(NamedTuple):
    """One guide's numbers, nats per datum (``*_stderr``: Monte-Carlo standard errors)."""

    guide: str
    split: str
    n: int
    elbo: float
    elbo_stderr: float
    reconstruction: float
    kl: float
    log_px: float  # L_K
    log_px_stderr: float
    gap: float  # L_K - elbo
    gap_stderr: float
    khat_median: float
    khat_share_bad: float  # share of data points (or the one global k̂) above 0.7
    ess_median: float
    seconds: float  # SVI steps only (evaluation excluded)
    num_params: int  # the guide's parameters
    note: str
    estimator: str = ""  # the Pyro estimator the guide was trained with
    bounds_ok: bool | None = None  # ELBO <= L_K within 5 s.e. (None: not checked)
    bounds: str = ""  # what was violated, or why nothing was checked
    failed: str = ""  # why training failed (a NaN loss, ...); the numbers are then NaN


class Comparison(NamedTuple):
    """The table of :func:`compare` with what it was computed from."""

    rows: tuple[ComparisonRow, ...]
    num_samples: int
    train: dict[str, Any]
    model: str
    #: per-datum PSIS k̂ of each guide (one value for global models; NaN for a point mass)
    khats: dict[str, np.ndarray] | None = None
    #: what the values are (``inference.watch`` tabulates whole objectives, as svi.step has them)
    units: str = "nats per datum"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "units": self.units,
            "num_samples": self.num_samples,
            "khat_threshold": KHAT_THRESHOLD,
            "train": self.train,
            "rows": [
                {
                    k: None if isinstance(v, float) and math.isnan(v) else v
                    for k, v in r._asdict().items()
                }
                for r in self.rows
            ],
        }


# --- guides --------------------------------------------------------------------------------------


def check_guides(names: Sequence[str], *, amortized: bool, estimator: str) -> None:
    """Refuse guide names that do not fit the model kind or the estimator (OptionError).

    ``amortized``: the model has a local latent per data point and takes ``diag``/``full``/
    ``flow``; otherwise (global latents) it takes autoguide names.
    """
    from models.guides import AUTOGUIDES, GUIDE_FAMILIES, autoguide_name

    if not names:
        raise OptionError("--guides: name at least one guide")
    if len(set(names)) != len(names):
        raise OptionError(f"--guides: a guide is named twice in {','.join(names)}")
    for name in names:
        if amortized and name not in GUIDE_FAMILIES:
            hint = " (an autoguide, for models with global latents)" if _is_autoguide(name) else ""
            raise OptionError(
                f"--guides: {name!r}{hint} does not fit this model; choose from "
                f"{', '.join(GUIDE_FAMILIES)}"
            )
        if not amortized and ":" in name:  # the user's own guide, FILE.py:NAME
            continue
        if not amortized:
            if name in GUIDE_FAMILIES:
                raise OptionError(
                    f"--guides: {name!r} is an amortized encoder for the built-in models; a user "
                    f"model takes autoguides ({', '.join(AUTOGUIDES)})"
                )
            try:
                name = autoguide_name(name)
            except ValueError as exc:
                raise OptionError(f"--guides: {exc}") from None
        if estimator in ANALYTIC_ESTIMATORS and name in FLOW_GUIDES:
            raise OptionError(
                f"--estimator {estimator}: needs an analytic KL, which the flow guide {name!r} "
                f"lacks; use --estimator trace"
            )


def _is_autoguide(name: str) -> bool:
    from models.guides import autoguide_name

    try:
        autoguide_name(name)
    except ValueError:
        return False
    return True


def _build_guide(entry: Any, model: Callable) -> Callable:
    """A guide from a dict entry: a guide, or a factory (a class / ``functools.partial`` of one)
    that takes the model, such as ``AutoNormal``."""
    target = getattr(entry, "func", entry)
    if isinstance(target, type):
        return entry(model)
    if callable(entry):
        return entry
    raise OptionError(f"guide {entry!r} is neither a guide nor a guide factory")


def _is_amortized(guide: Callable) -> bool:
    from models.guides import AmortizedGuide

    owner = getattr(guide, "__self__", guide)
    return isinstance(owner, AmortizedGuide) or (
        isinstance(owner, nn.Module) and hasattr(owner, "encoder")
    )


def _note(point_estimate: bool) -> str:
    if point_estimate:
        return "point estimate: 'ELBO' = log p(x, z*) omits the entropy; L_K is not a bound"
    return ""


def _param_count(guide: Callable, call: ModelArgs) -> int:
    """Number of scalars in the parameters the guide registers (one traced run)."""
    with torch.random.fork_rng(devices=[]):
        trace = poutine.trace(guide, param_only=True).get_trace(*call.args, **call.kwargs)
    store = pyro.get_param_store()
    return int(sum(store[name].numel() for name in trace.nodes))


def _model_module(model: Callable) -> nn.Module | None:
    owner = getattr(model, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


# --- evaluation ----------------------------------------------------------------------------------


class _Evaluation(NamedTuple):
    elbo: float
    elbo_var: float
    reconstruction: float
    kl: float
    log_px: float
    log_px_var: float
    log_weights: torch.Tensor  # (K, N) local or (K,) global


def _evaluate(
    model: Callable, guide: Callable, call: ModelArgs, options: CompareConfig, batched: bool
) -> _Evaluation:
    """Totals over the model's arguments of the ELBO (decomposed) and of L_K, with Monte-Carlo
    variances; ``batched`` (local latents, one data tensor): in chunks of rows."""
    n = call.args[0].shape[0] if batched else 1
    step = options.eval_batch_size if batched else 1
    elbo = elbo_var = recon = kl = log_px = log_px_var = 0.0
    weights = []
    with seeded(EVAL_SEED):
        for start in range(0, n, step):
            part = ModelArgs((call.args[0][start : start + step],), {}) if batched else call
            # one call of the model's own arguments: a self-subsampling plate, all its rows
            d = (decompose if batched else decompose_all_rows)(
                model,
                guide,
                *part.args,
                num_particles=options.elbo_particles,
                analytic_kl=True,
                **part.kwargs,
            )
            elbo, recon, kl = elbo + d.elbo, recon + d.reconstruction, kl + d.kl
            elbo_var += d.elbo_stderr**2 if math.isfinite(d.elbo_stderr) else 0.0
            est = iwae(
                model,
                guide,
                *part.args,
                num_samples=options.num_samples,
                chunk_size=options.chunk_size,
                **part.kwargs,
            )
            log_px += est.log_px
            log_px_var += est.stderr**2 if math.isfinite(est.stderr) else 0.0
            weights.append(est.log_weights)
    if len(weights) > 1 and weights[0].dim() != 2:
        raise OptionError("a model with global latents must be evaluated in one batch")
    log_w = torch.cat(weights, dim=-1)
    return _Evaluation(elbo, elbo_var, recon, kl, log_px, log_px_var, log_w)


def psis_khat(log_weights: torch.Tensor) -> np.ndarray:
    """Pareto k̂ of importance log-weights by ArviZ's PSIS: ``(K, N)`` -> ``(N,)``, ``(K,)`` -> ``()``.

    Draws are independent, so the relative efficiency is 1 (Vehtari et al. 2024).
    """
    lw = log_weights.detach().cpu().numpy().astype(np.float64)
    lw = lw.T if lw.ndim == 2 else lw  # ArviZ wants draws last
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        import arviz as az  # imported when needed: it costs 1.7 s at start-up of every command

        _, khat = az.psislw(lw, reff=1.0)
    return np.asarray(khat, dtype=np.float64)


def posterior_draws(
    model: Callable, guide: Callable, call: Any, num_draws: int, seed: int = EVAL_SEED
) -> dict[str, torch.Tensor]:
    """``num_draws`` independent draws of every latent site from the guide, ``(S, *site shape)``.

    ``call``: the model's arguments (:class:`~inference.batching.ModelArgs` or one tensor).
    Amortized guides with a ``distribution(x)`` are sampled in one vectorized call; any other
    guide by Pyro's :class:`~pyro.infer.Predictive`, one guide run per draw. Only latent sites
    of the model are returned.
    """
    call = ModelArgs.of(call)
    with torch.no_grad(), seeded(seed):
        if hasattr(guide, "distribution") and hasattr(guide, "site"):
            return {guide.site: guide.distribution(call.args[0]).sample((num_draws,))}
        guide_trace = poutine.trace(guide).get_trace(*call.args, **call.kwargs)
        replayed = poutine.replay(model, trace=guide_trace)
        model_trace = poutine.trace(replayed).get_trace(*call.args, **call.kwargs)
        names = [
            name
            for name, site in model_trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
        ]
        predictive = Predictive(model, guide=guide, num_samples=num_draws, return_sites=names)
        draws = predictive(*call.args, **call.kwargs)
    # Predictive pads every site to the model's plate nesting: back to each site's own shape
    shapes = {name: model_trace.nodes[name]["value"].shape for name in names}
    return {name: draws[name].detach().reshape(num_draws, *shapes[name]) for name in names}


def _inference_data(
    draws: Mapping[str, torch.Tensor], options: CompareConfig, *, local: bool, attrs: Mapping
) -> arviz.InferenceData:
    """Draws ``(S, ...)`` -> InferenceData with dims (chain, draw, ...), named dims and coords."""
    chains = options.num_chains
    per_chain = next(iter(draws.values())).shape[0] // chains
    posterior, dims, coords = {}, {}, {}
    for name, value in draws.items():
        array = value[: chains * per_chain].cpu().numpy()
        array = array.reshape(chains, per_chain, *array.shape[1:])
        posterior[name] = array
        if local and array.ndim == 4:  # (chain, draw, datum, latent)
            dims[name] = ["datum", f"{name}_dim"]
            coords["datum"] = np.arange(array.shape[2])
            coords[f"{name}_dim"] = np.arange(array.shape[3])
        else:
            dims[name] = [f"{name}_dim_{i}" for i in range(array.ndim - 2)]
            coords.update({f"{name}_dim_{i}": np.arange(s) for i, s in enumerate(array.shape[2:])})
    import arviz as az

    idata = az.from_dict(posterior=posterior, dims=dims, coords=coords)
    idata.posterior.attrs.update({k: str(v) for k, v in attrs.items()})
    return idata


def _save_netcdf(idata: arviz.InferenceData, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    idata.to_netcdf(str(tmp))
    os.replace(tmp, path)


# --- the comparison ------------------------------------------------------------------------------


def _failed_row(name: str, split: str, n: int, reason: str) -> ComparisonRow:
    nan = math.nan
    return ComparisonRow(
        guide=name,
        split=split,
        n=n,
        elbo=nan,
        elbo_stderr=nan,
        reconstruction=nan,
        kl=nan,
        log_px=nan,
        log_px_stderr=nan,
        gap=nan,
        gap_stderr=nan,
        khat_median=nan,
        khat_share_bad=nan,
        ess_median=nan,
        seconds=nan,
        num_params=0,
        note="",
        failed=reason,
    )


def compare(
    model: Callable,
    guides: Mapping[str, Any],
    data: Dataset | torch.Tensor,
    config: TrainConfig | None = None,
    options: CompareConfig = CompareConfig(),
    *,
    out_dir: str | os.PathLike | None = None,
    model_name: str = "",
) -> Comparison:
    """Train every guide on the same data with the same options and seed; tabulate what each buys.

    For each guide in turn: the param store is cleared, the model's module (if ``model`` is a
    bound method of an ``nn.Module``, e.g. ``VAE.model``) is reset to its initial parameters,
    the guide is built (a factory such as ``AutoNormal`` gets the model), trained by
    :func:`inference.train.fit` under ``config`` and evaluated as described in the module
    docstring. The trained guide's parameters stay in the param store until the next guide.

    Args:
        model: a Pyro model ``model(x[, num_data])``.
        guides: name -> guide (a callable with the model's signature, e.g. an
            :class:`~models.guides.AmortizedGuide`) or guide factory (a class or
            ``functools.partial`` of one, called with the model).
        data: a :class:`~inference.data.Dataset` (train and test split) or a tensor ``(N, D)``
            (training data only).
        config: training options shared by all guides (default ``TrainConfig()``).
        options: evaluation options.
        out_dir: with it, each guide's posterior draws are written there as
            ``posterior_<guide>.nc`` (no per-epoch checkpoints: they would cost more than the
            small models' steps).
        model_name: how the model is named in the outputs.

    Returns:
        A :class:`Comparison`; its rows follow the order of ``guides``.
    """
    config = config if config is not None else TrainConfig()
    if isinstance(data, Dataset):
        train_call, test_call = ModelArgs((data.train,), {}), ModelArgs((data.test,), {})
    elif isinstance(data, ModelData):
        train_call, test_call = data.train, data.test
    else:
        train_call, test_call = ModelArgs.of(data), None
    out_dir = Path(out_dir) if out_dir is not None else None
    module = _model_module(model)
    initial = copy.deepcopy(module.state_dict()) if module is not None else None
    batched = takes_num_data(model)
    rows = []
    khats: dict[str, np.ndarray] = {}
    for name, entry in guides.items():
        pyro.clear_param_store()
        if module is not None:
            module.load_state_dict(initial)
        with seeded(config.seed):
            guide = _build_guide(entry, model)
        amortized = _is_amortized(guide)
        split = options.split if options.split != "auto" else "test" if amortized else "train"
        if split == "test" and test_call is None:
            split = "train"
        if config.estimator in ANALYTIC_ESTIMATORS and (
            getattr(guide, "family", "") == "flow" or type(guide).__name__ == "AutoIAFNormal"
        ):
            raise OptionError(
                f"--estimator {config.estimator}: guide {name!r} is a flow without analytic KL"
            )
        eval_call = test_call if split == "test" else train_call
        n = num_rows(model, eval_call.args, eval_call.kwargs, None)
        log.info("comparing guides: training %s", name)
        # The comparison evaluates each guide itself afterwards: fit's per-epoch metrics
        # would only cost time, so they are computed once, after the last epoch.
        start = time.perf_counter()
        try:
            result = fit(
                model,
                guide,
                *train_call.args,
                config=replace(config, eval_every=config.epochs),
                **train_call.kwargs,
            )
        except Exception as exc:  # keep the guides already compared; report this one
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            if not isinstance(exc, NumericalError | OptionError):
                reason = f"{type(exc).__name__}: {reason}"
            log.warning("guide %s failed: %s", name, reason)
            log.debug("guide %s failed", name, exc_info=True)
            rows.append(_failed_row(name, split, n, reason))
            khats[name] = np.full(1, np.nan)
            continue
        seconds = time.perf_counter() - start
        if batched:
            x = train_call.args[0]
            probe = ModelArgs((x[: min(2, x.shape[0])],), {"num_data": x.shape[0]})
        else:
            probe = train_call
        num_params = _param_count(guide, probe)
        try:
            ev = _evaluate(model, guide, eval_call, options, batched and amortized)
        except Exception as exc:  # e.g. no L_K for a plate that subsamples itself
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            if not isinstance(exc, OptionError):
                reason = f"{type(exc).__name__}: {reason}"
            log.warning("guide %s: evaluation failed: %s", name, reason)
            rows.append(_failed_row(name, split, n, f"evaluation: {reason}"))
            khats[name] = np.full(1, np.nan)
            continue
        local = ev.log_weights.dim() == 2
        # a point mass has no density to importance-sample with: k̂ is undefined
        point = is_point_estimate(guide, *probe.args, **probe.kwargs)  # AutoDelta, a MAP guide
        khat = np.full(1, np.nan) if point else psis_khat(ev.log_weights)
        elbo_se = math.sqrt(ev.elbo_var) / n if ev.elbo_var > 0 else None
        bounds = check_bounds(
            ev.elbo / n,
            elbo_se,
            ev.log_px / n,
            math.sqrt(ev.log_px_var) / n,
            options.num_samples,
            point_estimate=point,
        )
        khats[name] = khat
        ess = torch.exp(
            2 * torch.logsumexp(ev.log_weights, 0) - torch.logsumexp(2 * ev.log_weights, 0)
        )
        rows.append(
            ComparisonRow(
                guide=name,
                split=split,
                n=n,
                elbo=ev.elbo / n,
                elbo_stderr=math.sqrt(ev.elbo_var) / n,
                reconstruction=ev.reconstruction / n,
                kl=ev.kl / n,
                log_px=ev.log_px / n,
                log_px_stderr=math.sqrt(ev.log_px_var) / n,
                gap=(ev.log_px - ev.elbo) / n,
                gap_stderr=math.sqrt(ev.elbo_var + ev.log_px_var) / n,
                khat_median=float(np.median(khat)),
                khat_share_bad=math.nan if point else float(np.mean(khat > KHAT_THRESHOLD)),
                ess_median=float(ess.median()),
                seconds=seconds,
                num_params=num_params,
                note=_note(point),
                estimator=ESTIMATOR_NAMES.get(result.estimator, result.estimator),
                bounds_ok=bounds.ok if bounds.checked else None,
                bounds="; ".join(bounds.violations) if bounds.checked else "point estimate",
            )
        )
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            draws = posterior_draws(model, guide, eval_call, options.num_draws)
            attrs = {
                "guide": name,
                "model": model_name,
                "split": split,
                "note": "independent draws from the guide q (not MCMC); chains split them evenly",
            }
            _save_netcdf(
                _inference_data(draws, options, local=local, attrs=attrs),
                Path(out_dir) / f"posterior_{name}.nc",
            )
    train = {k: v for k, v in config_record(config).items() if k != "progress"}
    return Comparison(tuple(rows), options.num_samples, train, model_name, khats)


# --- output --------------------------------------------------------------------------------------

COLUMNS = (
    ("guide", "guide", "{}"),
    ("elbo", "ELBO", "{:.3f}"),
    ("reconstruction", "E[log p(x|z)]", "{:.3f}"),
    ("kl", "KL(q||p(z))", "{:.3f}"),
    ("log_px", "L_K", "{:.3f}"),
    ("gap", "L_K - ELBO", "{:.3f}"),
    ("khat_median", "k̂ median", "{:.2f}"),
    ("khat_share_bad", "k̂ > 0.7", "{:.0%}"),
    ("seconds", "train s", "{:.1f}"),
    ("num_params", "params", "{}"),
)


def format_table(comparison: Comparison) -> str:
    """A Markdown table of the comparison (nats per datum), with notes below it."""
    header = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" if k == "guide" else "---:" for k, _, _ in COLUMNS) + "|"
    lines = [header, rule]
    for row in comparison.rows:
        cells = []
        if row.failed:
            cells = [row.guide] + ["failed"] * (len(COLUMNS) - 1)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        for key, _, fmt in COLUMNS:
            value = getattr(row, key)
            cells.append(
                "nan" if isinstance(value, float) and math.isnan(value) else fmt.format(value)
            )
        if row.bounds_ok is False:
            cells[0] = f"{row.guide} !! BOUND VIOLATED"
        lines.append("| " + " | ".join(cells) + " |")
    splits = sorted({(r.split, r.n) for r in comparison.rows})
    lines.append("")
    lines.append(
        f"{comparison.units} on the {', '.join(f'{s} split ({n} rows)' for s, n in splits)}; "
        f"L_K with K = {comparison.num_samples}; k̂: PSIS Pareto shape of the log-weights "
        f"(ArviZ; > 0.7 unreliable, Yao et al. 2018)."
    )
    estimators = sorted({r.estimator for r in comparison.rows if r.estimator})
    if estimators:
        lines.append(f"Trained with {', '.join(estimators)}; ELBO <= L_K checked within 5 s.e.")
    for row in comparison.rows:
        if row.note:
            lines.append(f"{row.guide}: {row.note}.")
        if row.failed:
            lines.append(f"{row.guide}: training failed: {row.failed}")
        if row.bounds_ok is False:
            lines.append(f"{row.guide}: !! BOUND VIOLATED: {row.bounds}")
    return "\n".join(lines)


def plot_comparison(comparison: Comparison, path: str | os.PathLike | None = None) -> Figure:
    """ELBO and L_K per guide with ±2 standard-error bars (nats per datum)."""
    rows = comparison.rows
    fig = Figure(figsize=(1.6 + 1.3 * len(rows), 3.6), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    xs = np.arange(len(rows))
    for offset, key, label, marker in (
        (-0.1, "elbo", "ELBO", "o"),
        (0.1, "log_px", f"L_K (K = {comparison.num_samples})", "s"),
    ):
        values = [getattr(r, key) for r in rows]
        errors = [2 * getattr(r, f"{key}_stderr") for r in rows]
        ax.errorbar(xs + offset, values, yerr=errors, fmt=marker, capsize=4, label=label)
    ax.set_xticks(xs, [r.guide for r in rows])
    ax.set_ylabel(comparison.units if len(comparison.units) < 30 else "nats")
    title = f"{comparison.model or 'model'}: ELBO ≤ L_K ≤ log p(x), ±2 s.e."
    points = [r.guide for r in rows if math.isnan(r.khat_share_bad)]  # k̂ undefined: point mass
    if points:
        title += f"\n({', '.join(points)}: point estimate, its values are not bounds)"
    ax.set_title(title, fontsize="medium")
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    if path is not None:
        save_figure(fig, path)
    return fig


def write_comparison(comparison: Comparison, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``comparison.csv``, ``.json``, ``.md`` and ``.png`` to ``out_dir``; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"comparison.{ext}" for ext in ("csv", "json", "md", "png")}
    write_csv(paths["csv"], [r._asdict() for r in comparison.rows])
    write_json(paths["json"], comparison.to_dict())
    atomic_write_text(paths["md"], format_table(comparison) + "\n")
    plot_comparison(comparison, paths["png"])
    return paths


# --- by name, as the command line asks -----------------------------------------------------------

#: Default guides per kind of model.
DEFAULT_GUIDES = {
    "amortized": ("diag", "full", "flow"),
    "user": ("AutoNormal", "AutoMultivariateNormal"),
}


def compare_guides(
    model: str,
    guides: Sequence[str] | None,
    data: str,
    *,
    epochs: int = TrainConfig.epochs,
    batch_size: int | None = None,
    learning_rate: float = 1e-3,
    seed: int = 0,
    estimator: str = "trace",
    optimizer: str = "adam",
    jit: str = TrainConfig.jit,
    latent_dim: int = 10,
    hidden_dims: Sequence[int] = (200,),
    device: str = "cpu",
    dtype: str = "float32",
    options: CompareConfig = CompareConfig(),
    out_dir: str | os.PathLike | None = None,
    replace: bool = False,
    progress: bool = False,
    max_bytes: int | None = None,
) -> Comparison:
    """:func:`compare` for a model and guides named as on the command line.

    ``model`` is a built-in name (``vae``, ``ppca``, ``fa``: amortized ``diag``/``full``/``flow``
    guides, linear encoders for the linear-Gaussian models) or a user model ``FILE.py:NAME`` /
    ``package.module:NAME`` taking the data tensor (autoguides by name). ``batch_size=None`` is
    128 for the built-in models and the full data for a user model without ``num_data``.
    Incompatible combinations raise :class:`~inference.errors.OptionError` before any work.
    """
    from models.guides import AUTOGUIDES, autoguide_name, make_guide

    from .data import load_data, load_model_data
    from .run import DTYPES, MODELS, ModelSpec, build_model
    from .user_model import guide_label, is_user_model, load_user_guide, load_user_model

    user = is_user_model(model)
    if not user and model not in MODELS:
        raise OptionError(
            f"--model: unknown model {model!r} (choose from {', '.join(MODELS)}, or FILE.py:NAME)"
        )
    names = [g.strip() for g in guides if g.strip()] if guides is not None else None
    names = names if names is not None else list(DEFAULT_GUIDES["user" if user else "amortized"])
    check_guides(names, amortized=not user, estimator=estimator)
    spec = None
    if not user:  # validate the model options before loading anything
        spec = ModelSpec(
            model=model,
            data=data,
            latent_dim=latent_dim,
            hidden_dims=tuple(hidden_dims),
            device=device,
            dtype=dtype,
        )
    elif dtype not in DTYPES:
        raise OptionError(f"--dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    pyro.clear_param_store()
    if user:
        model_fn = load_user_model(model)
        dataset = load_model_data(data, model_fn).to(device, DTYPES[dtype])
        entries: dict[str, Any] = {}
        for n in names:
            if is_user_model(n):  # the user's own guide, FILE.py:NAME: built once, now
                with seeded(seed):
                    entries[guide_label(n)] = load_user_guide(n, model_fn, option="--guides")
            else:
                entries[autoguide_name(n)] = AUTOGUIDES[autoguide_name(n)]
        batched = takes_num_data(model_fn)
        label = model
    else:
        dataset = load_data(data).to(device, DTYPES[dtype])
        with seeded(seed):
            module, model_fn, _ = build_model(spec, dataset)
            widths = tuple(hidden_dims) if model == "vae" else ()  # linear encoders: exact family
            try:
                entries = {
                    n: make_guide(n, dataset.data_dim, latent_dim, widths).to(device, DTYPES[dtype])
                    for n in names
                }
            except ValueError as exc:  # models/ words it in model terms; the option is ours
                raise OptionError(f"--guides: {exc}") from None
        batched, label = True, model
    if batch_size is None:
        batch_size = 128 if batched else None
    if max_bytes is not None:  # the (K, N) log-weights of one guide, float64, twice over
        if isinstance(dataset, Dataset):
            rows = max(len(dataset.train), len(dataset.test))
        else:
            rows = num_rows(model_fn, dataset.train.args, dataset.train.kwargs, None)
        need = 2 * options.num_samples * (rows if batched else 1) * 8
        if need > max_bytes:
            raise OptionError(
                f"--num-samples: K = {options.num_samples} draws for {rows} points need about "
                f"{need / 1e9:.3g} GB; {max_bytes / 1e9:.3g} GB of memory is available"
            )
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        estimator=estimator,
        optimizer=optimizer,
        jit=jit,
        progress=progress,
    )
    if out_dir is not None:
        out_dir = Path(out_dir)
        if out_dir.exists() and replace:
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    return compare(model_fn, entries, dataset, config, options, out_dir=out_dir, model_name=label)
