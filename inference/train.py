"""Stochastic variational inference for any Pyro model/guide pair, with per-epoch ELBO anatomy.

The step is Pyro's own estimator used as a PyTorch module, ``loss = Trace_ELBO()(model, guide)``,
with one fused ``torch.optim.Adam`` over every parameter the pair registers. Its value is exactly
what ``SVI.step()`` returns: loss = -ELBO = KL - E_q[log p(x | z)] (Kingma & Welling 2014). For
a model and guide declared static (every built-in one) the estimator is compiled by default
(:mod:`inference.estimators`): the same loss and gradients (bit for bit for the built-in
models; to rounding in general), without Pyro's per-step Python work, which makes the step as
fast as a hand-written PyTorch VAE's.

The training loop has the shape of NumPyro's ``SVI.init/update/run`` and BlackJAX's
``init/step``: :func:`init` makes a small state record (:class:`SVIState`), :func:`step` advances
it and returns the signed loss (:class:`StepInfo`), and :func:`fit` is the loop that adds, each
in a small piece of its own, the mini-batches of an epoch (``_Batches``), evaluation
(``_Evaluation``), the run directory's metrics files and checkpoints (``_RunFiles``), signals
(``_SignalFlag``) and the progress bar. After each evaluated epoch the train and test splits are
evaluated with :func:`inference.elbo.evaluate` (:func:`~inference.elbo.decompose` with analytic
KL where valid, a fixed evaluation seed) and reported per datum in nats as ``loss``, ``elbo``,
``reconstruction`` and ``kl``.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO
from tqdm.auto import tqdm

from . import collector
from .batching import (
    Batching,
    ModelArgs,
    chunks,
    default_batching,
    device_of,
    num_rows,
    slicer,
    take,
)
from .choices import (
    BATCH_SIZE,
    EVAL_BATCH_SIZE,
    EVAL_GLOBAL_DRAW_COST,
    EVAL_ROW_COST,
    EVAL_SHARE,
    EVALUATIONS_PER_RUN,
)
from .distributed import World, current_world
from .elbo import EVAL_SEED, PerDatumElbo, eval_chunk_rows, evaluate
from .enumeration import refuse_uncovered_pair
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
from .io import (
    CHECKPOINT,
    MetricsLog,
    copy_params,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    seeded,
    set_rng_state,
    write_json,
)
from .subsample import find_subsampled_plate, full_data_pairs
from .threads import StepThreads, torch_threads
from .traced_loss import planned_calls

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
    "default_eval_every",
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


@dataclass(frozen=True)
class TrainConfig:
    """Options of :func:`fit`. ``batch_size=None`` means full batch.

    ``estimator`` is a name of :data:`ESTIMATOR_CHOICES` or a Pyro ELBO object, used as given
    (e.g. ``Trace_ELBO(num_particles=8)``, ``RenyiELBO(alpha=0.5)``); ``optimizer`` one of
    :data:`OPTIMIZERS`.
    """

    epochs: int = 200
    batch_size: int | None = BATCH_SIZE
    learning_rate: float = 1e-3
    seed: int = 0
    estimator: str | ELBO = AUTO  # meanfield where its analytic KL is valid (the VAE), else trace
    jit: str = "auto"  # compile the estimator: on, off, auto = when model and guide are static
    num_particles: int = 1
    clip_norm: float | None = None
    validate: bool = False
    eval_batch_size: int | None = EVAL_BATCH_SIZE
    eval_every: int | None = None  # evaluate every this many epochs (and the last); None:
    # default_eval_every, about EVALUATIONS_PER_RUN times per run and within EVAL_SHARE of
    # the training time (an epoch is one step for full-batch models)
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
                    f"must be a positive integer, got {getattr(self, name)!r}", option=name
                )
        for name in ("batch_size", "eval_batch_size", "eval_every"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise OptionError(f"must be a positive integer, got {v!r}", option=name)
        if not (
            isinstance(self.learning_rate, float | int)
            and math.isfinite(self.learning_rate)
            and self.learning_rate > 0
        ):
            raise OptionError(
                f"must be a positive number, got {self.learning_rate!r}", option="learning_rate"
            )
        if self.clip_norm is not None and not (
            math.isfinite(self.clip_norm) and self.clip_norm > 0
        ):
            raise OptionError(
                f"must be a positive number, got {self.clip_norm!r}", option="clip_norm"
            )
        if self.optimizer not in OPTIMIZER_NAMES:
            raise OptionError(
                f"unknown optimizer {self.optimizer!r} (choose from {', '.join(OPTIMIZER_NAMES)})",
                option="optimizer",
            )
        if not isinstance(self.estimator, ELBO):  # else the user's own ELBO, run as given
            check_estimator(self.estimator, self.num_particles)
        if self.jit not in JIT_MODES:
            raise OptionError(
                f"must be one of {', '.join(JIT_MODES)}, got {self.jit!r}", option="jit"
            )
        if not (
            isinstance(self.checkpoint_every, float | int)
            and math.isfinite(self.checkpoint_every)
            and self.checkpoint_every >= 0
        ):
            raise OptionError(
                f"must be a non-negative number of seconds, got {self.checkpoint_every!r}",
                option="checkpoint_every",
            )


#: The former name of :class:`inference.elbo.PerDatumElbo`, the per-datum ELBO terms of a split.
Metrics = PerDatumElbo


class TrainResult(NamedTuple):
    """What :func:`fit` returns: the per-epoch history, the final test (or train) metrics and
    the estimator that was actually run (a name of :data:`ESTIMATORS`)."""

    history: list[dict[str, Any]]
    final: PerDatumElbo
    run_dir: Path | None
    estimator: str = ""


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after a checkpoint was written; ``signum`` says which."""

    def __init__(self, signum: int, where: str):
        super().__init__(f"interrupted by signal {signum} at {where}; checkpoint written")
        self.signum = signum


# --- evaluation ----------------------------------------------------------------------------------


def pyro_loss(
    model: Callable,
    guide: Callable,
    *args,
    batch_size: int | None = EVAL_BATCH_SIZE,
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
    batch_size = eval_chunk_rows(model, guide, args, kwargs, batching, batch_size)
    elbo_estimator = make_elbo(estimator, num_particles)
    total = 0.0
    with seeded(seed):
        for call in chunks(model, args, kwargs, batching, batch_size):
            pairs = [(model, guide)]
            if batching is None:  # a plate that subsamples itself: all its rows, in chunks
                pairs = full_data_pairs(model, guide, call.args, call.kwargs)
            for m, g in pairs:
                total += elbo_estimator.loss(m, g, *call.args, **call.kwargs)
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
        default_dtype(floating_dtype(args, kwargs)),
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
    dtype = floating_dtype(args, kwargs)
    with default_dtype(dtype):  # a lazily built guide's parameters at the data's dtype
        refuse_uncovered_pair(model, guide, *args, **kwargs)  # in one line, whatever the estimator
        if isinstance(config.estimator, ELBO):  # the user's own ELBO object, as given
            estimator, elbo = estimator_name(config.estimator), config.estimator
        else:
            estimator = resolve_estimator(config, model, guide, *args, **kwargs)
            elbo = make_elbo(estimator, config.num_particles)
        loss_fn = elbo(model, guide)
        with pyro.validation_enabled(True):
            names, params = _collect_params(loss_fn, args, kwargs)
    with collector.paused():  # the first optimizer in a process imports torch._dynamo
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


def floating_dtype(args: tuple, kwargs: Mapping) -> torch.dtype | None:
    """The dtype of the first floating-point tensor among the model's arguments."""
    for value in (*args, *kwargs.values()):
        values = value if isinstance(value, list | tuple) else (value,)
        for v in values:
            if torch.is_tensor(v) and v.is_floating_point():
                return v.dtype
    return None


# --- the loop and its pieces ---------------------------------------------------------------------


class _Batches:
    """How :func:`fit` cuts the rows into steps: an epoch is one pass over the N rows in global
    batches of B, each rank stepping on its shard of every batch.

    Full batch (B = N, one process) passes the arguments as given, rows in their order, every
    step. Mini-batches take a fresh permutation of the rows every epoch, cut through the
    declared :class:`~inference.batching.Batching`, whose size keyword scales a batch (or a
    rank's shard) by N / B.

    Raises:
        OptionError: no rows, or mini-batches without a declared batching.
    """

    def __init__(
        self,
        model: Callable,
        args: tuple,
        kwargs: Mapping,
        batching: Batching | None,
        config: TrainConfig,
        world: World | None,
    ):
        try:
            n = num_rows(model, args, kwargs, batching)
        except ValueError as exc:
            raise OptionError(str(exc)) from None
        if n == 0:
            raise OptionError("training data has zero rows")
        size = n if config.batch_size is None else min(config.batch_size, n)
        if size < n and batching is None:
            raise OptionError(
                f"mini-batches of {size} of {n} rows need a declared batching "
                "(which arguments hold the rows, and how the model's plate learns N: e.g. a "
                f"'num_data' argument); train full batch (batch size >= {n})",
                option="batch_size",
            )
        self.world = current_world() if world is None else world
        self.world.check_batches(n, size, scaled=batching is not None)
        self.n, self.size, self.seed = n, size, config.seed
        # a batch of B < N rows (or a rank's shard) is scaled by N / B through the declared size
        self.scaled = batching is not None and (size < n or self.world.size > 1)
        self.device = device_of(args, kwargs)
        self.steps_per_epoch = math.ceil(n / size)
        # whether this rank's share of the ragged last batch has as many rows as of a full one
        ragged_rows = n - (n // size) * size
        self._ragged_like_full = self._shard_rows(size) == self._shard_rows(ragged_rows)
        self._cut = slicer(model, args, kwargs, batching)  # bound to the signature once
        self.first = self.args_of(torch.arange(size, device=self.device))

    def args_of(self, rows: torch.Tensor) -> ModelArgs:
        """The model's arguments for ``rows``, scaled by N / len(rows) when mini-batching."""
        return self._cut(rows, self.n if self.scaled else None)

    def order(self, epoch: int) -> torch.Tensor:
        """The rows in the order ``epoch`` visits them."""
        if self.scaled:  # mini-batches: a fresh permutation of the rows every epoch
            generator = torch.Generator().manual_seed(self.seed + epoch)
            return torch.randperm(self.n, generator=generator).to(self.device)
        # full batch: the rows as given, in their order (a time series stays one)
        return torch.arange(self.n, device=self.device)

    def calls_left(self, epoch: int, index: int, epochs: int) -> int:
        """The steps in which this rank gets as many rows as in step ``index`` of ``epoch``,
        from it to the end of a run of ``epochs`` epochs, it included: every epoch cuts the
        rows alike, into full batches and a ragged last one, and a rank's shares of the two
        may have the same size."""
        full = self.n // self.size
        ragged = self.steps_per_epoch - full  # 0 or 1
        later = epochs - epoch - 1
        left_full = max(full - index, 0) + full * later
        left_ragged = ragged * (1 + later)  # the ragged batch is an epoch's last step
        if index < full:
            return left_full + (left_ragged if self._ragged_like_full else 0)
        return left_ragged + (left_full if self._ragged_like_full else 0)

    def _shard_rows(self, rows: int) -> int:
        """This rank's rows of a global batch of ``rows``."""
        return self.world.shard(torch.arange(rows)).shape[0]

    def steps(self, epoch: int, start: int) -> Iterator[tuple[int, ModelArgs, int, int]]:
        """``(index, arguments, shard rows, global batch rows)`` of each step of ``epoch``
        from step ``start``."""
        order = self.order(epoch)
        for index in range(start, self.steps_per_epoch):
            rows = order[index * self.size : (index + 1) * self.size]  # a global batch
            mine = self.world.shard(rows)
            call = self.args_of(mine) if self.scaled else self.first
            yield index, call, mine.shape[0], rows.shape[0]


def default_eval_every(
    epochs: int,
    train_rows: int = 0,
    *other_rows: int,
    eval_draws: int = 1,
    train_draws: int = 1,
    draw_cost: float = EVAL_ROW_COST,
) -> int:
    """Epochs between evaluations without an ``eval_every``: about
    :data:`~inference.choices.EVALUATIONS_PER_RUN` per run of ``epochs`` (and after the last).

    Given the rows of the training split and of the others evaluated, also no more often than
    keeps evaluation within :data:`~inference.choices.EVAL_SHARE` of training: an evaluation
    passes every row ``eval_draws`` times at ``draw_cost`` training row-draws each (rows in
    chunks: one draw, :data:`~inference.choices.EVAL_ROW_COST`; a model with global latents:
    ``eval_particles`` whole-data draws, :data:`~inference.choices.EVAL_GLOBAL_DRAW_COST`), and
    an epoch trains on ``train_rows`` with ``train_draws`` particles. Rows in chunks with a 20%
    test split: every 8 epochs, so a run that short is evaluated after its last epoch only;
    global latents with 10 evaluation draws: every 100 epochs (steps) without a test split.
    """
    every = max(1, math.ceil(epochs / EVALUATIONS_PER_RUN))
    if train_rows > 0:
        evaluated = eval_draws * (train_rows + sum(other_rows))
        epochs_per_share = draw_cost * evaluated / (EVAL_SHARE * train_draws * train_rows)
        every = max(every, math.ceil(round(epochs_per_share, 9)))
    return every


class _Evaluation:
    """What :func:`fit` evaluates after every ``eval_every`` epochs and after the last: the
    training data and ``test`` by :func:`~inference.elbo.evaluate`, as history rows.

    Local latents (a declared batching) are evaluated in chunks of ``eval_batch_size`` rows;
    global ones all rows at once with ``eval_particles`` draws (a one-draw ELBO has no error
    bar). With several ranks each evaluates its share of the batched rows and the totals are
    summed (:meth:`~inference.distributed.World.sum_over_shards`).
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        train: ModelArgs,
        test: Any,
        batching: Batching | None,
        config: TrainConfig,
        world: World,
        threads: Callable[[], int] | None = None,
    ):
        self.model, self.guide, self.world, self.epochs = model, guide, world, config.epochs
        self.threads = threads
        self.splits = [("train", train), ("test", None if test is None else ModelArgs.of(test))]
        self.options = (
            dict(batch_size=config.eval_batch_size, batching=batching)
            if batching is not None
            else dict(batch_size=None, num_particles=config.eval_particles)
        )
        self.config, self.batching = config, batching
        self._every = config.eval_every  # None: the default, found at the first due()
        self.final: PerDatumElbo | None = None  # the last split evaluated

    @property
    def every(self) -> int:
        """Epochs between evaluations: ``eval_every``, else :func:`default_eval_every`
        (found after the first epoch, when the guide's parameters exist)."""
        if self._every is None:
            self._every = self._default_every()
        return self._every

    def _default_every(self) -> int:
        """:func:`default_eval_every` of what an evaluation and an epoch cost. Rows in chunks:
        one draw each. Global latents: ``eval_particles`` whole-data draws; where a plate
        subsamples itself (B of its N rows a step), an epoch trains B rows and an evaluation
        runs all N in ceil(N / B) chunks of B. Vectorized particles count as one draw."""
        config, batching = self.config, self.batching
        estimator = config.estimator
        train_draws = getattr(estimator, "num_particles", config.num_particles)
        if getattr(estimator, "vectorize_particles", False):
            train_draws = 1  # one vectorized pass; counting K would evaluate too often
        calls = [c for _, c in self.splits if c]
        if batching is not None:
            try:
                rows = [num_rows(self.model, c.args, c.kwargs, batching) for c in calls]
            except (TypeError, ValueError):  # the evaluation itself says what is wrong
                rows = []
            return default_eval_every(config.epochs, *rows, train_draws=train_draws)
        trained, evaluated = 0, []
        try:
            for i, c in enumerate(calls):
                n = num_rows(self.model, c.args, c.kwargs, None)
                with seeded(EVAL_SEED):
                    plate = find_subsampled_plate(self.model, self.guide, c.args, c.kwargs)
                if plate is not None:  # B rows a step; all N rows in chunks of B evaluated
                    n = plate.size
                    evaluated.append(math.ceil(plate.full_size / plate.size) * plate.size)
                else:
                    evaluated.append(n)
                if i == 0:
                    trained = n
        except Exception:  # noqa: BLE001 - the evaluation itself says what is wrong
            return default_eval_every(config.epochs)
        return default_eval_every(
            config.epochs,
            trained,
            evaluated[0] - trained,
            *evaluated[1:],
            eval_draws=config.eval_particles,
            train_draws=train_draws,
            draw_cost=EVAL_GLOBAL_DRAW_COST,
        )

    def due(self, epoch: int) -> bool:
        return (epoch + 1) % self.every == 0 or epoch + 1 == self.epochs

    def rows(self, epoch: int, svi_loss: float, seconds: float) -> list[dict[str, Any]]:
        """The history rows of ``epoch`` (none when no evaluation is due), one per split; the
        train row also holds ``svi_loss``, the mean of what the steps minimized, and the
        epoch's ``seconds``."""
        if not self.due(epoch):
            return []
        rows = []
        with torch_threads(self.threads):
            for split, call in self.splits:
                if call is None:
                    continue
                m = self.split(call)
                row = {"epoch": epoch + 1, "split": split, **m._asdict()}
                if split == "train":
                    row["svi_loss"] = svi_loss
                    row["seconds"] = seconds
                rows.append(row)
                self.final = m
        return rows

    def split(self, call: ModelArgs) -> PerDatumElbo:
        """:func:`evaluate` of one split's arguments, reduced across ranks."""
        model, guide, options = self.model, self.guide, self.options
        if self.world.size == 1 or options.get("batching") is None:
            return evaluate(model, guide, *call.args, **call.kwargs, **options)
        batching = options["batching"]
        n = num_rows(model, call.args, call.kwargs, batching)

        def totals(rows: torch.Tensor) -> list[float]:
            part = take(model, call.args, call.kwargs, batching, rows, None)
            m = evaluate(model, guide, *part.args, **part.kwargs, **options)
            return [m.reconstruction * m.n, m.kl * m.n, m.n]

        rows = torch.arange(n, device=device_of(call.args, call.kwargs))
        recon_sum, kl_sum, total = self.world.sum_over_shards(totals, rows)
        return PerDatumElbo.from_totals(recon_sum, kl_sum, int(total))


class _Position(NamedTuple):
    """Where a run starts: the epoch and step, the running loss sum of that epoch's steps
    so far, and the history rows already recorded."""

    epoch: int
    step: int
    loss_sum: float
    history: list[dict[str, Any]]


class _RunFiles:
    """The run directory as :func:`fit` keeps it: ``config.json``, the metrics files and the
    checkpoint; without a directory there is nothing to write and every method returns.

    An atomic checkpoint (parameters, optimizer, config, RNG state of every rank, position, the
    metrics files' lengths) is written before the first step, every ``checkpoint_every``
    seconds at an epoch's end, at the end, and on a signal. Rows go to disk before the
    checkpoint that covers them; a resume cuts rows written after its checkpoint, so files and
    checkpoint describe the same step. Rank 0 alone writes; every rank takes part in the
    collectives a checkpoint needs.
    """

    def __init__(
        self,
        run_dir: str | Path | None,
        config: TrainConfig,
        metadata: Mapping[str, Any] | None,
        state: SVIState,
        world: World,
        publish: Callable[[], Path] | None,
    ):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.path = self.run_dir / CHECKPOINT if self.run_dir is not None else None
        self.metrics = (
            MetricsLog(self.run_dir, METRICS_COLUMNS) if self.run_dir is not None else None
        )
        self.config, self.metadata, self.state = config, metadata, state
        self.world, self.publish = world, publish
        self.last = time.monotonic()
        self.saved_at: tuple[int, int] | None = None  # the position of the last checkpoint

    def resume(self) -> _Position:
        """Load the checkpoint into the state (parameters, optimizer, this rank's RNG) and
        return where the run continues; a changed learning rate applies from there on."""
        if self.path is None:
            raise OptionError("needs a run directory (run_dir)", option="resume")
        saved = load_checkpoint(self.path)
        stored, current = saved["config"], _config_for_checkpoint(self.config)
        fixed = [k for k in current if k not in TrainConfig.RESUMABLE_CHANGES]
        if any(stored.get(k) != current[k] for k in fixed):
            raise RunError(f"{self.path}: its training options differ from this run's")
        state, world = self.state, self.world
        copy_params(state.names, state.params, saved, self.path)
        state.optimizer.load_state_dict(saved["optimizer"])
        for group in state.optimizer.param_groups:  # a changed --lr applies from here on
            group["lr"] = self.config.learning_rate
        if world.is_writer:  # rows written after the checkpoint go: they are recomputed
            history = self.metrics.truncate(saved["metrics"])
        else:
            history = self.metrics.read(saved["metrics"])
        at = saved["position"]
        loss_sum = at["loss_sum"] if world.is_writer else 0.0  # a global sum
        rng = world.rng_state(saved)
        if rng is not None:
            set_rng_state(rng)
        else:  # written by a world of another size: this rank's stream is derived afresh
            world.seed(self.config.seed, at["epoch"], at["step"])
        return _Position(at["epoch"], at["step"], loss_sum, history)

    def open(self, position: _Position, resume: bool) -> None:
        """Write ``config.json``, start the metrics files of a new run and its first
        checkpoint (a run directory always has one)."""
        self.last = time.monotonic()
        self.saved_at = (position.epoch, position.step) if resume else None
        if self.run_dir is not None and self.world.is_writer:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _write_config(
                self.run_dir, self.config, self.metadata, (position.epoch, position.step), resume
            )
            if not resume:
                self.metrics.reset()
        if not resume:
            self.save(0, 0, 0.0)

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Append history rows to the metrics files (before the checkpoint that covers them)."""
        if self.run_dir is not None and self.world.is_writer:
            self.metrics.append(rows)

    def due(self) -> bool:
        """Whether ``checkpoint_every`` seconds have passed since the last checkpoint on any
        rank (one collective)."""
        due = time.monotonic() - self.last >= self.config.checkpoint_every
        return self.path is not None and self.world.any(due, "agreeing to checkpoint")

    def kept(self) -> str:
        """Where a run that stops on a fault can be resumed from."""
        if self.saved_at is None:
            return ""
        return f"; its checkpoint of epoch {self.saved_at[0]}, step {self.saved_at[1]} is kept"

    def save(self, epoch: int, step: int, running: float) -> None:
        """Checkpoint at ``epoch``, ``step`` with ``running``, this rank's loss sum so far."""
        if self.path is None:
            return
        world, state = self.world, self.state
        rng_by_rank = world.all_gather(get_rng_state(), "gathering RNG states")
        running = world.sum([running], "reducing the training loss")[0]
        self.last, self.saved_at = time.monotonic(), (epoch, step)
        if not world.is_writer:
            return
        params = zip(state.names, state.params, strict=True)
        save_checkpoint(
            self.path,
            {
                "config": _config_for_checkpoint(self.config),
                "metadata": dict(self.metadata or {}),
                "param_names": state.names,
                "params": {k: p.detach().clone() for k, p in params},
                "optimizer": state.optimizer.state_dict(),
                "rng": rng_by_rank[0],
                "position": {"epoch": epoch, "step": step, "loss_sum": running},
                "metrics": self.metrics.offsets(),
                **({"rng_by_rank": rng_by_rank} if world.size > 1 else {}),
            },
        )
        if self.publish is not None:  # the run now has a checkpoint: it may take its final place
            self.run_dir, self.publish = self.publish(), None
            self.path, self.metrics.run_dir = self.run_dir / CHECKPOINT, self.run_dir


def _progress_bar(config: TrainConfig, start_epoch: int, world: World) -> tqdm:
    """The epochs' progress bar, on rank 0 only, with the last evaluated ELBO beside it."""
    return tqdm(
        total=config.epochs,
        initial=start_epoch,
        disable=not config.progress or not world.is_writer,
        desc="epochs",
        unit="epoch",
        leave=False,
    )


@dataclass
class _Loop:
    """:func:`fit`'s epochs: the steps of each (:meth:`steps`), then evaluation, metrics rows
    and a checkpoint when one is due, a stop on a signal (:meth:`close_epoch`)."""

    state: SVIState
    batches: _Batches
    evaluation: _Evaluation
    files: _RunFiles
    config: TrainConfig
    flag: _SignalFlag
    step_threads: StepThreads | None = None

    def run(self, position: _Position) -> list[dict[str, Any]]:
        """Train from ``position`` to ``config.epochs``; return the whole history."""
        history, loss_sum, world = position.history, position.loss_sum, self.batches.world
        with _progress_bar(self.config, position.epoch, world) as bar:
            for epoch in range(position.epoch, self.config.epochs):
                t0 = time.perf_counter()
                start = position.step if epoch == position.epoch else 0
                loss_sum = self.steps(epoch, start, loss_sum)
                seconds = time.perf_counter() - t0
                loss_sum = world.sum([loss_sum], "reducing the training loss")[0]
                rows = self.evaluation.rows(epoch, loss_sum / self.batches.n, seconds)
                history.extend(rows)
                loss_sum = 0.0
                self.files.append(rows)
                self.close_epoch(epoch)
                if rows:
                    bar.set_postfix(elbo=f"{rows[-1]['elbo']:.2f}")
                bar.update(1)
                log.info("epoch %d: %s", epoch + 1, rows)
        return history

    def steps(self, epoch: int, start: int, loss_sum: float) -> float:
        """The steps of ``epoch`` from step ``start``; returns this rank's sum of the steps'
        losses, each weighted by its share of the rows. A signal checkpoints after the step
        every rank is at and raises :class:`Interrupted`."""
        batches, flag, world = self.batches, self.flag, self.batches.world
        epochs = self.config.epochs
        threads = self.step_threads
        for index, call, mine, rows in batches.steps(epoch, start):
            with (
                threads.step(timed=rows == batches.size) if threads else nullcontext(),
                pyro.validation_enabled(self.config.validate or (epoch, index) == (0, 0)),
                planned_calls(batches.calls_left(epoch, index, epochs)),  # export if it pays
            ):
                try:
                    info, stop = _step(
                        self.state,
                        call.args,
                        call.kwargs,
                        clip_norm=self.config.clip_norm,
                        world=world,
                        weight=mine / rows,
                        stop=flag.signum is not None,
                    )
                except NumericalError as exc:  # where it stopped, and what survives
                    where = f"epoch {epoch + 1}, step {index + 1}"
                    raise NumericalError(f"{where}: {exc}{self.files.kept()}") from None
            loss_sum += info.loss * mine / (batches.n if batches.scaled else mine)
            if stop or (world.size == 1 and flag.signum is not None):  # same step everywhere
                self.files.save(epoch, index + 1, loss_sum)
                where = f"epoch {epoch + 1}, step {index + 1}"
                raise Interrupted(flag.signum or signal.SIGTERM, where)
        return loss_sum

    def close_epoch(self, epoch: int) -> None:
        """Checkpoint at the end of ``epoch`` when a signal came, the run ends, or one is
        due; then stop on the signal."""
        stopping = self.batches.world.any(self.flag.signum is not None)
        last = epoch + 1 == self.config.epochs
        if stopping or last or self.files.due():
            self.files.save(epoch + 1, 0, 0.0)
        if stopping and not last:
            raise Interrupted(self.flag.signum or signal.SIGTERM, f"the end of epoch {epoch + 1}")


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
    eval_threads: Callable[[], int] | None = None,
    step_threads: StepThreads | None = None,
    **kwargs,
) -> TrainResult:
    """Train ``guide`` (and the model's parameters) by SVI on the model's own arguments.

    ``fit(model, guide, *args, **kwargs)`` steps ``model(*args, **kwargs)`` as
    ``SVI.step(*args, **kwargs)`` does: the loop of :func:`init` and :func:`step`, with
    evaluation, metrics files, checkpoints and signal handling on top. Each step minimizes
    loss = -ELBO with the chosen Pyro estimator. Parameters are created by one run of the pair
    with the random state forked: the steps draw the noise that
    ``pyro.set_rng_seed(config.seed)`` starts, whatever the guide's initialization draws.

    Full batch (``config.batch_size=None`` or no ``batching``) passes the arguments as given
    every step. Mini-batches need a declared :class:`Batching` (the arguments sliced along dim
    0 and the keyword that receives N, so the plate scales a batch by N / B); a model that
    takes ``num_data`` has one by default. An "epoch" is one pass over the rows.

    After every ``config.eval_every`` epochs (default: :func:`default_eval_every`, about
    :data:`EVALUATIONS_PER_RUN` times per run and within :data:`EVAL_SHARE` of the training
    time) and after the last, the training data (and ``test``) are evaluated and appended to the history, and
    with ``run_dir`` to ``metrics.jsonl``/``metrics.csv``. A checkpoint is written before the first step, every
    ``config.checkpoint_every`` seconds at an epoch's end, at the end and on SIGINT/SIGTERM.

    Args:
        model, guide: Pyro functions of the same arguments with matching sample sites.
        *args, **kwargs: the model's arguments (the training data).
        config: a :class:`TrainConfig`.
        test: held-out data: a tensor, an ``(args, kwargs)`` pair or a ``ModelArgs``.
        batching: how mini-batches are cut (:class:`~inference.batching.Batching`).
        run_dir: where metrics and checkpoints go (created if missing).
        resume: continue from ``run_dir/checkpoint.pt`` (same config required, except for
            :attr:`TrainConfig.RESUMABLE_CHANGES`, recorded in ``config.json``).
        metadata: JSON-able facts stored with the checkpoint (e.g. how to rebuild the model).
        handle_signals: on SIGINT/SIGTERM finish the step, checkpoint, raise :class:`Interrupted`.
        world: the data-parallel ranks (:mod:`inference.distributed`); default: the initialized
            process group, else one process. Each rank steps on its shard of every global batch,
            gradients and metrics are reduced across ranks, and rank 0 alone writes files.
        publish: called once after the first checkpoint; returns the directory the run
            continues in (``elbo-lab train --force`` renames its new run over the old here).
        eval_threads: called before each evaluation; torch runs the evaluation with the
            threads it returns, then the training's again (``elbo-lab train``: the threads for
            its evaluation chunks, confirmed by a probe, :mod:`inference.threads`). Default:
            the training's.
        step_threads: a :class:`~inference.threads.StepThreads` that sets torch's threads
            for each step, by timing the run's steps with its count and with one; torch's
            count is restored after the last step. For a model whose steps compute the same
            with either count (``elbo-lab train``: the built-in VAE in float32,
            :func:`~inference.resources.step_threads`). Default: torch's count as it is.

    Returns:
        A :class:`TrainResult`; ``final`` holds the last evaluation's test metrics (train if no
        test) and ``estimator`` the estimator that ran.
    """
    batching = batching if batching is not None else default_batching(model)
    batches = _Batches(model, args, kwargs, batching, config, world)
    world = batches.world
    train = ModelArgs(tuple(args), dict(kwargs))
    evaluation = _Evaluation(model, guide, train, test, batching, config, world, eval_threads)
    pyro.set_rng_seed(config.seed)
    state = init(model, guide, *batches.first.args, config=config, **batches.first.kwargs)
    world.broadcast_(state.params)  # every rank starts from rank 0's parameters
    world.seed(config.seed)  # ranks 1.. draw their own noise
    files = _RunFiles(run_dir, config, metadata, state, world, publish)
    position = files.resume() if resume else _Position(0, 0, 0.0, [])
    files.open(position, resume)
    threads = torch.get_num_threads()
    try:
        with _SignalFlag(handle_signals) as flag:
            loop = _Loop(state, batches, evaluation, files, config, flag, step_threads)
            history = loop.run(position)
    finally:
        torch.set_num_threads(threads)
    final = evaluation.final
    if final is None:  # resumed a finished run: report the last recorded metrics
        final = PerDatumElbo(*(history[-1].get(k) for k in PerDatumElbo._fields))
    return TrainResult(history, final, files.run_dir, state.estimator)


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
    copy_params(names, params, state, source)
