"""Data loaders: the embedded digits, MNIST IDX files the tests write, user arrays, and bad input.

Every unusable input must raise :class:`DataError` with a one-line message naming the file.
"""

import gzip
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from inference.data import (
    Dataset,
    check_support,
    load_array,
    load_data,
    load_digits,
    load_mnist,
    read_idx,
)
from inference.errors import DataError, ElboLabError


def _raises_naming(path, fn, *args, match=None) -> str:
    """Call ``fn`` and check it raises a one-line DataError that names ``path``."""
    with pytest.raises(DataError) as info:
        fn(*args)
    msg = str(info.value)
    assert str(path) in msg, msg
    assert "\n" not in msg, msg
    assert isinstance(info.value, ElboLabError)
    if match is not None:
        assert match in msg, msg
    return msg


# --- digits --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits()


def test_digits_shapes_binary_and_split(digits):
    assert digits.name == "digits"
    assert digits.train.shape == (1438, 64) and digits.test.shape == (359, 64)
    assert digits.train.dtype == digits.test.dtype == torch.float64
    assert digits.image_shape == (8, 8) and digits.data_dim == 64
    for x in (digits.train, digits.test):
        assert set(torch.unique(x).tolist()) == {0.0, 1.0}
    assert digits.train_labels.shape == (1438,) and digits.test_labels.shape == (359,)
    assert digits.train_labels.dtype == torch.int64
    check_support(digits, "bernoulli")


def test_digits_are_deterministic_and_a_partition(digits):
    again = load_digits()
    assert torch.equal(again.train, digits.train) and torch.equal(again.test, digits.test)
    assert torch.equal(again.train_labels, digits.train_labels)
    # train and test together hold every image exactly once: same label histogram as sklearn's
    from sklearn.datasets import load_digits as sk_digits

    labels = torch.cat([digits.train_labels, digits.test_labels])
    expected = torch.as_tensor(np.bincount(sk_digits().target, minlength=10))
    assert torch.equal(torch.bincount(labels, minlength=10), expected)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "grey"])
def test_shipped_digits_equal_scikit_learns(binary):
    """The package's digits.npz gives the very values load_digits gave from scikit-learn's copy:
    the same intensities, binarized with the same seed and split by the same permutation."""
    sk = pytest.importorskip("sklearn.datasets")
    from inference.data import DATA_SEED, TEST_FRACTION, _split, binarize

    bunch = sk.load_digits()
    x = bunch.images.reshape(len(bunch.images), -1) / 16.0
    if binary:
        x = binarize(x)
    xtr, xte, ytr, yte = _split(x, bunch.target, TEST_FRACTION, DATA_SEED)
    shipped = load_digits(binary=binary)
    assert torch.equal(shipped.train, torch.from_numpy(xtr))
    assert torch.equal(shipped.test, torch.from_numpy(xte))
    assert torch.equal(shipped.train_labels, torch.from_numpy(ytr))
    assert torch.equal(shipped.test_labels, torch.from_numpy(yte))


def test_loading_digits_does_not_import_scikit_learn():
    code = (
        "import sys; from inference.data import load_digits; load_digits(); "
        "assert not any(m.split('.')[0] == 'sklearn' for m in sys.modules), 'sklearn imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_digits_binarization_is_bernoulli_of_the_intensities():
    """E[x_bin] = intensity: the mean over all pixels is within 5 standard errors of it."""
    grey = load_digits(binary=False)
    binary = load_digits()
    p = torch.cat([grey.train, grey.test])
    x = torch.cat([binary.train, binary.test])
    assert torch.equal(x[p == 0], torch.zeros_like(x[p == 0]))
    assert torch.equal(x[p == 1], torch.ones_like(x[p == 1]))
    stderr = (p * (1 - p)).sum().sqrt() / p.numel()
    assert abs(x.mean() - p.mean()) < 5 * stderr


def test_load_data_names(digits, tmp_path):
    assert torch.equal(load_data("digits").test, digits.test)
    _raises_naming(tmp_path / "nope", load_data, str(tmp_path / "nope"), match="no such file")


# --- MNIST IDX -----------------------------------------------------------------------------------


def _idx_bytes(a: np.ndarray, type_code: int = 0x08) -> bytes:
    header = struct.pack(">BBBB", 0, 0, type_code, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
    return header + a.astype(a.dtype.newbyteorder(">")).tobytes()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def _mnist_dir(root: Path, gz: bool, n_train=5, n_test=3, hw=(4, 3), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    ext = ".gz" if gz else ""
    root.mkdir(exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, *hw), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write(root / f"{prefix}-images-idx3-ubyte{ext}", _idx_bytes(images))
        _write(root / f"{prefix}-labels-idx1-ubyte{ext}", _idx_bytes(labels))
    return root


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_read_idx_round_trip(tmp_path, gz):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = _write(tmp_path / ("x.idx.gz" if gz else "x.idx"), _idx_bytes(images))
    assert np.array_equal(read_idx(path), images)
    big_endian = np.linspace(-1, 1, 6).reshape(2, 3)
    path = _write(tmp_path / "f.idx", _idx_bytes(big_endian, type_code=0x0E))
    assert np.array_equal(read_idx(path), big_endian)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_load_mnist_good_files(tmp_path, gz):
    root = _mnist_dir(tmp_path / "mnist", gz)
    data = load_mnist(root, binary=False)
    assert data.train.shape == (5, 12) and data.test.shape == (3, 12)
    assert data.image_shape == (4, 3)
    raw = read_idx(root / f"train-images-idx3-ubyte{'.gz' if gz else ''}")
    assert torch.equal(data.train, torch.as_tensor(raw.reshape(5, 12) / 255.0))
    assert data.train_labels.shape == (5,) and data.test_labels.dtype == torch.int64
    binary = load_data(str(root))
    assert set(torch.unique(binary.train).tolist()) <= {0.0, 1.0}
    assert torch.equal(load_data(f"mnist:{root}").train, binary.train)


IDX_GOOD = _idx_bytes(np.zeros((2, 3, 3), dtype=np.uint8))
BAD_IDX = {
    "wrong-magic": (b"\x08\x03" + IDX_GOOD[2:], "magic"),
    "unknown-type": (b"\x00\x00\x07\x03" + IDX_GOOD[4:], "magic"),
    "empty": (b"", "truncated"),
    "truncated-magic": (IDX_GOOD[:3], "truncated"),
    "truncated-header": (IDX_GOOD[:10], "truncated IDX header"),
    "truncated-body": (IDX_GOOD[:-1], "17 bytes"),
    "extra-bytes": (IDX_GOOD + b"\x00", "19 bytes"),
}


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("case", list(BAD_IDX), ids=list(BAD_IDX))
def test_read_idx_bad_files(tmp_path, case, gz):
    data, match = BAD_IDX[case]
    path = _write(tmp_path / ("bad.gz" if gz else "bad"), data)
    _raises_naming(path, read_idx, path, match=match)


def test_read_idx_missing_directory_and_broken_gzip(tmp_path):
    _raises_naming(tmp_path / "missing", read_idx, tmp_path / "missing", match="no such file")
    _raises_naming(tmp_path, read_idx, tmp_path, match="directory")
    not_gzip = tmp_path / "x.gz"
    not_gzip.write_bytes(IDX_GOOD)
    _raises_naming(not_gzip, read_idx, not_gzip, match="cannot read")
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(IDX_GOOD)[:-6])
    _raises_naming(cut, read_idx, cut, match="cannot read")
    corrupt = bytearray(gzip.compress(bytes(range(256)) * 8))
    corrupt[20:40] = bytes(b ^ 0x55 for b in corrupt[20:40])
    (tmp_path / "corrupt.gz").write_bytes(bytes(corrupt))
    _raises_naming(tmp_path / "corrupt.gz", read_idx, tmp_path / "corrupt.gz")


def test_load_mnist_count_mismatch(tmp_path):
    root = _mnist_dir(tmp_path / "m", gz=False)
    _write(root / "t10k-labels-idx1-ubyte", _idx_bytes(np.zeros(4, dtype=np.uint8)))
    _raises_naming(root / "t10k-images-idx3-ubyte", load_mnist, root, match="3 images")


def test_load_mnist_bad_layouts(tmp_path):
    root = _mnist_dir(tmp_path / "rank", gz=True)
    _write(root / "train-images-idx3-ubyte.gz", _idx_bytes(np.zeros((5, 12), dtype=np.uint8)))
    _raises_naming(root / "train-images-idx3-ubyte.gz", load_mnist, root, match="rank-3")
    root = _mnist_dir(tmp_path / "dtype", gz=False)
    _write(root / "train-images-idx3-ubyte", _idx_bytes(np.zeros((5, 4, 3)), type_code=0x0E))
    _raises_naming(root / "train-images-idx3-ubyte", load_mnist, root, match="unsigned-byte")
    root = _mnist_dir(tmp_path / "hw", gz=False)
    _write(root / "t10k-images-idx3-ubyte", _idx_bytes(np.zeros((3, 3, 4), dtype=np.uint8)))
    _raises_naming(root / "t10k-images-idx3-ubyte", load_mnist, root, match="training images")
    root = _mnist_dir(tmp_path / "zero", gz=False, n_train=0)
    _raises_naming(root / "train-images-idx3-ubyte", load_mnist, root, match="zero images")


def test_load_mnist_missing_files(tmp_path):
    root = _mnist_dir(tmp_path / "m", gz=False)
    (root / "t10k-labels-idx1-ubyte").unlink()
    _raises_naming(root, load_mnist, root, match="t10k-labels-idx1-ubyte")
    _raises_naming(tmp_path / "none", load_mnist, tmp_path / "none", match="not a directory")
    file = _write(tmp_path / "file", b"x")
    _raises_naming(file, load_mnist, file, match="not a directory")


# --- user arrays ---------------------------------------------------------------------------------


def test_load_npy_rows_and_images(tmp_path):
    x = np.random.default_rng(0).random((10, 6))
    np.save(tmp_path / "rows.npy", x)
    data = load_array(tmp_path / "rows.npy")
    assert data.train.shape == (8, 6) and data.test.shape == (2, 6) and data.image_shape is None
    together = torch.cat([data.train, data.test])
    assert torch.equal(
        together[torch.argsort(together[:, 0])], torch.as_tensor(x[x[:, 0].argsort()])
    )
    np.save(tmp_path / "images.npy", x.reshape(10, 2, 3).astype(np.float32))
    images = load_array(tmp_path / "images.npy")
    assert images.image_shape == (2, 3) and images.train.dtype == torch.float32  # as stored
    assert torch.equal(images.train, data.train.float())  # same split, same flattening
    np.save(tmp_path / "bool.npy", x > 0.5)
    check_support(load_array(tmp_path / "bool.npy"), "bernoulli")


@pytest.mark.parametrize("dtype", [np.float64, np.float32, ">f4", np.uint8])
def test_the_split_is_the_seeded_permutation_of_the_rows(tmp_path, dtype):
    """Test rows first: the file's rows in the order of ``default_rng(DATA_SEED).permutation``,
    exactly, whatever numeric dtype the file holds (float32 kept, the rest as float64)."""
    from inference.data import DATA_SEED, TEST_FRACTION

    x = (np.random.default_rng(1).random((50, 7)) * 200).astype(dtype)
    np.save(tmp_path / "rows.npy", x)
    data = load_array(tmp_path / "rows.npy")
    order = np.random.default_rng(DATA_SEED).permutation(50)
    n_test = round(TEST_FRACTION * 50)
    expected = x.astype(np.float64)
    assert data.train.dtype == (torch.float32 if dtype is np.float32 else torch.float64)
    assert torch.equal(data.test.double(), torch.from_numpy(expected[order[:n_test]]))
    assert torch.equal(data.train.double(), torch.from_numpy(expected[order[n_test:]]))


def test_two_rows_split_into_nonempty_parts(tmp_path):
    np.save(tmp_path / "two.npy", np.eye(2))
    data = load_array(tmp_path / "two.npy")
    assert data.train.shape == (1, 2) and data.test.shape == (1, 2)


def test_load_npz_train_test_and_single_array(tmp_path):
    train, test = np.zeros((4, 2, 2)), np.ones((3, 2, 2))
    np.savez(tmp_path / "tt.npz", train=train, test=test)
    data = load_data(str(tmp_path / "tt.npz"))
    assert torch.equal(data.train, torch.zeros(4, 4, dtype=torch.float64))
    assert torch.equal(data.test, torch.ones(3, 4, dtype=torch.float64))
    assert data.image_shape == (2, 2)
    np.savez_compressed(tmp_path / "one.npz", anything=np.ones((5, 3)))
    assert load_array(tmp_path / "one.npz").train.shape == (4, 3)
    np.savez(tmp_path / "x.npz", x=np.ones((5, 3)), labels=np.arange(5))
    assert load_array(tmp_path / "x.npz").test.shape == (1, 3)


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


BAD_ARRAYS = {
    "nan": (np.array([[0.0, np.nan], [1.0, 0.0]]), "NaN/Inf"),
    "inf": (np.array([[0.0, np.inf], [1.0, 0.0]]), "NaN/Inf"),
    "rank-1": (np.ones(5), "N x D or N x H x W"),
    "rank-0": (np.array(1.0), "N x D or N x H x W"),
    "rank-4": (np.ones((2, 2, 2, 2)), "N x D or N x H x W"),
    "zero-rows": (np.ones((0, 3)), "zero rows"),
    "zero-columns": (np.ones((3, 0)), "zero columns"),
    "one-row": (np.ones((1, 3)), "at least 2 rows"),
    "strings": (np.array([["a", "b"], ["c", "d"]]), "non-numeric"),
    "complex": (np.ones((3, 2), dtype=complex), "non-numeric"),
    "datetime": (np.full((3, 2), np.datetime64("2020-01-01")), "non-numeric"),
    "record": (np.zeros((3, 2), dtype=[("a", "f8")]), "non-numeric"),
}


@pytest.mark.parametrize("case", list(BAD_ARRAYS), ids=list(BAD_ARRAYS))
def test_load_array_bad_arrays(tmp_path, case):
    a, match = BAD_ARRAYS[case]
    np.save(tmp_path / "bad.npy", a)
    _raises_naming(tmp_path / "bad.npy", load_array, tmp_path / "bad.npy", match=match)


def test_load_array_bad_npz(tmp_path):
    f = _npz(tmp_path / "a.npz", train=np.ones((3, 4)), test=np.ones((3, 5)))
    _raises_naming(f, load_array, f, match="'test' rows are 5")
    f = _npz(tmp_path / "b.npz", train=np.ones((3, 2, 3)), test=np.ones((3, 3, 2)))
    _raises_naming(f, load_array, f, match="(3, 2)")
    f = _npz(tmp_path / "c.npz", train=np.ones((3, 4)), test=np.full((3, 4), np.nan))
    _raises_naming(f, load_array, f, match="array 'test' contains 12 NaN/Inf")
    f = _npz(tmp_path / "d.npz", a=np.ones((3, 4)), b=np.ones((3, 4)))
    _raises_naming(f, load_array, f, match="found ['a', 'b']")
    f = _npz(tmp_path / "e.npz")
    _raises_naming(f, load_array, f, match="found []")
    f = tmp_path / "obj.npy"
    np.save(f, np.array([{"a": 1}, None], dtype=object))
    _raises_naming(f, load_array, f, match="cannot read")


def test_load_array_bad_files(tmp_path):
    _raises_naming(tmp_path / "no.npy", load_array, tmp_path / "no.npy", match="no such file")
    d = tmp_path / "dir.npy"
    d.mkdir()
    _raises_naming(d, load_array, d, match="directory")
    f = _write(tmp_path / "data.csv", b"0,1\n1,0\n")
    _raises_naming(f, load_array, f, match="unsupported file type")
    f = _write(tmp_path / "empty.npy", b"")
    _raises_naming(f, load_array, f, match="empty file")
    f = _write(tmp_path / "garbage.npz", b"\x00garbage bytes\xff")
    _raises_naming(f, load_array, f, match="not a NumPy")
    np.save(tmp_path / "cut.npy", np.ones((10, 4)))
    for n in (8, 20, 300):  # magic only, inside the header, inside the data
        whole = (tmp_path / "cut.npy").read_bytes()
        f = _write(tmp_path / f"cut{n}.npy", whole[:n])
        _raises_naming(f, load_array, f, match="cannot read")
    np.savez_compressed(tmp_path / "z.npz", x=np.random.default_rng(0).random((200, 30)))
    whole = bytearray((tmp_path / "z.npz").read_bytes())
    _write(tmp_path / "cutz.npz", bytes(whole[: len(whole) // 2]))
    _raises_naming(tmp_path / "cutz.npz", load_array, tmp_path / "cutz.npz", match="cannot read")
    whole[80:400] = bytes(b ^ 0xFF for b in whole[80:400])  # corrupt the deflate stream
    f = _write(tmp_path / "corrupt.npz", bytes(whole))
    _raises_naming(f, load_array, f, match="cannot read")


def test_npy_header_claiming_a_huge_shape(tmp_path):
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (100000000000, 3), }"
    header = header.ljust(117) + "\n"
    f = _write(
        tmp_path / "huge.npy",
        b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(48),
    )
    _raises_naming(f, load_array, f, match="cannot read")


# --- support -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", [-0.5, 1.5, np.nan, 255.0], ids=["negative", "above-one", "nan", "raw-pixels"]
)
def test_check_support_bernoulli(tmp_path, value):
    x = np.full((6, 3), 0.5)
    x[4, 1] = value
    np.savez(tmp_path / "grey.npz", train=x[:4], test=x[4:])
    if np.isnan(value):  # load_array refuses NaN itself; build the Dataset by hand
        data = Dataset(str(tmp_path / "grey.npz"), torch.as_tensor(x[:4]), torch.as_tensor(x[4:]))
    else:
        data = load_array(tmp_path / "grey.npz")
    _raises_naming(tmp_path / "grey.npz", check_support, data, "bernoulli", match="test values")
    check_support(data, "normal")


def test_check_support_accepts_grey_levels_in_unit_interval():
    x = torch.tensor([[0.0, 0.25], [1.0, 0.75]], dtype=torch.float64)
    check_support(Dataset("grey", x, x), "bernoulli")


@pytest.mark.parametrize(
    "rows, dtype, bad",
    [
        ([[3e38, 3e38], [3e38, -1.0]], torch.float32, 0),  # finite, though the sum overflows
        ([[1e39, 0.5], [0.25, 1e39]], torch.float32, 2),  # finite in float64, not in float32
        ([[float("nan"), 0.5], [0.25, 0.75]], torch.float32, 1),
        ([[float("inf"), -float("inf")], [0.25, 0.75]], torch.float64, 2),  # sum is NaN
        ([[0.0, 1.0], [0.25, 0.75]], torch.float64, 0),
    ],
)
def test_dataset_to_counts_exactly_the_values_that_are_not_finite(rows, dtype, bad):
    """``Dataset.to`` refuses a split with a value that is not finite in the target dtype,
    counting them, and accepts one whose values are finite however large their sum."""
    x = torch.tensor(rows, dtype=torch.float64)
    data = Dataset("hand-made", x[:1], x[1:])
    if not bad:
        cast = data.to("cpu", dtype)
        assert torch.equal(cast.train, x[:1].to(dtype)) and torch.equal(cast.test, x[1:].to(dtype))
        return
    train = torch.tensor([rows[0] + rows[1]], dtype=torch.float64)  # every bad value in train
    with pytest.raises(DataError, match=f"hand-made: {bad} train value"):
        Dataset("hand-made", train, x[:0]).to("cpu", dtype)


# --- property: load_array on arbitrary arrays ----------------------------------------------------

_dtypes = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(),
    hnp.unsigned_integer_dtypes(),
    hnp.floating_dtypes(),
    hnp.complex_number_dtypes(),
    hnp.unicode_string_dtypes(max_len=2),
    hnp.datetime64_dtypes(),
    hnp.timedelta64_dtypes(),
)
_arrays = hnp.arrays(_dtypes, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4))


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(a=_arrays, as_npz=st.booleans())
def test_load_array_accepts_good_arrays_and_names_the_file_otherwise(tmp_path, a, as_npz):
    """Either a valid Dataset (finite rows: float32 as stored, the rest float64; non-empty
    split, nothing lost) or a DataError."""
    path = tmp_path / ("a.npz" if as_npz else "a.npy")
    if as_npz:
        np.savez(path, x=a)
    else:
        np.save(path, a)
    try:
        data = load_array(path)
    except DataError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
        return
    assert a.dtype.kind in "biuf" and a.ndim in (2, 3) and a.shape[0] >= 2
    rows = a.reshape(a.shape[0], -1).astype(np.float64)
    stored = torch.float32 if a.dtype == np.dtype(np.float32) else torch.float64
    assert data.train.dtype == data.test.dtype == stored
    assert data.train.shape[0] >= 1 and data.test.shape[0] >= 1
    assert data.train.shape[0] + data.test.shape[0] == a.shape[0]
    assert data.data_dim == rows.shape[1] >= 1
    assert torch.isfinite(data.train).all() and torch.isfinite(data.test).all()
    got = torch.cat([data.train, data.test]).numpy()
    assert sorted(map(tuple, got)) == sorted(map(tuple, rows))


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(blob=st.binary(max_size=64), suffix=st.sampled_from([".npy", ".npz"]))
def test_load_array_garbage_bytes(tmp_path, blob, suffix):
    path = _write(tmp_path / f"blob{suffix}", blob)
    with pytest.raises(DataError) as info:
        load_array(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_zip_that_is_not_an_npz(tmp_path):
    path = tmp_path / "archive.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "not an array")
    _raises_naming(path, load_array, path, match="not a NumPy array")
