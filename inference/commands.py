"""The ``elbo-lab`` commands' bodies: each turns parsed options into the library's configs, calls
the library and prints its report (``train``'s: :mod:`inference.train_command`). Imported when a
command runs (it loads torch and Pyro), so ``--help`` never does; :mod:`inference.cli`
dispatches here through :data:`COMMANDS`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pyro

from . import choices
from .batching import takes_num_data
from .bounds import checked_metrics
from .data import load_data, load_model_data
from .errors import OptionError
from .messages import first_line as _first_line
from .messages import warn as _warn
from .reports import exact_log_px, report_dict, sign_report
from .resources import available_memory, check_writable, phase_threads, stored_spec, use_threads
from .run import DTYPES, ModelSpec, build_model, load_run
from .rundir import RunDirectory, refuse_to_replace
from .train import choose_estimator
from .train_command import train, training_config
from .user_model import guide_label, is_user_model, load_user_model

__all__ = ["COMMANDS"]


def _evaluate(args) -> int:
    use_threads(args, stored_spec(args.run_dir), choices.EVAL_BATCH_SIZE)
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
        exact_log_px=exact_log_px(run.module, call),
        **call.kwargs,
    )
    out = args.out_
    if args.json:
        print(json.dumps(report_dict(c)), file=out)
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

    use_threads(args, stored_spec(args.run_dir), CHUNK_ROWS)

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
    from .evidence import CHUNK_ROWS

    data_name = "digits" if args.data == "digits" else Path(args.data.removeprefix("mnist:")).stem
    model_name = Path(args.model.rpartition(":")[0]).stem if ":" in args.model else args.model
    out = args.run_dir or Path("runs") / f"compare-{model_name}-{data_name}-seed{args.seed}"
    if out.is_symlink():
        raise OptionError(f"--run-dir: {out} is a symbolic link; name the directory itself")
    if out.exists() and not args.force:
        raise OptionError(f"--run-dir: {out} exists (use --force to replace it)")
    if out.exists():
        refuse_to_replace(out, "run_dir")
    check_writable(out)
    options = CompareConfig(
        num_samples=args.num_samples, eval_particles=args.eval_particles, num_draws=args.num_draws
    )
    model, guides, dataset, batched = _compared_guides(args)
    # the threads for the model's training steps on these data (a user model: one weight a row)
    spec = {"model": args.model, "latent_dim": args.latent_dim, "hidden_dims": args.hidden_dims}
    # its dtype too: count_keeps_numbers reads a missing one as float32 (a probe by the load)
    spec.update(data_dim=getattr(dataset, "data_dim", None), device=args.device, dtype=args.dtype)
    use_threads(args, spec, args.batch_size or choices.BATCH_SIZE)
    _check_comparison_memory(options, model, dataset, batched, available_memory())
    config = training_config(args, batched=batched, progress=sys.stderr.isatty())
    # written beside an existing comparison, then renamed into place: an error or a kill
    # leaves the old output whole (inference.rundir, as a training run is)
    owner = RunDirectory.create(out, force=args.force)
    try:
        comparison = compare(
            model,
            guides,
            dataset,
            config,
            options,
            out_dir=owner.path,
            model_name=args.model,
            # each guide's evaluations: the threads for L_K's chunks (as explain counts them)
            eval_threads=phase_threads(args, spec, CHUNK_ROWS),
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
    check_writable(run_dir)
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
    "train": train,
    "evaluate": _evaluate,
    "explain": _explain,
    "compare": _compare,
    "watch": _watch,
}
