"""Stochastic variational inference for any Pyro model/guide pair, with per-epoch ELBO anatomy.

The step is Pyro's own estimator used as a PyTorch module, ``loss = Trace_ELBO()(model, guide)``,
with one fused ``torch.optim.Adam`` over every parameter the pair registers. Its value is exactly
what ``SVI.step()`` returns: loss = -ELBO = KL - E_q[log p(x | z)] (Kingma & Welling 2014). For
a model and guide declared static (every built-in one) the estimator is compiled by default
(:mod:`inference.estimators`): the same loss and gradients (bit for bit for the built-in
models; to rounding in general), without Pyro's per-step Python work, which makes the step as
fast as a hand-written PyTorch VAE's.

After each epoch the train and test splits are evaluated with :func:`inference.elbo.decompose`
(analytic KL where valid, a fixed evaluation seed) and reported per datum in nats as
``loss``, ``elbo``, ``reconstruction`` and ``kl``.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import signal
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from tqdm.auto import tqdm

from .distributed import World, current_world
from .elbo import decompose, meanfield_violations
from .enumeration import TraceEnum_ELBO, enumeration, has_enumerated_sites
from .errors import NumericalError, OptionError, RunError
from .estimators import COMPILED, JitTrace_ELBO, JitTraceMeanField_ELBO, is_static_pair
from .io import load_checkpoint, save_checkpoint, write_csv, write_json, write_jsonl

__all__ = [
    "ESTIMATORS",
    "Interrupted",
    "Metrics",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "fit",
    "make_elbo",
    "pyro_loss",
    "resolve_estimator",
]

log = logging.getLogger(__name__)


#: ELBO estimators by name: Monte-Carlo KL, analytic KL, and their JIT-compiled variants
#: (:mod:`inference.estimators`: traced once per shape, same noise and gradients as the plain);
#: ``graph`` (Trace_ELBO's loss, Rao-Blackwellized score-function gradients) and ``enum``
#: (the model's enumerated discrete sites summed out, :mod:`inference.enumeration`).
ESTIMATORS: dict[str, type[ELBO]] = {
    "trace": Trace_ELBO,
    "meanfield": TraceMeanField_ELBO,
    "jit": JitTrace_ELBO,
    "jit-meanfield": JitTraceMeanField_ELBO,
    "graph": TraceGraph_ELBO,
    "enum": TraceEnum_ELBO,
}

#: ``TrainConfig.estimator`` may also be this: TraceMeanField_ELBO where its analytic KL is
#: valid for the model/guide pair (:func:`inference.elbo.meanfield_violations`), else Trace_ELBO.
AUTO = "auto"
ESTIMATOR_CHOICES = (AUTO, *ESTIMATORS)

#: When :func:`fit` compiles its estimator (``TrainConfig.jit``).
JIT_MODES = ("auto", "on", "off")

#: With ``eval_every=None``, :func:`fit` evaluates about this many times per run (and after
#: the last epoch): evaluation stays a small share of training however long the run.
EVALUATIONS_PER_RUN = 20

CHECKPOINT = "checkpoint.pt"
EVAL_SEED = 20140101  # the noise used for every evaluation: common random numbers across epochs


@dataclass(frozen=True)
class TrainConfig:
    """Options of :func:`fit`. ``batch_size=None`` means full batch."""

    epochs: int = 200
    batch_size: int | None = 128
    learning_rate: float = 1e-3
    seed: int = 0
    estimator: str = AUTO  # meanfield where its analytic KL is valid (the VAE), else trace
    jit: str = "auto"  # compile the estimator: on, off, auto = when model and guide are static
    num_particles: int = 1
    clip_norm: float | None = None
    validate: bool = False
    eval_batch_size: int | None = 1024
    eval_every: int | None = None  # evaluate every this many epochs (and the last); None:
    # about EVALUATIONS_PER_RUN times per run (an epoch is one step for full-batch models)
    eval_particles: int = 10  # draws per evaluation of a model with global latents
    progress: bool = True

    def __post_init__(self):
        for name in ("epochs", "num_particles", "eval_particles"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise OptionError(
                    f"--{name.replace('_', '-')}: must be a positive integer, "
                    f"got {getattr(self, name)!r}"
                )
        for name in ("batch_size", "eval_batch_size", "eval_every"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise OptionError(
                    f"--{name.replace('_', '-')}: must be a positive integer, got {v!r}"
                )
        if not (
            isinstance(self.learning_rate, float | int)
            and math.isfinite(self.learning_rate)
            and self.learning_rate > 0
        ):
            raise OptionError(f"--lr: must be a positive number, got {self.learning_rate!r}")
        if self.clip_norm is not None and not (
            math.isfinite(self.clip_norm) and self.clip_norm > 0
        ):
            raise OptionError(f"--clip-norm: must be a positive number, got {self.clip_norm!r}")
        if self.estimator not in ESTIMATOR_CHOICES:
            raise OptionError(
                f"--estimator: unknown estimator {self.estimator!r} "
                f"(choose from {', '.join(ESTIMATOR_CHOICES)})"
            )
        if self.jit not in JIT_MODES:
            raise OptionError(f"--jit: must be one of {', '.join(JIT_MODES)}, got {self.jit!r}")


class Metrics(NamedTuple):
    """Per-datum ELBO anatomy of one split, in nats: loss = -elbo, elbo = reconstruction - kl.

    ``elbo_stderr`` is the Monte-Carlo standard error of ``elbo`` (None from one draw).
    """

    loss: float
    elbo: float
    reconstruction: float
    kl: float
    n: int
    elbo_stderr: float | None = None


class TrainResult(NamedTuple):
    """What :func:`fit` returns: the per-epoch history, the final test (or train) metrics and
    the estimator that was actually run (a name of :data:`ESTIMATORS`)."""

    history: list[dict[str, Any]]
    final: Metrics
    run_dir: Path | None
    estimator: str = ""


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after a checkpoint was written; ``signum`` says which."""

    def __init__(self, signum: int, where: str):
        super().__init__(f"interrupted by signal {signum} at {where}; checkpoint written")
        self.signum = signum


def make_elbo(name: str, num_particles: int = 1) -> ELBO:
    """Instantiate an estimator from :data:`ESTIMATORS` (vectorized particles for >1)."""
    if name not in ESTIMATORS:
        raise OptionError(
            f"--estimator: unknown estimator {name!r} (choose from {', '.join(ESTIMATORS)})"
        )
    if num_particles == 1:
        return ESTIMATORS[name]()
    return ESTIMATORS[name](num_particles=num_particles, vectorize_particles=False)


def choose_estimator(name: str, model: Callable, guide: Callable, *args, **kwargs) -> str:
    """The plain estimator for ``name`` on this pair and arguments.

    ``"auto"`` is ``enum`` (TraceEnum_ELBO) when the model enumerates discrete sites
    (``@config_enumerate``; :func:`inference.enumeration.enumeration`), else ``meanfield``
    (TraceMeanField_ELBO) when its analytic KL is valid at every site
    (:func:`inference.elbo.meanfield_violations`), else ``trace`` (Trace_ELBO, valid for every
    pair). An explicit ``meanfield`` on a pair where it is not valid is an
    :class:`OptionError` naming the site: it would train on, and report, a wrong objective
    (e.g. an "ELBO" above log p(x) for an autoguide over a constrained latent); so is any
    estimator but ``enum`` on a model with enumerated sites, which it would sample from the
    prior with no guide term.
    """
    plain = {compiled: plain for plain, compiled in COMPILED.items()}
    base = plain.get(name, name)
    enumerable = base != "enum" and bool(args or kwargs)
    if enumerable and has_enumerated_sites(model, guide, *args, **kwargs):
        enumerated = enumeration(model, guide, *args, **kwargs).sites
        if enumerated and base == AUTO:
            return "enum"
        if enumerated:
            raise OptionError(
                f"--estimator {name}: the model enumerates {', '.join(enumerated)}, which only "
                "TraceEnum_ELBO sums out; use --estimator enum or auto"
            )
    if base not in (AUTO, "meanfield"):
        return name
    violations = meanfield_violations(model, guide, *args, **kwargs)
    if base == AUTO:
        return "trace" if violations else "meanfield"
    if violations:
        raise OptionError(
            f"--estimator {name}: TraceMeanField_ELBO's analytic KL is not valid for this pair "
            f"({violations[0]}); use --estimator trace or auto"
        )
    return name


def resolve_estimator(
    config: TrainConfig, model: Callable, guide: Callable, *args, **kwargs
) -> str:
    """The estimator :func:`fit` runs: ``config.estimator`` (``auto`` chosen for the pair on
    ``*args, **kwargs`` by :func:`choose_estimator`), compiled when ``config.jit`` says.

    ``jit="auto"`` compiles (``trace`` -> ``jit``, ``meanfield`` -> ``jit-meanfield``) when the
    model and the guide are both declared static (:func:`models.structure.static_structure`:
    every built-in model and guide is; a Pyro autoguide is as static as the model it was built
    from) and per-step validation is off, which needs the eager path. A compiled estimator
    computes the plain one's loss and gradients for shared noise (bit for bit for the built-in
    models, to rounding in general: :mod:`inference.estimators`); it only removes Pyro's
    per-step Python work. Undeclared functions run eagerly: a traced graph would silently
    freeze a data-dependent branch.
    """
    name = config.estimator
    if name in (AUTO, "meanfield", "jit-meanfield"):
        if not args and not kwargs:
            raise OptionError(f"--estimator {name}: choosing it needs the model's arguments")
        name = choose_estimator(name, model, guide, *args, **kwargs)
    if name not in COMPILED:  # already a compiled estimator
        return name
    if config.jit == "on" or (
        config.jit == "auto" and not config.validate and is_static_pair(model, guide)
    ):
        return COMPILED[name]
    return name


def takes_num_data(model: Callable) -> bool:
    """Whether ``model`` accepts a ``num_data`` keyword to scale a mini-batch to the full data."""
    try:
        return "num_data" in inspect.signature(model).parameters
    except (TypeError, ValueError):
        return False


# --- random state --------------------------------------------------------------------------------


def get_rng_state() -> dict[str, Any]:
    """torch, numpy and Python RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (global state)
    return {
        "torch": torch.get_rng_state(),
        "numpy": [
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "python": random.getstate(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    legacy = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    np.random.set_state(legacy)  # noqa: NPY002 (global state)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


@contextmanager
def seeded(seed: int):
    """Run a block under ``pyro.set_rng_seed(seed)`` and restore the caller's RNG state after."""
    state = get_rng_state()
    pyro.set_rng_seed(seed)
    try:
        yield
    finally:
        set_rng_state(state)


# --- evaluation ----------------------------------------------------------------------------------


def evaluate(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *,
    batch_size: int | None = 1024,
    analytic_kl: bool = True,
    seed: int = EVAL_SEED,
    model_kwargs: Mapping[str, Any] | None = None,
    num_particles: int = 1,
) -> Metrics:
    """Per-datum loss, ELBO, reconstruction and KL of ``x`` ``(N, D)`` under the guide.

    Sums :func:`~inference.elbo.decompose` over batches (each with ``num_particles`` draws)
    under a fixed seed, then divides by N. ``batch_size=None`` evaluates all rows in one call,
    as models with global latents need. With several particles ``elbo_stderr`` is the standard
    error of the per-datum ELBO (batches independent).
    """
    n = x.shape[0]
    step = n if batch_size is None else batch_size
    recon = kl = variance = 0.0
    with seeded(seed):
        for start in range(0, n, step):
            d = decompose(
                model,
                guide,
                x[start : start + step],
                num_particles=num_particles,
                analytic_kl=analytic_kl,
                **dict(model_kwargs or {}),
            )
            recon += d.reconstruction
            kl += d.kl
            variance += d.elbo_stderr**2
    reconstruction, kl = recon / n, kl / n
    elbo = reconstruction - kl
    return Metrics(
        loss=-elbo,
        elbo=elbo,
        reconstruction=reconstruction,
        kl=kl,
        n=n,
        elbo_stderr=math.sqrt(variance) / n if math.isfinite(variance) else None,
    )


def pyro_loss(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *,
    batch_size: int | None = 1024,
    estimator: str = "meanfield",
    seed: int = EVAL_SEED,
    num_particles: int = 1,
) -> float:
    """Per-datum loss of ``x`` as Pyro's own estimator computes it, with :func:`evaluate`'s noise.

    An independent check on :func:`evaluate`: ``TraceMeanField_ELBO().loss`` summed over the
    same batches under the same seed equals its ``kl - reconstruction``.
    """
    n = x.shape[0]
    step = n if batch_size is None else batch_size
    elbo_estimator = make_elbo(estimator, num_particles)
    total = 0.0
    with seeded(seed):
        for start in range(0, n, step):
            total += elbo_estimator.loss(model, guide, x[start : start + step])
    return total / n


# --- training ------------------------------------------------------------------------------------


def adam(params: list[torch.Tensor], learning_rate: float) -> torch.optim.Adam:
    """One ``torch.optim.Adam`` over all parameters, fused into one kernel where torch has it.

    The update is Adam's (Kingma & Ba 2015) either way; the fused kernel (CPU and CUDA, float
    parameters) replaces a Python loop over the tensors, which dominates small models' steps.
    """
    devices = {p.device.type for p in params}
    floating = all(p.is_floating_point() for p in params)
    fused = bool(params) and devices <= {"cpu", "cuda"} and floating
    return torch.optim.Adam(params, lr=learning_rate, fused=fused or None)


@contextmanager
def default_dtype(dtype: torch.dtype | None):
    """Make ``dtype`` torch's default dtype inside the block (a floating dtype; else unchanged).

    Parameters that a guide creates lazily from the default dtype, such as the networks of
    ``AutoIAFNormal``'s flow, are then created in the data's precision.
    """
    if dtype is None or not dtype.is_floating_point or dtype == torch.get_default_dtype():
        yield
        return
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _collect_params(loss_fn: torch.nn.Module, x: torch.Tensor, kwargs) -> tuple[list[str], list]:
    """Run the pair once (RNG forked, parameters created at ``x``'s dtype); return its
    parameters sorted by name, each tensor once (a guide may register one tensor under two
    names, as ``AutoIAFNormal`` does: the optimizer must step it once)."""
    with (
        torch.random.fork_rng(devices=[]),
        default_dtype(x.dtype),
        poutine.trace(param_only=True) as capture,
    ):
        loss_fn(x, **kwargs)
    store = pyro.get_param_store()
    names, params, seen = [], [], set()
    for name in sorted(capture.trace.nodes):
        param = store.get_param(name).unconstrained()
        if id(param) in seen:
            continue
        seen.add(id(param))
        names.append(name)
        params.append(param)
    return names, params


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite (a NaN or inf makes its tensor's sum, and
    the sum of sums, non-finite; so does an overflowing sum, which is as much a warning)."""
    if not tensors:
        return True
    return bool(torch.isfinite(torch.stack([t.sum() for t in tensors]).sum()))


class _SignalFlag:
    """Records SIGINT/SIGTERM so the loop can finish its step and checkpoint before exiting."""

    def __init__(self, enabled: bool):
        self.enabled, self.signum, self._old = enabled, None, {}

    def __enter__(self):
        if self.enabled:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def fit(
    model: Callable,
    guide: Callable,
    train_x: torch.Tensor,
    test_x: torch.Tensor | None = None,
    config: TrainConfig = TrainConfig(),
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    metadata: Mapping[str, Any] | None = None,
    handle_signals: bool = False,
    world: World | None = None,
) -> TrainResult:
    """Train ``guide`` (and the model's parameters) by SVI on ``train_x`` ``(N, D)``.

    Each step minimizes loss = -ELBO with the chosen Pyro estimator on a mini-batch; a model
    that takes ``num_data`` gets it, so its plate scales the batch by N / B. A model without it
    is trained full batch. After every epoch, train (and test) metrics are appended to the
    history and, with ``run_dir``, written to ``metrics.jsonl``/``metrics.csv`` together with an
    atomic checkpoint (parameters, optimizer, config, RNG state, position).

    Args:
        model, guide: Pyro functions ``f(x, [num_data])`` with matching sample sites.
        train_x, test_x: float tensors ``(N, D)``; test metrics are skipped when ``test_x`` is None.
        config: a :class:`TrainConfig`.
        run_dir: where metrics and checkpoints go (created if missing).
        resume: continue from ``run_dir/checkpoint.pt`` (same config required).
        metadata: JSON-able facts stored with the checkpoint (e.g. how to rebuild the model).
        handle_signals: on SIGINT/SIGTERM finish the step, checkpoint, raise :class:`Interrupted`.
        world: the data-parallel ranks (:mod:`inference.distributed`); default: the initialized
            process group, else one process. Each rank steps on its shard of every global batch,
            gradients and metrics are reduced across ranks, and rank 0 alone writes files.

    Returns:
        A :class:`TrainResult`; ``final`` holds the last epoch's test metrics (train if no test).
    """
    n = train_x.shape[0]
    if n == 0:
        raise OptionError("training data has zero rows")
    batch = n if config.batch_size is None else min(config.batch_size, n)
    kwargs = {"num_data": n} if takes_num_data(model) else {}
    if batch < n and not kwargs:
        raise OptionError(
            f"--batch-size: the model takes no 'num_data' argument, so mini-batches of {batch} "
            f"of {n} rows would be scaled wrongly; train full batch (batch size >= {n})"
        )
    world = current_world() if world is None else world
    world.check_batches(n, batch, scaled=bool(kwargs))
    # global latents: all rows at once, several draws (a one-draw ELBO has no error bar)
    eval_kwargs = (
        dict(batch_size=config.eval_batch_size)
        if kwargs
        else dict(batch_size=None, num_particles=config.eval_particles)
    )
    eval_every = config.eval_every or max(1, math.ceil(config.epochs / EVALUATIONS_PER_RUN))
    run_dir = Path(run_dir) if run_dir is not None else None
    checkpoint_path = run_dir / CHECKPOINT if run_dir is not None else None

    pyro.set_rng_seed(config.seed)
    with default_dtype(train_x.dtype):  # a lazily built guide's parameters at the data's dtype
        estimator = resolve_estimator(config, model, guide, train_x[:batch], **kwargs)
    loss_fn = make_elbo(estimator, config.num_particles)(model, guide)
    with pyro.validation_enabled(True):
        names, params = _collect_params(loss_fn, train_x[:batch], kwargs)
    world.broadcast_(params)  # every rank starts from rank 0's parameters
    world.seed(config.seed)  # ranks 1.. draw their own noise
    optimizer = adam(params, config.learning_rate)

    history: list[dict[str, Any]] = []
    start_epoch, start_step, loss_sum = 0, 0, 0.0
    if resume:
        if checkpoint_path is None:
            raise OptionError("--resume needs a run directory")
        state = load_checkpoint(checkpoint_path)
        if state["config"] != _config_for_checkpoint(config):
            raise RunError(f"{checkpoint_path}: its training options differ from this run's")
        _copy_params(names, params, state, checkpoint_path)
        optimizer.load_state_dict(state["optimizer"])
        history = list(state["history"])
        start_epoch, start_step = state["position"]["epoch"], state["position"]["step"]
        loss_sum = state["position"]["loss_sum"] if world.is_writer else 0.0  # a global sum
        rng = world.rng_state(state)
        if rng is not None:
            set_rng_state(rng)
        else:  # written by a world of another size: this rank's stream is derived afresh
            world.seed(config.seed, start_epoch, start_step)

    def checkpoint(epoch: int, step: int, running: float) -> None:
        if checkpoint_path is None:
            return
        rng_by_rank = world.all_gather(get_rng_state(), "gathering RNG states")
        running = world.sum([running], "reducing the training loss")[0]
        if not world.is_writer:
            return
        save_checkpoint(
            checkpoint_path,
            {
                "config": _config_for_checkpoint(config),
                "metadata": dict(metadata or {}),
                "param_names": names,
                "params": {k: p.detach().clone() for k, p in zip(names, params, strict=True)},
                "optimizer": optimizer.state_dict(),
                "rng": rng_by_rank[0],
                "position": {"epoch": epoch, "step": step, "loss_sum": running},
                "history": history,
                **({"rng_by_rank": rng_by_rank} if world.size > 1 else {}),
            },
        )

    if run_dir is not None and world.is_writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(
            run_dir / "config.json", {"train": asdict(config), "metadata": dict(metadata or {})}
        )

    steps_per_epoch = math.ceil(n / batch)
    final = None
    bar = tqdm(
        total=config.epochs,
        initial=start_epoch,
        disable=not config.progress or not world.is_writer,
        desc="epochs",
        unit="epoch",
        leave=False,
    )
    validate_every_step = config.validate
    with _SignalFlag(handle_signals) as flag, bar:
        for epoch in range(start_epoch, config.epochs):
            t0 = time.perf_counter()
            if batch < n:  # mini-batches: a fresh permutation of the rows every epoch
                generator = torch.Generator().manual_seed(config.seed + epoch)
                order = torch.randperm(n, generator=generator).to(train_x.device)
            else:  # full batch: the rows as given, in their order (a time series stays one)
                order = torch.arange(n, device=train_x.device)
            for step in range(start_step, steps_per_epoch):
                batch_rows = order[step * batch : (step + 1) * batch]  # the global batch
                x = train_x[world.shard(batch_rows)]
                with pyro.validation_enabled(validate_every_step or (epoch, step) == (0, 0)):
                    loss = loss_fn(x, **kwargs)
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise NumericalError(
                        f"epoch {epoch + 1}, step {step + 1}: loss is {loss_value}; stopped, "
                        f"the last good checkpoint is kept"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # one collective per step: the gradients and whether any rank caught a signal
                stop = world.all_reduce_gradients(
                    params, weight=x.shape[0] / batch_rows.shape[0], stop=flag.signum is not None
                )
                if config.clip_norm:
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        params, config.clip_norm, foreach=True
                    )
                    finite = bool(torch.isfinite(grad_norm))
                else:
                    finite = _all_finite([p.grad for p in params if p.grad is not None])
                if not finite:
                    raise NumericalError(
                        f"epoch {epoch + 1}, step {step + 1}: the gradient is not finite; "
                        f"stopped before the update, the last good checkpoint is kept"
                    )
                optimizer.step()
                loss_sum += loss_value * x.shape[0] / (n if kwargs else x.shape[0])
                if stop or (world.size == 1 and flag.signum is not None):  # same step everywhere
                    checkpoint(epoch, step + 1, loss_sum)
                    raise Interrupted(
                        flag.signum or signal.SIGTERM, f"epoch {epoch + 1}, step {step + 1}"
                    )
            start_step = 0
            seconds = time.perf_counter() - t0
            loss_sum = world.sum([loss_sum], "reducing the training loss")[0]
            rows = []
            evaluated = (epoch + 1) % eval_every == 0 or epoch + 1 == config.epochs
            for split, xs in (("train", train_x), ("test", test_x)):
                if xs is None or not evaluated:
                    continue
                m = world.evaluate(
                    partial(evaluate, model, guide), xs, model_kwargs=None, **eval_kwargs
                )
                row = {"epoch": epoch + 1, "split": split, **m._asdict()}
                if split == "train":
                    row["svi_loss"] = loss_sum / n  # mean of what the steps minimized
                    row["seconds"] = seconds
                rows.append(row)
                final = m
            history.extend(rows)
            loss_sum = 0.0
            if run_dir is not None and world.is_writer:
                write_jsonl(run_dir / "metrics.jsonl", history)
                write_csv(run_dir / "metrics.csv", [_flat(r) for r in history])
            checkpoint(epoch + 1, 0, 0.0)
            if world.any(flag.signum is not None) and epoch + 1 < config.epochs:
                raise Interrupted(flag.signum or signal.SIGTERM, f"the end of epoch {epoch + 1}")
            if rows:
                bar.set_postfix(elbo=f"{rows[-1]['elbo']:.2f}")
            bar.update(1)
            log.info("epoch %d: %s", epoch + 1, rows)
    if final is None:  # resumed a finished run: report the last recorded metrics
        last = history[-1]
        final = Metrics(*(last.get(k) for k in Metrics._fields))
    return TrainResult(history, final, run_dir, estimator)


def _config_for_checkpoint(config: TrainConfig) -> dict[str, Any]:
    """The options that determine the numbers (progress bar and epochs excluded)."""
    d = asdict(config)
    d.pop("progress")
    d.pop("epochs")
    d.pop("jit")  # compiled or not, the same estimator: a run may resume either way
    return d


def _flat(row: Mapping[str, Any]) -> dict[str, Any]:
    keys = (
        "epoch",
        "split",
        "loss",
        "elbo",
        "elbo_stderr",
        "reconstruction",
        "kl",
        "n",
        "svi_loss",
        "seconds",
    )
    return {k: row.get(k, "") for k in keys}


def restore(
    model: Callable, guide: Callable, x: torch.Tensor, state: Mapping[str, Any], source: str = ""
) -> None:
    """Create the pair's parameters (one forward on ``x``) and overwrite them from a checkpoint."""
    kwargs = {"num_data": x.shape[0]} if takes_num_data(model) else {}
    names, params = _collect_params(Trace_ELBO()(model, guide), x, kwargs)
    _copy_params(names, params, state, source)


def _copy_params(names: list[str], params: list, state: Mapping[str, Any], source) -> None:
    if state["param_names"] != names:
        raise RunError(f"{source}: its parameters do not match this model and guide")
    with torch.no_grad():
        for name, p in zip(names, params, strict=True):
            saved = state["params"][name]
            if saved.shape != p.shape:
                raise RunError(
                    f"{source}: parameter {name!r} has shape {tuple(saved.shape)}, "
                    f"this model has {tuple(p.shape)}"
                )
            p.copy_(saved.to(p))
