"""Why the VAE loss looks "backwards": the ELBO anatomy of a trained run, in its own numbers.

Three numbers and two inequalities (Kingma & Welling 2014, eqs. 1-3):

    loss = -ELBO                                    (what SVI minimized)
    ELBO = E_q[log p(x | z)] - KL(q(z | x) || p(z)) (reconstruction - kl)
    ELBO <= L_K <= log p(x),   log p(x) - ELBO = KL(q(z | x) || p(z | x))

with L_K the importance-weighted bound (Burda et al. 2016) as the estimate of log p(x). For
linear-Gaussian runs (``ppca``, ``fa``) log p(x), the ELBO and the gap are also exact.

A user model (``FILE.py:NAME`` with an autoguide) has *global* latents z shared by all N rows:
then every value is a whole-data total, log p(x_1, ..., x_N) and its ELBO, divided by N, and the
split is the training data the guide's posterior describes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from pyro.infer import ELBO

from .batching import Batching, ModelArgs, default_batching, num_rows, take
from .bounds import check_bounds, is_point_estimate, report_particles
from .choices import EVAL_BATCH_SIZE, NUM_SAMPLES
from .elbo import EVAL_SEED, evaluate
from .enumeration import exact_evidence
from .errors import OptionError
from .estimators import ESTIMATORS, choose_estimator, make_elbo
from .evidence import KHAT_THRESHOLD, deprecated_alias, iwae, psis_khat
from .io import seeded
from .objectives import check_objective
from .run import load_run
from .subsample import full_data_pairs
from .threads import SPLIT_SUM_ELEMENTS, torch_threads
from .train import estimator_name, pyro_loss

__all__ = ["Explanation", "explain", "explain_pair", "explain_run"]

SPLITS = ("train", "test")


class Explanation(NamedTuple):
    """The ELBO anatomy of one split of a run, per datum in nats.

    Attributes:
        loss, elbo, reconstruction, kl: :func:`~inference.elbo.evaluate` (analytic KL, fixed
            noise): loss = -elbo, elbo = reconstruction - kl.
        pyro_loss: ``TraceMeanField_ELBO().loss`` on the same data and noise (an independent check).
        lk, lk_stderr: L_K, the K-sample importance-weighted bound on log p(x) (Burda et al.
            2016), and its standard error.
        elbo_mc, elbo_mc_stderr: the ELBO from the same K draws, mean_k log w_k.
        gap, gap_stderr: L_K - elbo_mc >= 0, a lower bound on KL(q(z | x) || p(z | x)) that
            tightens as K grows.
        ess: mean over data points of the effective sample size of the K weights.
        exact_log_px, exact_elbo, exact_gap: closed forms for linear-Gaussian runs, or sums
            over every value of a model whose latents are all enumerated
            (:func:`inference.enumeration.exact_evidence`), else None;
            exact_gap = KL(q(z | x) || p(z | x)).
        run_dir, data, split: where the run and its data are (empty for :func:`explain_pair`).
        guide: the guide's name (``diag`` for a built-in model, an autoguide for a user model,
            the function's name for :func:`explain_pair`).
        latents: ``"local"`` (one z per data point; L_K per datum, summed) or ``"global"`` (z
            shared by all rows; L_K and the ELBO are whole-data values divided by N).
    """

    run_dir: str
    model: str
    guide: str
    latents: str
    data: str
    split: str
    n: int
    loss: float
    elbo: float
    reconstruction: float
    kl: float
    pyro_loss: float
    num_samples: int
    lk: float
    lk_stderr: float
    elbo_mc: float
    elbo_mc_stderr: float
    gap: float
    gap_stderr: float
    ess: float
    exact_log_px: float | None
    exact_elbo: float | None
    exact_gap: float | None
    estimator: str = ""  # the Pyro estimator whose KL terms the decomposition uses
    elbo_stderr: float | None = None
    khat: float = math.nan  # PSIS k̂ of the log-weights (median over data points if local)
    khat_share_bad: float = math.nan  # share of k̂ > 0.7
    bounds: dict | None = None  # inference.bounds.BoundCheck.to_dict()
    objective: dict | None = None  # inference.objectives.ObjectiveCheck.to_dict(), whole data
    warnings: tuple[str, ...] = ()

    log_px = deprecated_alias("lk", "log_px")
    log_px_stderr = deprecated_alias("lk_stderr", "log_px_stderr")

    def to_dict(self) -> dict[str, Any]:
        d = self._asdict()
        d["warnings"] = list(self.warnings)
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()
        }

    def _objective_lines(self) -> list[str]:
        if self.objective is None:
            return []
        c = self.objective
        verdict = "ok" if c["ok"] else f"MISMATCH {c['note']}".rstrip()
        return [
            f"   what .loss is minus: {c['objective_text']}",
            f"   checked on the whole split from the same draws: .loss = {c['loss']:.3f}, "
            f"-{c['objective']} = {c['minus_objective']:.3f}, .loss_and_grads = "
            f"{c['loss_and_grads']:.3f} ({verdict})",
        ]

    def report(self) -> str:
        """The worked answer as text for people."""
        where = f"{self.run_dir}: " if self.run_dir else ""
        what = f" on {self.data}" if self.data else ""
        split = f"{self.split} split, " if self.split else ""
        lines = [
            f"{where}{self.model} with guide {self.guide}{what}, {split}{self.n} data points; "
            "nats per data point",
        ]
        if self.latents == "global":
            lines += [
                f"z: global latents, shared by all N = {self.n} points, so every value below is",
                "a whole-data value / N: L_K estimates log p(x_1, ..., x_N) / N, the ELBO bounds it",
                "and the gap is KL(q(z) || p(z | x_1, ..., x_N)) / N",
            ]
            weights = f"one weight per draw for all {self.n} points, K = {self.num_samples}, ESS"
            codes = "the latents z"
        else:
            weights = f"per data point, K = {self.num_samples}, mean ESS"
            codes = "codes z"
        lines += [
            "",
            "1. What SVI minimized: the loss, which is minus the ELBO",
            f"   loss = -ELBO = KL - E_q[log p(x|z)] = {self.kl:.3f} - ({self.reconstruction:.3f})"
            f" = {self.loss:.3f}",
            f"   (Pyro's own {self.estimator}().loss on the same noise: {self.pyro_loss:.3f})",
            *self._objective_lines(),
            "",
            "2. The ELBO, which training maximized, split with its signs",
            f"   ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z)) = {self.reconstruction:.3f} - "
            f"{self.kl:.3f} = {self.elbo:.3f}",
            f"   reconstruction E_q[log p(x|z)]: how well {codes} explain x (higher is better)",
            f"   kl KL(q(z|x) || p(z)) >= 0: what {codes} cost against the prior",
            "",
            "3. The evidence log p(x), which the ELBO bounds from below",
            f"   log p(x) ~ L_K = {self.lk:.3f} +- {self.lk_stderr:.3f} "
            f"(importance-weighted, {weights} {self.ess:.1f})",
            f"   ELBO from the same draws = {self.elbo_mc:.3f} +- {self.elbo_mc_stderr:.3f}",
            f"   gap L_K - ELBO = {self.gap:.3f} +- {self.gap_stderr:.3f} >= 0, read as "
            "KL(q(z|x) || p(z|x)):",
            "   how far the guide is from the true posterior (a lower bound on that KL,",
            "   tightening as K grows)",
            f"   PSIS k̂ of the log-weights = {self.khat:.2f}"
            + ("" if math.isnan(self.khat_share_bad) else f" ({self.khat_share_bad:.0%} > 0.7)")
            + " (< 0.5 good, > 0.7 the importance estimate is unreliable; Yao et al. 2018)",
        ]
        from .bounds import BoundCheck

        if self.bounds is not None:
            check = BoundCheck(**{**self.bounds, "violations": tuple(self.bounds["violations"])})
            lines += [line.replace("  bounds:", "   bounds:", 1) for line in check.lines()]
        lines += [f"   WARNING: {w}" for w in self.warnings]
        if self.exact_log_px is not None:
            exact_elbo = "" if self.exact_elbo is None else f"   ELBO = {self.exact_elbo:.3f}"
            exact_gap = (
                ""
                if self.exact_gap is None
                else f"   gap = KL(q(z|x) || p(z|x)) = {self.exact_gap:.3f}"
            )
            lines += [
                "",
                "4. Exact: in closed form (linear-Gaussian model) or with every latent summed out",
                f"   log p(x) = {self.exact_log_px:.3f}{exact_elbo}{exact_gap}",
                f"   L_K - exact log p(x) = {self.lk - self.exact_log_px:+.3f}",
            ]
        return "\n".join(lines)


def explain(
    model: Callable | str | os.PathLike | None = None,
    /,
    *args,
    num_samples: int = NUM_SAMPLES,
    chunk_size: int | None = None,
    seed: int = EVAL_SEED,
    max_bytes: int | None = None,
    bound_figure: str | os.PathLike | None = None,
    on_report: Callable[[Explanation], None] | None = None,
    **kwargs,
) -> Explanation:
    """Compute the ELBO anatomy of a model/guide pair on the model's arguments, or of a run.

    Two forms, told apart by the first argument:

    - ``explain(model, guide, *args, batching=None, estimator="auto", **kwargs)``: the pair
      as Pyro's ``SVI.step(*args, **kwargs)`` runs it, with the parameters now in Pyro's
      param store (:func:`explain_pair`);
    - ``explain(run_dir, split=None, data=None, allow_changed=False, warn=None)``: a
      directory written by ``elbo-lab train``, its model and guide rebuilt from disk, then the
      pair form on one of its splits (:func:`explain_run`).

    The options below are common to both (see :func:`explain_pair`).

    Returns:
        An :class:`Explanation` (per-datum values, nats).
    """
    common = dict(
        num_samples=num_samples,
        chunk_size=chunk_size,
        seed=seed,
        max_bytes=max_bytes,
        bound_figure=bound_figure,
        on_report=on_report,
    )
    if model is None and "run_dir" in kwargs:  # explain(run_dir=...), as it was once called
        model = kwargs.pop("run_dir")
    if model is None:
        raise TypeError("explain() takes a model and its guide, or a run directory")
    if isinstance(model, str | os.PathLike):
        return explain_run(model, *args, **common, **kwargs)
    return explain_pair(model, *args, **common, **kwargs)


def explain_pair(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = NUM_SAMPLES,
    batching: Batching | None = None,
    estimator: str | ELBO = "auto",
    chunk_size: int | None = None,
    seed: int = EVAL_SEED,
    max_bytes: int | None = None,
    bound_figure: str | os.PathLike | None = None,
    on_report: Callable[[Explanation], None] | None = None,
    **kwargs,
) -> Explanation:
    """The ELBO anatomy of ``model``/``guide`` on the model's own arguments, per datum.

        loss = -ELBO = KL - E_q[log p(x | z)],   ELBO <= L_K <= log p(x)

    ``explain_pair(model, guide, *args, **kwargs)`` runs ``model(*args, **kwargs)`` as
    ``SVI.step`` does, with the parameters in Pyro's param store (as training left them).
    Values are whole-data totals divided by N, the rows of the data
    (:func:`inference.batching.num_rows`): for local latents (one z per row) L_K is per
    datum, summed; for global latents it bounds log p(x_1, ..., x_N). Nothing is mini-batched:
    a model whose plate subsamples itself is run over all its rows.

    Args:
        model, guide: Pyro functions (or modules) of the same arguments.
        *args, **kwargs: the model's arguments (the data it is conditioned on).
        num_samples: K for the importance-weighted bound L_K (Burda et al. 2016).
        batching: which arguments hold the rows (:class:`~inference.batching.Batching`;
            default: a ``num_data`` model's); with local latents the ELBO is evaluated in
            chunks of these rows.
        estimator: the Pyro ELBO whose KL terms the decomposition uses and whose ``.loss`` is
            checked: ``"auto"`` (:func:`inference.train.choose_estimator`), a name of
            :data:`inference.train.ESTIMATORS` or such a Pyro ELBO object.
        chunk_size: particles vectorized at once (see :func:`inference.evidence.log_weights`).
        seed: the noise of every estimate.
        max_bytes: refuse (OptionError, with the estimate) when the K x N log-weights would
            need more memory than this.
        bound_figure: write the per-datum bound picture here as PNG
            (:func:`inference.plots.plot_bound`; local latents only).
        on_report: called with the result before the figure is drawn, so a figure that fails
            to be written loses nothing.

    Returns:
        An :class:`Explanation`; ``run_dir`` and ``split`` are empty, ``model``/``guide``
        the functions' names.
    """
    labels = dict(run_dir="", model=_name(model), guide=_name(guide), data="", split="")
    result, estimate = _anatomy(
        model,
        guide,
        args,
        kwargs,
        num_samples=num_samples,
        batching=batching,
        estimator=estimator,
        chunk_size=chunk_size,
        seed=seed,
        max_bytes=max_bytes,
        labels=labels,
    )
    if on_report is not None:
        on_report(result)
    if bound_figure is not None and estimate.per_datum is not None:
        title = f"{result.model}: ELBO ≤ L_K ≤ log p(x) per datum"
        _bound_figure(bound_figure, _module_of(model), title, args, estimate)
    return result


def explain_run(
    run_dir: str | os.PathLike,
    *,
    num_samples: int = NUM_SAMPLES,
    split: str | None = None,
    data: str | None = None,
    chunk_size: int | None = None,
    seed: int = EVAL_SEED,
    bound_figure: str | os.PathLike | None = None,
    allow_changed: bool = False,
    warn: Callable[[str], None] | None = None,
    max_bytes: int | None = None,
    on_report: Callable[[Explanation], None] | None = None,
) -> Explanation:
    """The ELBO anatomy of a trained run on one of its splits: the run rebuilt from disk,
    then :func:`explain_pair` on the split's arguments with the run's batching.

    Args:
        run_dir: a directory written by ``elbo-lab train``.
        split: ``"test"`` or ``"train"``; default ``"test"``, ``"train"`` for a user model
            (the data its guide's posterior describes).
        data: other data of the same dimension (default: the run's).
        allow_changed, warn: use a run whose model file or data changed since training,
            reporting it through ``warn`` (:func:`inference.run.check_sources`).
        num_samples, chunk_size, seed, max_bytes, bound_figure, on_report: as
            :func:`explain_pair`.
    """
    if split is not None and split not in SPLITS:
        raise OptionError(f"must be one of {', '.join(SPLITS)}, got {split!r}", option="split")
    run = load_run(run_dir, data=data, allow_changed=allow_changed, warn=warn)
    split = split or run.default_split
    call = run.split(split)
    labels = dict(
        run_dir=str(run_dir), model=run.spec.model, guide=run.spec.guide, data=run.spec.data
    )
    result, estimate = _anatomy(
        run.model,
        run.guide,
        call.args,
        call.kwargs,
        num_samples=num_samples,
        batching=run.batching,
        estimator="auto",
        chunk_size=chunk_size,
        seed=seed,
        max_bytes=max_bytes,
        labels={**labels, "split": split},
        objective=_trained_objective(run),
    )
    if on_report is not None:
        on_report(result)
    if bound_figure is not None and estimate.per_datum is not None:
        title = (
            f"{run.spec.model} on {os.path.basename(run.spec.data)}: "
            "ELBO ≤ L_K ≤ log p(x) per datum"
        )
        _bound_figure(bound_figure, run.module, title, call.args, estimate)
    return result


def _name(fn: Any) -> str:
    """A readable name of a model or guide: its function's name, or its class's."""
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _module_of(model: Callable) -> torch.nn.Module | None:
    """The module a model is a method of (a built-in model's ``module.model``), else None."""
    owner = getattr(model, "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


def _anatomy(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    *,
    num_samples: int,
    batching: Batching | None,
    estimator: str | ELBO,
    chunk_size: int | None,
    seed: int,
    max_bytes: int | None,
    labels: dict[str, str],
    objective: ELBO | None = None,
) -> tuple[Explanation, Any]:
    """The :class:`Explanation` of the pair on ``model(*args, **kwargs)`` and its
    :class:`~inference.evidence.EvidenceEstimate`. ``objective``: the Pyro ELBO whose
    ``.loss`` sign is checked, when it is not the decomposition's own (a Renyi run)."""
    batching = batching if batching is not None else default_batching(model)
    try:
        n = num_rows(model, args, kwargs, batching)
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    _check_size(n, num_samples, max_bytes, labels)
    probe = ModelArgs(tuple(args), dict(kwargs))
    if batching is not None and batching.args:  # a few rows choose as well as all of them
        probe = take(model, args, kwargs, batching, torch.arange(min(2, n)), None)
    name = choose_estimator(_estimator_name(estimator), model, guide, *probe.args, **probe.kwargs)
    with seeded(seed):
        estimate = iwae(
            model, guide, *args, num_samples=num_samples, chunk_size=chunk_size, **kwargs
        )
    log_w = estimate.log_weights  # (K, N) local, (K,) global
    local = log_w.dim() == 2
    # local latents with declared rows: the ELBO in chunks of rows; global latents all rows
    # at once, as fit trains them (chunks would count KL(q(z) || p(z)) once per chunk)
    chunked = local and batching is not None and bool(batching.args)
    batch_size = EVAL_BATCH_SIZE if chunked else None
    # the ELBO with its standard error, drawn as evaluate and train's report draw it (fewer
    # per row on a large split): the same number for the same run and seed
    particles = report_particles(batch_size is not None, n)
    common = dict(batch_size=batch_size, batching=batching, seed=seed, num_particles=particles)
    metrics = evaluate(model, guide, *args, analytic_kl=name == "meanfield", **common, **kwargs)
    checked = pyro_loss(model, guide, *args, estimator=name, **common, **kwargs)
    k = log_w.shape[0]
    # ELBO from the same draws: mean_k log w_k, its stderr across draws of the data-set total
    total_per_draw = log_w.sum(-1) if local else log_w
    elbo_mc = float(total_per_draw.mean()) / n
    elbo_mc_stderr = float(total_per_draw.std()) / math.sqrt(k) / n if k > 1 else math.nan
    lk = estimate.lk / n
    lk_stderr = estimate.stderr / n
    module = _module_of(model)
    exact = _exact(module, args[0] if module is not None else None)
    if exact["exact_log_px"] is None:  # every latent enumerated: log p(x) summed out exactly
        whole = exact_evidence(model, guide, *args, **kwargs)
        exact = {key: None if v is None else v / n for key, v in whole.items()}
    point = is_point_estimate(guide, *probe.args, **probe.kwargs)
    bounds = check_bounds(
        metrics.elbo,
        metrics.elbo_stderr,
        lk,
        lk_stderr if math.isfinite(lk_stderr) else None,
        k,
        exact["exact_log_px"],
        point_estimate=point,
    )
    khat, share_bad, ess, warnings = _diagnostics(estimate, point)
    # what the estimator's .loss is minus, checked from the same draws (pyro#1982's sign bug):
    # the run's own objective where it trained on another one than the ELBO (renyi:ALPHA)
    checked_elbo = objective if objective is not None else make_elbo(name)
    # Pyro sums that loss over all the split's rows at once, and torch splits a sum of
    # SPLIT_SUM_ELEMENTS or more between its threads (a probe chose them by the load): so
    # one thread there
    with torch_threads((lambda: 1) if n >= SPLIT_SUM_ELEMENTS else None):
        objective = _check_objective_all_rows(checked_elbo, model, guide, args, kwargs, seed)
    if not objective.ok:
        warnings.append(f"{objective.estimator}.loss is not -{objective.objective} here")
    result = Explanation(
        **labels,
        latents="local" if local else "global",
        n=n,
        loss=metrics.loss,
        elbo=metrics.elbo,
        reconstruction=metrics.reconstruction,
        kl=metrics.kl,
        pyro_loss=checked,
        num_samples=k,
        lk=lk,
        lk_stderr=lk_stderr,
        elbo_mc=elbo_mc,
        elbo_mc_stderr=elbo_mc_stderr,
        gap=lk - elbo_mc,
        gap_stderr=math.hypot(lk_stderr, elbo_mc_stderr),
        ess=ess,
        **exact,
        estimator=ESTIMATORS[name].__name__,
        elbo_stderr=metrics.elbo_stderr,
        khat=khat,
        khat_share_bad=share_bad,
        bounds=bounds.to_dict(),
        warnings=tuple(warnings),
        objective=objective.to_dict(),
    )
    return result, estimate


def _check_size(n: int, num_samples: int, max_bytes: int | None, labels: dict) -> None:
    """Refuse, in one line, an empty split or K draws whose log-weights would not fit in
    memory: the (K, N) weights in float64, with about as much again for the work in flight."""
    if n == 0:
        where = f"the {labels['split']} split of {labels['data']}" if labels["data"] else "data"
        raise OptionError(f"{where} is empty", option="split")
    need = 2 * num_samples * n * 8
    if max_bytes is not None and need > max_bytes:
        raise OptionError(
            f"K = {num_samples} draws for {n} points need about "
            f"{need / 1e9:.3g} GB; {max_bytes / 1e9:.3g} GB of memory is available",
            option="num_samples",
        )


def _diagnostics(estimate, point: bool) -> tuple[float, float, float, list[str]]:
    """PSIS k̂ (median over data points), the share of points above the threshold (local
    latents), the mean ESS, and the warnings they call for."""
    log_w = estimate.log_weights  # (K, N) local, (K,) global
    k = log_w.shape[0]
    khats = psis_khat(log_w) if not point else torch.full((1,), math.nan).numpy()
    khat = float(np.median(khats))
    share_bad = float(np.mean(khats > KHAT_THRESHOLD)) if log_w.dim() == 2 else math.nan
    ess = float(estimate.ess.to(torch.float64).mean())
    warnings = []
    if point:
        warnings.append("the guide is a point estimate: its 'ELBO' is log p(x, z*), L_K no bound")
    elif khat > KHAT_THRESHOLD:
        warnings.append(
            f"k̂ = {khat:.2f} > {KHAT_THRESHOLD}: q is a poor importance proposal, L_K and the gap "
            "can't be trusted (the true log p(x) may be far above L_K)"
        )
    if not point and ess < max(10.0, 0.01 * k):
        warnings.append(
            f"ESS = {ess:.1f} of K = {k} draws: a few weights dominate, L_K and its standard "
            "error can't be trusted; draw more samples (a larger K) or use a richer guide"
        )
    return khat, share_bad, ess, warnings


def _trained_objective(run) -> ELBO | None:
    """The Pyro ELBO a run trained on when it is not an ELBO decomposition's (``renyi:ALPHA``),
    else None."""
    trained = run.state.get("config", {})
    if str(trained.get("estimator", "")).startswith("renyi"):
        return make_elbo(trained["estimator"], trained.get("num_particles", 2))
    return None


def _estimator_name(estimator: str | ELBO) -> str:
    """A name of :data:`~inference.train.ESTIMATORS` (or ``auto``) for ``estimator``."""
    if isinstance(estimator, str):
        return estimator
    name = estimator_name(estimator)
    if name not in ESTIMATORS:
        raise OptionError(
            f"explain decomposes the ELBO of {', '.join(ESTIMATORS)}; {name} is not one of them",
            option="estimator",
        )
    return name


def _check_objective_all_rows(elbo, model, guide, args: tuple, kwargs: dict, seed: int):
    """:func:`~inference.objectives.check_objective` on the whole split: summed over the chunks
    of a plate that subsamples itself (:func:`inference.subsample.full_data_pairs`)."""
    pairs = full_data_pairs(model, guide, args, kwargs)
    checks = [check_objective(elbo, m, g, *args, seed=seed, **kwargs) for m, g in pairs]
    if len(checks) == 1:
        return checks[0]
    return checks[0]._replace(
        loss=sum(c.loss for c in checks),
        loss_and_grads=sum(c.loss_and_grads for c in checks),
        minus_objective=sum(c.minus_objective for c in checks),
        residual=sum(c.residual for c in checks),
        ok=all(c.ok for c in checks),
        note="; ".join(sorted({c.note for c in checks if c.note})),
    )


def _bound_figure(path, module, title: str, args: tuple, estimate) -> None:
    """Per-datum ELBO against L_K: the mean of the K log-weights (never above L_K), or the
    closed-form ELBO with the exact log p(x) for linear-Gaussian models."""
    from models.linear_gaussian import LinearGaussian

    from .plots import plot_bound

    log_w, lk = estimate.log_weights, estimate.per_datum
    if isinstance(module, LinearGaussian):
        x = args[0]
        elbo, exact = module.exact_elbo(x).elbo, module.log_marginal(x)
    else:
        elbo, exact = log_w.mean(0), None
    plot_bound(elbo, lk, num_samples=log_w.shape[0], exact_log_px=exact, title=title, path=path)


def _exact(module: torch.nn.Module, x: torch.Tensor) -> dict[str, float | None]:
    """Closed-form log p(x), ELBO and KL(q || p(z | x)) per datum for linear-Gaussian modules."""
    from models.linear_gaussian import LinearGaussian

    if not isinstance(module, LinearGaussian):
        return {"exact_log_px": None, "exact_elbo": None, "exact_gap": None}
    return {
        "exact_log_px": float(module.log_marginal(x).mean()),
        "exact_elbo": float(module.exact_elbo(x).elbo.mean()),
        "exact_gap": float(module.kl_to_posterior(x).mean()),
    }
