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

import json
import logging
import math
import random
import signal
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO
from tqdm.auto import tqdm

from .batching import Batching, ModelArgs, default_batching, num_rows, slicer, take
from .distributed import World, current_world
from .elbo import decompose
from .errors import NumericalError, OptionError, RunError
from .estimators import (  # the estimator registry lives there; re-exported for old imports
    AUTO,
    COMPILED,
    ESTIMATOR_CHOICES,
    ESTIMATORS,
    check_estimator,
    choose_estimator,
    make_elbo,
    resolve_estimator,
)
from .io import MetricsLog, load_checkpoint, save_checkpoint, write_json

__all__ = [
    "AUTO",
    "COMPILED",
    "ESTIMATORS",
    "ESTIMATOR_CHOICES",
    "Interrupted",
    "Metrics",
    "TrainConfig",
    "TrainResult",
    "choose_estimator",
    "evaluate",
    "fit",
    "make_elbo",
    "pyro_loss",
    "resolve_estimator",
]

log = logging.getLogger(__name__)


#: When :func:`fit` compiles its estimator (``TrainConfig.jit``).
JIT_MODES = ("auto", "on", "off")

#: ``TrainConfig.optimizer`` choices (:data:`OPTIMIZERS` holds the functions).
OPTIMIZER_NAMES = ("adam", "adamw", "sgd")

#: With ``eval_every=None``, :func:`fit` evaluates about this many times per run (and after
#: the last epoch): evaluation stays a small share of training however long the run.
EVALUATIONS_PER_RUN = 20

CHECKPOINT = "checkpoint.pt"
EVAL_SEED = 20140101  # the noise used for every evaluation: common random numbers across epochs


@dataclass(frozen=True)
class TrainConfig:
    """Options of :func:`fit`. ``batch_size=None`` means full batch.

    ``estimator`` is a name of :data:`ESTIMATOR_CHOICES` or a Pyro ELBO object, used as given
    (e.g. ``Trace_ELBO(num_particles=8)``, ``RenyiELBO(alpha=0.5)``); ``optimizer`` one of
    :data:`OPTIMIZERS`.
    """

    epochs: int = 200
    batch_size: int | None = 128
    learning_rate: float = 1e-3
    seed: int = 0
    estimator: str | ELBO = AUTO  # meanfield where its analytic KL is valid (the VAE), else trace
    jit: str = "auto"  # compile the estimator: on, off, auto = when model and guide are static
    num_particles: int = 1
    clip_norm: float | None = None
    validate: bool = False
    eval_batch_size: int | None = 1024
    eval_every: int | None = None  # evaluate every this many epochs (and the last); None:
    # about EVALUATIONS_PER_RUN times per run (an epoch is one step for full-batch models)
    eval_particles: int = 10  # draws per evaluation of a model with global latents
    progress: bool = True
    checkpoint_every: float = 30.0  # seconds between checkpoints (0: every epoch), and the last
    optimizer: str = "adam"

    #: Options a resumed run may change; each change is recorded in config.json.
    RESUMABLE_CHANGES = ("epochs", "learning_rate", "clip_norm")

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
        if self.optimizer not in OPTIMIZER_NAMES:
            raise OptionError(
                f"--optimizer: unknown optimizer {self.optimizer!r} "
                f"(choose from {', '.join(OPTIMIZER_NAMES)})"
            )
        if not isinstance(self.estimator, ELBO):  # else the user's own ELBO, run as given
            check_estimator(self.estimator, self.num_particles)
        if self.jit not in JIT_MODES:
            raise OptionError(f"--jit: must be one of {', '.join(JIT_MODES)}, got {self.jit!r}")
        if not (
            isinstance(self.checkpoint_every, float | int)
            and math.isfinite(self.checkpoint_every)
            and self.checkpoint_every >= 0
        ):
            raise OptionError(
                f"--checkpoint-every: must be a non-negative number of seconds, "
                f"got {self.checkpoint_every!r}"
            )


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

    @classmethod
    def per_datum(
        cls, reconstruction: float, kl: float, n: int, elbo_stderr: float | None = None
    ) -> Metrics:
        """From whole-split totals: elbo = reconstruction - kl, and loss = -elbo (the only
        place elbo-lab turns the maximized ELBO into the minimized loss), all divided by n."""
        elbo = (reconstruction - kl) / n
        return cls(-elbo, elbo, reconstruction / n, kl / n, n, elbo_stderr)


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
    *args,
    batch_size: int | None = 1024,
    batching: Batching | None = None,
    analytic_kl: bool = True,
    seed: int = EVAL_SEED,
    num_particles: int = 1,
    **kwargs,
) -> Metrics:
    """Per-datum loss, ELBO, reconstruction and KL of the model's arguments under the guide.

    Sums :func:`~inference.elbo.decompose` (``num_particles`` draws) under a fixed seed, then
    divides by N (:func:`inference.batching.num_rows`). With a ``batching`` (default: a
    ``num_data`` model's, :func:`~inference.batching.default_batching`) and ``batch_size``,
    the rows are evaluated in chunks, each a full plate (local latents sum over rows);
    ``batch_size=None`` or no batching evaluates everything in one call, as models with global
    latents need. With several particles ``elbo_stderr`` is the standard error of the
    per-datum ELBO (chunks independent).
    """
    batching = batching if batching is not None else default_batching(model)
    n = num_rows(model, args, kwargs, batching)
    step = n if batch_size is None or batching is None else batch_size
    device = _device(args, kwargs)
    recon = kl = variance = 0.0
    with seeded(seed):
        for start in range(0, n, step):
            if step == n:
                call = ModelArgs(tuple(args), dict(kwargs))
            else:
                rows = torch.arange(start, min(start + step, n), device=device)
                call = take(model, args, kwargs, batching, rows, None)
            d = decompose(
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
    return Metrics.per_datum(recon, kl, n, stderr)


def pyro_loss(
    model: Callable,
    guide: Callable,
    *args,
    batch_size: int | None = 1024,
    batching: Batching | None = None,
    estimator: str = "meanfield",
    seed: int = EVAL_SEED,
    num_particles: int = 1,
    **kwargs,
) -> float:
    """Per-datum loss as Pyro's own estimator computes it, with :func:`evaluate`'s chunks and
    noise: an independent check on :func:`evaluate`, whose ``kl - reconstruction`` it equals
    for the same estimator's KL terms."""
    batching = batching if batching is not None else default_batching(model)
    n = num_rows(model, args, kwargs, batching)
    step = n if batch_size is None or batching is None else batch_size
    device = _device(args, kwargs)
    elbo_estimator = make_elbo(estimator, num_particles)
    total = 0.0
    with seeded(seed):
        for start in range(0, n, step):
            if step == n:
                call = ModelArgs(tuple(args), dict(kwargs))
            else:
                rows = torch.arange(start, min(start + step, n), device=device)
                call = take(model, args, kwargs, batching, rows, None)
            total += elbo_estimator.loss(model, guide, *call.args, **call.kwargs)
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


#: Optimizers by name (``TrainConfig.optimizer``): each takes the parameters and a learning rate.
OPTIMIZERS: dict[str, Callable[[list[torch.Tensor], float], torch.optim.Optimizer]] = {}


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


def _collect_params(
    loss_fn: torch.nn.Module, args: tuple, kwargs: Mapping
) -> tuple[list[str], list]:
    """Run the pair once on the model's arguments (RNG forked, parameters created at the
    data's dtype); return its parameters sorted by name, each tensor once (a guide may register
    one tensor under two names, as ``AutoIAFNormal`` does: the optimizer must step it once)."""
    with (
        torch.random.fork_rng(devices=[]),
        default_dtype(_floating_dtype(args, kwargs)),
        poutine.trace(param_only=True) as capture,
    ):
        loss_fn(*args, **kwargs)
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


class SVIState(NamedTuple):
    """What :func:`init` returns and :func:`step` advances (NumPyro's ``SVIState``, BlackJAX's
    state): the estimator run, as a module ``loss_fn(*args, **kwargs)``, the optimizer over
    the pair's parameters (each tensor once), their names, and the steps taken. The tensors
    and the optimizer are updated in place, as torch does."""

    estimator: str
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    names: list[str]
    params: list[torch.Tensor]
    num_steps: int = 0


class StepInfo(NamedTuple):
    """One step's signed numbers: ``loss`` is what the step minimized (Pyro's value, what
    ``SVI.step`` returns), and the ELBO it estimates is its negative."""

    loss: float

    @property
    def elbo(self) -> float:
        """The ELBO estimate of the step: maximized, minus the loss."""
        return -self.loss


def init(
    model: Callable,
    guide: Callable,
    *args,
    config: TrainConfig = TrainConfig(),
    **kwargs,
) -> SVIState:
    """Choose the estimator for the pair, create its parameters on ``*args, **kwargs`` (one
    run, RNG forked, at the data's dtype) and the optimizer (:func:`adam`).

    ``config.estimator="auto"`` picks TraceMeanField_ELBO where its analytic KL is valid and
    Trace_ELBO otherwise (:func:`choose_estimator`); ``config.jit`` decides compilation.
    """
    dtype = _floating_dtype(args, kwargs)
    with default_dtype(dtype):  # a lazily built guide's parameters at the data's dtype
        if isinstance(config.estimator, ELBO):  # the user's own ELBO object, as given
            estimator, elbo = estimator_name(config.estimator), config.estimator
        else:
            estimator = resolve_estimator(config, model, guide, *args, **kwargs)
            elbo = make_elbo(estimator, config.num_particles)
        loss_fn = elbo(model, guide)
        with pyro.validation_enabled(True):
            names, params = _collect_params(loss_fn, args, kwargs)
    optimizer = OPTIMIZERS[config.optimizer](params, config.learning_rate)
    return SVIState(estimator, loss_fn, optimizer, names, params)


def estimator_name(elbo: ELBO | str) -> str:
    """A name for an estimator: its key in :data:`ESTIMATORS` (``trace`` for a
    ``Trace_ELBO``), else its class name (``RenyiELBO``)."""
    if isinstance(elbo, str):
        return elbo
    for name, cls in ESTIMATORS.items():
        if type(elbo) is cls:
            return name
    return type(elbo).__name__


def sgd(params: list[torch.Tensor], learning_rate: float) -> torch.optim.SGD:
    """Plain stochastic gradient descent, ``torch.optim.SGD`` (foreach where torch has it)."""
    return torch.optim.SGD(params, lr=learning_rate)


def adamw(params: list[torch.Tensor], learning_rate: float) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` (Loshchilov & Hutter 2019), fused where torch has it."""
    devices = {p.device.type for p in params}
    fused = (
        bool(params) and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)
    )
    return torch.optim.AdamW(params, lr=learning_rate, fused=fused or None)


OPTIMIZERS.update(adam=adam, adamw=adamw, sgd=sgd)


def step(state: SVIState, *args, clip_norm: float | None = None, **kwargs):
    """One SVI step on the model's arguments: loss = -ELBO, its gradient, one optimizer update.

    Returns ``(state, StepInfo)``. A non-finite loss or gradient raises
    :class:`~inference.errors.NumericalError` before the update.
    """
    try:
        info, _ = _step(state, args, kwargs, clip_norm=clip_norm)
    except NumericalError as exc:
        raise NumericalError(f"step {state.num_steps + 1}: {exc}") from None
    return state._replace(num_steps=state.num_steps + 1), info


def _step(
    state: SVIState,
    args: tuple,
    kwargs: dict,
    *,
    clip_norm: float | None,
    world: World | None = None,
    weight: float = 1.0,
    stop: bool = False,
) -> tuple[StepInfo, bool]:
    """The step of :func:`step`, with the gradients all-reduced across ``world`` (this rank's
    share ``weight``) and whether any rank asked to ``stop`` (one collective). Its
    :class:`NumericalError` says what was not finite; the caller says where."""
    loss = state.loss_fn(*args, **kwargs)
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        raise NumericalError(f"loss is {loss_value}; stopped")
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if world is not None:
        # one collective per step: the gradients and whether any rank caught a signal
        stop = world.all_reduce_gradients(state.params, weight=weight, stop=stop)
    if clip_norm:
        grad_norm = torch.nn.utils.clip_grad_norm_(state.params, clip_norm, foreach=True)
        finite = bool(torch.isfinite(grad_norm))
    else:
        finite = _all_finite([p.grad for p in state.params if p.grad is not None])
    if not finite:
        raise NumericalError("the gradient is not finite; stopped before the update")
    state.optimizer.step()
    return StepInfo(loss_value), stop


def _floating_dtype(args: tuple, kwargs: Mapping) -> torch.dtype | None:
    """The dtype of the first floating-point tensor among the model's arguments."""
    for value in (*args, *kwargs.values()):
        values = value if isinstance(value, list | tuple) else (value,)
        for v in values:
            if torch.is_tensor(v) and v.is_floating_point():
                return v.dtype
    return None


def _device(args: tuple, kwargs: Mapping) -> torch.device:
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value):
            return value.device
    return torch.device("cpu")


def fit(
    model: Callable,
    guide: Callable,
    *args,
    config: TrainConfig = TrainConfig(),
    test: Any = None,
    batching: Batching | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    metadata: Mapping[str, Any] | None = None,
    handle_signals: bool = False,
    world: World | None = None,
    publish: Callable[[], Path] | None = None,
    **kwargs,
) -> TrainResult:
    """Train ``guide`` (and the model's parameters) by SVI on the model's own arguments.

    ``fit(model, guide, *args, **kwargs)`` steps ``model(*args, **kwargs)`` as
    ``SVI.step(*args, **kwargs)`` does: the loop of :func:`init` and :func:`step`, with
    evaluation, metrics files, checkpoints and signal handling on top. Each step minimizes
    loss = -ELBO with the chosen Pyro estimator.

    Parameters are created by one run of the pair with the random state forked: the steps
    draw the noise that ``pyro.set_rng_seed(config.seed)`` starts, whatever the guide's
    initialization draws.

    Full batch (``config.batch_size=None`` or no ``batching``) passes the arguments as given,
    rows in their order, every step. Mini-batches need a declared :class:`Batching` (the
    arguments sliced along dim 0 and the keyword that receives N, so the plate scales a batch
    by N / B); a model that takes ``num_data`` has one by default (its first argument). An
    "epoch" is one pass over the rows: one step at full batch.

    After every ``config.eval_every`` epochs (default: about 20 times per run) the training
    data (and ``test``) are evaluated and appended to the history; with ``run_dir`` the rows
    are appended to ``metrics.jsonl``/``metrics.csv``. An atomic checkpoint (parameters,
    optimizer, config, RNG state, position, the metrics files' lengths) follows before the
    first step, every ``config.checkpoint_every`` seconds at an epoch's end, at the
    end, and on SIGINT/SIGTERM. Rows go to disk before the checkpoint that covers them; a resume
    cuts rows written after its checkpoint, so files and checkpoint describe the same step.

    Args:
        model, guide: Pyro functions of the same arguments with matching sample sites.
        *args, **kwargs: the model's arguments (the training data).
        config: a :class:`TrainConfig`.
        test: held-out data in the same form: a tensor, an ``(args, kwargs)`` pair or a
            :class:`~inference.batching.ModelArgs`; None skips test metrics.
        batching: how mini-batches are cut (:class:`~inference.batching.Batching`).
        run_dir: where metrics and checkpoints go (created if missing).
        resume: continue from ``run_dir/checkpoint.pt`` (same config required, except for
            :attr:`TrainConfig.RESUMABLE_CHANGES`, recorded in ``config.json``).
        metadata: JSON-able facts stored with the checkpoint (e.g. how to rebuild the model).
        handle_signals: on SIGINT/SIGTERM finish the step, checkpoint, raise :class:`Interrupted`.
        world: the data-parallel ranks (:mod:`inference.distributed`); default: the initialized
            process group, else one process. Each rank steps on its shard of every global batch,
            gradients and metrics are reduced across ranks, and rank 0 alone writes files.
        publish: called once after the first checkpoint is written; returns the directory the
            run continues in (``elbo-lab train --force`` renames its new run over the old here).

    Returns:
        A :class:`TrainResult`; ``final`` holds the last evaluation's test metrics (train if no
        test) and ``estimator`` the estimator that ran.
    """
    batching = batching if batching is not None else default_batching(model)
    try:
        n = num_rows(model, args, kwargs, batching)
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    if n == 0:
        raise OptionError("training data has zero rows")
    batch = n if config.batch_size is None else min(config.batch_size, n)
    if batch < n and batching is None:
        raise OptionError(
            f"--batch-size: mini-batches of {batch} of {n} rows need a declared batching "
            "(which arguments hold the rows, and how the model's plate learns N: e.g. a "
            f"'num_data' argument); train full batch (batch size >= {n})"
        )
    world = current_world() if world is None else world
    world.check_batches(n, batch, scaled=batching is not None)
    # a batch of B < N rows (or a rank's shard) is scaled by N / B through the declared size
    scaled = batching is not None and (batch < n or world.size > 1)
    device = _device(args, kwargs)
    test_args = None if test is None else ModelArgs.of(test)
    # local latents (declared batching): evaluated in chunks; global: all rows at once, with
    # several draws (a one-draw ELBO has no error bar)
    eval_kwargs = (
        dict(batch_size=config.eval_batch_size, batching=batching)
        if batching is not None
        else dict(batch_size=None, num_particles=config.eval_particles)
    )
    eval_every = config.eval_every or max(1, math.ceil(config.epochs / EVALUATIONS_PER_RUN))
    run_dir = Path(run_dir) if run_dir is not None else None
    checkpoint_path = run_dir / CHECKPOINT if run_dir is not None else None

    cut = slicer(model, args, kwargs, batching)  # bound to the signature once, not per step

    def batch_args(rows: torch.Tensor) -> ModelArgs:
        return cut(rows, n if scaled else None)

    pyro.set_rng_seed(config.seed)
    first = batch_args(torch.arange(batch, device=device))
    state = init(model, guide, *first.args, config=config, **first.kwargs)
    names, params, optimizer = state.names, state.params, state.optimizer
    world.broadcast_(params)  # every rank starts from rank 0's parameters
    world.seed(config.seed)  # ranks 1.. draw their own noise

    history: list[dict[str, Any]] = []
    start_epoch, start_step, loss_sum = 0, 0, 0.0
    metrics_log = MetricsLog(run_dir, METRICS_COLUMNS) if run_dir is not None else None
    if resume:
        if checkpoint_path is None:
            raise OptionError("--resume needs a run directory")
        saved = load_checkpoint(checkpoint_path)
        stored, current = saved["config"], _config_for_checkpoint(config)
        fixed = [k for k in current if k not in TrainConfig.RESUMABLE_CHANGES]
        if any(stored.get(k) != current[k] for k in fixed):
            raise RunError(f"{checkpoint_path}: its training options differ from this run's")
        _copy_params(names, params, saved, checkpoint_path)
        optimizer.load_state_dict(saved["optimizer"])
        for group in optimizer.param_groups:  # a changed --lr applies from here on
            group["lr"] = config.learning_rate
        if world.is_writer:  # rows written after the checkpoint go: they are recomputed
            history = metrics_log.truncate(saved["metrics"])
        else:
            history = metrics_log.read(saved["metrics"])
        start_epoch, start_step = saved["position"]["epoch"], saved["position"]["step"]
        loss_sum = saved["position"]["loss_sum"] if world.is_writer else 0.0  # a global sum
        rng = world.rng_state(saved)
        if rng is not None:
            set_rng_state(rng)
        else:  # written by a world of another size: this rank's stream is derived afresh
            world.seed(config.seed, start_epoch, start_step)

    last_checkpoint = time.monotonic()
    saved_at = (start_epoch, start_step) if resume else None

    def kept() -> str:
        """Where a run that stops on a fault can be resumed from."""
        if saved_at is None:
            return ""
        return f"; its checkpoint of epoch {saved_at[0]}, step {saved_at[1]} is kept"

    def checkpoint(epoch: int, step: int, running: float) -> None:
        nonlocal last_checkpoint, run_dir, checkpoint_path, publish, saved_at
        if checkpoint_path is None:
            return
        rng_by_rank = world.all_gather(get_rng_state(), "gathering RNG states")
        running = world.sum([running], "reducing the training loss")[0]
        last_checkpoint, saved_at = time.monotonic(), (epoch, step)
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
                "metrics": metrics_log.offsets(),
                **({"rng_by_rank": rng_by_rank} if world.size > 1 else {}),
            },
        )
        if publish is not None:  # the run now has a checkpoint: it may take its final place
            run_dir, publish = publish(), None
            checkpoint_path, metrics_log.run_dir = run_dir / CHECKPOINT, run_dir

    if run_dir is not None and world.is_writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_config(run_dir, config, metadata, (start_epoch, start_step), resume)
        if not resume:
            metrics_log.reset()
    if not resume:
        checkpoint(0, 0, 0.0)  # before the first step: a run directory always has one

    splits = [("train", ModelArgs(tuple(args), dict(kwargs))), ("test", test_args)]
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
            if scaled:  # mini-batches: a fresh permutation of the rows every epoch
                generator = torch.Generator().manual_seed(config.seed + epoch)
                order = torch.randperm(n, generator=generator).to(device)
            else:  # full batch: the rows as given, in their order (a time series stays one)
                order = torch.arange(n, device=device)
            for step_index in range(start_step, steps_per_epoch):
                batch_rows = order[step_index * batch : (step_index + 1) * batch]  # global batch
                mine = world.shard(batch_rows)
                call = batch_args(mine) if scaled else first
                with pyro.validation_enabled(validate_every_step or (epoch, step_index) == (0, 0)):
                    try:
                        info, stop = _step(
                            state,
                            call.args,
                            call.kwargs,
                            clip_norm=config.clip_norm,
                            world=world,
                            weight=mine.shape[0] / batch_rows.shape[0],
                            stop=flag.signum is not None,
                        )
                    except NumericalError as exc:  # where it stopped, and what survives
                        where = f"epoch {epoch + 1}, step {step_index + 1}"
                        raise NumericalError(f"{where}: {exc}{kept()}") from None
                loss_sum += info.loss * mine.shape[0] / (n if scaled else mine.shape[0])
                if stop or (world.size == 1 and flag.signum is not None):  # same step everywhere
                    checkpoint(epoch, step_index + 1, loss_sum)
                    raise Interrupted(
                        flag.signum or signal.SIGTERM, f"epoch {epoch + 1}, step {step_index + 1}"
                    )
            start_step = 0
            seconds = time.perf_counter() - t0
            loss_sum = world.sum([loss_sum], "reducing the training loss")[0]
            rows = []
            evaluated = (epoch + 1) % eval_every == 0 or epoch + 1 == config.epochs
            for split, call in splits:
                if call is None or not evaluated:
                    continue
                m = _evaluate_split(world, model, guide, call, **eval_kwargs)
                row = {"epoch": epoch + 1, "split": split, **m._asdict()}
                if split == "train":
                    row["svi_loss"] = loss_sum / n  # mean of what the steps minimized
                    row["seconds"] = seconds
                rows.append(row)
                final = m
            history.extend(rows)
            loss_sum = 0.0
            if run_dir is not None and world.is_writer:
                metrics_log.append(rows)  # before the checkpoint that covers them
            stopping = world.any(flag.signum is not None)
            due = time.monotonic() - last_checkpoint >= config.checkpoint_every
            if (
                stopping
                or epoch + 1 == config.epochs
                or (checkpoint_path is not None and world.any(due, "agreeing to checkpoint"))
            ):
                checkpoint(epoch + 1, 0, 0.0)
            if stopping and epoch + 1 < config.epochs:
                raise Interrupted(flag.signum or signal.SIGTERM, f"the end of epoch {epoch + 1}")
            if rows:
                bar.set_postfix(elbo=f"{rows[-1]['elbo']:.2f}")
            bar.update(1)
            log.info("epoch %d: %s", epoch + 1, rows)
    if final is None:  # resumed a finished run: report the last recorded metrics
        last = history[-1]
        final = Metrics(*(last.get(k) for k in Metrics._fields))
    return TrainResult(history, final, run_dir, state.estimator)


def _evaluate_split(
    world: World, model: Callable, guide: Callable, call: ModelArgs, **kwargs
) -> Metrics:
    """:func:`evaluate` of one split's arguments; with several ranks each evaluates its share
    of the batched rows and the sums are reduced."""
    if world.size == 1 or kwargs.get("batching") is None:
        return evaluate(model, guide, *call.args, **call.kwargs, **kwargs)
    batching = kwargs["batching"]
    n = num_rows(model, call.args, call.kwargs, batching)

    def totals(rows: torch.Tensor) -> list[float]:
        part = take(model, call.args, call.kwargs, batching, rows, None)
        m = evaluate(model, guide, *part.args, **part.kwargs, **kwargs)
        return [m.reconstruction * m.n, m.kl * m.n, m.n]

    rows = torch.arange(n, device=_device(call.args, call.kwargs))
    recon_sum, kl_sum, total = world.sum_over_shards(totals, rows)
    return Metrics.per_datum(recon_sum, kl_sum, int(total))


def config_record(config: TrainConfig) -> dict[str, Any]:
    """``config`` as JSON-able values: an ELBO object is recorded by its name and particles."""
    d = asdict(config)
    if isinstance(config.estimator, ELBO):
        e = config.estimator
        d["estimator"] = f"{estimator_name(e)}(num_particles={getattr(e, 'num_particles', 1)})"
    return d


def _config_for_checkpoint(config: TrainConfig) -> dict[str, Any]:
    """The options that determine the numbers (progress bar, epochs and cadence excluded)."""
    d = config_record(config)
    d.pop("progress")
    d.pop("epochs")
    d.pop("checkpoint_every")
    d.pop("jit")  # compiled or not, the same estimator: a run may resume either way
    return d


#: The columns of ``metrics.csv`` (``metrics.jsonl`` holds the same rows).
METRICS_COLUMNS = (
    "epoch", "split", "loss", "elbo", "elbo_stderr", "reconstruction", "kl", "n", "svi_loss",
    "seconds",
)  # fmt: skip


def _write_config(
    run_dir: Path,
    config: TrainConfig,
    metadata: Mapping[str, Any] | None,
    position: tuple[int, int],
    resume: bool,
) -> None:
    """``config.json``: the options in force, and every change a resume made to them
    (:attr:`TrainConfig.RESUMABLE_CHANGES`, with the epoch and step it applies from)."""
    record = {"train": config_record(config), "metadata": dict(metadata or {}), "changes": []}
    if resume:
        try:
            old = json.loads((run_dir / "config.json").read_text())
            record["changes"], before = list(old["changes"]), dict(old["train"])
        except (OSError, ValueError, KeyError, TypeError):
            before = {}
        changes = {
            k: [before.get(k), record["train"][k]]
            for k in TrainConfig.RESUMABLE_CHANGES
            if k in before and before[k] != record["train"][k]
        }
        if changes:
            epoch, step = position
            record["changes"].append({"epoch": epoch, "step": step, "changed": dict(changes)})
    write_json(run_dir / "config.json", record)


def restore(
    model: Callable, guide: Callable, *args, state: Mapping[str, Any], source: str = "", **kwargs
) -> None:
    """Create the pair's parameters (one run on the model's arguments) and overwrite them from a
    checkpoint."""
    names, params = _collect_params(Trace_ELBO()(model, guide), args, kwargs)
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
