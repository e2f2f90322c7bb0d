"""``elbo-lab train``: a new or resumed run's options, its model and data, ``fit`` into its run
directory, then the checked report and the figures."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import pyro
import torch

from . import choices
from .batching import Batching, ModelArgs, check_batching, takes_num_data
from .bounds import checked_metrics
from .data import load_data, load_model_data
from .distributed import device_for, init_from_env, shutdown
from .errors import NumericalError, OptionError, RunError
from .estimators import estimator_label, plain_estimator
from .figure_worker import FigureError, draw, training_figure_jobs
from .io import load_checkpoint
from .messages import first_line as _first_line
from .messages import warn as _warn
from .provenance import absolute_data_spec, data_fingerprint, file_fingerprint
from .reports import exact_log_px, report_dict, sign_report
from .resources import (
    available_memory,
    check_writable,
    phase_threads,
    step_threads,
    use_threads,
)
from .run import DEFAULT_AUTOGUIDE, DTYPES, ModelSpec, build_model, check_sources
from .rundir import RunDirectory
from .threads import torch_threads
from .train import CHECKPOINT, Interrupted, TrainConfig, fit
from .user_model import (
    guide_label,
    is_user_model,
    load_user_model,
    model_source_file,
    resolve_model_spec,
    user_model_label,
)

__all__ = ["train"]

log = logging.getLogger("elbo-lab")


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def _declared_batching(args) -> Batching | None:
    """The batching named by --batch-args/--size-arg/--subsample-arg (None: none given)."""
    names, size, subsample = args.batch_args, args.size_arg, args.subsample_arg
    if names is None and size is None and subsample is None:
        return None
    if not names and subsample is None:
        raise OptionError(
            "--batch-args: name the parameters that hold the data rows (e.g. --batch-args X,y), "
            "or give --subsample-arg for a plate that picks its rows itself"
        )
    if size is None and subsample is None:
        raise OptionError(
            f"--size-arg: the model must learn that {','.join(names)} is a batch, through "
            "--size-arg (e.g. num_data) or --subsample-arg, or its ELBO would not be scaled"
        )
    return Batching(args=names or (), size=size, subsample=subsample)


def _check_declared_batching(model, call: ModelArgs, batching: Batching) -> None:
    """The declared batching fits the model and its data, in one line naming the option."""
    options = {"args": "--batch-args", "size": "--size-arg", "subsample": "--subsample-arg"}
    try:
        check_batching(model, call.args, call.kwargs, batching)
    except ValueError as exc:
        field, _, problem = str(exc).partition(": ")
        given = [o for f, o in options.items() if getattr(batching, f)] or ["--batch-args"]
        raise OptionError(f"{options.get(field, '/'.join(given))}: {problem}") from None


def _estimator_label(name: str) -> str:
    """``TraceMeanField_ELBO``, ``... (JIT-compiled)``, ``RenyiELBO(alpha=0.5)``."""
    return estimator_label(name)


#: Options ``--resume`` accepts besides the run directory: documented changes and display.
RESUME_OPTIONS = {
    "epochs", "lr", "clip_norm", "checkpoint_every", "jit", "threads", "no_progress", "json",
    "allow_changed", "resume", "run_dir",
}  # fmt: skip


def _given_options(args, argv: list[str]) -> set[str]:
    """The destinations of the train options given on the command line (not defaulted)."""
    sentinel = object()
    namespace = argparse.Namespace(**{k: sentinel for k in vars(args)})
    tail = argv[argv.index("train") + 1 :]
    args.parser_.parse_args(tail, namespace=namespace)
    return {k for k, v in vars(namespace).items() if v is not sentinel}


def _memory_of_model(spec: ModelSpec, data_dim: int) -> int:
    """Bytes a built-in model's training state needs: parameters, gradients, two Adam moments."""
    if spec.user_model:
        return 0
    itemsize = DTYPES[spec.dtype].itemsize
    widths = [data_dim, *spec.hidden_dims]
    encoder = [*widths, 2 * spec.latent_dim]
    decoder = [spec.latent_dim, *reversed(widths)]
    count = sum(a * b + b for layers in (encoder, decoder) for a, b in itertools.pairwise(layers))
    return 4 * count * itemsize


def train(args) -> int:
    progress = not args.no_progress and sys.stderr.isatty()
    data_name = _data_label(args.data)
    model_name = args.model
    if is_user_model(args.model):
        guide_name = guide_label(args.guide or DEFAULT_AUTOGUIDE)
        model_name = f"{user_model_label(args.model)}-{guide_name}"
    run_dir = args.run_dir or Path("runs") / f"{model_name}-{data_name}-seed{args.seed}"
    is_writer = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 owns the directory
    resume, spec = args.resume, None
    if resume and (run_dir / CHECKPOINT).exists():  # without one, it starts from scratch
        refused = sorted(_given_options(args, args.argv_) - RESUME_OPTIONS)
        if refused:
            names = ", ".join("--" + k.replace("_", "-") for k in refused)
            raise OptionError(
                f"--resume: continues the run with its stored options; {names} cannot change "
                "(only --epochs, --lr and --clip-norm can)"
            )
    if not resume:
        spec = _new_spec(args)
        check_writable(run_dir)
    owner = None
    if is_writer:
        owner = (
            RunDirectory.open(run_dir) if resume else RunDirectory.create(run_dir, force=args.force)
        )
    try:
        code = _train_owned(args, run_dir, owner, progress, data_name, resume, spec)
    except BaseException:
        if owner is not None:
            owner.close(keep=False)  # a run that never wrote a checkpoint leaves nothing behind
        raise
    if owner is not None:
        owner.close()
    return code


def _train_owned(args, run_dir, owner, progress, data_name, resume, spec) -> int:
    source = source_sha256 = None
    if resume and not (run_dir / CHECKPOINT).exists():
        resume = False  # killed before its first checkpoint: start again, from scratch
    if resume:
        config, spec, source, source_sha256 = _resumed_config(args, run_dir, progress)
    else:
        if spec is None:  # --resume of a run killed before its first checkpoint
            spec = _new_spec(args)
        config = _new_config(args, spec, progress)
    run = _set_up_training(args, spec, config, run_dir, source, source_sha256)
    result = _fit_run(
        run, run_dir, owner, resume, _evaluation_threads(args, run), _step_threads(args, run)
    )
    if isinstance(result, int):  # stopped: the exit status
        return result
    shutdown(run.world)
    if not run.world.is_writer:  # rank 0 writes the figures and the report
        return 0
    return _report_training(args, run, result, run_dir, data_name)


def _new_spec(args) -> ModelSpec:
    """The model, data and sizes a new run trains, from its options."""
    return ModelSpec(
        model=resolve_model_spec(args.model),
        data=absolute_data_spec(args.data),
        latent_dim=args.latent_dim,
        hidden_dims=args.hidden_dims,
        device=args.device,
        dtype=args.dtype,
        guide=args.guide,
        batching=_declared_batching(args),
    )


def training_config(args, *, batched: bool, progress: bool, **options) -> TrainConfig:
    """The :class:`TrainConfig` of the training options ``train`` and ``compare`` share
    (:func:`inference.parser._add_training_options`), with ``options`` for the rest; mini-batches
    of :data:`~inference.choices.BATCH_SIZE` by default where the model is ``batched``, else
    all rows at once."""
    batch_size = args.batch_size
    if batch_size is None and batched:
        batch_size = choices.BATCH_SIZE
    return TrainConfig(
        epochs=args.epochs,
        batch_size=batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        estimator=args.estimator,
        optimizer=args.optimizer,
        jit=args.jit,
        progress=progress,
        **options,
    )


def _new_config(args, spec: ModelSpec, progress: bool) -> TrainConfig:
    """A new run's training options (built-in models: mini-batches of 128 by default)."""
    return training_config(
        args,
        batched=not spec.user_model,
        progress=progress,
        num_particles=args.num_particles,
        eval_every=args.eval_every,
        clip_norm=args.clip_norm,
        validate=args.validate,
        checkpoint_every=args.checkpoint_every,
    )


def _resumed_config(args, run_dir: Path, progress: bool):
    """A resumed run's stored model, data and options, and its model file's path and hash.

    --epochs, --lr, --clip-norm may change (config.json records each change); so may what
    does not change the numbers (progress, --jit, --checkpoint-every).
    """
    state = load_checkpoint(run_dir / CHECKPOINT)
    try:
        spec = ModelSpec.from_dict(state["metadata"]["model_spec"])
        changes = {"epochs": args.epochs, "progress": progress, "jit": args.jit}
        changes["checkpoint_every"] = args.checkpoint_every
        given = _given_options(args, args.argv_)
        if "lr" in given:
            changes["learning_rate"] = args.lr
        if "clip_norm" in given:
            changes["clip_norm"] = args.clip_norm
        config = TrainConfig(**{**state["config"], **changes})
    except (KeyError, TypeError) as exc:
        raise RunError(f"{run_dir / CHECKPOINT}: checkpoint lacks its options ({exc})") from None
    done = state["position"]["epoch"]
    if args.epochs < done:
        raise OptionError(f"--epochs: {args.epochs} is fewer than the {done} already run")
    source, source_sha256 = check_sources(
        state, run_dir, allow_changed=args.allow_changed, warn=_warn
    )
    return config, spec, source, source_sha256


class _TrainingRun(NamedTuple):
    """What ``elbo-lab train`` fits, and with what: the options (batch size settled), the
    model spec (data size recorded), the ranks, the module whose ``model``/``guide`` are
    trained, the data as the model's arguments, and the split the report is about."""

    config: TrainConfig
    spec: ModelSpec
    world: Any
    module: Any
    model: Any
    guide: Any
    train_call: ModelArgs
    test_call: ModelArgs | None
    split: str
    dataset: Any


def _set_up_training(args, spec, config, run_dir, source, source_sha256) -> _TrainingRun:
    """Join the ranks, load the data onto the device and build the model and guide under the
    run's seed ("same seed, same numbers")."""
    world = init_from_env(spec.device)  # one process, or a rank under torchrun
    device = device_for(spec.device, world)  # cuda -> cuda:LOCAL_RANK
    pyro.clear_param_store()
    if spec.user_model:
        # the model's own arguments (--data FILE.py:NAME, a .npz bound by parameter name, or
        # one array), all of them: a posterior describes the data it conditions on
        user_model = load_user_model(spec.model, path=source, expected_sha256=source_sha256)
        dataset = load_model_data(spec.data, user_model).to(device, DTYPES[spec.dtype])
        pyro.set_rng_seed(config.seed)
        module, model, guide = build_model(replace(spec, device=device), dataset, user_model)
        train_call, test_call, split = dataset.train, dataset.test, "train"
        # The rule cannot count a user model's work (weights_per_row: one weight a row), so it
        # trains on one thread, as the built-in models' small steps do, unless --threads: a
        # 100,000-row regression (full batch) ran 1.2-1.3x faster than on torch's default of
        # one per core on a quiet machine, and about as fast beside a busy process.
        use_threads(args, spec.to_dict(), config.batch_size or 1)
        if spec.batching is not None:
            _check_declared_batching(model, train_call, spec.batching)
    else:
        dataset = load_data(spec.data).to(device, DTYPES[spec.dtype])
        if spec.data_dim is not None and dataset.data_dim != spec.data_dim:
            raise RunError(
                f"{spec.data}: data have {dataset.data_dim} columns but the checkpoint in "
                f"{run_dir} was trained on {spec.data_dim}"
            )
        need, have = _memory_of_model(spec, dataset.data_dim), available_memory()
        if have is not None and need > have:
            raise OptionError(
                f"--hidden-dims/--latent-dim: the model's parameters, gradients and Adam state "
                f"need about {_gb(need)}; {_gb(have)} of memory is available"
            )
        spec = ModelSpec.from_dict({**spec.to_dict(), "data_dim": dataset.data_dim})
        rows = config.batch_size or len(dataset.train)
        use_threads(args, spec.to_dict(), rows)
        pyro.set_rng_seed(config.seed)  # network initialization: "same seed, same numbers"
        module, model, guide = build_model(replace(spec, device=device), dataset)
        train_call = ModelArgs((dataset.train,), {})
        test_call, split = ModelArgs((dataset.test,), {}), "test"
    if config.batch_size is None and (takes_num_data(model) or spec.batching is not None):
        config = replace(config, batch_size=choices.BATCH_SIZE)
    return _TrainingRun(
        config, spec, world, module, model, guide, train_call, test_call, split, dataset
    )


def _fit_run(
    run: _TrainingRun,
    run_dir: Path,
    owner,
    resume: bool,
    eval_threads=None,
    step_threads=None,
):
    """:func:`~inference.train.fit` the run into its directory (``eval_threads`` and
    ``step_threads``: fit's); the exit status instead of the result when it stopped on a
    signal or a non-finite number."""
    spec, config, train_call = run.spec, run.config, run.train_call
    model_file = model_source_file(run.model) if spec.user_model else None
    provenance = {
        "model": file_fingerprint(model_file) if model_file else None,
        "data": data_fingerprint(spec.data),
    }
    try:
        return fit(
            run.model,
            run.guide,
            *train_call.args,
            test=run.test_call,
            config=config,
            batching=spec.batching,
            run_dir=owner.path if owner is not None else run_dir,
            resume=resume,
            metadata={"model_spec": spec.to_dict(), "provenance": provenance},
            handle_signals=True,
            world=run.world,
            publish=owner.publish if owner is not None else None,
            eval_threads=eval_threads,
            step_threads=step_threads,
            **train_call.kwargs,
        )
    except Interrupted as exc:
        print(
            f"elbo-lab: {exc}; continue with: elbo-lab train --resume --run-dir {run_dir} "
            f"--epochs {config.epochs}",
            file=sys.stderr,
        )
        return 128 + exc.signum
    except NumericalError as exc:
        print(f"elbo-lab: error: {exc}", file=sys.stderr)
        return 1


def _evaluation_threads(args, run: _TrainingRun):
    """What ``fit`` asks before each evaluation: the threads for its chunks of
    ``eval_batch_size`` rows (all of a split's rows where it has fewer), probed then
    (:func:`~inference.resources.phase_threads`); None, the training's, also with several
    ranks, which evaluate their shards at once on the same cores, each probe timing its
    product beside the others'."""
    if run.spec.user_model or run.world.size > 1:  # (a user model: no rows to count)
        return None
    rows = max(len(run.dataset.train), len(run.dataset.test))  # the larger split's
    if run.config.eval_batch_size:
        rows = min(rows, run.config.eval_batch_size)
    return phase_threads(args, run.spec.to_dict(), rows)


def _step_threads(args, run: _TrainingRun):
    """Torch's threads for each training step, timed on the run's own steps
    (:func:`~inference.resources.step_threads`); None, the count ``use_threads`` set, also with
    several ranks, which share the cores (a user model: no rows to count)."""
    if run.spec.user_model or run.world.size > 1:
        return None
    n = len(run.dataset.train)
    return step_threads(args, run.spec.to_dict(), min(run.config.batch_size or n, n))


def _report_training(args, run: _TrainingRun, result, run_dir: Path, data_name: str) -> int:
    """Check the trained run's bounds, print the report and write the figures; the exit
    status says whether the bounds held."""
    spec, config, out = run.spec, run.config, args.out_
    # The checks need the estimator's loss on the same noise: shards drew other noise, so
    # rank 0 re-evaluates the whole split; global latents: all rows at once.
    call = run.train_call if spec.user_model else run.test_call
    batched = takes_num_data(run.model) and not spec.user_model
    exact = exact_log_px(run.module, call)
    plain = plain_estimator(result.estimator)  # whose .loss is -ELBO, for the sign check
    figures = _Figures(args, run, result, run_dir, data_name)
    with _report_threads(args, run):
        if torch.get_num_threads() == 1:  # the worker draws on the other core meanwhile; it
            figures.send()  # would stall a team of threads, whose every product waits for all
        checked = checked_metrics(
            run.model,
            run.guide,
            *call.args,
            estimator=plain,
            batched=batched,
            exact_log_px=exact,
            **call.kwargs,
        )
    if args.json:
        report = {"run_dir": str(run_dir), "estimator": _estimator_label(result.estimator)}
        print(json.dumps({**report, run.split: report_dict(checked)}, indent=2), file=out)
    else:
        if spec.user_model:
            what = f"{spec.model} with {spec.guide} on {spec.data} ({checked.metrics.n} rows"
            what += ", all at once)" if config.batch_size is None else ")"
        else:
            what = (
                f"{spec.model} on {spec.data} ({len(run.dataset.train)} train / "
                f"{len(run.dataset.test)} test images)"
            )
        print(
            f"Trained {what} for {config.epochs} epochs with "
            f"{_estimator_label(result.estimator)}; run directory: {run_dir}",
            file=out,
        )
        unit = "point" if spec.user_model else "image"
        print(sign_report(checked, run.split, unit), file=out)
    out.flush()
    figures.write()
    return 0 if checked.bounds.ok else 1


def _report_threads(args, run: _TrainingRun):
    """Torch's threads for the report's checks, then the training's again: the report's work
    is L_K's chunks of :data:`~inference.evidence.CHUNK_ROWS` rows, forward only (as
    ``elbo-lab explain`` counts it), not the training step's
    (:func:`~inference.resources.phase_threads`)."""
    from .evidence import CHUNK_ROWS

    return torch_threads(phase_threads(args, run.spec.to_dict(), CHUNK_ROWS))


class _Figures:
    """The training figures (:func:`~inference.figure_worker.training_figure_jobs`): their
    numbers computed at once; where the program started a figure worker
    (``args.figure_worker_``), handed to it (:meth:`send`) to draw while this process goes on.
    :meth:`write` waits for them (or draws them here), after the report, so that one that
    cannot be written is a warning, not a lost result."""

    def __init__(self, args, run: _TrainingRun, result, run_dir: Path, data_name: str):
        self.run_dir, self.worker, self.error = run_dir, getattr(args, "figure_worker_", None), None
        try:
            self.jobs = training_figure_jobs(
                run_dir,
                result.history,
                run.module,
                None if run.spec.user_model else run.dataset,
                seed=run.config.seed,
                title=f"{run.spec.model} on {data_name}",
            )
        except Exception as exc:  # noqa: BLE001 - reported after the report, as drawing is
            self.jobs, self.error = [], exc

    def send(self) -> None:
        """Hand the figures to the worker, once (nothing to do without one)."""
        if self.worker is not None and self.error is None and self.worker.jobs is None:
            self.worker.send(self.jobs)

    def write(self) -> None:
        try:
            if self.error is not None:
                raise self.error
            where = "in this process"
            if self.worker is not None:
                self.send()
                figures = self.worker.wait()
                where = "by the figure worker" if self.worker.drew else where
            else:
                figures = draw(self.jobs)
            log.info("figures (drawn %s): %s", where, ", ".join(str(p) for p in figures))
        except FigureError as exc:  # the worker's words for what it could not write
            _warn(f"{self.run_dir}: figures not written ({exc})")
        except Exception as exc:  # noqa: BLE001 - any failure to draw or write is reported
            _warn(f"{self.run_dir}: figures not written ({type(exc).__name__}: {_first_line(exc)})")


def _data_label(data: str) -> str:
    """A short name of ``--data`` for directory names."""
    if data == "digits":
        return data
    source, sep, name = data.rpartition(":")
    if sep and source and not source.startswith("mnist") and not Path(data).exists():
        return f"{Path(source).stem}.{name}"
    return Path(data.removeprefix("mnist:")).stem
