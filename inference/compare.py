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
group, named dims and coords) in ``posterior_<guide>.nc`` (:mod:`inference.posterior`); the
diagnostics k̂ and ESS are :mod:`inference.evidence`'s, the figure :mod:`inference.plots`'.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyro
import torch
from pyro import poutine
from torch import nn

from .batching import ModelArgs, num_rows, takes_num_data
from .bounds import check_bounds, is_point_estimate
from .choices import COMPARE_EVAL_PARTICLES, NUM_DRAWS, NUM_SAMPLES
from .data import Dataset, ModelData
from .elbo import EVAL_SEED, decompose, decompose_all_rows
from .errors import NumericalError, OptionError, renamed_keywords
from .estimators import estimator_label
from .evidence import KHAT_THRESHOLD, deprecated_alias, effective_sample_size, iwae, psis_khat
from .io import atomic_write_text, seeded, write_csv, write_json
from .plots import plot_comparison
from .posterior import posterior_draws, save_netcdf, to_inference_data
from .threads import torch_threads
from .train import TrainConfig, config_record, fit

__all__ = [
    "DEFAULT_GUIDES",
    "CompareConfig",
    "Comparison",
    "ComparisonRow",
    "check_guides",
    "compare",
    "format_table",
    "write_comparison",
]

log = logging.getLogger(__name__)

#: Estimators with an analytic KL term; flows have no registered KL to use there.
ANALYTIC_ESTIMATORS = ("meanfield", "jit-meanfield")
FLOW_GUIDES = ("flow", "AutoIAFNormal")
#: Estimator names as Pyro calls them, for the table.
#: Guides compared by default, per kind of model: amortized encoders for the built-in models
#: (local latents), autoguides for a user's model (global latents).
DEFAULT_GUIDES = {
    "amortized": ("diag", "full", "flow"),
    "user": ("AutoNormal", "AutoMultivariateNormal"),
}


@renamed_keywords(elbo_particles="eval_particles")
@dataclass(frozen=True)
class CompareConfig:
    """Options of the evaluation in :func:`compare`.

    Attributes:
        num_samples: K of L_K.
        eval_particles: draws per datum for the ELBO and its decomposition (formerly
            ``elbo_particles``, still accepted with a DeprecationWarning).
        num_draws, num_chains: posterior draws saved per guide, as ``num_chains`` chains of
            ``num_draws // num_chains`` independent draws (so ArviZ's multi-chain summaries run).
        split: ``"auto"`` (test for amortized guides, train otherwise), ``"test"`` or ``"train"``.
        chunk_size: particles vectorized at once in L_K (default: inference.evidence's choice).
        eval_batch_size: data rows per evaluation call for mini-batched models.
    """

    num_samples: int = NUM_SAMPLES
    eval_particles: int = COMPARE_EVAL_PARTICLES
    num_draws: int = NUM_DRAWS
    num_chains: int = 4
    split: str = "auto"
    chunk_size: int | None = None
    eval_batch_size: int = 512

    def __post_init__(self):
        for name in ("num_samples", "eval_particles", "num_draws", "num_chains", "eval_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise OptionError(f"must be a positive integer, got {v!r}", option=name)
        if self.num_draws < self.num_chains:
            raise OptionError(
                f"need at least one draw per chain ({self.num_chains}), got {self.num_draws}",
                option="num_draws",
            )
        if self.split not in ("auto", "test", "train"):
            raise OptionError(
                f"must be 'auto', 'test' or 'train', got {self.split!r}", option="split"
            )


class ComparisonRow(NamedTuple):
    """One guide's numbers, nats per datum (``*_stderr``: Monte-Carlo standard errors)."""

    guide: str
    split: str
    n: int
    elbo: float
    elbo_stderr: float
    reconstruction: float
    kl: float
    lk: float  # L_K, the K-sample importance-weighted bound on log p(x)
    lk_stderr: float
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

    log_px = deprecated_alias("lk", "log_px")
    log_px_stderr = deprecated_alias("lk_stderr", "log_px_stderr")


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
        raise OptionError("name at least one guide", option="guides")
    if len(set(names)) != len(names):
        raise OptionError(f"a guide is named twice in {','.join(names)}", option="guides")
    for name in names:
        if amortized and name not in GUIDE_FAMILIES:
            hint = " (an autoguide, for models with global latents)" if _is_autoguide(name) else ""
            raise OptionError(
                f"{name!r}{hint} does not fit this model; choose from {', '.join(GUIDE_FAMILIES)}",
                option="guides",
            )
        if not amortized and ":" in name:  # the user's own guide, FILE.py:NAME
            continue
        if not amortized:
            if name in GUIDE_FAMILIES:
                raise OptionError(
                    f"{name!r} is an amortized encoder for the built-in models; a user "
                    f"model takes autoguides ({', '.join(AUTOGUIDES)})",
                    option="guides",
                )
            try:
                name = autoguide_name(name)
            except ValueError as exc:
                raise OptionError(str(exc), option="guides") from None
        if estimator in ANALYTIC_ESTIMATORS and name in FLOW_GUIDES:
            raise OptionError(
                f"{estimator!r} needs an analytic KL, which the flow guide {name!r} lacks; "
                f"use estimator='trace'",
                option="estimator",
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
    lk: float
    lk_var: float
    log_weights: torch.Tensor  # (K, N) local or (K,) global


def _evaluate(
    model: Callable, guide: Callable, call: ModelArgs, options: CompareConfig, batched: bool
) -> _Evaluation:
    """Totals over the model's arguments of the ELBO (decomposed) and of L_K, with Monte-Carlo
    variances; ``batched`` (local latents, one data tensor): in chunks of rows."""
    n = call.args[0].shape[0] if batched else 1
    step = options.eval_batch_size if batched else 1
    elbo = elbo_var = recon = kl = lk = lk_var = 0.0
    weights = []
    with seeded(EVAL_SEED):
        for start in range(0, n, step):
            part = ModelArgs((call.args[0][start : start + step],), {}) if batched else call
            # one call of the model's own arguments: a self-subsampling plate, all its rows
            d = (decompose if batched else decompose_all_rows)(
                model,
                guide,
                *part.args,
                num_particles=options.eval_particles,
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
            lk += est.lk
            lk_var += est.stderr**2 if math.isfinite(est.stderr) else 0.0
            weights.append(est.log_weights)
    if len(weights) > 1 and weights[0].dim() != 2:
        raise OptionError("a model with global latents must be evaluated in one batch")
    log_w = torch.cat(weights, dim=-1)
    return _Evaluation(elbo, elbo_var, recon, kl, lk, lk_var, log_w)


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
        lk=nan,
        lk_stderr=nan,
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
    eval_threads: Callable[[], int] | None = None,
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
        eval_threads: asked before each guide's evaluations (``fit``'s last and this
            comparison's); torch runs them with the threads it returns, then the training's
            again (``elbo-lab compare``: the threads for L_K's chunks, confirmed by a probe,
            :mod:`inference.threads`). Default: the training's.

    Returns:
        A :class:`Comparison`; its rows follow the order of ``guides``.
    """
    config = config if config is not None else TrainConfig()
    train_call, test_call = _calls(data)
    module = _model_module(model)
    initial = copy.deepcopy(module.state_dict()) if module is not None else None
    batched = takes_num_data(model)
    probe = train_call  # the model's arguments for one traced run: two rows of a mini-batch
    if batched:
        x = train_call.args[0]
        probe = ModelArgs((x[: min(2, x.shape[0])],), {"num_data": x.shape[0]})
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
                f"{config.estimator!r}: guide {name!r} is a flow without analytic KL",
                option="estimator",
            )
        eval_call = test_call if split == "test" else train_call
        n = num_rows(model, eval_call.args, eval_call.kwargs, None)
        khats[name] = np.full(1, np.nan)
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
                eval_threads=eval_threads,
                **train_call.kwargs,
            )
        except Exception as exc:  # keep the guides already compared; report this one
            reason = _reason(exc, (NumericalError, OptionError))
            log.warning("guide %s failed: %s", name, reason)
            log.debug("guide %s failed", name, exc_info=True)
            rows.append(_failed_row(name, split, n, reason))
            continue
        seconds = time.perf_counter() - start
        num_params = _param_count(guide, probe)
        try:
            with torch_threads(eval_threads):
                ev = _evaluate(model, guide, eval_call, options, batched and amortized)
        except Exception as exc:  # e.g. no L_K for a plate that subsamples itself
            reason = _reason(exc, (OptionError,))
            log.warning("guide %s: evaluation failed: %s", name, reason)
            rows.append(_failed_row(name, split, n, f"evaluation: {reason}"))
            continue
        # a point mass has no density to importance-sample with: k̂ is undefined
        point = is_point_estimate(guide, *probe.args, **probe.kwargs)  # AutoDelta, a MAP guide
        khats[name] = np.full(1, np.nan) if point else psis_khat(ev.log_weights)
        row = _row(name, split, n, ev, khats[name], point, options.num_samples)
        estimator = estimator_label(result.estimator)  # the Pyro class that trained it
        rows.append(row._replace(seconds=seconds, num_params=num_params, estimator=estimator))
        if out_dir is not None:
            attrs = {"guide": name, "model": model_name, "split": split}
            _write_posterior(model, guide, eval_call, options, ev, attrs, Path(out_dir))
    train = {k: v for k, v in config_record(config).items() if k != "progress"}
    return Comparison(tuple(rows), options.num_samples, train, model_name, khats)


def _calls(data: Any) -> tuple[ModelArgs, ModelArgs | None]:
    """The model's arguments on the training split and on the test split (None: no test split)."""
    if isinstance(data, Dataset):
        return ModelArgs((data.train,), {}), ModelArgs((data.test,), {})
    if isinstance(data, ModelData):
        return data.train, data.test
    return ModelArgs.of(data), None


def _reason(exc: Exception, ours: tuple[type[Exception], ...]) -> str:
    """The first line of an error; prefixed by its class unless it is one of ``ours``."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return reason if isinstance(exc, ours) else f"{type(exc).__name__}: {reason}"


def _row(
    name: str,
    split: str,
    n: int,
    ev: _Evaluation,
    khat: np.ndarray,
    point: bool,
    num_samples: int,
) -> ComparisonRow:
    """One guide's row, per datum, with ELBO <= L_K checked (not for a point estimate);
    ``seconds``, ``num_params`` and ``estimator`` are the caller's to fill."""
    elbo_se = math.sqrt(ev.elbo_var) / n if ev.elbo_var > 0 else None
    bounds = check_bounds(
        ev.elbo / n,
        elbo_se,
        ev.lk / n,
        math.sqrt(ev.lk_var) / n,
        num_samples,
        point_estimate=point,
    )
    ess = effective_sample_size(ev.log_weights)
    return ComparisonRow(
        guide=name,
        split=split,
        n=n,
        elbo=ev.elbo / n,
        elbo_stderr=math.sqrt(ev.elbo_var) / n,
        reconstruction=ev.reconstruction / n,
        kl=ev.kl / n,
        lk=ev.lk / n,
        lk_stderr=math.sqrt(ev.lk_var) / n,
        gap=(ev.lk - ev.elbo) / n,  # L_K - ELBO ~ KL(q(z|x) || p(z|x))
        gap_stderr=math.sqrt(ev.elbo_var + ev.lk_var) / n,
        khat_median=float(np.median(khat)),
        khat_share_bad=math.nan if point else float(np.mean(khat > KHAT_THRESHOLD)),
        ess_median=float(ess.median()),
        seconds=math.nan,
        num_params=0,
        note=_note(point),
        bounds_ok=bounds.ok if bounds.checked else None,
        bounds="; ".join(bounds.violations) if bounds.checked else "point estimate",
    )


def _write_posterior(
    model: Callable,
    guide: Callable,
    call: ModelArgs,
    options: CompareConfig,
    ev: _Evaluation,
    attrs: Mapping[str, str],
    out_dir: Path,
) -> None:
    """``posterior_<guide>.nc``: ``options.num_draws`` draws from the guide, as ArviZ data."""
    out_dir.mkdir(parents=True, exist_ok=True)
    draws = posterior_draws(model, guide, call, options.num_draws)
    note = "independent draws from the guide q (not MCMC); chains split them evenly"
    idata = to_inference_data(
        draws, options.num_chains, local=ev.log_weights.dim() == 2, attrs={**attrs, "note": note}
    )
    save_netcdf(idata, out_dir / f"posterior_{attrs['guide']}.nc")


# --- output --------------------------------------------------------------------------------------

COLUMNS = (
    ("guide", "guide", "{}"),
    ("elbo", "ELBO", "{:.3f}"),
    ("reconstruction", "E[log p(x|z)]", "{:.3f}"),
    ("kl", "KL(q||p(z))", "{:.3f}"),
    ("lk", "L_K", "{:.3f}"),
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
