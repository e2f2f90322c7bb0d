"""The report a command prints: the sign convention in a run's own numbers, checked against
Pyro's loss and the bounds ELBO <= L_K <= log p(x)."""

from __future__ import annotations

from .batching import ModelArgs
from .bounds import CheckedMetrics
from .train import ESTIMATORS

__all__ = ["exact_log_px", "report_dict", "sign_report"]


def sign_report(c: CheckedMetrics, split: str = "test", unit: str = "image") -> str:
    """The sign convention in the run's own numbers, checked against Pyro's own loss and
    against the bounds ELBO <= L_K <= log p(x).

    ``c.pyro_loss`` is the estimator's own ``.loss`` per data point on the same data and noise
    (:func:`inference.train.pyro_loss`), computed independently of the decomposition.
    ``unit`` names a data point (``"point"`` for a user model, whose values are totals / N).
    """
    m = c.metrics
    residual = c.pyro_loss - (m.kl - m.reconstruction)
    ok = abs(residual) <= 1e-5 * max(1.0, abs(m.loss))
    name = ESTIMATORS[c.estimator].__name__
    se = "" if m.elbo_stderr is None else f" +- {m.elbo_stderr:.2f}"
    point = not c.bounds.checked and not c.bounds.unchecked  # bounds nothing
    claim = "a point estimate's log p(x, z*): no bound" if point else "a lower bound on log p(x)"
    return "\n".join(
        [
            f"Pyro minimized loss = -ELBO = KL - E[log p(x|z)] = {m.kl:.2f} - ({m.reconstruction:.2f})"
            f" = {m.loss:.2f} nats/{unit}",
            f"  ELBO = E[log p(x|z)] - KL = {m.reconstruction:.2f} - {m.kl:.2f} = {m.elbo:.2f}{se} "
            f"nats/{unit} (maximized; {claim})",
            f"  checked: Pyro's {name}().loss = {c.pyro_loss:.4f}; minus (KL - E[log p(x|z)])"
            f" = {residual:.1e} ({'ok' if ok else 'MISMATCH'}), {split} split, {m.n} {unit}s",
            *c.bounds.lines(),
        ]
    )


def report_dict(c: CheckedMetrics) -> dict:
    return {
        **c.metrics._asdict(),
        "estimator": ESTIMATORS[c.estimator].__name__,
        "pyro_loss": c.pyro_loss,
        "bounds": c.bounds.to_dict(),
    }


def exact_log_px(module, call: ModelArgs) -> float | None:
    """The closed-form log p(x) per datum where the model has one (linear-Gaussian)."""
    from models.linear_gaussian import LinearGaussian

    if isinstance(module, LinearGaussian):
        return float(module.log_marginal(call.args[0]).mean())
    return None
