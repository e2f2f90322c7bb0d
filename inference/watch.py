"""Watching an unchanged SVI script: every loss it minimizes, named and signed.

Inside :class:`Watch` (``with watch() as w:``, or ``elbo-lab watch SCRIPT.py``) every
``pyro.infer.SVI.step`` and every ELBO module (``Trace_ELBO()(model, guide)``) is observed, not
changed: the step runs as it would, returns the same loss, draws the same noise. Each step's loss
is recorded; every N steps the guide as that step left it is decomposed on the step's own
arguments (:func:`inference.elbo.decompose`, Kingma & Welling 2014, eq. 3),

    ELBO = E_q[log p(x | z)] - KL(q(z | x) || p(z))      (reconstruction - kl)
    loss = -ELBO                                          (what svi.step() estimates)

with the KL in closed form for ``TraceMeanField_ELBO`` and as log q - log p for ``Trace_ELBO``, as
the estimator the script chose computes it, so the decomposition's loss is the expectation of
the script's. Observation never moves the script's random streams (torch, CUDA, numpy, Python
``random``: forked and restored, its own noise seeded with ``EVAL_SEED``), runs without gradients
and leaves the param store as it found it. With ``every=None`` the cadence adapts: a step is
decomposed only while the time spent observing stays under ``budget`` of the time spent in steps.

At the end: the last step's decomposition checked against Pyro's own estimator on the same draws,
the importance-weighted bound L_K on the last step's arguments and the gap L_K - ELBO (Burda et
al. 2016), figures, and for several SVI objects one comparison table (:mod:`inference.compare`).
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import json
import logging
import math
import os
import runpy
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoGuide
from pyro.infer.elbo import ELBOModule

from .bounds import is_point_estimate
from .choices import NUM_SAMPLES, WATCH_EVAL_PARTICLES
from .elbo import EVAL_SEED, ElboDecomposition, decompose
from .errors import OptionError, RunError, renamed_keywords
from .evidence import KHAT_THRESHOLD, deprecated_alias, iwae, psis_khat
from .io import atomic_write_text, copy_params, seeded, write_csv, write_json, write_jsonl

__all__ = [
    "Watch",
    "WatchConfig",
    "WatchedFit",
    "explain_watched",
    "format_script_traceback",
    "run_script",
    "watch",
]

log = logging.getLogger(__name__)

#: Files of a watched run directory.
METRICS, LOSSES, STATE, SUMMARY, REPORT = (
    "metrics",
    "losses.csv",
    "watch_state.pt",
    "watch.json",
    "report.txt",
)

#: Rows are written out at least this often while the script runs.
FLUSH_SECONDS = 10.0

#: A finite plate nesting for the checking estimator: with Pyro's default (inf) it first runs
#: model and guide once to guess the nesting, which draws noise the decomposition did not.
_KNOWN_NESTING = 1000


@renamed_keywords(num_particles="eval_particles")
@dataclass(frozen=True)
class WatchConfig:
    """What :class:`Watch` computes.

    Attributes:
        every: decompose every N-th step of each SVI object (and the first and the last);
            None: adaptively, while observing costs at most ``budget`` of the steps' time.
        budget: share of the steps' time the adaptive cadence may spend observing.
        eval_particles: draws from the guide per decomposition (its standard errors; formerly
            ``num_particles``, still accepted with a DeprecationWarning).
        num_samples: K of the bound L_K on the last step's arguments.
        progress: show a progress line on stderr with the signed ELBO.
        figures: write ``curves.png`` and ``bound.png``.
    """

    every: int | None = None
    budget: float = 0.04
    eval_particles: int = WATCH_EVAL_PARTICLES
    num_samples: int = NUM_SAMPLES
    progress: bool = False
    figures: bool = True

    def __post_init__(self):
        for name in ("eval_particles", "num_samples"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise OptionError(f"must be a positive integer, got {v!r}", option=name)
        if self.every is not None and (not isinstance(self.every, int) or self.every < 1):
            raise OptionError(f"must be a positive integer, got {self.every!r}", option="every")
        if not 0 < self.budget < 1:
            raise OptionError(f"must lie in (0, 1), got {self.budget!r}", option="budget")


class WatchedFit(NamedTuple):
    """One SVI object (or ELBO module) at the end of the script, nats as ``svi.step`` reports them.

    ``decomposition`` is the guide after the last step on that step's arguments; ``pyro_loss``
    Pyro's own estimator on the same draws (None where not an ELBO); ``lk`` L_K with its
    standard error, ``elbo_mc`` the ELBO of the same K draws, ``gap = lk - elbo_mc``.
    """

    name: str
    estimator: str
    steps: int
    rows: int
    last_loss: float
    decomposition: ElboDecomposition | None
    pyro_loss: float | None
    lk: float | None
    lk_stderr: float | None
    elbo_mc: float | None
    elbo_mc_stderr: float | None
    num_samples: int
    seconds: float
    observe_seconds: float
    note: str

    log_px = deprecated_alias("lk", "log_px")
    log_px_stderr = deprecated_alias("lk_stderr", "log_px_stderr")

    def to_dict(self) -> dict[str, Any]:
        d = self._asdict()
        d["decomposition"] = None if self.decomposition is None else self.decomposition.to_dict()
        return d


@dataclass
class _Tracked:
    """What is known about one observed SVI object or ELBO module."""

    name: str
    model: Callable
    guide: Callable
    estimator: str
    analytic_kl: bool | None  # None: not an ELBO this module can decompose
    losses: list[float] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    last_args: tuple = ()
    last_kwargs: dict = field(default_factory=dict)
    step_seconds: float = 0.0
    observe_seconds: float = 0.0
    since_row: list[float] = field(default_factory=list)
    pending: bool = False  # an ELBO module's step waits to be observed after its update
    note: str = ""
    key: Any = None  # the SVI object or module, kept alive so that its id() stays unique
    log_weights: torch.Tensor | None = None  # of L_K on the last step's arguments

    @property
    def steps(self) -> int:
        return len(self.losses)


def _estimator(loss: Any) -> tuple[str, bool | None]:
    """The estimator's name and the ``analytic_kl`` of :func:`decompose` that matches it.

    ``loss`` is an ELBO, or what ``SVI`` keeps of it: its bound ``loss`` method."""
    loss = getattr(loss, "__self__", loss)
    name = type(loss).__name__ if hasattr(loss, "loss") else getattr(loss, "__name__", "loss")
    if isinstance(loss, TraceMeanField_ELBO):
        return name, True
    if isinstance(loss, Trace_ELBO | TraceGraph_ELBO):  # TraceEnum_ELBO is neither
        return name, False
    return name, None


def _guide_name(guide: Callable) -> str:
    if isinstance(guide, AutoGuide):
        return type(guide).__name__
    owner = getattr(guide, "__self__", None)
    if owner is not None:
        return f"{type(owner).__name__}.{guide.__name__}"
    return getattr(guide, "__name__", type(guide).__name__)


class Watch:
    """Observe every SVI object and ELBO module stepped inside the ``with`` block.

    Args:
        run_dir: where rows, figures and the report go (None: nothing is written).
        config: :class:`WatchConfig`.
        script: the script's path, for the report and for rebuilding its model and guide.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike | None = None,
        config: WatchConfig = WatchConfig(),
        *,
        script: str | os.PathLike | None = None,
    ):
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.config = config
        self.script = None if script is None else str(Path(script).resolve())
        self.fits: tuple[WatchedFit, ...] = ()
        self.failed = False
        self.rebuilt_from: Path | None = None  # set by explain_watched
        self._tracked: dict[int, _Tracked] = {}
        self._busy = False
        self._saved: list[tuple[type, str, Any]] = []
        self._bar = None
        self._last_flush = 0.0
        self._start = 0.0

    # --- the context ----------------------------------------------------------------------------

    def __enter__(self) -> Watch:
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._start = self._last_flush = time.perf_counter()
        if self.config.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(desc="watch", unit="step", file=sys.stderr, leave=True)
        self._patch(SVI, "step", self._wrap_svi_step)
        self._patch(ELBOModule, "forward", self._wrap_module_forward)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for cls, name, original in reversed(self._saved):
            setattr(cls, name, original)
        self._saved.clear()
        clean_exit = isinstance(exc, SystemExit) and exc.code in (None, 0)
        self.failed = exc is not None and not clean_exit
        try:
            if not self.failed:
                self._finish()
        except Exception as error:  # a fault of observation never becomes the script's
            log.warning("watch: the report is incomplete: %s: %s", type(error).__name__, error)
        finally:
            if self._bar is not None:
                self._bar.close()
            try:
                self._write_rows()
            except OSError as error:
                log.warning("watch: rows not written: %s", error)

    def _patch(self, cls: type, name: str, make: Callable[[Callable], Callable]) -> None:
        original = cls.__dict__[name]
        self._saved.append((cls, name, original))
        setattr(cls, name, make(original))

    def _wrap_svi_step(self, original: Callable) -> Callable:
        def step(svi, *args, **kwargs):
            if self._busy:
                return original(svi, *args, **kwargs)
            start = time.perf_counter()
            loss = original(svi, *args, **kwargs)
            tracked = self._track(svi, svi.model, svi.guide, svi.loss)
            self._record(tracked, loss, args, kwargs, time.perf_counter() - start)
            if self._due(tracked):
                self._observe(tracked)
            return loss

        return step

    def _wrap_module_forward(self, original: Callable) -> Callable:
        def forward(module, *args, **kwargs):
            if self._busy:
                return original(module, *args, **kwargs)
            tracked = self._track(module, module.model, module.guide, module.elbo)
            if tracked.pending:  # the previous call's parameters, as its update left them
                self._observe(tracked)
            start = time.perf_counter()
            loss = original(module, *args, **kwargs)
            value = float(loss.detach()) if torch.is_tensor(loss) else loss
            self._record(tracked, value, args, kwargs, time.perf_counter() - start)
            tracked.pending = self._due(tracked)
            return loss

        return forward

    # --- recording ------------------------------------------------------------------------------

    def _track(self, key: Any, model: Callable, guide: Callable, loss: Any) -> _Tracked:
        tracked = self._tracked.get(id(key))
        if tracked is None:
            name = _guide_name(guide)
            taken = {t.name for t in self._tracked.values()}
            base, i = name, 2
            while name in taken:
                name, i = f"{base}-{i}", i + 1
            estimator, analytic_kl = _estimator(loss)
            tracked = _Tracked(name, model, guide, estimator, analytic_kl)
            if analytic_kl is None:
                tracked.note = f"{estimator} is not an ELBO decompose supports: losses only"
            tracked.key = key
            self._tracked[id(key)] = tracked
        return tracked

    def _record(self, tracked: _Tracked, loss: Any, args, kwargs, seconds: float) -> None:
        if isinstance(loss, tuple):
            loss = float("nan")
        tracked.losses.append(float(loss))
        tracked.since_row.append(float(loss))
        tracked.last_args, tracked.last_kwargs = args, kwargs
        tracked.step_seconds += seconds
        if self._bar is not None:
            self._bar.update(1)

    def _due(self, tracked: _Tracked) -> bool:
        if tracked.analytic_kl is None:
            return False
        every = self.config.every
        if every is not None:
            return tracked.steps == 1 or tracked.steps % every == 0
        return tracked.steps == 1 or (
            tracked.observe_seconds <= self.config.budget * tracked.step_seconds
        )

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        """Run observation code without a trace on the script: random streams forked (and our own
        noise seeded), no gradients, no new parameters left in the param store."""
        store = pyro.get_param_store()
        names = set(store.keys())
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        self._busy = True
        try:
            with torch.random.fork_rng(devices=devices), seeded(EVAL_SEED), torch.no_grad():
                yield
        finally:
            self._busy = False
            for name in set(store.keys()) - names:
                del store[name]

    def _observe(self, tracked: _Tracked) -> None:
        tracked.pending = False
        start = time.perf_counter()
        try:
            with self._quiet():
                d = decompose(
                    tracked.model,
                    tracked.guide,
                    *tracked.last_args,
                    num_particles=self.config.eval_particles,
                    analytic_kl=tracked.analytic_kl,
                    **tracked.last_kwargs,
                )
        except Exception as exc:  # the script's own steps go on; only the rows stop
            tracked.analytic_kl = None
            tracked.note = f"not decomposed: {type(exc).__name__}: {exc}".splitlines()[0]
            log.warning("%s: %s", tracked.name, tracked.note)
            return
        finally:
            tracked.observe_seconds += time.perf_counter() - start
        start = time.perf_counter()
        tracked.rows.append(self._row(tracked, d))
        tracked.since_row = []
        if self._bar is not None:
            self._bar.set_postfix_str(
                f"{tracked.name}: ELBO = {d.reconstruction:.4g} - {d.kl:.4g} = {d.elbo:.4g} "
                f"± {d.elbo_stderr:.2g}, loss = -ELBO = {d.loss:.4g}",
                refresh=False,
            )
        if start - self._last_flush > FLUSH_SECONDS:  # rows so far survive a crash
            self._write_rows()
        tracked.observe_seconds += time.perf_counter() - start

    def _row(self, tracked: _Tracked, d: ElboDecomposition) -> dict[str, Any]:
        since = tracked.since_row or tracked.losses[-1:]
        row = {
            "svi": tracked.name,
            "step": tracked.steps,
            "estimator": tracked.estimator,
            "svi_loss": tracked.losses[-1],
            "svi_loss_mean": sum(since) / len(since),
            "loss": d.loss,
            "elbo": d.elbo,
            "reconstruction": d.reconstruction,
            "kl": d.kl,
            "residual": d.loss - (d.kl - d.reconstruction),  # loss = -ELBO = KL - reconstruction
            "elbo_stderr": d.elbo_stderr,
            "reconstruction_stderr": d.reconstruction_stderr,
            "kl_stderr": d.kl_stderr,
            "num_particles": d.num_particles,
            "seconds": time.perf_counter() - self._start,
        }
        for s in d.sites:
            key = f"{'reconstruction' if s.kind == 'observed' else 'kl'}[{s.name}]"
            row[key] = s.value
            row[f"{key}_stderr"] = s.stderr
            row[f"{key}_method"] = s.method
        return row

    # --- the end --------------------------------------------------------------------------------

    def _finish(self) -> None:
        fits = []
        for tracked in self._tracked.values():
            if tracked.analytic_kl is not None and (
                tracked.pending or not tracked.rows or tracked.rows[-1]["step"] != tracked.steps
            ):
                self._observe(tracked)
            fits.append(self._final(tracked))
        self.fits = tuple(fits)
        if self.run_dir is None:
            return
        for fit, tracked in zip(self.fits, self._tracked.values(), strict=True):
            self._figures(fit, tracked)
        if len(self.fits) > 1:
            self._comparison()
        write_json(self.run_dir / SUMMARY, self._summary())
        self._save_state()
        atomic_write_text(self.run_dir / REPORT, self.report() + "\n")

    def _final(self, tracked: _Tracked) -> WatchedFit:
        d = pyro_value = None
        lk = lk_stderr = elbo_mc = elbo_mc_stderr = None
        note = tracked.note
        if tracked.analytic_kl is not None and tracked.rows:
            d = _decomposition(tracked.rows[-1])
            pyro_value = self._pyro_loss(tracked)
            try:
                with self._quiet():
                    est = iwae(
                        tracked.model,
                        tracked.guide,
                        *tracked.last_args,
                        num_samples=self.config.num_samples,
                        **tracked.last_kwargs,
                    )
                tracked.log_weights = est.log_weights
                total = est.log_weights.sum(-1) if est.log_weights.dim() == 2 else est.log_weights
                k = total.shape[0]
                lk, lk_stderr = est.lk, est.stderr
                elbo_mc = float(total.mean())
                elbo_mc_stderr = float(total.std()) / math.sqrt(k) if k > 1 else math.nan
            except Exception as exc:
                note = f"L_K not computed: {type(exc).__name__}: {exc}".splitlines()[0]
            if is_point_estimate(tracked.guide, *tracked.last_args, **tracked.last_kwargs):
                note = "point estimate: 'ELBO' = log p(x, z*) omits the entropy; L_K is not a bound"
        return WatchedFit(
            name=tracked.name,
            estimator=tracked.estimator,
            steps=tracked.steps,
            rows=len(tracked.rows),
            last_loss=tracked.losses[-1] if tracked.losses else math.nan,
            decomposition=d,
            pyro_loss=pyro_value,
            lk=lk,
            lk_stderr=lk_stderr,
            elbo_mc=elbo_mc,
            elbo_mc_stderr=elbo_mc_stderr,
            num_samples=self.config.num_samples,
            seconds=tracked.step_seconds,
            observe_seconds=tracked.observe_seconds,
            note=note,
        )

    def _pyro_loss(self, tracked: _Tracked) -> float | None:
        """Pyro's own estimator on the draws of the last decomposition (an independent check)."""
        cls = TraceMeanField_ELBO if tracked.analytic_kl else Trace_ELBO
        elbo = cls(
            num_particles=self.config.eval_particles,
            vectorize_particles=False,
            max_plate_nesting=_KNOWN_NESTING,
        )
        try:
            with self._quiet():
                return float(
                    elbo.loss(
                        tracked.model, tracked.guide, *tracked.last_args, **tracked.last_kwargs
                    )
                )
        except Exception as exc:
            log.warning("%s: Pyro's %s().loss failed: %s", tracked.name, cls.__name__, exc)
            return None

    def report(self) -> str:
        """The sign convention in the script's own numbers, one block per SVI object."""
        where = f" in {Path(self.script).name}" if self.script else ""
        lines = []
        if self.rebuilt_from is not None:
            lines.append(f"{self.rebuilt_from}: model and guide rebuilt, parameters restored")
        lines.append(
            f"Watched {len(self.fits)} SVI object{'s' if len(self.fits) != 1 else ''}{where}"
            + (f"; run directory: {self.run_dir}" if self.run_dir else "")
        )
        for fit in self.fits:
            lines.append("")
            lines += _fit_report(fit)
        if not self.fits:
            lines.append("  (no SVI step and no ELBO module was called)")
        return "\n".join(lines)

    # --- files ----------------------------------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        """Every recorded row, in order of steps within each SVI object."""
        return [row for t in self._tracked.values() for row in t.rows]

    def losses(self) -> dict[str, list[float]]:
        """Every step's loss, as the step returned it, per SVI object."""
        return {t.name: list(t.losses) for t in self._tracked.values()}

    def _write_rows(self) -> None:
        self._last_flush = time.perf_counter()
        if self.run_dir is None:
            return
        rows = self.rows()
        write_jsonl(self.run_dir / f"{METRICS}.jsonl", rows)
        columns = list(dict.fromkeys(k for row in rows for k in row))
        write_csv(
            self.run_dir / f"{METRICS}.csv", [{k: r.get(k, "") for k in columns} for r in rows]
        )
        write_csv(
            self.run_dir / LOSSES,
            [
                {"svi": t.name, "step": i + 1, "loss": loss}
                for t in self._tracked.values()
                for i, loss in enumerate(t.losses)
            ],
        )

    def _figure_name(self, stem: str, fit: WatchedFit) -> Path:
        suffix = "" if len(self.fits) == 1 else f"-{fit.name}"
        return self.run_dir / f"{stem}{suffix}.png"

    def _figures(self, fit: WatchedFit, tracked: _Tracked) -> None:
        if not self.config.figures or not tracked.rows:
            return
        from .plots import plot_bound, plot_training_curves

        history = [
            {**row, "epoch": row["step"], "split": "train", "svi_loss": row["svi_loss_mean"]}
            for row in tracked.rows
        ]
        title = f"{fit.name} ({fit.estimator}), nats on each step's arguments"
        plot_training_curves(
            history,
            title=title,
            xlabel="step",
            unit="nats",  # totals over each step's arguments, as svi.step reports them
            path=self._figure_name("curves", fit),
        )
        log_w = tracked.log_weights
        if log_w is not None:
            # per datum for local latents; one point, the whole data, for global ones
            elbo, bound = (log_w.mean(0), torch.logsumexp(log_w, 0) - math.log(log_w.shape[0]))
            plot_bound(
                elbo.reshape(-1),
                bound.reshape(-1),
                num_samples=log_w.shape[0],
                title=f"{fit.name}: ELBO ≤ L_K ≤ log p(x) on the last step's arguments",
                path=self._figure_name("bound", fit),
            )

    def _comparison(self) -> None:
        from .compare import Comparison, ComparisonRow, write_comparison

        rows = []
        for fit, tracked in zip(self.fits, self._tracked.values(), strict=True):
            d = fit.decomposition
            if d is None:
                continue
            log_w = tracked.log_weights
            khat = psis_khat(log_w) if log_w is not None else float("nan")
            nan = float("nan")
            gap = nan if fit.lk is None else fit.lk - fit.elbo_mc
            rows.append(
                ComparisonRow(
                    guide=fit.name,
                    split="last step's",
                    n=_num_rows(tracked.last_args),
                    elbo=d.elbo,
                    elbo_stderr=d.elbo_stderr,
                    reconstruction=d.reconstruction,
                    kl=d.kl,
                    lk=nan if fit.lk is None else fit.lk,
                    lk_stderr=nan if fit.lk_stderr is None else fit.lk_stderr,
                    gap=gap,
                    gap_stderr=nan
                    if fit.lk is None
                    else math.hypot(fit.lk_stderr, fit.elbo_mc_stderr),
                    khat_median=float(torch.tensor(khat).median()) if log_w is not None else nan,
                    khat_share_bad=float((torch.tensor(khat) > KHAT_THRESHOLD).double().mean())
                    if log_w is not None
                    else nan,
                    ess_median=nan,
                    seconds=fit.seconds,
                    num_params=self._num_params(tracked),
                    note=fit.note,
                )
            )
        if len(rows) > 1:
            comparison = Comparison(
                rows=tuple(rows),
                num_samples=self.config.num_samples,
                train={"script": self.script, "steps": {f.name: f.steps for f in self.fits}},
                model=Path(self.script).name if self.script else "watched script",
                units="nats, whole objective as svi.step reports it,",
            )
            write_comparison(comparison, self.run_dir)
            self.comparison = comparison

    def _num_params(self, tracked: _Tracked) -> int:
        """Scalars in the parameters the guide reads (one traced run, nothing changed)."""
        try:
            with self._quiet():
                trace = poutine.trace(tracked.guide, param_only=True).get_trace(
                    *tracked.last_args, **tracked.last_kwargs
                )
        except Exception:
            return -1
        store = pyro.get_param_store()
        return int(sum(store[name].numel() for name in trace.nodes if name in store))

    def _summary(self) -> dict[str, Any]:
        return {
            "kind": "elbo-lab watch",
            "script": self.script,
            "config": asdict(self.config),
            "failed": self.failed,
            "fits": [
                {
                    **fit.to_dict(),
                    "model_ref": _reference(t.model, self.script),
                    "guide_ref": _guide_reference(t.guide, t.model, self.script),
                    "sources": _sources(
                        _reference(t.model, self.script),
                        _guide_reference(t.guide, t.model, self.script),
                    ),
                }
                for fit, t in zip(self.fits, self._tracked.values(), strict=True)
            ],
        }

    def _save_state(self) -> None:
        """The parameters and last arguments of every pair that can be rebuilt (for explain)."""
        state = {}
        for t in self._tracked.values():
            if _reference(t.model, self.script) is None:
                continue
            if not _plain((t.last_args, t.last_kwargs)):
                continue
            with self._quiet(), poutine.trace(param_only=True) as capture:
                guide_trace = poutine.trace(t.guide).get_trace(*t.last_args, **t.last_kwargs)
                poutine.replay(t.model, trace=guide_trace)(*t.last_args, **t.last_kwargs)
            store = pyro.get_param_store()
            names = sorted(capture.trace.nodes)
            state[t.name] = {
                "params": {n: store.get_param(n).unconstrained().detach().clone() for n in names},
                "args": list(t.last_args),
                "kwargs": dict(t.last_kwargs),
            }
        if state:
            torch.save(state, self.run_dir / STATE)


def _what_the_elbo_is(note: str) -> str:
    """What a report's ELBO line says the number is: a bound, or a point estimate's value."""
    if note.startswith("point estimate"):
        return "a point estimate's log p(x, z*): no bound on log p(x)"
    return "a lower bound on log p(x)"


def _decomposition(row: Mapping[str, Any]) -> ElboDecomposition:
    from .elbo import SiteTerm

    sites = []
    for key in row:
        if key.endswith("_method"):
            base = key.removesuffix("_method")
            kind, name = base.split("[", 1)
            sites.append(
                SiteTerm(
                    name[:-1],
                    "observed" if kind == "reconstruction" else "latent",
                    row[key],
                    row[base],
                    row[f"{base}_stderr"],
                )
            )
    return ElboDecomposition(
        elbo=row["elbo"],
        loss=row["loss"],
        reconstruction=row["reconstruction"],
        kl=row["kl"],
        elbo_stderr=row["elbo_stderr"],
        reconstruction_stderr=row["reconstruction_stderr"],
        kl_stderr=row["kl_stderr"],
        num_particles=row["num_particles"],
        sites=tuple(sites),
    )


def _num_rows(args: tuple) -> int:
    for a in args:
        if torch.is_tensor(a) and a.dim() > 0:
            return int(a.shape[0])
    return 1


def _fit_report(fit: WatchedFit) -> list[str]:
    d = fit.decomposition
    share = fit.observe_seconds / fit.seconds if fit.seconds > 0 else math.nan
    head = (
        f"{fit.name} ({fit.estimator}, {fit.steps} steps, {fit.rows} rows; observing took "
        f"{share:.1%} of the steps' time)"
    )
    if d is None:
        return [f"{head}: last svi.step() = {fit.last_loss:.4f}; {fit.note}"]
    unit = "nats"
    lines = [
        f"{head}, after the last step, on its arguments:",
        f"Pyro minimized loss = -ELBO = KL - E[log p(x|z)] = {d.kl:.4f} - ({d.reconstruction:.4f})"
        f" = {d.loss:.4f} {unit}",
        f"  ELBO = E[log p(x|z)] - KL = {d.reconstruction:.4f} - {d.kl:.4f} = {d.elbo:.4f} "
        f"± {d.elbo_stderr:.4f} {unit} (maximized; {_what_the_elbo_is(fit.note)})",
    ]
    if fit.pyro_loss is not None:
        cls = "TraceMeanField_ELBO" if fit.estimator.endswith("MeanField_ELBO") else "Trace_ELBO"
        residual = fit.pyro_loss - (d.kl - d.reconstruction)
        ok = abs(residual) <= 1e-5 * max(1.0, abs(d.loss))
        lines.append(
            f"  checked: Pyro's {cls}().loss = {fit.pyro_loss:.4f} on the same {d.num_particles} "
            f"draws; minus (KL - E[log p(x|z)]) = {residual:.1e} ({'ok' if ok else 'MISMATCH'})"
        )
    lines.append(
        f"  svi.step() returned {fit.last_loss:.4f} at the last step: one draw of the loss "
        "(before that step's update)"
    )
    if fit.lk is not None:
        gap = fit.lk - fit.elbo_mc
        gap_se = math.hypot(fit.lk_stderr, fit.elbo_mc_stderr)
        lines += [
            f"  log p(x) >= L_{fit.num_samples} = {fit.lk:.4f} ± {fit.lk_stderr:.4f}; "
            f"ELBO from the same draws = {fit.elbo_mc:.4f} ± {fit.elbo_mc_stderr:.4f}",
            f"  gap L_K - ELBO = {gap:.4f} ± {gap_se:.4f} >= 0, read as KL(q(z|x) || p(z|x)) "
            "(a lower bound on it)"
            if gap > -3 * gap_se
            else f"  gap L_K - ELBO = {gap:.4f} ± {gap_se:.4f}: L_K lies below the ELBO by more "
            "than 3 s.e. (CHECK FAILED: ELBO <= L_K must hold)",
        ]
    if fit.note:
        lines.append(f"  note: {fit.note}")
    return lines


def watch(run_dir: str | os.PathLike | None = None, config: WatchConfig | None = None, **options):
    """A :class:`Watch` context: ``with watch() as w: <the SVI loop>``, then ``w.report()``.

    ``options`` are :class:`WatchConfig` fields (``every=10``, ``eval_particles=32``, ...).
    """
    return Watch(run_dir, config or WatchConfig(**options))


# --- the script -----------------------------------------------------------------------------------


def run_script(path: str | os.PathLike, args: list[str]) -> None:
    """Run ``path`` as ``python path args...`` would: ``__main__``, ``sys.argv``, ``sys.path[0]``.

    Whatever the script raises (``SystemExit`` included) propagates unchanged.
    """
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise OptionError(f"{path}: no such script")
    saved_argv, saved_path0 = sys.argv, sys.path[0] if sys.path else None
    sys.argv = [path, *args]
    sys.path[0:1] = [os.path.dirname(path)]
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv = saved_argv
        if saved_path0 is not None:
            sys.path[0] = saved_path0


def format_script_traceback(exc: BaseException, script: str | os.PathLike) -> str:
    """The traceback Python prints for ``exc`` raised by ``python script``: the frames that run
    the script (runpy, the command line) and those of this module's wrappers left out."""
    script = os.path.abspath(script)
    here = os.path.abspath(__file__)
    te = traceback.TracebackException(type(exc), exc, exc.__traceback__)
    seen = set()

    def clean(t: traceback.TracebackException | None) -> None:
        if t is None or id(t) in seen:
            return
        seen.add(id(t))
        frames = list(t.stack)
        # the frames that ran the script (this package's and runpy's), up to its first own frame
        first = 0
        if frames and os.path.dirname(frames[0].filename) == os.path.dirname(here):
            first = next((i for i, f in enumerate(frames) if f.filename == script), len(frames))
        kept = [f for f in frames[first:] if f.filename != here]
        t.stack = traceback.StackSummary.from_list(kept)
        clean(t.__cause__)
        clean(t.__context__)

    clean(te)
    return "".join(te.format())


# --- rebuilding a watched pair (explain) -----------------------------------------------------------


def _import_safe(script: str) -> bool:
    """Whether importing ``script`` runs nothing but definitions: imports, functions, classes,
    assignments, and an ``if __name__ == "__main__":`` block (which an import skips)."""
    try:
        tree = ast.parse(Path(script).read_text())
    except (OSError, SyntaxError):
        return False
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom | ast.FunctionDef | ast.ClassDef):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Assign | ast.AnnAssign) and not any(
            isinstance(n, ast.Call) for n in ast.walk(node)
        ):
            continue
        return False
    return True


def _sources(*refs: str | None) -> dict[str, str]:
    """The SHA-256 of each file a reference names: ``explain`` imports only these bytes."""
    from .provenance import file_fingerprint

    out = {}
    for ref in refs:
        if ref and not ref.startswith("autoguide:"):
            path = ref.rpartition(":")[0]
            if os.path.isfile(path):
                out[path] = file_fingerprint(path)["sha256"]
    return out


def _load_recorded(ref: str, sources: Mapping[str, str]) -> Callable:
    """The function ``FILE.py:NAME`` of a watched run, imported from the recorded absolute path
    only if the file's bytes still have the recorded hash (what opening a run trusts)."""
    from .user_model import load_user_model

    path = ref.rpartition(":")[0]
    if not os.path.isabs(path) or path not in sources:
        raise RunError(f"{ref}: no recorded hash for this file; not imported")
    return load_user_model(ref, path=path, expected_sha256=sources[path])


def _reference(fn: Callable, script: str | None) -> str | None:
    """``FILE.py:NAME`` for a module-level function that can be imported without running the
    script again; None otherwise (a method, a closure, or the body of an unguarded script)."""
    if not inspect.isfunction(fn) or fn.__qualname__ != fn.__name__:
        return None
    module = sys.modules.get(fn.__module__)
    source = getattr(module, "__file__", None)
    if fn.__module__ == "__main__":
        source = script
        if source is None or not _import_safe(source):
            return None
    if source is None:
        return None
    return f"{os.path.abspath(source)}:{fn.__name__}"


def _guide_reference(guide: Callable, model: Callable, script: str | None) -> str | None:
    """``autoguide:AutoNormal`` for a Pyro autoguide (of the model it is paired with), else as
    :func:`_reference`."""
    if isinstance(guide, AutoGuide):
        if type(guide).__module__.startswith("pyro.infer.autoguide"):
            return f"autoguide:{type(guide).__name__}"
        return None
    return _reference(guide, script)


def _plain(value: Any) -> bool:
    if torch.is_tensor(value) or value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def explain_watched(run_dir: str | os.PathLike, *, num_samples: int = 1000) -> Watch:
    """Rebuild the model and guide of each SVI object of a watched run and evaluate them again
    on their last step's arguments: a :class:`Watch` whose ``fits`` and ``report()`` say it.

    Raises:
        RunError: the run's model or guide lived in the script's own body (or a method, or a
            closure), which cannot be rebuilt without running the script.
    """
    from pyro.infer import autoguide

    run_dir = Path(run_dir)
    summary = json.loads((run_dir / SUMMARY).read_text())
    fits = summary.get("fits", [])
    missing = [f["name"] for f in fits if not f.get("model_ref") or not f.get("guide_ref")]
    if not fits or missing or not (run_dir / STATE).exists():
        script = Path(summary.get("script") or "the script").name
        what = ", ".join(missing) if missing else "its SVI objects"
        raise RunError(
            f"{run_dir}: written by 'elbo-lab watch {script}'; the model and guide of {what} "
            f"live in the script's own body (or are methods), so they cannot be rebuilt without "
            f"running it again; its report is in {run_dir / REPORT}"
        )
    state = torch.load(run_dir / STATE, map_location="cpu", weights_only=True)
    recorded = dict(summary["config"])
    if "num_particles" in recorded:  # written before the field was named eval_particles
        recorded["eval_particles"] = recorded.pop("num_particles")
    config = WatchConfig(**{**recorded, "num_samples": num_samples, "progress": False})
    w = Watch(None, config, script=summary.get("script"))
    fits_out = []
    for f in fits:
        pyro.clear_param_store()
        sources = f.get("sources") or {}
        model = _load_recorded(f["model_ref"], sources)
        kind, _, name = f["guide_ref"].partition(":")
        guide = (
            getattr(autoguide, name)(model)
            if kind == "autoguide"
            else _load_recorded(f["guide_ref"], sources)
        )
        saved = state[f["name"]]
        args, kwargs = tuple(saved["args"]), saved["kwargs"]
        with torch.random.fork_rng(devices=[]), poutine.trace(param_only=True) as capture:
            Trace_ELBO().loss(model, guide, *args, **kwargs)
        store = pyro.get_param_store()
        names = sorted(capture.trace.nodes)  # as _save_state wrote them
        params = [store.get_param(n).unconstrained() for n in names]
        recorded = {"param_names": sorted(saved["params"]), "params": saved["params"]}
        copy_params(names, params, recorded, f"{run_dir / STATE} ({f['name']})")
        analytic_kl = f["estimator"].endswith("MeanField_ELBO")
        tracked = _Tracked(f["name"], model, guide, f["estimator"], analytic_kl)
        tracked.losses, tracked.last_args, tracked.last_kwargs = [f["last_loss"]], args, kwargs
        tracked.key = tracked
        w._observe(tracked)
        fit = w._final(tracked)
        fits_out.append(fit._replace(steps=f["steps"], rows=f["rows"]))
    w.fits = tuple(fits_out)
    w.rebuilt_from = run_dir
    return w
