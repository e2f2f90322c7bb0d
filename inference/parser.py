"""The ``elbo-lab`` command line's options: the parser, its option groups and the checks on each
value. It imports nothing but the standard library and :mod:`inference.choices`, so ``--help``
and a refused option answer at once, before torch loads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import choices
from .messages import warn

__all__ = ["build_parser"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _importance_samples(text: str) -> int:
    """K of L_K: at least 2. L_1 is the ELBO itself (one draw, no log-mean-exp), so it bounds
    nothing beyond it, has no standard error across draws and no tail for PSIS k̂."""
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            "K must be at least 2: L_1 is the ELBO itself, with no gap to show, no standard "
            "error across draws and no tail for PSIS k̂"
        )
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


class _Renamed(argparse.Action):
    """Store an option's value; a spelling in ``old`` still works for one release, with one
    warning line on stderr naming the option's new spelling (its first option string)."""

    def __init__(self, option_strings, dest, old=(), **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.old = tuple(old)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.old:
            warn(
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

    _add_train_parser(sub)
    _add_evaluate_parser(sub)
    _add_explain_parser(sub)
    _add_compare_parser(sub)
    _add_watch_parser(sub)
    return parser


def _add_train_parser(sub) -> None:
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
        help="for your own model: your guide as FILE.py:NAME, or a pyro.infer.autoguide class "
        "by name (AutoNormal by default; AutoDiagonalNormal, AutoMultivariateNormal, "
        "AutoStructured, AutoGaussian, ...: the README lists which apply); the built-in models "
        "train their own mean-field encoder, diag",
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
        f"{choices.EVALUATIONS_PER_RUN} times per run, and within "
        f"{choices.EVAL_SHARE * 100:.0f}%% of the training time: every 8 epochs or more for "
        "rows in chunks with a 20%% test split (built-in models, num_data, --batch-args), 100 / "
        "--num-particles or more for a model with global latents; an epoch is one step when the "
        "model trains full batch)",
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


def _add_evaluate_parser(sub) -> None:
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


def _add_explain_parser(sub) -> None:
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
        type=_importance_samples,
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


def _add_threads_option(p: argparse.ArgumentParser, default: str | None = None) -> None:
    default = default or (
        "one per 1/3 GFLOP of a forward pass over a step's or a chunk's rows, up to one per "
        "core; for the VAE in float32, more than one only where a quick probe finds them "
        "faster now (train: a large "
        "VAE's steps time themselves on one and more threads as the run goes); waiting "
        "threads sleep, so a busy machine slows a run down without collapsing it"
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help=f"torch threads for this process (default: {default})",
    )


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
        type=_importance_samples,
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
        f"package.module:NAME (default: {choices.MODEL})",
    )
    c.add_argument(
        "--guides",
        default=None,
        help="comma-separated: diag,full,flow for the built-in models (default: all three); "
        "for a user model, guides as FILE.py:NAME and pyro.infer.autoguide class names "
        "(default: AutoNormal,AutoMultivariateNormal)",
    )
    # Flow guides have no closed-form KL, so guides are compared under Trace_ELBO by default.
    _add_training_options(
        c, estimator=choices.COMPARE_ESTIMATOR, every=", the same for every guide"
    )
    c.add_argument(
        "--num-samples",
        type=_importance_samples,
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
