"""How the command line words what the library says: its parameters as options, one line per
error or warning on stderr.
"""

from __future__ import annotations

import re
import sys

from .errors import ElboLabError

__all__ = ["FLAGS", "as_options", "error_line", "first_line", "warn"]


#: Library parameter -> the option that sets it. The library words its errors in its own
#: parameters (``OptionError(..., option="learning_rate")``, hints as ``estimator='trace'``);
#: :func:`error_line` words them as the command line's options.
FLAGS = {
    "allow_changed": "--allow-changed",
    "batch_args": "--batch-args",
    "batch_size": "--batch-size",
    "batching": "--batch-args",
    "checkpoint_every": "--checkpoint-every",
    "clip_norm": "--clip-norm",
    "data": "--data",
    "device": "--device",
    "dtype": "--dtype",
    "epochs": "--epochs",
    "estimator": "--estimator",
    "eval_every": "--eval-every",
    "eval_particles": "--eval-particles",
    "every": "--every",
    "force": "--force",
    "guide": "--guide",
    "guides": "--guides",
    "hidden_dims": "--hidden-dims",
    "jit": "--jit",
    "latent_dim": "--latent-dim",
    "learning_rate": "--lr",
    "model": "--model",
    "num_draws": "--num-draws",
    "num_particles": "--num-particles",
    "num_samples": "--num-samples",
    "optimizer": "--optimizer",
    "resume": "--resume",
    "run_dir": "--run-dir",
    "seed": "--seed",
    "size_arg": "--size-arg",
    "split": "--split",
    "subsample_arg": "--subsample-arg",
    "threads": "--threads",
}

#: ``name=True``, ``name='value'`` or ``name=value`` in a library message.
_KEYWORD = re.compile(r"\b([a-z_]+)=(?:(True)\b|'([^']*)'|([\w.:/-]+))")


def as_options(message: str) -> str:
    """A library message with the keywords it names worded as options (``use estimator='trace'``
    -> ``use --estimator trace``, ``force=True`` -> ``--force``); other keywords unchanged."""

    def as_flag(m: re.Match) -> str:
        name, flag, quoted, plain = m.groups()
        if name not in FLAGS:
            return m.group(0)
        return FLAGS[name] if flag else f"{FLAGS[name]} {quoted if quoted is not None else plain}"

    return _KEYWORD.sub(as_flag, message)


def error_line(exc: ElboLabError) -> str:
    """The one line the command line prints for a library error: the parameter it names and the
    keywords its hint names worded as options (``num_draws: ...`` -> ``--num-draws: ...``)."""
    message = as_options(exc.message)
    return f"{FLAGS.get(exc.option, exc.option)}: {message}" if exc.option else message


def warn(message: str) -> None:
    print(f"elbo-lab: warning: {as_options(message)}", file=sys.stderr)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
