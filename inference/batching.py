"""Which of a model's own arguments hold the data rows, and how a mini-batch reaches its plate.

A Pyro model takes whatever arguments its author chose: ``model(data)``, ``model(X, y=None)``,
``model(data, num_data=None)``, a list of scalar tensors. elbo-lab passes them through as
``SVI.step(*args, **kwargs)`` does. Mini-batching is declared, never guessed from the signature
(NumPyro's ``static_kwargs`` is the same idea from the other side): a :class:`Batching` names the
arguments that are sliced along dim 0 and the keyword that receives the full size N, so the
model's plate (``pyro.plate("data", N, subsample=...)`` or elbo-lab's
``models.plate.data_plate(x, num_data)``) scales a batch of B rows by N / B and the mini-batch
ELBO is unbiased for the whole data's.

    model(X, y, num_data=None)  +  Batching(args=("X", "y"), size="num_data")

A model that takes ``num_data`` and is given no batching gets the default of elbo-lab's own
models: its first argument is the data rows, ``num_data`` the size.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

__all__ = [
    "Batching",
    "ModelArgs",
    "check_batching",
    "chunks",
    "default_batching",
    "device_of",
    "num_rows",
    "signature",
    "takes_num_data",
]


@dataclass(frozen=True)
class Batching:
    """Mini-batching of a model's arguments.

    Attributes:
        args: names of the model's parameters whose values are indexed along dim 0 (tensors,
            or lists/tuples of per-row values); every one must have the same number of rows.
            Empty for a model whose plate picks its rows itself, ``pyro.plate("data", len(x),
            subsample=ind)`` with ``obs=x[ind]`` (SVI Part II): its arguments stay whole, only
            ``subsample`` receives the batch's rows, and N is the first argument's rows.
        size: the keyword that receives N, the number of rows of the whole data set, or None
            when the model's plate needs no size (it is then given the subsample instead).
        subsample: the keyword that receives the batch's row indices (``pyro.plate(...,
            subsample=ind)``), or None.
    """

    args: tuple[str, ...]
    size: str | None = "num_data"
    subsample: str | None = None

    def __post_init__(self):
        if isinstance(self.args, str):
            object.__setattr__(self, "args", (self.args,))
        object.__setattr__(self, "args", tuple(self.args))
        if not self.args and self.subsample is None:
            raise ValueError(
                "batching: name at least one batched argument, or the subsample keyword of a "
                "plate that picks its rows from whole arguments (pyro.plate(..., subsample=ind))"
            )
        if self.size is None and self.subsample is None:
            raise ValueError(
                "batching: the model must learn of the subsampling, through a size keyword "
                "(e.g. num_data) or a subsample keyword, or its ELBO would not be scaled"
            )


class ModelArgs(NamedTuple):
    """A model's positional and keyword arguments, as ``SVI.step(*args, **kwargs)`` takes them."""

    args: tuple
    kwargs: dict[str, Any]

    @classmethod
    def of(cls, value: Any) -> ModelArgs:
        """``ModelArgs`` from itself, an ``(args, kwargs)`` pair, or one data tensor."""
        return cls.of_pair(value) or cls((value,), {})

    @classmethod
    def of_pair(cls, value: Any) -> ModelArgs | None:
        """``value`` if it is a ``ModelArgs``, as one if it is an ``(args, kwargs)`` pair, else
        None."""
        if isinstance(value, ModelArgs):
            return value
        if (
            isinstance(value, tuple)
            and len(value) == 2
            and isinstance(value[0], tuple | list)
            and isinstance(value[1], Mapping)
        ):
            return cls(tuple(value[0]), dict(value[1]))
        return None


def takes_num_data(model: Callable) -> bool:
    """Whether ``model`` accepts a ``num_data`` keyword to scale a mini-batch to the full data."""
    return "num_data" in _parameters(model)


def signature(model: Callable) -> inspect.Signature:
    """The signature the model is called with: ``forward``'s for an ``nn.Module`` (whose own
    ``__call__`` takes ``*args, **kwargs``)."""
    target = model.forward if isinstance(model, torch.nn.Module) else model
    return inspect.signature(target)


def _parameters(model: Callable) -> Mapping[str, inspect.Parameter]:
    try:
        return signature(model).parameters
    except (TypeError, ValueError):
        return {}


def default_batching(model: Callable) -> Batching | None:
    """elbo-lab's convention for a model that takes ``num_data``: its first parameter holds
    the rows and ``num_data`` their number. None for any other model (trained full batch)."""
    params = list(_parameters(model))
    if "num_data" not in params or params[0] == "num_data":
        return None
    return Batching(args=(params[0],), size="num_data")


def _bind(model: Callable, args: Sequence, kwargs: Mapping) -> inspect.BoundArguments:
    try:
        return signature(model).bind_partial(*args, **kwargs)
    except TypeError as exc:
        raise ValueError(f"the model's arguments do not fit its signature: {exc}") from None


def _length(value: Any) -> int:
    if torch.is_tensor(value):
        if value.dim() == 0:
            raise ValueError("a 0-dimensional tensor has no rows")
        return int(value.shape[0])
    return len(value)


def num_rows(model: Callable, args: Sequence, kwargs: Mapping, batching: Batching | None) -> int:
    """N: the rows of the batched arguments (all equal), else of the first argument that has
    rows (a tensor's dim 0, a list's length), else 1. Per-datum values are totals / N."""
    if batching is not None and batching.args:
        bound = _bind(model, args, kwargs).arguments
        sizes = {}
        for name in batching.args:
            if name not in bound:
                raise ValueError(f"batching: the model has no argument {name!r} in this call")
            try:
                sizes[name] = _length(bound[name])
            except (TypeError, ValueError):
                raise ValueError(f"batching: argument {name!r} has no rows to batch") from None
        if len(set(sizes.values())) > 1:
            raise ValueError(f"batching: the batched arguments differ in rows: {sizes}")
        return next(iter(sizes.values()))
    for value in (*args, *kwargs.values()):
        try:
            return _length(value)
        except (TypeError, ValueError):
            continue
    return 1


def slicer(
    model: Callable, args: Sequence, kwargs: Mapping, batching: Batching | None
) -> Callable[[torch.Tensor, int | None], ModelArgs]:
    """:func:`take` with the binding to the model's signature done once: ``cut(rows,
    num_data)`` indexes only the batched arguments, as a training step needs."""
    if batching is None:
        whole = ModelArgs(tuple(args), dict(kwargs))
        return lambda rows, num_data: whole
    bound = _bind(model, args, kwargs)
    names = list(bound.arguments)
    positional = len(bound.args)
    batched = [names.index(n) for n in batching.args]
    values = [bound.arguments[n] for n in names]

    def cut(rows: torch.Tensor, num_data: int | None) -> ModelArgs:
        new = list(values)
        for i in batched:
            value = values[i]
            if torch.is_tensor(value):
                new[i] = value[rows.to(value.device)]
            else:
                new[i] = type(value)(value[j] for j in rows.tolist())
        extra = {}
        if batching.size is not None and num_data is not None:
            extra[batching.size] = num_data
        if batching.subsample is not None and num_data is not None:
            extra[batching.subsample] = rows
        kw = {n: new[i] for i, n in enumerate(names) if i >= positional}
        return ModelArgs(tuple(new[:positional]), {**kw, **extra})

    return cut


def take(
    model: Callable,
    args: Sequence,
    kwargs: Mapping,
    batching: Batching | None,
    rows: torch.Tensor,
    num_data: int | None,
) -> ModelArgs:
    """The model's arguments for ``rows`` of the data: batched arguments indexed by ``rows``;
    the size keyword set to ``num_data`` (None: left out, the plate is then as large as the
    batch, as evaluation in chunks needs) and the subsample keyword to ``rows``."""
    if batching is None:
        return ModelArgs(tuple(args), dict(kwargs))
    bound = _bind(model, args, kwargs)
    for name in batching.args:
        value = bound.arguments[name]
        if torch.is_tensor(value):
            bound.arguments[name] = value[rows.to(value.device)]
        else:
            bound.arguments[name] = type(value)(value[i] for i in rows.tolist())
    extra = {}
    if batching.size is not None and num_data is not None:
        extra[batching.size] = num_data
    if batching.subsample is not None and num_data is not None:
        extra[batching.subsample] = rows
    return ModelArgs(tuple(bound.args), {**bound.kwargs, **extra})


def device_of(args: Sequence, kwargs: Mapping) -> torch.device:
    """The device of the first tensor among the model's arguments (CPU if none)."""
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value):
            return value.device
    return torch.device("cpu")


def chunks(
    model: Callable,
    args: Sequence,
    kwargs: Mapping,
    batching: Batching | None,
    size: int | None,
) -> Iterator[ModelArgs]:
    """The model's arguments in consecutive chunks of ``size`` rows, in order, each a full
    plate (:func:`take` with no size keyword), as evaluation needs; with ``size=None`` or no
    ``batching`` one call with the arguments as given."""
    n = num_rows(model, args, kwargs, batching)
    whole = size is None or batching is None or not batching.args  # nothing to cut
    step = n if whole else size
    device = device_of(args, kwargs)
    for start in range(0, n, step):
        if step == n:
            yield ModelArgs(tuple(args), dict(kwargs))
        else:
            rows = torch.arange(start, min(start + step, n), device=device)
            yield take(model, args, kwargs, batching, rows, None)


def check_batching(model: Callable, args: Sequence, kwargs: Mapping, batching: Batching) -> int:
    """Check a declared batching against the model and its arguments; return N.

    Every name must be a parameter of the model, the batched arguments must have the same
    number of rows N, and a batch of one row must reach the model's plates scaled by N: some
    site's ``scale`` is N (``pyro.plate("data", N, subsample=ind)``, or a plate of size
    ``num_data`` over a batch), or the mini-batch ELBO would not be unbiased for the whole's.

    Raises:
        ValueError: ``"FIELD: problem"``, FIELD the one at fault (``args``, ``size``,
            ``subsample``), or ``batching`` when the declaration as a whole does not fit.
    """
    import pyro
    from pyro import poutine

    parameters = _parameters(model)
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    fields = {"args": batching.args, "size": (batching.size,), "subsample": (batching.subsample,)}
    for field, names in fields.items():
        for name in names:
            if name is not None and name not in parameters and not open_ended:
                raise ValueError(
                    f"{field}: the model has no parameter {name!r} "
                    f"(its parameters: {', '.join(parameters) or 'none'})"
                )
    try:
        n = num_rows(model, args, kwargs, batching)
    except ValueError as exc:
        raise ValueError(f"args: {str(exc).removeprefix('batching: ')}") from None
    if n < 2:
        return n
    call = take(model, args, kwargs, batching, torch.zeros(1, dtype=torch.long), n)
    try:
        with torch.random.fork_rng(devices=[]), poutine.block(), pyro.validation_enabled(False):
            trace = poutine.trace(model).get_trace(*call.args, **call.kwargs)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(
            f"batching: the model fails on a batch of 1 of the {n} rows cut as declared "
            f"({type(exc).__name__}: {first})"
        ) from None
    scales = [float(site["scale"]) for site in trace.nodes.values() if site["type"] == "sample"]
    if not any(abs(scale - n) <= 1e-6 * n for scale in scales):
        raise ValueError(
            f"batching: a batch of 1 of the {n} rows reaches the model's plates "
            f"unscaled (site scales {sorted(set(scales)) or 'none'}, not {n}): the plate must "
            "learn N through the size keyword (pyro.plate('data', num_data)) or take the "
            "batch's rows through the subsample keyword (pyro.plate('data', N, subsample=ind))"
        )
    return n
