"""User-facing errors: one line that names the file or option and the problem."""


class ElboLabError(Exception):
    """A mistake in the user's input (data, options, run directory), reported without a traceback.

    The command line prints ``elbo-lab: error: <message>`` and exits with status 2.
    """


class DataError(ElboLabError, ValueError):
    """A data file or array that cannot be used: missing, unreadable, malformed or out of support."""


class OptionError(ElboLabError, ValueError):
    """An option value or combination of options that is invalid."""


class RunError(ElboLabError):
    """A run directory or checkpoint that cannot be used (missing, foreign, truncated, mismatched)."""


class NumericalError(RuntimeError):
    """Training produced a non-finite loss or gradient; the last good checkpoint is kept."""
