"""The ``elbo-lab`` command line: a thin layer that turns options into configs and calls the library.

Every user mistake ends in one line ``elbo-lab: error: ...`` naming the file or option, exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import choices
from .errors import ElboLabError, OptionError

if TYPE_CHECKING:
    from .train import Metrics, TrainConfig

# Everything that needs torch, Pyro or matplotlib is imported inside the command that uses it,
# so that the parser, --help and option errors answer at once (inference/choices.py).

__all__ = ["main", "sign_report"]

log = logging.getLogger("elbo-lab")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _hidden_dims(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths, got {text!r}") from None
    if any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return dims


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user error
        self.exit(2, f"elbo-lab: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="elbo-lab",
        description="See and check what variational inference optimizes: "
        "Pyro minimizes loss = -ELBO = KL - E_q[log p(x|z)].",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser(
        "train",
        help="train a model by SVI and report loss = -ELBO",
        description="Train a model/guide pair by SVI on a data set; write metrics, a checkpoint "
        "and a report of the sign convention to the run directory.",
    )
    t.add_argument(
        "--model",
        default="vae",
        help=f"{', '.join(choices.MODELS)} (default: vae), or your own Pyro model model(x) of the data "
        "tensor as FILE.py:NAME or package.module:NAME",
    )
    t.add_argument(
        "--guide",
        default=None,
        help="for your own model, a Pyro autoguide: AutoNormal (default), AutoDelta, "
        "AutoMultivariateNormal, AutoLowRankMultivariateNormal, AutoIAFNormal; the built-in "
        "models train their own mean-field encoder, diag",
    )
    _add_training_options(t, estimator=choices.ESTIMATOR, every="")
    t.add_argument(
        "--num-particles", type=_positive_int, default=1, help="samples of z per step (1)"
    )
    t.add_argument(
        "--eval-every",
        type=_positive_int,
        default=1,
        help="evaluate train/test metrics every N epochs and after the last (1)",
    )
    t.add_argument(
        "--clip-norm",
        type=_positive_float,
        default=None,
        help="clip the gradient norm to this value (off)",
    )
    t.add_argument(
        "--validate",
        action="store_true",
        help="run Pyro's argument validation on every step (the first always is)",
    )
    t.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="output directory (default: runs/<model>-<data>-seed<seed>)",
    )
    t.add_argument("--force", action="store_true", help="replace an existing run directory")
    t.add_argument(
        "--resume", action="store_true", help="continue the run in --run-dir from its checkpoint"
    )
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    t.add_argument("--json", action="store_true", help="print the final report as JSON")

    e = sub.add_parser(
        "evaluate",
        help="test-split loss, elbo, reconstruction, kl of a trained run",
        description="Evaluate a trained run on its test split: per-image loss (= -ELBO), elbo, "
        "reconstruction (E_q[log p(x|z)]) and kl (KL(q(z|x) || p(z))) in nats, analytic KL.",
    )
    e.add_argument("run_dir", type=Path, help="a directory written by 'elbo-lab train'")
    e.add_argument("--data", default=None, help="evaluate on other data of the same dimension")
    e.add_argument(
        "--json", action="store_true", help="print JSON with keys loss, elbo, reconstruction, kl, n"
    )
    _add_threads_option(e)

    xp = sub.add_parser(
        "explain",
        help="why the loss is -ELBO: its parts, log p(x) and the gap, in the run's numbers",
        description="Explain a trained run: what SVI minimized (loss = -ELBO), the ELBO split "
        "into reconstruction and KL, log p(x) estimated by the importance-weighted bound L_K "
        "and the gap L_K - ELBO read as KL(q(z|x) || p(z|x)); exact values for ppca/fa runs.",
    )
    xp.add_argument("run_dir", type=Path, help="a directory written by 'elbo-lab train'")
    xp.add_argument(
        "--num-samples",
        type=_positive_int,
        default=1000,
        help="importance samples K per data point for L_K (1000)",
    )
    xp.add_argument(
        "--split",
        default=None,
        choices=["test", "train"],
        help="split (test; train for your own model: the data its posterior describes)",
    )
    xp.add_argument("--data", default=None, help="explain other data of the same dimension")
    xp.add_argument("--json", action="store_true", help="print the record as JSON")
    _add_threads_option(xp)
    _add_compare_parser(sub)
    return parser


def _add_training_options(p: argparse.ArgumentParser, *, estimator: str, every: str) -> None:
    """The options that say what is trained on which data, shared by train and compare."""
    p.add_argument(
        "--data",
        default="digits",
        help="'digits' (embedded, default), 'mnist:DIR' or a DIR of MNIST IDX files, "
        "or a .npy/.npz file (N x D or N x H x W)",
    )
    p.add_argument("--latent-dim", type=_positive_int, default=10, help="latent dimension L (10)")
    p.add_argument(
        "--hidden-dims",
        type=_hidden_dims,
        default=(200,),
        help="comma-separated hidden widths of the VAE encoder/decoder (200)",
    )
    p.add_argument(
        "--epochs",
        type=_positive_int,
        default=choices.EPOCHS,
        help=f"passes over the training split{every} ({choices.EPOCHS})",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="mini-batch size (128; all rows for your own model unless it takes num_data)",
    )
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate (1e-3)")
    p.add_argument(
        "--seed", type=int, default=0, help=f"random seed{every} (0); same seed, same numbers"
    )
    p.add_argument(
        "--estimator",
        default=estimator,
        choices=list(choices.ESTIMATORS),
        help="ELBO estimator: meanfield = TraceMeanField_ELBO (analytic KL where registered), "
        "trace = Trace_ELBO (Monte-Carlo KL), jit / jit-meanfield = their JIT-compiled "
        f"versions ({estimator})",
    )
    p.add_argument(
        "--jit",
        default=choices.JIT,
        choices=list(choices.JIT_MODES),
        help="compile the estimator with torch.jit (same loss and gradients, less Python per "
        "step): on, off, or auto = when model and guide are declared static, as every "
        f"built-in one is ({choices.JIT})",
    )
    _add_threads_option(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (cpu)")
    p.add_argument(
        "--dtype", default="float32", choices=list(choices.DTYPES), help="float32 or float64"
    )


def _add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch threads for this process (default: one per 1 GFLOP of work in a step, up to "
        "one per core: 1 for small models such as the default VAE, which run faster with 1 and "
        "do not slow down on a busy machine)",
    )


def _use_threads(args, spec: Mapping[str, Any], rows: int, backward: bool) -> None:
    """Unless ``--threads`` was given, set torch's threads from the work in one step.

    ``spec`` holds the model's name and sizes (:class:`inference.run.ModelSpec` fields); a step
    runs ``rows`` rows, forward only or with ``backward`` (:mod:`inference.threads`).
    """
    if args.threads is not None:
        return
    import torch

    from .threads import step_flops, threads_for, weights_per_row

    weights = weights_per_row(
        str(spec.get("model", "vae")),
        int(spec.get("data_dim") or 1),
        int(spec.get("latent_dim", 10)),
        tuple(spec.get("hidden_dims", (200,))),
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads_for(step_flops(weights, rows, backward), cores or 1))


def _add_compare_parser(sub) -> None:
    c = sub.add_parser(
        "compare",
        help="fit several guides to one model under the same budget and compare them",
        description="Train each guide with the same data, options and seed, then tabulate on "
        "the test split (training data for autoguides) the ELBO, reconstruction, KL, L_K, the "
        "gap L_K - ELBO, PSIS k-hat, training time and parameter count (nats per datum). "
        "Writes comparison.csv/.json/.md/.png and posterior_<guide>.nc (ArviZ) to --out.",
    )
    c.add_argument(
        "--model",
        default="vae",
        help=f"{', '.join(choices.MODELS)}, or your Pyro model model(x) as FILE.py:NAME or "
        "package.module:NAME (then --guides are autoguide names) (default: vae)",
    )
    c.add_argument(
        "--guides",
        default=None,
        help="comma-separated: diag,full,flow for the built-in models (default: all three); "
        "AutoDelta,AutoNormal,AutoMultivariateNormal,AutoLowRankMultivariateNormal,"
        "AutoIAFNormal for a user model (default: AutoNormal,AutoMultivariateNormal)",
    )
    # Flow guides have no closed-form KL, so guides are compared under Trace_ELBO by default.
    _add_training_options(c, estimator="trace", every=", the same for every guide")
    c.add_argument(
        "--num-samples", type=_positive_int, default=1000, help="importance samples K of L_K (1000)"
    )
    c.add_argument(
        "--elbo-particles",
        type=_positive_int,
        default=100,
        help="draws per datum for the ELBO and its standard error (100)",
    )
    c.add_argument(
        "--num-draws",
        type=_positive_int,
        default=200,
        help="posterior draws per guide saved for ArviZ, as 4 chains (200)",
    )
    c.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: runs/compare-<model>-<data>-seed<seed>)",
    )
    c.add_argument("--force", action="store_true", help="replace an existing output directory")
    c.add_argument("--json", action="store_true", help="print the table as JSON")


def sign_report(m: Metrics, pyro_value: float, split: str = "test", unit: str = "image") -> str:
    """The sign convention in the run's own numbers, checked against Pyro's own loss.

    ``pyro_value`` is ``TraceMeanField_ELBO().loss`` per image on the same data and noise
    (:func:`inference.train.pyro_loss`), computed independently of the decomposition.
    ``unit`` names a data point (``"point"`` for a user model, whose values are totals / N).
    """
    residual = pyro_value - (m.kl - m.reconstruction)
    ok = abs(residual) <= 1e-5 * max(1.0, abs(m.loss))
    return "\n".join(
        [
            f"Pyro minimized loss = -ELBO = KL - E[log p(x|z)] = {m.kl:.2f} - ({m.reconstruction:.2f})"
            f" = {m.loss:.2f} nats/{unit}",
            f"  ELBO = E[log p(x|z)] - KL = {m.reconstruction:.2f} - {m.kl:.2f} = {m.elbo:.2f} "
            f"nats/{unit} (maximized; a lower bound on log p(x))",
            f"  checked: Pyro's TraceMeanField_ELBO().loss = {pyro_value:.4f}; minus (KL - E[log p(x|z)])"
            f" = {residual:.1e} ({'ok' if ok else 'MISMATCH'}), {split} split, {m.n} {unit}s",
        ]
    )


def _check_writable(run_dir: Path) -> None:
    """Refuse early, before any work, an output directory that cannot be written."""
    parent = next((p for p in (run_dir, *run_dir.parents) if p.exists()), Path("."))
    if not parent.is_dir():
        raise OptionError(f"--run-dir: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OptionError(f"--run-dir: {parent} is not writable")


def _estimator_label(config: TrainConfig, model, guide) -> str:
    """``TraceMeanField_ELBO``, or ``TraceMeanField_ELBO (JIT-compiled)`` for its traced form."""
    from .estimators import COMPILED
    from .train import ESTIMATORS, resolve_estimator

    name = resolve_estimator(config, model, guide)
    plain = {compiled: plain for plain, compiled in COMPILED.items()}.get(name)
    if plain is None:
        return ESTIMATORS[name].__name__
    return f"{ESTIMATORS[plain].__name__} (JIT-compiled)"


def _train(args) -> int:
    import pyro

    from .data import load_data
    from .distributed import device_for, init_from_env, shutdown
    from .errors import NumericalError, RunError
    from .io import load_checkpoint
    from .plots import write_training_figures
    from .run import DEFAULT_AUTOGUIDE, DTYPES, ModelSpec, build_model
    from .train import (
        CHECKPOINT,
        Interrupted,
        TrainConfig,
        evaluate,
        fit,
        pyro_loss,
        takes_num_data,
    )
    from .user_model import is_user_model, resolve_model_spec, user_model_label

    progress = not args.no_progress and sys.stderr.isatty()
    data_name = "digits" if args.data == "digits" else Path(args.data.removeprefix("mnist:")).stem
    model_name = args.model
    if is_user_model(args.model):
        model_name = f"{user_model_label(args.model)}-{args.guide or DEFAULT_AUTOGUIDE}"
    run_dir = args.run_dir or Path("runs") / f"{model_name}-{data_name}-seed{args.seed}"
    if args.resume:
        # A resumed run keeps its stored model, data and options; only --epochs may grow.
        state = load_checkpoint(run_dir / CHECKPOINT)
        try:
            spec = ModelSpec.from_dict(state["metadata"]["model_spec"])
            config = TrainConfig(
                **{**state["config"], "epochs": args.epochs, "progress": progress, "jit": args.jit}
            )
        except (KeyError, TypeError) as exc:
            raise RunError(
                f"{run_dir / CHECKPOINT}: checkpoint lacks its options ({exc})"
            ) from None
        done = state["position"]["epoch"]
        if args.epochs < done:
            raise OptionError(f"--epochs: {args.epochs} is fewer than the {done} already run")
    else:
        if run_dir.exists() and not args.force:
            raise OptionError(
                f"--run-dir: {run_dir} exists (use --force to replace it, --resume to continue it)"
            )
        spec = ModelSpec(
            model=resolve_model_spec(args.model),
            data=args.data,
            latent_dim=args.latent_dim,
            hidden_dims=args.hidden_dims,
            device=args.device,
            dtype=args.dtype,
            guide=args.guide,
        )
        batch_size = args.batch_size
        if batch_size is None and not spec.user_model:
            batch_size = 128
        config = TrainConfig(
            epochs=args.epochs,
            batch_size=batch_size,
            learning_rate=args.lr,
            seed=args.seed,
            estimator=args.estimator,
            jit=args.jit,
            num_particles=args.num_particles,
            eval_every=args.eval_every,
            clip_norm=args.clip_norm,
            validate=args.validate,
            progress=progress,
        )
    _check_writable(run_dir)
    world = init_from_env(spec.device)  # one process, or a rank under torchrun
    device = device_for(spec.device, world)  # cuda -> cuda:LOCAL_RANK
    dataset = load_data(spec.data).to(device, DTYPES[spec.dtype])
    if spec.data_dim is not None and dataset.data_dim != spec.data_dim:
        raise RunError(
            f"{spec.data}: data have {dataset.data_dim} columns but the checkpoint in {run_dir} "
            f"was trained on {spec.data_dim}"
        )
    spec = ModelSpec.from_dict({**spec.to_dict(), "data_dim": dataset.data_dim})
    _use_threads(args, spec.to_dict(), config.batch_size or len(dataset.train), backward=True)
    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)  # network initialization is part of "same seed, same numbers"
    module, model, guide = build_model(replace(spec, device=device), dataset)
    if config.batch_size is None and takes_num_data(model):  # mini-batches scale by num_data
        config = replace(config, batch_size=128)
    # a user model's autoguide describes the posterior given the rows it was fit to: those
    # are its train and evaluation split; a test split would need another posterior
    test_x, split = (None, "train") if spec.user_model else (dataset.test, "test")
    if not args.resume and run_dir.exists() and world.is_writer:
        shutil.rmtree(run_dir)
    try:
        result = fit(
            model,
            guide,
            dataset.train,
            test_x,
            config,
            run_dir=run_dir,
            resume=args.resume,
            metadata={"model_spec": spec.to_dict()},
            handle_signals=True,
            world=world,
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
    shutdown(world)
    if not world.is_writer:  # rank 0 writes the figures and the report
        return 0
    figures = write_training_figures(
        run_dir,
        result.history,
        module,
        dataset,
        seed=config.seed,
        title=f"{spec.model} on {data_name}",
    )
    log.info("figures: %s", ", ".join(str(p) for p in figures))
    if args.json:
        print(json.dumps({"run_dir": str(run_dir), split: result.final._asdict()}, indent=2))
    else:
        if spec.user_model:
            what = f"{spec.model} with {spec.guide} on {spec.data} ({len(dataset.train)} rows"
            what += ", all at once)" if config.batch_size is None else ")"
        else:
            what = (
                f"{spec.model} on {spec.data} ({len(dataset.train)} train / "
                f"{len(dataset.test)} test images)"
            )
        print(
            f"Trained {what} for {config.epochs} epochs with "
            f"{_estimator_label(config, model, guide)}; run directory: {run_dir}"
        )
        # The check needs Pyro's loss on the same noise: shards drew other noise, so rank 0
        # re-evaluates the whole split for it.
        x = dataset.train if spec.user_model else dataset.test
        batch = None if spec.user_model else 1024  # global latents: all rows at once
        final = result.final
        if world.size > 1:
            final = evaluate(model, guide, x, batch_size=batch)
        unit = "point" if spec.user_model else "image"
        print(sign_report(final, pyro_loss(model, guide, x, batch_size=batch), split, unit))
    return 0


def _evaluate(args) -> int:
    from .run import load_run
    from .train import evaluate, pyro_loss

    run = load_run(args.run_dir, data=args.data)
    # a user model: the rows its autoguide was fit to, all at once (global latents), / N
    split, batch = ("train", None) if run.spec.user_model else ("test", 1024)
    x = run.data.train if run.spec.user_model else run.data.test
    _use_threads(args, run.spec.to_dict(), min(batch or len(x), len(x)), backward=False)
    m = evaluate(run.model, run.guide, x, batch_size=batch)
    if args.json:
        print(json.dumps(m._asdict()))
    else:
        unit = "point" if run.spec.user_model else "image"
        print(f"{args.run_dir}: {split} split, {m.n} {unit}s, nats per {unit} (analytic KL)")
        for k in ("loss", "elbo", "reconstruction", "kl"):
            print(f"  {k:<15} {getattr(m, k):>10.4f}")
        pyro_value = pyro_loss(run.model, run.guide, x, batch_size=batch)
        print(sign_report(m, pyro_value, split, unit))
    return 0


def _explain(args) -> int:
    from .evidence import CHUNK_ROWS
    from .explain import explain

    try:  # the model's sizes, without loading it twice
        stored = json.loads((args.run_dir / "config.json").read_text())["metadata"]["model_spec"]
    except (OSError, ValueError, KeyError, TypeError):
        stored = {}  # explain() itself reports a run directory it cannot use
    _use_threads(args, stored, CHUNK_ROWS, backward=False)
    e = explain(
        args.run_dir,
        num_samples=args.num_samples,
        split=args.split,
        data=args.data,
        bound_figure=args.run_dir / "bound.png",
    )
    print(json.dumps(e.to_dict(), indent=2) if args.json else e.report())
    return 0


def _compare(args) -> int:
    from .compare import CompareConfig, compare_guides, format_table, write_comparison

    data_name = "digits" if args.data == "digits" else Path(args.data.removeprefix("mnist:")).stem
    model_name = Path(args.model.rpartition(":")[0]).stem if ":" in args.model else args.model
    out = args.out or Path("runs") / f"compare-{model_name}-{data_name}-seed{args.seed}"
    if out.exists() and not args.force:
        raise OptionError(f"--out: {out} exists (use --force to replace it)")
    _check_writable(out)
    if args.threads is None:
        from .data import load_data

        spec = {"model": args.model, "latent_dim": args.latent_dim, "hidden_dims": args.hidden_dims}
        spec["data_dim"] = load_data(args.data).data_dim
        _use_threads(args, spec, args.batch_size or 128, backward=True)
    options = CompareConfig(
        num_samples=args.num_samples, elbo_particles=args.elbo_particles, num_draws=args.num_draws
    )
    comparison = compare_guides(
        args.model,
        args.guides.split(",") if args.guides else None,
        args.data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        estimator=args.estimator,
        jit=args.jit,
        latent_dim=args.latent_dim,
        hidden_dims=args.hidden_dims,
        device=args.device,
        dtype=args.dtype,
        options=options,
        out_dir=out,
        replace=args.force,
        progress=sys.stderr.isatty(),
    )
    write_comparison(comparison, out)
    if args.json:
        print(json.dumps({"out": str(out), **comparison.to_dict()}, indent=2))
    else:
        print(format_table(comparison))
        print(f"wrote comparison.csv, .json, .md, .png and posterior_<guide>.nc to {out}")
    return 0


COMMANDS = {"train": _train, "evaluate": _evaluate, "explain": _explain, "compare": _compare}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    # Before torch loads OpenMP: threads that wait at a barrier sleep instead of spinning, so a
    # run with several threads slows down on a busy machine but does not collapse.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return COMMANDS[args.command](args)
    except ElboLabError as exc:
        print(f"elbo-lab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("elbo-lab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
