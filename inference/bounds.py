"""The inequalities every report is checked against: ELBO <= L_K <= log p(x).

    ELBO = E_q[log p(x, z) - log q(z | x)]  <=  E[L_K]  <=  log p(x)

(Jordan et al. 1999; Burda et al. 2016, Theorem 1). Each is checked within ``z`` standard
errors of the Monte-Carlo estimates (the exact log p(x) has none). A violation is a bug in
what produced the number (such as a KL term that drops a log-Jacobian), never a result, and
is reported as one. A point estimate (a guide whose every latent is a Delta of zero
log-density, e.g. ``AutoDelta``) bounds nothing: its "ELBO" is log p(x, z*), and it is not
checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from .choices import EVAL_BATCH_SIZE, EVAL_PARTICLES_GLOBAL, EVAL_PARTICLES_LOCAL
from .errors import OptionError

__all__ = ["BoundCheck", "check_bounds", "is_point_estimate", "report_particles"]

#: Standard errors a Monte-Carlo estimate may stray before an inequality counts as violated.
Z = 5.0


class BoundCheck(NamedTuple):
    """ELBO <= L_K <= log p(x), checked; per datum, nats. ``ok`` is False on any violation."""

    elbo: float
    elbo_stderr: float | None
    lk: float
    lk_stderr: float | None
    num_samples: int
    exact_log_px: float | None
    ok: bool
    checked: bool  # False for a point estimate, which bounds nothing, or without L_K
    violations: tuple[str, ...]
    unchecked: str = ""  # why nothing was checked (empty: a point estimate)
    rows: int | None = None  # the first rows of the split the check ran on (None: all)
    of_rows: int | None = None  # the split's rows, where the check ran on fewer

    def to_dict(self) -> dict[str, Any]:
        d = self._asdict()
        d["violations"] = list(self.violations)
        # JSON has no NaN: an estimate that was not made is null
        return {
            k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in d.items()
        }

    def lines(self) -> list[str]:
        """The check as text: one line, and one marked line per violation."""
        if not self.checked:
            why = self.unchecked or (
                "the guide is a point estimate, its 'ELBO' is log p(x, z*) and bounds nothing"
            )
            return [f"  bounds: not checked: {why}"]
        exact = "" if self.exact_log_px is None else f" <= exact log p(x) = {self.exact_log_px:.4f}"
        where = "" if self.rows is None else f" on the first {self.rows} of {self.of_rows}"
        head = (
            f"  bounds{where}: ELBO = {self.elbo:.4f}{_pm(self.elbo_stderr)} <= "
            f"L_{self.num_samples} = {self.lk:.4f}{_pm(self.lk_stderr)}{exact}"
        )
        if self.ok:
            return [f"{head} (ok, within {Z:g} s.e.)"]
        return [f"{head} (VIOLATED)"] + [f"  !! BOUND VIOLATED: {v}" for v in self.violations]


def _pm(se: float | None) -> str:
    return "" if se is None or not math.isfinite(se) else f" +- {se:.4f}"


def _se(*values: float | None) -> float:
    return math.sqrt(sum(v * v for v in values if v is not None and math.isfinite(v)))


def check_bounds(
    elbo: float,
    elbo_stderr: float | None,
    lk: float,
    lk_stderr: float | None,
    num_samples: int,
    exact_log_px: float | None = None,
    *,
    point_estimate: bool = False,
    z: float = Z,
) -> BoundCheck:
    """Check ELBO <= L_K and, with the exact value, ELBO <= log p(x) and L_K <= log p(x).

    An inequality a <= b counts as violated when a - b exceeds ``z`` standard errors of the
    difference (plus float rounding, 1e-6 relative). Standard errors of None (one draw) count
    as zero.
    """

    def above(a: float, b: float, se: float) -> bool:
        return a - b > z * se + 1e-6 * max(1.0, abs(a), abs(b))

    violations = []
    if not point_estimate:
        if above(elbo, lk, _se(elbo_stderr, lk_stderr)):
            violations.append(
                f"ELBO {elbo:.4f} > L_{num_samples} {lk:.4f} by {elbo - lk:.4f} "
                f"(more than {z:g} s.e.): the ELBO estimate is not a lower bound"
            )
        if exact_log_px is not None:
            if above(elbo, exact_log_px, _se(elbo_stderr)):
                violations.append(
                    f"ELBO {elbo:.4f} > exact log p(x) {exact_log_px:.4f} by "
                    f"{elbo - exact_log_px:.4f}"
                )
            if above(lk, exact_log_px, _se(lk_stderr)):
                violations.append(
                    f"L_{num_samples} {lk:.4f} > exact log p(x) {exact_log_px:.4f} by "
                    f"{lk - exact_log_px:.4f}"
                )
    return BoundCheck(
        elbo=elbo,
        elbo_stderr=elbo_stderr,
        lk=lk,
        lk_stderr=lk_stderr,
        num_samples=num_samples,
        exact_log_px=exact_log_px,
        ok=not violations,
        checked=not point_estimate,
        violations=tuple(violations),
    )


@torch.no_grad()
def is_point_estimate(guide: Callable, *args, **kwargs) -> bool:
    """Whether every sample site of ``guide`` is a Delta of zero log-density (``AutoDelta``,
    a MAP guide): q is then a point mass and its "ELBO" is log p(x, z*).

    So is a guide whose auxiliary sites are such Deltas and whose other sites are Deltas at a
    transform of them, of log-density the transform's log-Jacobian (``AutoLaplaceApproximation``,
    a MAP in unconstrained space). A Delta of non-zero log-density with no auxiliary point mass
    behind it is a density written as a Delta, not a point mass."""
    with torch.random.fork_rng(devices=[]):
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
    sites = [s for s in trace.nodes.values() if s["type"] == "sample" and not s["is_observed"]]
    sites = [s for s in sites if not s["infer"].get("_do_not_trace") and s["fn"] is not None]
    latent = [s for s in sites if not site_is_subsample(s)]
    if not latent:
        return False
    weighted = []  # names of the Deltas with a non-zero log-density
    for s in latent:
        fn = s["fn"]
        while isinstance(fn, dist.Independent | dist.MaskedDistribution):
            fn = fn.base_dist
        if not isinstance(fn, dist.Delta):
            return False
        if torch.is_tensor(fn.log_density) and bool((fn.log_density != 0).any()):
            weighted.append(s)
    auxiliary = [s for s in latent if s["infer"].get("is_auxiliary")]
    if not weighted:
        return True
    return bool(auxiliary) and not any(s["infer"].get("is_auxiliary") for s in weighted)


class CheckedMetrics(NamedTuple):
    """What a report prints: the ELBO anatomy, Pyro's own loss on the same noise, the bounds."""

    metrics: Any  # inference.elbo.PerDatumElbo
    pyro_loss: float  # the estimator's own .loss per datum, same data and noise
    estimator: str  # the plain estimator name (trace, meanfield)
    bounds: BoundCheck


#: Rows of a batched split (the built-in models: local latents, the rows in ``args[0]``) on
#: which :func:`checked_metrics` checks ELBO <= L_K: the first ones, with the ELBO on the same
#: rows. L_K costs K passes of the decoder per row: on the 15,000 test rows of an MNIST-sized
#: VAE (784-400-20) L_100 took 28 s, more than two epochs of training; on 2,000 rows about 4 s.
#: The bound holds row by row, so a check on the first rows checks the same inequality, on
#: fewer rows; the report says how many.
BOUND_ROWS = 2000


def report_particles(batched: bool, rows: int | None = None) -> int:
    """Draws of a reported ELBO with its standard error: per datum for ``batched`` models (local
    latents, rows in chunks), whole-data draws otherwise (:mod:`inference.choices`).

    A batched split of more than :data:`BOUND_ROWS` ``rows`` gets fewer draws per row: as many
    row-draws in all as :data:`BOUND_ROWS` rows with ``EVAL_PARTICLES_LOCAL`` each, and at least
    2, so every chunk still has an error bar. On the 15,000 test rows of an MNIST-sized VAE the
    report's ELBO and Pyro's loss check then take 2 draws, not 10 (about 1 s, not 5).
    """
    if not batched:
        return EVAL_PARTICLES_GLOBAL
    if rows is None or rows <= BOUND_ROWS:
        return EVAL_PARTICLES_LOCAL
    return max(2, math.ceil(EVAL_PARTICLES_LOCAL * BOUND_ROWS / rows))


def checked_metrics(
    model: Callable,
    guide: Callable,
    *args,
    estimator: str,
    batched: bool,
    num_samples: int = 100,
    num_particles: int | None = None,
    exact_log_px: float | None = None,
    seed: int | None = None,
    **kwargs,
) -> CheckedMetrics:
    """Evaluate the model's arguments the way the estimator defines the ELBO; check the bounds.

    The ELBO is decomposed with the estimator's own KL terms (analytic for ``meanfield``,
    Monte Carlo for ``trace``), so Pyro's ``.loss`` for the same noise must equal
    KL - reconstruction; L_K with ``num_samples`` draws (whole split at once; per datum for
    ``batched`` models, whose latents are local to rows) bounds it from above. For a batched
    split of more than :data:`BOUND_ROWS` rows the bounds are checked on its first
    :data:`BOUND_ROWS`, ELBO and L_K both (``bounds.rows``, ``bounds.of_rows``); the metrics
    and Pyro's loss check stay on all rows.
    ``num_particles`` defaults to :func:`report_particles` (fewer per row on more than
    :data:`BOUND_ROWS` rows; the bound check's first rows get the full count), so the ELBO
    carries a standard error. Values are per datum (totals / N).
    ``exact_log_px`` (per datum) defaults to the exact value of a model whose every latent is
    enumerated (:func:`inference.enumeration.exact_log_evidence`).
    """
    from .elbo import EVAL_SEED, evaluate
    from .enumeration import exact_log_evidence
    from .estimators import plain_estimator
    from .evidence import iwae
    from .io import seeded
    from .train import pyro_loss

    seed = EVAL_SEED if seed is None else seed
    plain = plain_estimator(estimator)  # whose .loss is -ELBO (trace for jit and renyi)
    rows = int(args[0].shape[0]) if batched else None  # batched: the built-in models' data
    particles = num_particles or report_particles(batched, rows)
    batch = EVAL_BATCH_SIZE if batched else None
    common = dict(batch_size=batch, seed=seed, num_particles=particles)
    analytic = plain == "meanfield"
    metrics = evaluate(model, guide, *args, analytic_kl=analytic, **common, **kwargs)
    checked = pyro_loss(model, guide, *args, estimator=plain, **common, **kwargs)
    n = metrics.n
    if exact_log_px is None:  # every latent enumerated: log p(x) is a finite sum
        whole = exact_log_evidence(model, *args, **kwargs)
        exact_log_px = None if whole is None else whole / n
    # the bound check on the first BOUND_ROWS rows of a large batched split, with the ELBO on them
    capped = batched and not kwargs and exact_log_px is None and n > BOUND_ROWS
    lk_args, lk_metrics = args, metrics
    if capped:
        lk_args = (args[0][:BOUND_ROWS], *args[1:])
        first = dict(common, num_particles=num_particles or report_particles(True, BOUND_ROWS))
        lk_metrics = evaluate(model, guide, *lk_args, analytic_kl=analytic, **first)
    try:
        with seeded(seed + 1):
            estimate = iwae(model, guide, *lk_args, num_samples=num_samples, **kwargs)
    except OptionError as exc:  # no L_K for this model (a plate that subsamples itself)
        nan = math.nan
        bounds = BoundCheck(
            metrics.elbo, metrics.elbo_stderr, nan, None, num_samples, exact_log_px,
            ok=True, checked=False, violations=(), unchecked=f"no L_K: {exc}",
        )  # fmt: skip
        return CheckedMetrics(metrics, checked, plain, bounds)
    m = lk_metrics.n
    se = estimate.stderr / m if math.isfinite(estimate.stderr) else None
    probe_args = (args[0][:2], *args[1:]) if batched else args
    bounds = check_bounds(
        lk_metrics.elbo,
        lk_metrics.elbo_stderr,
        estimate.lk / m,
        se,
        num_samples,
        exact_log_px,
        point_estimate=is_point_estimate(guide, *probe_args, **kwargs),
    )
    if capped:
        bounds = bounds._replace(rows=m, of_rows=n)
    return CheckedMetrics(metrics, checked, plain, bounds)
