"""User-facing errors: one line that names the file or parameter and the problem."""

import functools
import warnings


class ElboLabError(Exception):
    """A mistake in the user's input (data, options, run directory), reported without a traceback.

    ``option`` is the library parameter the message is about (``num_draws``), or None. With
    one, ``str(exc)`` reads ``num_draws: must be a positive integer, got 0``, and the command
    line prints the option that sets it instead (``elbo-lab: error: --num-draws: must be ...``,
    from its table :data:`inference.messages.FLAGS`) and exits with status 2. Other parameters a
    message refers to are written as keywords (``use estimator='trace'``), which the command
    line words as options too (``use --estimator trace``).
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


def renamed_keywords(**renames: str):
    """Class decorator: the constructor also takes each old keyword (``old="new"``) for one
    release, with a DeprecationWarning, and ``obj.old`` reads ``obj.new`` (:func:`renamed_field`).
    Put it above ``@dataclass``: the fields, ``replace`` and ``asdict`` know only the new names."""

    def decorate(cls):
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(f"{cls.__name__}() takes {new} or its old name {old}, not both")
                warnings.warn(
                    f"{cls.__name__}({old}=...) is deprecated and will be removed in the next "
                    f"release; use {new}=...",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        for old, new in renames.items():
            setattr(cls, old, renamed_field(old, new))
        return cls

    return decorate


def renamed_field(
    old: str, new: str, why: str = " and will be removed in the next release"
) -> property:
    """A read-only property ``old`` that returns the field ``new`` with a DeprecationWarning
    (``<Class>.<old> is deprecated<why>; use .<new>``)."""

    def get(self):
        warnings.warn(
            f"{type(self).__name__}.{old} is deprecated{why}; use .{new}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(self, new)

    return property(get, doc=f"Deprecated name of :attr:`{new}`.")
