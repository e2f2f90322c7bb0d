"""The ``elbo-lab`` commands' bodies: each turns parsed options into the library's configs, calls
the library and prints its report. Imported when a command runs (it loads torch and Pyro), so
``--help`` never does; :mod:`inference.cli` dispatches here through :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import pyro

from . import choices
from .batching import Batching, ModelArgs, check_batching, takes_num_data
from .bounds import CheckedMetrics, checked_metrics
from .data import load_data, load_model_data
from .distributed import device_for, init_from_env, shutdown
from .errors import NumericalError, OptionError, RunError
from .estimators import estimator_label, plain_estimator
from .io import load_checkpoint
from .messages import first_line as _first_line
from .messages import warn as _warn
from .plots import write_training_figures
from .provenance import absolute_data_spec, data_fingerprint, file_fingerprint
from .run import DEFAULT_AUTOGUIDE, DTYPES, ModelSpec, build_model, check_sources, load_run
from .rundir import RunDirectory, refuse_to_replace
from .train import CHECKPOINT, ESTIMATORS, Interrupted, TrainConfig, choose_estimator, fit
from .user_model import (
    guide_label,
    is_user_model,
    load_user_model,
    model_source_file,
    resolve_model_spec,
    user_model_label,
)

__all__ = ["COMMANDS", "available_cores", "available_memory", "sign_report"]

log = logging.getLogger("elbo-lab")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def _use_threads(args, spec: dict, rows: int, backward: bool) -> None:
    """Unless ``--threads`` was given, set torch's threads from the work in one step.

    ``spec`` holds the model's name and sizes (:class:`inference.run.ModelSpec` fields); a step
    runs ``rows`` rows, forward only or with ``backward`` (:mod:`inference.threads`).
    """
    if getattr(args, "threads", None) is not None:
        return
    import torch

    from .threads import step_flops, threads_for, weights_per_row

    weights = weights_per_row(
        str(spec.get("model", choices.MODEL)),
        int(spec.get("data_dim") or 1),
        int(spec.get("latent_dim", choices.LATENT_DIM)),
        tuple(spec.get("hidden_dims", choices.HIDDEN_DIMS)),
    )
    torch.set_num_threads(threads_for(step_flops(weights, rows, backward), available_cores()))


def _stored_spec(run_dir: Path) -> dict:
    """A run's model sizes from its config.json, without loading it ({} if unreadable)."""
    try:
        return json.loads((run_dir / "config.json").read_text())["metadata"]["model_spec"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


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


def _report_dict(c: CheckedMetrics) -> dict:
    return {
        **c.metrics._asdict(),
        "estimator": ESTIMATORS[c.estimator].__name__,
        "pyro_loss": c.pyro_loss,
        "bounds": c.bounds.to_dict(),
    }


def _check_writable(run_dir: Path) -> None:
    """Refuse early, before any work, an output directory that cannot be written."""
    parent = next((p for p in (run_dir, *run_dir.parents) if p.exists()), Path("."))
    if not parent.is_dir():
        raise OptionError(f"--run-dir: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OptionError(f"--run-dir: {parent} is not writable")


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


def _train(args) -> int:
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
        _check_writable(run_dir)
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
    result = _fit_run(run, run_dir, owner, resume)
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


def _new_config(args, spec: ModelSpec, progress: bool) -> TrainConfig:
    """A new run's training options (built-in models: mini-batches of 128 by default)."""
    batch_size = args.batch_size
    if batch_size is None and not spec.user_model:
        batch_size = choices.BATCH_SIZE
    return TrainConfig(
        epochs=args.epochs,
        batch_size=batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        estimator=args.estimator,
        optimizer=args.optimizer,
        jit=args.jit,
        num_particles=args.num_particles,
        eval_every=args.eval_every,
        clip_norm=args.clip_norm,
        validate=args.validate,
        progress=progress,
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
        _use_threads(args, spec.to_dict(), rows, backward=True)
        pyro.set_rng_seed(config.seed)  # network initialization: "same seed, same numbers"
        module, model, guide = build_model(replace(spec, device=device), dataset)
        train_call = ModelArgs((dataset.train,), {})
        test_call, split = ModelArgs((dataset.test,), {}), "test"
    if config.batch_size is None and (takes_num_data(model) or spec.batching is not None):
        config = replace(config, batch_size=choices.BATCH_SIZE)
    return _TrainingRun(
        config, spec, world, module, model, guide, train_call, test_call, split, dataset
    )


def _fit_run(run: _TrainingRun, run_dir: Path, owner, resume: bool):
    """:func:`~inference.train.fit` the run into its directory; the exit status instead of
    the result when it stopped on a signal or a non-finite number."""
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


def _report_training(args, run: _TrainingRun, result, run_dir: Path, data_name: str) -> int:
    """Check the trained run's bounds, print the report and write the figures; the exit
    status says whether the bounds held."""
    spec, config, out = run.spec, run.config, args.out_
    # The checks need the estimator's loss on the same noise: shards drew other noise, so
    # rank 0 re-evaluates the whole split; global latents: all rows at once.
    call = run.train_call if spec.user_model else run.test_call
    batched = takes_num_data(run.model) and not spec.user_model
    exact = _exact_log_px(run.module, call)
    plain = plain_estimator(result.estimator)  # whose .loss is -ELBO, for the sign check
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
        print(json.dumps({**report, run.split: _report_dict(checked)}, indent=2), file=out)
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
    _write_figures(run, result, run_dir, data_name)
    return 0 if checked.bounds.ok else 1


def _write_figures(run: _TrainingRun, result, run_dir: Path, data_name: str) -> None:
    """The training figures; after the report, so one that cannot be written is a warning,
    not a lost result."""
    try:
        figures = write_training_figures(
            run_dir,
            result.history,
            run.module,
            None if run.spec.user_model else run.dataset,
            seed=run.config.seed,
            title=f"{run.spec.model} on {data_name}",
        )
        log.info("figures: %s", ", ".join(str(p) for p in figures))
    except Exception as exc:  # noqa: BLE001 - any failure to draw or write is reported
        _warn(f"{run_dir}: figures not written ({type(exc).__name__}: {_first_line(exc)})")


def _exact_log_px(module, call: ModelArgs) -> float | None:
    """The closed-form log p(x) per datum where the model has one (linear-Gaussian)."""
    from models.linear_gaussian import LinearGaussian

    if isinstance(module, LinearGaussian):
        return float(module.log_marginal(call.args[0]).mean())
    return None


def _data_label(data: str) -> str:
    """A short name of ``--data`` for directory names."""
    if data == "digits":
        return data
    source, sep, name = data.rpartition(":")
    if sep and source and not source.startswith("mnist") and not Path(data).exists():
        return f"{Path(source).stem}.{name}"
    return Path(data.removeprefix("mnist:")).stem


def _evaluate(args) -> int:
    _use_threads(args, _stored_spec(args.run_dir), choices.EVAL_BATCH_SIZE, backward=False)
    run = load_run(args.run_dir, data=args.data, allow_changed=args.allow_changed, warn=_warn)
    # a user model: the rows its guide was fit to, all at once (global latents), / N
    split = run.default_split
    call = run.split(split)
    probe = run.probe(call)
    estimator = choose_estimator("auto", run.model, run.guide, *probe.args, **probe.kwargs)
    c = checked_metrics(
        run.model,
        run.guide,
        *call.args,
        estimator=estimator,
        batched=run.batched,
        exact_log_px=_exact_log_px(run.module, call),
        **call.kwargs,
    )
    out = args.out_
    if args.json:
        print(json.dumps(_report_dict(c)), file=out)
    else:
        unit = "point" if run.spec.user_model else "image"
        kl = "analytic KL" if estimator == "meanfield" else "Monte-Carlo KL"
        print(
            f"{args.run_dir}: {split} split, {c.metrics.n} {unit}s, nats per {unit} ({kl})",
            file=out,
        )
        for k in ("loss", "elbo", "reconstruction", "kl"):
            print(f"  {k:<15} {getattr(c.metrics, k):>10.4f}", file=out)
        print(sign_report(c, split, unit), file=out)
    return 0 if c.bounds.ok else 1


def _explain(args) -> int:
    from .evidence import CHUNK_ROWS
    from .explain import explain
    from .watch import SUMMARY, explain_watched

    _use_threads(args, _stored_spec(args.run_dir), CHUNK_ROWS, backward=False)

    if (args.run_dir / SUMMARY).is_file():  # written by 'elbo-lab watch'
        w = explain_watched(args.run_dir, num_samples=args.num_samples)
        text = json.dumps([f.to_dict() for f in w.fits], indent=2) if args.json else w.report()
        print(text, file=args.out_)
        return 0

    reported = []

    def report(e) -> None:  # printed before the figure is drawn
        print(json.dumps(e.to_dict(), indent=2) if args.json else e.report(), file=args.out_)
        args.out_.flush()
        reported.append(e)

    try:
        explain(
            args.run_dir,
            num_samples=args.num_samples,
            split=args.split,
            data=args.data,
            bound_figure=args.run_dir / "bound.png",
            allow_changed=args.allow_changed,
            warn=_warn,
            max_bytes=available_memory(),
            on_report=report,
        )
    except Exception as exc:
        if not reported:
            raise
        # the report is out: a figure that cannot be written is a warning, not a lost result
        _warn(
            f"{args.run_dir / 'bound.png'}: not written ({type(exc).__name__}: {_first_line(exc)})"
        )
    return 0


def _compare(args) -> int:
    from .compare import CompareConfig, compare, format_table, write_comparison

    data_name = "digits" if args.data == "digits" else Path(args.data.removeprefix("mnist:")).stem
    model_name = Path(args.model.rpartition(":")[0]).stem if ":" in args.model else args.model
    out = args.run_dir or Path("runs") / f"compare-{model_name}-{data_name}-seed{args.seed}"
    if out.is_symlink():
        raise OptionError(f"--run-dir: {out} is a symbolic link; name the directory itself")
    if out.exists() and not args.force:
        raise OptionError(f"--run-dir: {out} exists (use --force to replace it)")
    if out.exists():
        refuse_to_replace(out, "run_dir")
    _check_writable(out)
    spec = {"model": args.model, "latent_dim": args.latent_dim, "hidden_dims": args.hidden_dims}
    _use_threads(
        args, {**spec, "data_dim": 64}, args.batch_size or choices.BATCH_SIZE, backward=True
    )
    options = CompareConfig(
        num_samples=args.num_samples, eval_particles=args.eval_particles, num_draws=args.num_draws
    )
    model, guides, dataset, batched = _compared_guides(args)
    _check_comparison_memory(options, model, dataset, batched, available_memory())
    batch_size = args.batch_size
    if batch_size is None and batched:  # else a user model's rows, all at once
        batch_size = choices.BATCH_SIZE
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        estimator=args.estimator,
        optimizer=args.optimizer,
        jit=args.jit,
        progress=sys.stderr.isatty(),
    )
    # written beside an existing comparison, then renamed into place: an error or a kill
    # leaves the old output whole (inference.rundir, as a training run is)
    owner = RunDirectory.create(out, force=args.force)
    try:
        comparison = compare(
            model, guides, dataset, config, options, out_dir=owner.path, model_name=args.model
        )
        write_comparison(comparison, owner.path)
        owner.publish()
    except BaseException:
        owner.close(keep=False)
        raise
    owner.close()
    if args.json:
        print(json.dumps({"out": str(out), **comparison.to_dict()}, indent=2), file=args.out_)
    else:
        print(format_table(comparison), file=args.out_)
        print(
            f"wrote comparison.csv, .json, .md, .png and posterior_<guide>.nc to {out}",
            file=args.out_,
        )
    faults = [r.guide for r in comparison.rows if r.failed or r.bounds_ok is False]
    return 1 if faults else 0


def _compared_guides(args):
    """The model, its guides by name (or guide factories), its data and whether it is trained
    in mini-batches, for ``--model``/``--guides``/``--data``: a built-in model with amortized
    guides, or a user model ``FILE.py:NAME`` with autoguides (or the user's own guides).
    Incompatible combinations are OptionErrors before anything is loaded."""
    from models.guides import AUTOGUIDES, autoguide_name, make_guide

    from .compare import DEFAULT_GUIDES, check_guides
    from .io import seeded
    from .run import MODELS
    from .user_model import load_user_guide

    user = is_user_model(args.model)
    if not user and args.model not in MODELS:
        raise OptionError(
            f"--model: unknown model {args.model!r} "
            f"(choose from {', '.join(MODELS)}, or FILE.py:NAME)"
        )
    names = [g.strip() for g in args.guides.split(",") if g.strip()] if args.guides else None
    names = names if names is not None else list(DEFAULT_GUIDES["user" if user else "amortized"])
    check_guides(names, amortized=not user, estimator=args.estimator)
    if user:
        if args.dtype not in DTYPES:
            raise OptionError(f"--dtype: must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
        pyro.clear_param_store()
        model = load_user_model(args.model)
        dataset = load_model_data(args.data, model).to(args.device, DTYPES[args.dtype])
        guides = {}
        for n in names:
            if is_user_model(n):  # the user's own guide, FILE.py:NAME: built once, now
                with seeded(args.seed):
                    guides[guide_label(n)] = load_user_guide(n, model, option="guides")
            else:
                guides[autoguide_name(n)] = AUTOGUIDES[autoguide_name(n)]
        return model, guides, dataset, takes_num_data(model)
    spec = ModelSpec(  # validates the model options before anything is loaded
        model=args.model,
        data=args.data,
        latent_dim=args.latent_dim,
        hidden_dims=tuple(args.hidden_dims),
        device=args.device,
        dtype=args.dtype,
    )
    pyro.clear_param_store()
    dtype = DTYPES[spec.dtype]
    dataset = load_data(args.data).to(args.device, dtype)
    with seeded(args.seed):
        _, model, _ = build_model(spec, dataset)
        widths = spec.hidden_dims if args.model == "vae" else ()  # linear encoders: exact family
        try:
            guides = {
                n: make_guide(n, dataset.data_dim, args.latent_dim, widths).to(args.device, dtype)
                for n in names
            }
        except ValueError as exc:  # models/ words it in model terms; the option is ours
            raise OptionError(f"--guides: {exc}") from None
    return model, guides, dataset, True


def _check_comparison_memory(options, model, dataset, batched: bool, max_bytes) -> None:
    """Refuse a K too large for memory: each guide's (K, N) log-weights, float64, twice over."""
    from .batching import num_rows
    from .data import Dataset

    if max_bytes is None:
        return
    if isinstance(dataset, Dataset):
        rows = max(len(dataset.train), len(dataset.test))
    else:
        rows = num_rows(model, dataset.train.args, dataset.train.kwargs, None)
    need = 2 * options.num_samples * (rows if batched else 1) * 8
    if need > max_bytes:
        raise OptionError(
            f"--num-samples: K = {options.num_samples} draws for {rows} points need about "
            f"{need / 1e9:.3g} GB; {max_bytes / 1e9:.3g} GB of memory is available"
        )


def _watch(args) -> int:
    from .watch import Watch, WatchConfig, format_script_traceback, run_script

    if not args.script.is_file():
        raise OptionError(f"{args.script}: no such script")
    run_dir = args.run_dir or Path("runs") / f"watch-{args.script.stem}"
    if run_dir.exists() and not args.force:
        raise OptionError(f"--run-dir: {run_dir} exists (use --force to replace it)")
    _check_writable(run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    config = WatchConfig(
        every=args.every,
        eval_particles=args.eval_particles,
        num_samples=args.num_samples,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    w = Watch(run_dir, config, script=args.script)
    code = 0
    try:
        with w:
            run_script(args.script, args.args)
    except SystemExit as exc:  # as Python ends a script that calls sys.exit
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException as exc:  # the script failed: its traceback, as Python prints it
        sys.stdout.flush()
        print(format_script_traceback(exc, args.script), end="", file=sys.stderr)
        code = 130 if isinstance(exc, KeyboardInterrupt) else 1
    sys.stdout.flush()
    if w.failed:
        kept = len(w.rows())
        print(f"elbo-lab watch: the script failed; {kept} rows kept in {run_dir}", file=sys.stderr)
    else:
        print(w.report(), file=sys.stderr)
    return code


COMMANDS = {
    "train": _train,
    "evaluate": _evaluate,
    "explain": _explain,
    "compare": _compare,
    "watch": _watch,
}
