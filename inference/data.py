"""Data sets for elbo-lab: embedded digits, MNIST IDX files, user arrays (.npy/.npz), and the
arguments a user's own model is conditioned on.

The built-in models' loaders return a :class:`Dataset` of float tensors of shape ``(N, D)`` with
a deterministic train/test split. A user's model gets :class:`ModelData`: its own positional and
keyword arguments, as ``SVI.step(*args, **kwargs)`` takes them (:func:`load_model_data`). Every
loader raises :class:`~inference.errors.DataError` with a one-line message that names the file
and the problem for anything it cannot use.
"""

from __future__ import annotations

import gzip
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .batching import ModelArgs
from .errors import DataError

__all__ = [
    "Dataset",
    "ModelData",
    "load_model_data",
    "binarize",
    "check_support",
    "load_array",
    "load_data",
    "load_digits",
    "load_mnist",
    "read_idx",
]

#: Seed of the one-off binarization and of the train/test split; fixed so every run sees one data set.
DATA_SEED = 0
TEST_FRACTION = 0.2
#: The digits' raw intensities (0..16) and labels, shipped inside the package.
DIGITS_FILE = "digits.npz"


@dataclass(frozen=True)
class Dataset:
    """A train/test split of flattened observations.

    Attributes:
        name: where the data came from (``"digits"``, a directory or a file path).
        train: ``(N_train, D)`` float64 tensor; float32 where the file holds float32 (the
            copy a float64 intermediate would cost, 0.38 GB for 60,000 x 784 rows, is saved,
            and :meth:`to` from float32 is exact).
        test: ``(N_test, D)``, the same dtype.
        image_shape: ``(H, W)`` when the rows are images, else ``None``.
        train_labels, test_labels: ``(N,)`` int64 labels when known, else ``None``.
    """

    name: str
    train: torch.Tensor
    test: torch.Tensor
    image_shape: tuple[int, int] | None = None
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None

    @property
    def data_dim(self) -> int:
        return int(self.train.shape[1])

    def to(self, device: str | torch.device, dtype: torch.dtype) -> Dataset:
        """The same data on ``device`` in ``dtype`` (labels stay int64).

        Raises:
            DataError: a value that is finite in float64 overflows ``dtype`` (e.g. 1e39 in
                float32): the finiteness check holds for the numbers that are trained on.
        """
        train, test = (x.to(device=device, dtype=dtype) for x in (self.train, self.test))
        for split, x in (("train", train), ("test", test)):
            if x.is_floating_point() and not _all_finite(x):
                bad = int((~torch.isfinite(x)).sum())
                raise DataError(
                    f"{self.name}: {bad} {split} value(s) overflow {str(dtype).removeprefix('torch.')}"
                    " (use dtype='float64' or rescale the data)"
                )
        return Dataset(
            self.name, train, test, self.image_shape, self.train_labels, self.test_labels
        )


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every value of ``x`` is finite. A sum is finite only if every term is (an Inf
    or NaN makes it Inf or NaN), so one reduction answers, without the elementwise mask (0.2 s
    and 47 MB for 60,000 x 784 float32 rows); the mask only where the sum itself overflowed."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def binarize(x: np.ndarray, seed: int = DATA_SEED) -> np.ndarray:
    """Draw x_bin ~ Bernoulli(x) once, elementwise, with a fixed seed (x in [0, 1])."""
    rng = np.random.default_rng(seed)
    return (rng.random(x.shape) < x).astype(np.float64)


def _split(
    x: np.ndarray, labels: np.ndarray | None, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    n = x.shape[0]
    order = np.random.default_rng(seed).permutation(n)
    # both parts non-empty for n >= 2 (round(0.2 * 2) = 0 would leave no test rows)
    n_test = min(n - 1, max(1, int(round(test_fraction * n)))) if n > 1 else 0
    test_idx, train_idx = order[:n_test], order[n_test:]
    # np.take copies whole rows: the same arrays as x[idx], 5-10% faster for 75,000 x 784 (the
    # copy's time is mostly page faults on the new array: 0.08 s float32 without huge pages)
    train, test = np.take(x, train_idx, axis=0), np.take(x, test_idx, axis=0)
    if labels is None:
        return train, test, None, None
    return train, test, labels[train_idx], labels[test_idx]


def _labels(a: np.ndarray | None) -> torch.Tensor | None:
    # a copy: IDX labels are read-only views of the file's bytes
    return None if a is None else torch.from_numpy(np.array(a, dtype=np.int64))


def _rows_tensor(rows: np.ndarray) -> torch.Tensor:
    """float32 rows as they are (no copy; every later cast from float32 is exact), any other
    numbers as float64."""
    dtype = torch.float32 if rows.dtype == np.dtype(np.float32) else torch.float64
    return torch.as_tensor(np.ascontiguousarray(rows), dtype=dtype)


def _dataset(name, train, test, image_shape=None, train_labels=None, test_labels=None) -> Dataset:
    return Dataset(
        name,
        _rows_tensor(train),
        _rows_tensor(test),
        image_shape,
        _labels(train_labels),
        _labels(test_labels),
    )


def load_digits(binary: bool = True, test_fraction: float = TEST_FRACTION) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images), scaled to [0, 1].

    The images ship with the package (``inference/digits.npz``, written from scikit-learn's copy
    by ``scripts/make_digits.py``), so loading them needs neither scikit-learn nor its import
    time. With ``binary`` (the default) each pixel is drawn once as Bernoulli(intensity) with a
    fixed seed, so a Bernoulli decoder is a proper likelihood. The split is a fixed permutation:
    1438 train and 359 test images.
    """
    with (resources.files(__package__) / DIGITS_FILE).open("rb") as f, np.load(f) as arrays:
        images, target = arrays["images"], arrays["target"]
    x = images.reshape(len(images), -1).astype(np.float64) / 16.0
    if binary:
        x = binarize(x)
    xtr, xte, ytr, yte = _split(x, target, test_fraction, DATA_SEED)
    return _dataset("digits", xtr, xte, (8, 8), ytr, yte)


# --- MNIST IDX files ---------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a file")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(f"{path}: cannot read ({exc.__class__.__name__}: {msg})") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzipped) and check its magic number, rank and length."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, no header)")
    zero1, zero2, type_code, ndim = struct.unpack(">BBBB", raw[:4])
    if zero1 != 0 or zero2 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{path}: wrong IDX magic number 0x{raw[:4].hex()}")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header_len])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = raw[header_len:]
    if len(body) != expected:
        raise DataError(
            f"{path}: IDX header says shape {shape} ({expected} bytes) but the file holds "
            f"{len(body)} bytes of data"
        )
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise DataError(f"{directory}: no {stem}[.gz] found")


def load_mnist(directory: str | os.PathLike, binary: bool = True) -> Dataset:
    """MNIST from the four standard IDX files in ``directory`` (gzipped or not).

    Pixel values are scaled to [0, 1] and, with ``binary``, binarized once with a fixed seed.
    Image and label counts must agree, and images must be rank 3 (N, H, W).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory of MNIST IDX files")
    parts = {}
    shape: tuple[int, ...] = ()
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images_path = _find(directory, f"{prefix}-images-idx3-ubyte")
        labels_path = _find(directory, f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3:
            raise DataError(f"{images_path}: expected rank-3 images (N, H, W), got {images.shape}")
        if images.dtype != np.uint8:
            raise DataError(
                f"{images_path}: expected unsigned-byte pixels (magic 0x00000803), got {images.dtype}"
            )
        if labels.ndim != 1:
            raise DataError(f"{labels_path}: expected rank-1 labels, got shape {labels.shape}")
        if len(images) != len(labels):
            raise DataError(
                f"{images_path}: {len(images)} images but {labels_path.name} has "
                f"{len(labels)} labels"
            )
        if len(images) == 0:
            raise DataError(f"{images_path}: zero images")
        if 0 in images.shape[1:]:
            raise DataError(f"{images_path}: zero-size images {images.shape[1:]} (no pixels)")
        x = images.reshape(len(images), -1).astype(np.float64) / 255.0
        parts[split] = (binarize(x, DATA_SEED + (split == "test")) if binary else x, labels)
        if split == "test" and images.shape[1:] != shape:
            raise DataError(
                f"{images_path}: test images are {images.shape[1:]} but training images are {shape}"
            )
        shape = images.shape[1:]
    return _dataset(
        str(directory),
        parts["train"][0],
        parts["test"][0],
        tuple(shape),
        parts["train"][1],
        parts["test"][1],
    )


# --- user arrays -------------------------------------------------------------------------------


#: Floating dtypes, in native byte order: checked for finiteness as the file holds them, then
#: kept (float32) or cast to float64 once by :func:`_rows_tensor`.
_NATIVE_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _as_rows(x: np.ndarray, path: Path, what: str) -> tuple[np.ndarray, tuple[int, int] | None]:
    if not isinstance(x, np.ndarray):  # a non-.npy member of a zip archive loads as bytes
        raise DataError(f"{path}: {what} is not a NumPy array ({type(x).__name__})")
    # kinds b/i/u/f: booleans, integers, floats; complex, timedelta, strings, records are refused
    if x.dtype.kind not in "biuf":
        raise DataError(f"{path}: {what} has non-numeric dtype {x.dtype}")
    if x.ndim == 2:
        rows, image_shape = x, None
    elif x.ndim == 3:
        # explicit width: reshape(N, -1) fails on empty arrays such as shape (0, 0, 0)
        rows = x.reshape(x.shape[0], x.shape[1] * x.shape[2])
        image_shape = (int(x.shape[1]), int(x.shape[2]))
    else:
        raise DataError(f"{path}: {what} must be N x D or N x H x W, got shape {x.shape}")
    if rows.shape[0] == 0:
        raise DataError(f"{path}: {what} has zero rows")
    if rows.shape[1] == 0:
        raise DataError(f"{path}: {what} has zero columns")
    if rows.dtype not in _NATIVE_FLOATS:  # integers, booleans, other byte orders, float128
        rows = rows.astype(np.float64)  # (a float's finiteness survives a cast to float64)
    if not np.all(np.isfinite(rows)):
        bad = int(np.size(rows) - np.count_nonzero(np.isfinite(rows)))
        raise DataError(f"{path}: {what} contains {bad} NaN/Inf value(s)")
    return rows, image_shape


def load_array(path: str | os.PathLike, test_fraction: float = TEST_FRACTION) -> Dataset:
    """A user array from ``.npy`` or ``.npz`` (N x D, or N x H x W flattened to N x HW).

    A ``.npz`` with arrays ``train`` and ``test`` is used as given; otherwise its one array (or
    the one named ``x``/``data``) is split deterministically like the digits, or, with
    ``test_fraction=0``, is all training data, its rows in the file's order (a model with
    global latents conditions on every row it is given; a time series stays in order).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a .npy or .npz file")
    if path.suffix not in (".npy", ".npz"):
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .npy or .npz)")
    try:
        with path.open("rb") as f:
            head = f.read(6)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.__class__.__name__}: {exc.strerror})") from None
    # .npy files start with b"\x93NUMPY", .npz files are zip archives (b"PK...")
    if not (head.startswith(b"\x93NUMPY") or head.startswith(b"PK")):
        what = "empty file" if not head else f"starts with {head!r}"
        raise DataError(f"{path}: not a NumPy .npy/.npz file ({what})")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            arrays = {"data": loaded}
        else:
            with loaded:
                arrays = {k: loaded[k] for k in loaded.files}
    except (
        OSError,
        ValueError,
        EOFError,
        KeyError,
        MemoryError,  # a header that claims a shape far larger than the file
        zipfile.BadZipFile,
        zlib.error,  # corrupt deflate stream in a compressed .npz
    ) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise DataError(f"{path}: cannot read array file ({msg})") from None
    if "train" in arrays and "test" in arrays:
        train, shape = _as_rows(arrays["train"], path, "array 'train'")
        test, test_shape = _as_rows(arrays["test"], path, "array 'test'")
        if train.shape[1] != test.shape[1] or shape != test_shape:
            raise DataError(
                f"{path}: 'train' rows are {shape or train.shape[1]} but 'test' rows are "
                f"{test_shape or test.shape[1]}"
            )
        return _dataset(str(path), train, test, shape)
    key = next((k for k in ("x", "data", "X") if k in arrays), None)
    if key is None:
        if len(arrays) != 1:
            raise DataError(
                f"{path}: expected arrays 'train' and 'test', or one array 'x'/'data'; "
                f"found {sorted(arrays)}"
            )
        key = next(iter(arrays))
    rows, shape = _as_rows(arrays[key], path, f"array {key!r}" if key != "data" else "array")
    if test_fraction == 0:
        if rows.shape[0] < 1:
            raise DataError(f"{path}: has no rows")
        return _dataset(str(path), rows, rows[:0], shape)
    if rows.shape[0] < 2:
        raise DataError(f"{path}: need at least 2 rows to split train/test, got {rows.shape[0]}")
    train, test, _, _ = _split(rows, None, test_fraction, DATA_SEED)
    return _dataset(str(path), train, test, shape)


def check_support(data: Dataset, likelihood: str) -> None:
    """Raise if the data lie outside the support of the decoder's likelihood.

    ``"bernoulli"`` needs values in [0, 1]; ``"normal"`` accepts any finite value.
    """
    if likelihood == "bernoulli":
        for split, x in (("train", data.train), ("test", data.test)):
            # one pass, no elementwise masks; aminmax is NaN if any value is, which counts as
            # outside the support (NaN >= 0 is False)
            lo, hi = torch.aminmax(x) if x.numel() else (0, 1)
            if not (bool(lo >= 0) and bool(hi <= 1)):
                raise DataError(
                    f"{data.name}: {split} values lie in [{x.min().item():.4g}, "
                    f"{x.max().item():.4g}], outside [0, 1] required by the Bernoulli decoder"
                )


def load_data(spec: str, *, split: bool = True) -> Dataset:
    """Load ``"digits"``, an MNIST IDX directory (``"mnist:DIR"`` or ``DIR``), or a .npy/.npz path.

    ``split=False``: a single array is not split, all its rows are the training data (a
    ``.npz`` with ``train`` and ``test`` is still used as given).
    """
    if spec == "digits":
        return load_digits()
    if spec.startswith("mnist:"):
        return load_mnist(spec[len("mnist:") :])
    path = Path(spec)
    if path.is_dir():
        return load_mnist(path)
    if path.suffix in (".npy", ".npz") or path.exists():
        return load_array(path, TEST_FRACTION if split else 0.0)
    raise DataError(f"{spec}: no such file (use 'digits', 'mnist:DIR', or a .npy/.npz path)")


# --- a user model's own arguments ----------------------------------------------------------------


@dataclass(frozen=True)
class ModelData:
    """The arguments a user's model is trained on (``train``) and, if given, held out (``test``).

    Each is a :class:`~inference.batching.ModelArgs`: ``model(*train.args, **train.kwargs)``.
    A model with global latents conditions on all of ``train``; nothing is split off unless
    the user gives ``test``.
    """

    name: str
    train: ModelArgs
    test: ModelArgs | None = None

    def to(self, device: str | torch.device, dtype: torch.dtype) -> ModelData:
        """Floating-point tensors (also inside lists, tuples and dicts) on ``device`` in
        ``dtype``; integer and boolean tensors keep their dtype; other values are unchanged."""
        return ModelData(
            self.name,
            _cast_args(self.train, device, dtype),
            None if self.test is None else _cast_args(self.test, device, dtype),
        )


def _cast(value: Any, device, dtype) -> Any:
    if torch.is_tensor(value):
        value = value.to(device=device)
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, np.ndarray):
        return _cast(torch.as_tensor(np.ascontiguousarray(value)), device, dtype)
    if isinstance(value, list | tuple):
        return type(value)(_cast(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, device, dtype) for k, v in value.items()}
    return value


def _cast_args(call: ModelArgs, device, dtype) -> ModelArgs:
    return ModelArgs(
        tuple(_cast(a, device, dtype) for a in call.args),
        {k: _cast(v, device, dtype) for k, v in call.kwargs.items()},
    )


def _as_model_args(value: Any, where: str) -> ModelArgs:
    """``(args, kwargs)``, a ``ModelArgs``, a dict of keyword arguments or a tuple of
    positional ones, as a data function may return them."""
    pair = ModelArgs.of_pair(value)
    if pair is not None:
        return pair
    if isinstance(value, Mapping):
        return ModelArgs((), dict(value))
    if isinstance(value, tuple):
        return ModelArgs(value, {})
    raise DataError(
        f"{where}: expected (args, kwargs), a dict of keyword arguments or a tuple of positional "
        f"ones, got {type(value).__name__}"
    )


def load_model_data(spec: str, model: Callable) -> ModelData:
    """The arguments of a user's ``model`` named on the command line by ``--data``.

    - ``FILE.py:NAME`` (or ``package.module:NAME``): ``NAME()`` returns ``(args, kwargs)``
      (or a dict of keyword arguments, or a tuple of positional ones), or a dict
      ``{"train": ..., "test": ...}`` of two of those.
    - ``FILE.npz`` whose arrays are named after the model's parameters, e.g. ``X`` and ``y``
      for ``model(X, y=None)``: bound by name. Names ``train_X`` / ``test_X`` give a held-out
      set of the same parameters.
    - any other data (``.npy``, a ``.npz`` with ``x``/``data``, or ``train``/``test``): one
      ``(N, D)`` tensor, the model's first argument; all rows (no split) unless the file has
      ``train`` and ``test``.
    """
    from .user_model import load_user_object

    if ":" in spec and not Path(spec).exists():
        fn = load_user_object(spec, option="data")
        try:
            value = fn()
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise DataError(f"{spec}: failed ({type(exc).__name__}: {first})") from None
        if isinstance(value, Mapping) and set(value) == {"train", "test"}:
            return ModelData(
                spec,
                _as_model_args(value["train"], spec),
                _as_model_args(value["test"], spec),
            )
        return ModelData(spec, _as_model_args(value, spec))
    path = Path(spec)
    if path.suffix == ".npz" and path.is_file():
        bound = _bind_npz(path, model)
        if bound is not None:
            return bound
    dataset = load_data(spec, split=False)
    test = ModelArgs((dataset.test,), {}) if dataset.test.shape[0] else None
    return ModelData(dataset.name, ModelArgs((dataset.train,), {}), test)


def _bind_npz(path: Path, model: Callable) -> ModelData | None:
    """Arrays of a ``.npz`` named after the model's parameters, as keyword arguments (None when
    no array is so named)."""
    from .batching import signature

    try:
        parameters = set(signature(model).parameters)
    except (TypeError, ValueError):
        return None
    try:
        with np.load(path, allow_pickle=False) as loaded:
            arrays = {k: loaded[k] for k in loaded.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise DataError(f"{path}: cannot read array file ({msg})") from None
    train = {k.removeprefix("train_"): v for k, v in arrays.items() if not k.startswith("test_")}
    test = {k.removeprefix("test_"): v for k, v in arrays.items() if k.startswith("test_")}
    if not set(train) & parameters:
        if len(arrays) == 1 or {"train", "test"} <= set(arrays):
            return None  # one data tensor: the model's first argument
        raise DataError(
            f"{path}: arrays {sorted(arrays)} name no parameter of the model "
            f"({', '.join(sorted(parameters))}); name them after its parameters"
        )
    unknown = sorted((set(train) | set(test)) - parameters)
    if unknown:
        raise DataError(
            f"{path}: arrays {unknown} name no parameter of the model "
            f"({', '.join(sorted(parameters))})"
        )
    for name, values in {**train, **{f"test_{k}": v for k, v in test.items()}}.items():
        if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
            raise DataError(f"{path}: array {name!r} contains NaN/Inf values")

    def call(arrays: dict) -> ModelArgs:
        return ModelArgs(
            (), {k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in arrays.items()}
        )

    return ModelData(str(path), call(train), call(test) if test else None)
