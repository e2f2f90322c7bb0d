"""User-facing errors: one line that names the file or option and the problem."""

import warnings


class ElboLabError(Exception):
    """A mistake in the user's input (data, options, run directory), reported without a traceback.

    ``option`` names the library parameter the message is about (``num_draws``), or is None:
    ``str(exc)`` then reads ``num_draws: must be a positive integer, got 0``, and the command line
    prints the flag that sets it instead (``elbo-lab: error: --num-draws: must be ...``, from
    its table :data:`inference.cli.FLAGS`) and exits with status 2. Other parameters a message
    refers to are written as keywords (``estimator='trace'``), which the command line words as
    flags too.
    """

    def __init__(self, message: str = "", *, option: str | None = None):
        super().__init__(message)
        self.message = message
        self.option = option

    def __str__(self) -> str:
        return f"{self.option}: {self.message}" if self.option else self.message


class DataError(ElboLabError, ValueError):
    """A data file or array that cannot be used: missing, unreadable, malformed or out of support."""


class OptionError(ElboLabError, ValueError):
    """An option value or combination of options that is invalid."""


class RunError(ElboLabError):
    """A run directory or checkpoint that cannot be used (missing, foreign, truncated, mismatched)."""


class NumericalError(RuntimeError):
    """Training produced a non-finite loss or gradient; the last good checkpoint is kept."""


def warn_renamed(owner: str, old: str, new: str) -> None:
    """Warn (DeprecationWarning) that ``owner``'s keyword ``old`` is now called ``new``; the old
    name is accepted for one release."""
    warnings.warn(
        f"{owner}({old}=...) is deprecated and will be removed in the next release; use {new}=...",
        DeprecationWarning,
        stacklevel=4,
    )


def renamed_field(owner: str, old: str, new: str) -> property:
    """A read-only property ``old`` that returns the field ``new`` with a DeprecationWarning."""

    def get(self):
        warnings.warn(
            f"{owner}.{old} is deprecated and will be removed in the next release; use .{new}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(self, new)

    return property(get, doc=f"Deprecated name of :attr:`{new}`.")
