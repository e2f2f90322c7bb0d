"""The ``elbo-lab`` command line: a thin layer that turns options into configs and calls the library.

Every user mistake ends in one line ``elbo-lab: error: ...`` naming the file or option, exit 2.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import itertools
import json
import logging
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from . import choices
from .errors import ElboLabError, NumericalError, OptionError, RunError
from .provenance import absolute_data_spec, data_fingerprint, file_fingerprint

if TYPE_CHECKING:  # bound at run time by _load_library, when a command runs
    import pyro

    from .batching import Batching, ModelArgs, check_batching, takes_num_data
    from .bounds import CheckedMetrics, checked_metrics
    from .data import load_data, load_model_data
    from .distributed import device_for, init_from_env, shutdown
    from .estimators import ESTIMATORS, choose_estimator, estimator_label, plain_estimator
    from .io import CHECKPOINT, load_checkpoint
    from .plots import write_training_figures
    from .run import (
        DEFAULT_AUTOGUIDE,
        DTYPES,
        ModelSpec,
        build_model,
        check_sources,
        load_run,
    )
    from .rundir import RunDirectory, refuse_to_replace
    from .train import Interrupted, TrainConfig, fit
    from .user_model import (
        guide_label,
        is_user_model,
        load_user_model,
        model_source_file,
        resolve_model_spec,
        user_model_label,
    )

__all__ = ["main", "sign_report"]

log = logging.getLogger("elbo-lab")


def _load_library() -> None:
    """Import what the commands compute with (torch, Pyro, matplotlib) when a command runs: the
    parser, ``--help`` and option errors answer at once (their names: :mod:`inference.choices`).
    A name already bound here (e.g. patched by a test) is kept."""
    import pyro

    from . import (
        batching,
        bounds,
        data,
        distributed,
        estimators,
        io,
        plots,
        run,
        rundir,
        train,
        user_model,
    )

    names = {
        "pyro": pyro,
        **{
            n: getattr(batching, n)
            for n in ("Batching", "ModelArgs", "check_batching", "takes_num_data")
        },
        **{n: getattr(bounds, n) for n in ("CheckedMetrics", "checked_metrics")},
        **{n: getattr(data, n) for n in ("load_data", "load_model_data")},
        **{n: getattr(distributed, n) for n in ("device_for", "init_from_env", "shutdown")},
        **{n: getattr(estimators, n) for n in ("estimator_label", "plain_estimator")},
        "load_checkpoint": io.load_checkpoint,
        "write_training_figures": plots.write_training_figures,
        **{
            n: getattr(run, n)
            for n in (
                "DEFAULT_AUTOGUIDE",
                "DTYPES",
                "ModelSpec",
                "build_model",
                "check_sources",
                "load_run",
            )
        },
        **{n: getattr(rundir, n) for n in ("RunDirectory", "refuse_to_replace")},
        **{
            n: getattr(train, n)
            for n in (
                "CHECKPOINT",
                "ESTIMATORS",
                "Interrupted",
                "TrainConfig",
                "choose_estimator",
                "fit",
            )
        },
        **{
            n: getattr(user_model, n)
            for n in (
                "guide_label",
                "is_user_model",
                "load_user_model",
                "model_source_file",
                "resolve_model_spec",
                "user_model_label",
            )
        },
    }
    for name, value in names.items():
        globals().setdefault(name, value)


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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative number of seconds, got {text}")
    return value


#: numpy's global seed (set by pyro.set_rng_seed) takes 0 <= seed < 2**32.
MAX_SEED = 2**32 - 1


def _estimator(text: str) -> str:
    """An estimator name of :data:`inference.choices.ESTIMATORS`, or ``renyi:ALPHA`` (ALPHA is
    checked with the other options, by :func:`inference.estimators.check_estimator`)."""
    name, sep, _ = text.partition(":")
    if name not in choices.ESTIMATORS or (sep and name != "renyi"):
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {', '.join(choices.ESTIMATORS)}; "
            "renyi:ALPHA for RenyiELBO's alpha)"
        )
    return text


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, {MAX_SEED}], got {value}")
    return value


def _hidden_dims(text: str) -> tuple[int, ...]:
    items = [t.strip() for t in text.split(",")]
    if not any(items):
        raise argparse.ArgumentTypeError("expected at least one hidden width, got none")
    try:
        dims = tuple(int(t) for t in items)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths, got {text!r}") from None
    if any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return dims


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


def _warn(message: str) -> None:
    print(f"elbo-lab: warning: {message}", file=sys.stderr)


class _Renamed(argparse.Action):
    """Store an option's value; a spelling in ``old`` still works for one release, with one
    warning line on stderr naming the option's new spelling (its first option string)."""

    def __init__(self, option_strings, dest, old=(), **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.old = tuple(old)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.old:
            _warn(
                f"{option_string} is deprecated and will be removed in the next release; "
                f"use {self.option_strings[0]}"
            )
        setattr(namespace, self.dest, values)


def _add_renamed(p: argparse.ArgumentParser, new: str, *old: str, help: str, **kwargs) -> None:
    """Add option ``new`` that also answers to its former spellings ``old`` (deprecated)."""
    spelled = ", ".join(old)
    p.add_argument(
        new,
        *old,
        action=_Renamed,
        old=old,
        help=f"{help}; formerly {spelled} (deprecated)",
        **kwargs,
    )


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
        default=choices.MODEL,
        help=f"{', '.join(choices.MODELS)} (default: {choices.MODEL}), or your own Pyro model model(x) of the data "
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
    _add_batching_options(t)
    t.add_argument(
        "--num-particles",
        type=_positive_int,
        default=choices.NUM_PARTICLES,
        help="particles of the training objective: draws of z per SVI step, averaged in its "
        f"loss and gradient ({choices.NUM_PARTICLES})",
    )
    t.add_argument(
        "--eval-every",
        type=_positive_int,
        default=None,
        help="evaluate train/test metrics every N epochs and after the last (default: about "
        "20 times per run; an epoch is one step when the model trains full batch)",
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
    t.add_argument(
        "--force",
        action="store_true",
        help="replace an existing run directory (an elbo-lab run or an empty directory) once the "
        "new run has its first checkpoint",
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its checkpoint; only --epochs, --lr and "
        "--clip-norm may change (recorded in config.json)",
    )
    t.add_argument(
        "--checkpoint-every",
        type=_seconds,
        default=choices.CHECKPOINT_EVERY,
        help="seconds between checkpoints, written at an epoch's end (0: every epoch); also "
        f"at the start, the end and on SIGINT/SIGTERM ({choices.CHECKPOINT_EVERY:g})",
    )
    _add_allow_changed(t)
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    t.add_argument("--json", action="store_true", help="print the final report as JSON")
    t.set_defaults(parser_=t)

    e = sub.add_parser(
        "evaluate",
        help="test-split loss, elbo, reconstruction, kl of a trained run",
        description="Evaluate a trained run on its test split: per-image loss (= -ELBO), elbo, "
        "reconstruction (E_q[log p(x|z)]) and kl (KL(q(z|x) || p(z))) in nats, analytic KL.",
    )
    e.add_argument("run_dir", type=Path, help="a directory written by 'elbo-lab train'")
    e.add_argument("--data", default=None, help="evaluate on other data of the same dimension")
    _add_allow_changed(e)
    _add_threads_option(e)
    e.add_argument(
        "--json", action="store_true", help="print JSON with keys loss, elbo, reconstruction, kl, n"
    )

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
        default=choices.NUM_SAMPLES,
        help=f"importance samples K per data point for L_K ({choices.NUM_SAMPLES})",
    )
    xp.add_argument(
        "--split",
        default=None,
        choices=["test", "train"],
        help="split (test; train for your own model: the data its posterior describes)",
    )
    xp.add_argument("--data", default=None, help="explain other data of the same dimension")
    _add_allow_changed(xp)
    _add_threads_option(xp)
    xp.add_argument("--json", action="store_true", help="print the record as JSON")
    _add_compare_parser(sub)
    _add_watch_parser(sub)
    return parser


def _add_threads_option(p: argparse.ArgumentParser, default: str | None = None) -> None:
    default = default or (
        "one per 1 GFLOP of work in a step, up to one per core; waiting threads sleep, so a busy "
        "machine slows a run down without collapsing it"
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help=f"torch threads for this process (default: {default})",
    )


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


def _add_allow_changed(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-changed",
        action="store_true",
        help="use a run whose model file or data changed since training (with a warning); "
        "without it such a run is refused",
    )


def _add_watch_parser(sub) -> None:
    w = sub.add_parser(
        "watch",
        help="run your SVI script unchanged and name every number it minimizes",
        description="Run SCRIPT.py as 'python SCRIPT.py ARGS' would (same argv, __main__, stdout, "
        "random stream and exit status) while observing every pyro.infer.SVI step and ELBO "
        "module: each step's loss, and every N steps the ELBO = reconstruction - KL on that "
        "step's arguments, with standard errors. At the end (on stderr): loss = -ELBO in the "
        "script's numbers, L_K and the gap; metrics, figures and, for several SVI objects, a "
        "comparison table in --run-dir. Options go before SCRIPT.py.",
    )
    w.add_argument("script", type=Path, help="the Python script to run")
    w.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    w.add_argument(
        "--every",
        type=_positive_int,
        default=None,
        help="decompose every N-th step (default: adaptive, observing costs at most 4%% of the "
        "steps' time)",
    )
    _add_renamed(
        w,
        "--eval-particles",
        "--num-particles",
        type=_positive_int,
        default=choices.WATCH_EVAL_PARTICLES,
        help="draws of z per datum for each decomposition's ELBO and its standard error "
        f"({choices.WATCH_EVAL_PARTICLES})",
    )
    w.add_argument(
        "--num-samples",
        type=_positive_int,
        default=choices.NUM_SAMPLES,
        help=f"importance samples K of L_K ({choices.NUM_SAMPLES})",
    )
    _add_threads_option(w, default="torch's, unless the script sets them")
    w.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="output directory (default: runs/watch-<script name>)",
    )
    w.add_argument("--force", action="store_true", help="replace an existing run directory")
    w.add_argument("--no-progress", action="store_true", help="hide the progress line")


def _names(text: str) -> tuple[str, ...]:
    """Comma-separated parameter names ('' for none)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]!r} is not a parameter name")
    return names


def _name(text: str) -> str:
    (name,) = _names(text) or ("",)
    if not name or "," in text:
        raise argparse.ArgumentTypeError(f"expected one parameter name, got {text!r}")
    return name


def _add_batching_options(p: argparse.ArgumentParser) -> None:
    """How --batch-size cuts your own model's arguments (inference.batching.Batching)."""
    p.add_argument(
        "--batch-args",
        type=_names,
        default=None,
        metavar="NAMES",
        help="your model's parameters that hold the data rows, comma-separated (e.g. X,y): a "
        "mini-batch indexes them along dim 0; '' when the plate picks its rows itself "
        "(--subsample-arg). Default: the first parameter, if the model takes num_data",
    )
    p.add_argument(
        "--size-arg",
        type=_name,
        default=None,
        metavar="NAME",
        help="the keyword that receives N, the rows of all the data, so that the model's plate "
        "scales a batch of B rows by N / B (e.g. num_data for pyro.plate('data', num_data))",
    )
    p.add_argument(
        "--subsample-arg",
        type=_name,
        default=None,
        metavar="NAME",
        help="the keyword that receives the batch's row indices, for a plate "
        "pyro.plate('data', N, subsample=ind) (SVI Part II)",
    )


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


def _add_training_options(p: argparse.ArgumentParser, *, estimator: str, every: str) -> None:
    """The options that say what is trained on which data, shared by train and compare."""
    p.add_argument(
        "--data",
        default=choices.DATA,
        help="'digits' (embedded, default), 'mnist:DIR' or a DIR of MNIST IDX files, "
        "or a .npy/.npz file (N x D or N x H x W)",
    )
    p.add_argument(
        "--latent-dim",
        type=_positive_int,
        default=choices.LATENT_DIM,
        help=f"latent dimension L ({choices.LATENT_DIM})",
    )
    p.add_argument(
        "--hidden-dims",
        type=_hidden_dims,
        default=choices.HIDDEN_DIMS,
        help="comma-separated hidden widths of the VAE encoder/decoder "
        f"({','.join(map(str, choices.HIDDEN_DIMS))})",
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
        help=f"mini-batch size ({choices.BATCH_SIZE}; all rows for your own model unless it "
        "takes num_data or declares --batch-args/--subsample-arg)",
    )
    p.add_argument(
        "--lr",
        type=_positive_float,
        default=choices.LEARNING_RATE,
        help=f"learning rate ({choices.LEARNING_RATE:g})",
    )
    p.add_argument(
        "--optimizer",
        default=choices.OPTIMIZER,
        choices=list(choices.OPTIMIZERS),
        help="torch optimizer over the pair's parameters: adam (fused where torch has it), "
        f"adamw or sgd ({choices.OPTIMIZER})",
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=choices.SEED,
        help=f"random seed in [0, 2^32 - 1]{every} ({choices.SEED}); same seed, same numbers",
    )
    p.add_argument(
        "--estimator",
        default=estimator,
        type=_estimator,
        metavar="{" + ",".join(choices.ESTIMATORS) + "}",
        help="ELBO estimator: auto = TraceMeanField_ELBO where its analytic KL is valid for "
        "the model and guide (the VAE), else Trace_ELBO; meanfield = TraceMeanField_ELBO "
        "(refused where its analytic KL would be wrong, e.g. an autoguide over a constrained "
        "latent); trace = Trace_ELBO (Monte-Carlo KL); jit / jit-meanfield = their "
        "compiled versions; graph = TraceGraph_ELBO; enum = TraceEnum_ELBO; renyi:ALPHA = "
        "RenyiELBO(alpha=ALPHA) with --num-particles K > 1 (bare renyi: alpha 0, the "
        f"importance-weighted bound) ({estimator})",
    )
    p.add_argument(
        "--jit",
        default=choices.JIT,
        choices=list(choices.JIT_MODES),
        help="compile the estimator with torch.export (same loss and gradients, less Python "
        "per step; torch.compile for long runs): on, off, or auto = when model and guide are "
        f"declared static, as every built-in one is ({choices.JIT})",
    )
    _add_threads_option(p)
    p.add_argument("--device", default=choices.DEVICE, help=f"cpu or cuda[:N] ({choices.DEVICE})")
    p.add_argument(
        "--dtype",
        default=choices.DTYPE,
        choices=list(choices.DTYPES),
        help=f"float32 or float64 ({choices.DTYPE})",
    )


def _add_compare_parser(sub) -> None:
    c = sub.add_parser(
        "compare",
        help="fit several guides to one model under the same budget and compare them",
        description="Train each guide with the same data, options and seed, then tabulate on "
        "the test split (training data for autoguides) the ELBO, reconstruction, KL, L_K, the "
        "gap L_K - ELBO, PSIS k-hat, training time and parameter count (nats per datum). "
        "Writes comparison.csv/.json/.md/.png and posterior_<guide>.nc (ArviZ) to --run-dir.",
    )
    c.add_argument(
        "--model",
        default=choices.MODEL,
        help=f"{', '.join(choices.MODELS)}, or your Pyro model model(x) as FILE.py:NAME or "
        f"package.module:NAME (then --guides are autoguide names) (default: {choices.MODEL})",
    )
    c.add_argument(
        "--guides",
        default=None,
        help="comma-separated: diag,full,flow for the built-in models (default: all three); "
        "AutoDelta,AutoNormal,AutoMultivariateNormal,AutoLowRankMultivariateNormal,"
        "AutoIAFNormal for a user model (default: AutoNormal,AutoMultivariateNormal)",
    )
    # Flow guides have no closed-form KL, so guides are compared under Trace_ELBO by default.
    _add_training_options(
        c, estimator=choices.COMPARE_ESTIMATOR, every=", the same for every guide"
    )
    c.add_argument(
        "--num-samples",
        type=_positive_int,
        default=choices.NUM_SAMPLES,
        help=f"importance samples K of L_K ({choices.NUM_SAMPLES})",
    )
    _add_renamed(
        c,
        "--eval-particles",
        "--elbo-particles",
        type=_positive_int,
        default=choices.COMPARE_EVAL_PARTICLES,
        help="draws of z per datum for the reported ELBO and its standard error "
        f"({choices.COMPARE_EVAL_PARTICLES})",
    )
    c.add_argument(
        "--num-draws",
        type=_positive_int,
        default=choices.NUM_DRAWS,
        help=f"posterior draws per guide saved for ArviZ, as 4 chains ({choices.NUM_DRAWS})",
    )
    _add_renamed(
        c,
        "--run-dir",
        "--out",
        type=Path,
        default=None,
        help="output directory (default: runs/compare-<model>-<data>-seed<seed>)",
    )
    c.add_argument("--force", action="store_true", help="replace an existing output directory")
    c.add_argument("--json", action="store_true", help="print the table as JSON")


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
    return "\n".join(
        [
            f"Pyro minimized loss = -ELBO = KL - E[log p(x|z)] = {m.kl:.2f} - ({m.reconstruction:.2f})"
            f" = {m.loss:.2f} nats/{unit}",
            f"  ELBO = E[log p(x|z)] - KL = {m.reconstruction:.2f} - {m.kl:.2f} = {m.elbo:.2f}{se} "
            f"nats/{unit} (maximized; a lower bound on log p(x))",
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


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
        refuse_to_replace(out, "--run-dir")
    _check_writable(out)
    spec = {"model": args.model, "latent_dim": args.latent_dim, "hidden_dims": args.hidden_dims}
    _use_threads(
        args, {**spec, "data_dim": 64}, args.batch_size or choices.BATCH_SIZE, backward=True
    )
    options = CompareConfig(
        num_samples=args.num_samples, elbo_particles=args.eval_particles, num_draws=args.num_draws
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
    owner = RunDirectory.create(out, force=args.force, option="--run-dir")
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
                    guides[guide_label(n)] = load_user_guide(n, model, option="--guides")
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
        num_particles=args.eval_particles,
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


def _os_error(exc: OSError) -> str:
    """``<path>: <problem>`` for an OSError (ENOSPC, EROFS, EACCES, ENAMETOOLONG, ...)."""
    path = exc.filename if exc.filename is not None else "elbo-lab"
    if len(str(path)) > 200:
        path = f"{str(path)[:100]}...{str(path)[-60:]}"
    return f"{path}: {exc.strerror or exc}"


def _load_library_as_program() -> None:
    """:func:`_load_library` in a process that exists to run one command, with Python's cyclic
    garbage collector kept off the millions of objects that torch, Pyro and matplotlib load.

    Imports allocate objects that live until the process ends; the collector's full passes go
    over all of them as the heap grows, and once more as Python shuts down: about 1.6 s of CPU
    of the 7 s that a default ``train`` took (BENCHMARKS.md, "Whole runs"). The collector pauses
    while the library loads; what it loaded is then frozen (:func:`gc.freeze`: later passes
    skip it), and so is everything at exit, the freeze running as the last exit handler. Exit
    handlers still run and streams are flushed; our files are closed when written, so no
    finalizer waits. Not for ``watch`` (the user's script keeps its own process) and not when
    ``main`` is called with arguments, as from Python or a test: there, frozen objects would
    outlive the call.
    """
    gc.disable()
    try:
        _load_library()
    finally:
        gc.freeze()
        gc.enable()
    atexit.unregister(gc.freeze)  # once, however often main runs in one process
    atexit.register(gc.freeze)  # registered first, so run last of the handlers registered later


def main(argv: list[str] | None = None) -> int:
    """Run one command; every error is one line on stderr: exit 2 for the user's input and
    the file system, 1 for faults (a non-finite loss, memory exhausted), 128 + N on signal N."""
    program = argv is None  # the process runs this one command (console script, python -m)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        # Before torch loads OpenMP: threads that wait at a barrier sleep instead of spinning,
        # so a run with several threads slows down on a busy machine but does not collapse.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        if program and args.command != "watch":
            _load_library_as_program()
        else:
            _load_library()
        threads = getattr(args, "threads", None)
        if threads and threads > available_cores():
            raise OptionError(
                f"--threads: {threads} is more than the {available_cores()} cores available"
            )
        if threads:
            import torch

            torch.set_num_threads(threads)
        if args.command == "watch":  # the script runs as it would alone: its logging, stdout
            return COMMANDS["watch"](args)
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="%(name)s: %(message)s",
        )
        args.argv_, args.out_ = argv, sys.stdout
        # what the user's model prints goes to stderr: stdout carries the report (or JSON) only
        with contextlib.redirect_stdout(sys.stderr):
            return COMMANDS[args.command](args)
    except ElboLabError as exc:
        print(f"elbo-lab: error: {exc}", file=sys.stderr)
        distributed = sys.modules.get(f"{__package__}.distributed")  # loaded if it can fail
        if distributed is not None and isinstance(exc, distributed.DistributedError):
            # a peer died or hung: the process group's threads still wait on it, and tearing
            # them down at interpreter exit can abort ("terminate called ..."); leave at once
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except OSError as exc:
        print(f"elbo-lab: error: {_os_error(exc)}", file=sys.stderr)
        return 2
    except MemoryError:
        print("elbo-lab: error: out of memory", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        if "can't allocate memory" not in str(exc) and "out of memory" not in str(exc):
            raise
        print(f"elbo-lab: error: out of memory ({_first_line(exc)[:160]})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("elbo-lab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
