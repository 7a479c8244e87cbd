"""Generic data sources (arrays files, image folders) and the partitioners, on real files in tmp_path."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from fedgradnorm.data.arrays import read_arrays, write_arrays
from fedgradnorm.data.base import DataError, MultiTaskArrays, Pools
from fedgradnorm.data.images import read_images
from fedgradnorm.data.splitting import Partitioner, dirichlet, iid, parse_partitioner

RNG = np.random.default_rng(7)
X = RNG.normal(size=(12, 2, 3)).astype(np.float32)
Y = np.arange(12) % 3


def _raises(path: Path, problem: str, read: Callable[[], object]) -> DataError:
    """``read`` raises a DataError whose message names ``path`` and contains ``problem``."""
    with pytest.raises(DataError) as info:
        read()
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert problem in message, message
    return info.value


def _h5(path: Path, **arrays: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        for name, value in arrays.items():
            f[name] = value
    return path


# --------------------------------------------------------------------------------------------------------
# Arrays files
# --------------------------------------------------------------------------------------------------------


def test_npz_round_trip_with_test_pool_and_several_columns(tmp_path: Path) -> None:
    age = RNG.normal(size=(12, 2))
    train = MultiTaskArrays(x=X, targets={"y": Y, "age": age})
    test = MultiTaskArrays(x=X[:4], targets={"y": Y[:4], "age": age[:4]})
    for compress in (False, True):
        path = tmp_path / f"data-{compress}.npz"
        write_arrays(path, Pools(train=train, test=test), compress=compress)
        with np.load(path, allow_pickle=False) as npz:
            assert sorted(npz.files) == ["x", "x_test", "y", "y_age", "y_test", "y_test_age"]
        pools = read_arrays(path)
        assert pools.test is not None
        for got, want in ((pools.train, train), (pools.test, test)):
            assert got.x.dtype == np.float32 and np.array_equal(got.x, want.x)
            assert got.targets["y"].dtype == np.int64 and np.array_equal(got.targets["y"], want.targets["y"])
            assert got.targets["age"].dtype == np.float32
            assert np.array_equal(got.targets["age"], want.targets["age"].astype(np.float32))


def test_write_arrays_of_a_single_pool_has_no_test_pool(tmp_path: Path) -> None:
    path = tmp_path / "node.npz"
    write_arrays(path, MultiTaskArrays(x=X, targets={"signal": Y}, extras={"snr": Y}))
    pools = read_arrays(path)
    assert pools.test is None and list(pools.train.targets) == ["signal"] and not pools.train.extras
    assert np.array_equal(pools.train.targets["signal"], Y)


def test_hdf5_types_are_converted_and_test_pool_read(tmp_path: Path) -> None:
    x = RNG.integers(0, 256, size=(6, 4), dtype=np.uint8)
    path = _h5(
        tmp_path / "d.hdf5",
        x=x,
        y=np.arange(6, dtype=np.int32),
        y_score=np.linspace(0, 1, 6),
        x_test=x[:2],
        y_test=np.arange(2, dtype=np.int16),
        y_test_score=np.ones(2),
    )
    pools = read_arrays(path)
    assert pools.train.x.dtype == np.float32 and np.array_equal(pools.train.x, x.astype(np.float32))
    assert pools.train.targets["y"].dtype == np.int64 and pools.train.targets["score"].dtype == np.float32
    assert pools.test is not None and pools.test.targets["y"].dtype == np.int64 and len(pools.test) == 2


def test_unknown_suffix_is_detected_by_signature(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=X, y=Y)
    (tmp_path / "a.npz").rename(tmp_path / "a.bin")
    assert len(read_arrays(tmp_path / "a.bin").train) == 12
    with h5py.File(tmp_path / "b.dat", "w", userblock_size=512) as f:  # signature at offset 512
        f["x"], f["y"] = X, Y
    assert np.array_equal(read_arrays(str(tmp_path / "b.dat")).train.x, X)


def _npz(**arrays: object) -> Callable[[Path], None]:
    return lambda p: np.savez(p, **arrays)  # type: ignore[arg-type]


def _hdf(**arrays: np.ndarray) -> Callable[[Path], None]:
    def write(p: Path) -> None:
        _h5(p, **arrays)

    return write


def _hdf5_group(p: Path) -> None:
    with h5py.File(p, "w") as f:
        f["x"], f["y"] = X, Y
        f.create_group("y_extra")


def _hdf5_link(p: Path) -> None:
    with h5py.File(p, "w") as f:
        f["x"] = X
        f["y"] = h5py.SoftLink("/x")


def _hdf5_text(p: Path) -> None:
    with h5py.File(p, "w") as f:
        f["x"] = X
        f["y"] = [str(v) for v in Y]


def _zip_with_raw_member(p: Path) -> None:
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x", b"not an array")


def _truncated(make: Callable[[Path], None], keep: float) -> Callable[[Path], None]:
    def write(p: Path) -> None:
        make(p)
        data = p.read_bytes()
        p.write_bytes(data[: int(len(data) * keep)])

    return write


ARRAY_ERRORS: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "missing": ("a.npz", lambda p: None, "file not found"),
    "folder": ("a.npz", lambda p: p.mkdir(), "is a folder"),
    "empty": ("a.npz", lambda p: p.write_bytes(b""), "file is empty"),
    "unknown format": ("a.dat", lambda p: p.write_text("1,2,3\n"), "unrecognised format"),
    "npz not a zip": ("a.npz", lambda p: p.write_text("1,2,3\n"), "does not start with the zip signature"),
    "h5 not hdf5": ("a.h5", lambda p: p.write_text("1,2,3\n"), "has no HDF5 signature"),
    "hdf5 named npz": ("a.npz", _hdf(x=X, y=Y), "is an HDF5 file despite its .npz suffix"),
    "truncated npz": ("a.npz", _truncated(_npz(x=X, y=Y), 0.5), "cannot read the .npz archive"),
    "truncated h5": ("a.h5", _truncated(_hdf(x=X, y=Y), 0.5), "cannot read the HDF5 file"),
    "pickled objects": ("a.npz", _npz(x=X, y=np.array([{}] * 12, dtype=object)), "holds Python objects"),
    "raw zip member": ("a.npz", _zip_with_raw_member, "member 'x' of the archive is not a .npy array"),
    "text npz": ("a.npz", _npz(x=X, y=np.array(["a"] * 12)), "array 'y' holds text values"),
    "text h5": ("a.h5", _hdf5_text, "array 'y' holds text values"),
    "complex": ("a.npz", _npz(x=X.astype(np.complex64), y=Y), "array 'x' holds complex values"),
    "boolean": ("a.npz", _npz(x=X, y=Y > 0), "array 'y' holds boolean values"),
    "no x": ("a.npz", _npz(y=Y), "no array 'x'"),
    "no target": ("a.npz", _npz(x=X), "no target array"),
    "unexpected": ("a.npz", _npz(x=X, y=Y, z=Y), "unexpected array 'z'"),
    "y spelled twice": ("a.npz", _npz(x=X, y_y=Y), "column 'y' is spelled 'y'"),
    "empty column name": ("a.npz", _npz(x=X, y_=Y), "array 'y_' names no column"),
    "rows differ": ("a.npz", _npz(x=X, y=Y[:11]), "array 'y' has 11 rows but 'x' has 12"),
    "no samples": ("a.npz", _npz(x=X[:0], y=Y[:0]), "array 'x' has no samples"),
    "scalar x": ("a.npz", _npz(x=np.float32(1), y=Y), "array 'x' is a single value"),
    "no values per sample": ("a.npz", _npz(x=np.zeros((12, 0)), y=Y), "no values per sample"),
    "nan": (
        "a.npz",
        _npz(x=np.where(np.arange(12)[:, None, None] == 3, np.nan, X), y=Y),
        "NaN or infinity (first at row 3)",
    ),
    "float32 overflow": ("a.npz", _npz(x=np.full((12, 1), 1e300), y=Y), "beyond the float32 range (first at row 0)"),
    "infinite target": ("a.npz", _npz(x=X, y=np.full(12, np.inf)), "array 'y' holds NaN or infinity"),
    "3-d target": ("a.npz", _npz(x=X, y=X), "array 'y' has shape (12, 2, 3); expected 1-D or 2-D"),
    "int64 overflow": ("a.npz", _npz(x=X, y=np.full(12, 2**63, np.uint64)), "beyond the int64 range"),
    "x_test alone": ("a.npz", _npz(x=X, y=Y, x_test=X), "array 'x_test' without test targets"),
    "y_test alone": ("a.npz", _npz(x=X, y=Y, y_test=Y), "array 'y_test' without 'x_test'"),
    "test shape": (
        "a.npz",
        _npz(x=X, y=Y, x_test=X[:, 0], y_test=Y),
        "'x_test' has samples of shape (3,) but 'x' has (2, 3)",
    ),
    "test rows": ("a.h5", _hdf(x=X, y=Y, x_test=X[:3], y_test=Y[:2]), "array 'y_test' has 2 rows but 'x_test' has 3"),
    "test kind": ("a.npz", _npz(x=X, y=Y, x_test=X, y_test=Y * 0.5), "'y_test' holds floats but 'y' holds integers"),
    "test column missing": ("a.npz", _npz(x=X, y=Y, y_age=Y, x_test=X, y_test=Y), "test pool lacks column 'age'"),
    "test column extra": (
        "a.npz",
        _npz(x=X, y=Y, x_test=X, y_test=Y, y_test_age=Y),
        "'y_test_age' has no training column 'y_age'",
    ),
    "hdf5 group": ("a.h5", _hdf5_group, "'y_extra' is a group"),
    "hdf5 link": ("a.h5", _hdf5_link, "'y' is a link"),
}


@pytest.mark.parametrize("case", list(ARRAY_ERRORS))
def test_bad_arrays_file_raises_data_error_naming_file_and_problem(tmp_path: Path, case: str) -> None:
    name, make, problem = ARRAY_ERRORS[case]
    path = tmp_path / name
    make(path)
    _raises(path, problem, lambda: read_arrays(path))


def test_write_arrays_refuses_what_cannot_read_back_and_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "node.npz"
    write_arrays(path, MultiTaskArrays(x=X, targets={"y": Y}))
    before = path.read_bytes()
    bad = MultiTaskArrays(x=np.full_like(X, np.nan), targets={"y": Y})
    _raises(path, "array 'x' holds NaN or infinity", lambda: write_arrays(path, bad))
    with pytest.raises(ValueError, match="'test'"):
        write_arrays(path, MultiTaskArrays(x=X, targets={"test": Y}))
    with pytest.raises(ValueError, match=r"must end in \.npz"):
        write_arrays(tmp_path / "node.h5", MultiTaskArrays(x=X, targets={"y": Y}))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.npz"]


# --------------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------------


def _gray(path: Path, value: int, size: tuple[int, int] = (5, 4)) -> None:
    """A ``size`` (width, height) PNG whose pixel (row r, column c) is ``value + r * width + c``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    Image.fromarray((value + np.arange(w * h).reshape(h, w)).astype(np.uint8), mode="L").save(path)


def _folder(tmp_path: Path, csv: str, images: dict[str, int] | None = None) -> Path:
    root = tmp_path / "imgs"
    root.mkdir(exist_ok=True)
    for rel, value in (images if images is not None else {"a/1.png": 0, "a/2.png": 100, "b/3.png": 200}).items():
        _gray(root / rel, value)
    (root / "labels.csv").write_text(csv)
    return root


GOOD_CSV = "file,kind,weight,split\na/1.png,0,1.5,train\na/2.png,1,-2,test\nb/3.png,2,3,train\n"


def test_image_folder_round_trip_with_split(tmp_path: Path) -> None:
    root = _folder(tmp_path, GOOD_CSV)
    pools = read_images(root)
    assert pools.test is not None
    ramp = np.arange(20).reshape(4, 5)
    assert pools.train.x.shape == (2, 1, 4, 5) and pools.train.x.dtype == np.float32
    assert np.allclose(pools.train.x[1, 0], (200 + ramp) / 255.0)
    assert np.allclose(pools.test.x[0, 0], (100 + ramp) / 255.0)
    assert pools.train.targets["kind"].dtype == np.int64 and list(pools.train.targets["kind"]) == [0, 2]
    assert pools.train.targets["weight"].dtype == np.float32 and list(pools.test.targets["weight"]) == [-2.0]
    same = read_images(root / "labels.csv")
    assert np.array_equal(same.train.x, pools.train.x)


def test_image_folder_rgb_resize_and_no_split(tmp_path: Path) -> None:
    root = tmp_path / "rgb"
    root.mkdir()
    Image.new("RGB", (8, 6), (255, 0, 51)).save(root / "red.png")
    Image.new("RGB", (3, 3), (0, 255, 0)).save(root / "green.jpg", quality=100)
    (root / "labels.csv").write_text('\ufefffile , label\n"red.png", 1\n\ngreen.jpg,0\n')
    pools = read_images(root, mode="RGB", size=(2, 4))
    assert pools.test is None and pools.train.x.shape == (2, 3, 2, 4)
    assert np.allclose(pools.train.x[0, :, 0, 0], [1.0, 0.0, 0.2])
    assert np.allclose(pools.train.x[1, :, 1, 3], [0.0, 1.0, 0.0], atol=0.02)
    gray = read_images(root, size=(2, 4))
    assert gray.train.x.shape == (2, 1, 2, 4)
    with pytest.raises(ValueError, match="mode"):
        read_images(root, mode="CMYK")
    with pytest.raises(ValueError, match="size"):
        read_images(root, size=(0, 4))


IMAGE_CSV_ERRORS: dict[str, tuple[str, str]] = {
    "empty csv": ("", "file is empty"),
    "header only": ("file,label\n", "no image rows after the header"),
    "duplicate header": ("file,label,label\na/1.png,1,2\n", "line 1 (header): column 'label' appears twice"),
    "unnamed column": ("file,,label\na/1.png,1,2\n", "column 2 has no name"),
    "no file column": ("path,label\na/1.png,1\n", "no 'file' column"),
    "file not first": ("label,file\n1,a/1.png\n", "'file' must be the first column"),
    "no target": ("file,split\na/1.png,train\n", "no target column after 'file'"),
    "field count": ("file,label\na/1.png,1\na/2.png\n", "line 3: 1 fields, but the header has 2"),
    "empty cell": ("file,label,w\na/1.png,1,2\na/2.png,,3\n", "line 3, column 'label': empty cell"),
    "not a number": ("file,label\na/1.png,1\na/2.png,cat\n", "line 3, column 'label': not a number: 'cat'"),
    "nan": ("file,label\na/1.png,nan\n", "line 2, column 'label': 'nan' is not a finite"),
    "float32 overflow": ("file,label\na/1.png,1e39\n", "'1e39' is not a finite float32"),
    "int64 overflow": ("file,label\na/1.png,9223372036854775808\n", "beyond the int64 range"),
    "empty file cell": ("file,label\n,1\n", "line 2: the 'file' cell is empty"),
    "absolute path": ("file,label\n/etc/passwd,1\n", "image path '/etc/passwd' must be relative"),
    "escape": ("file,label\na/../../x.png,1\n", "image path 'a/../../x.png' must be relative"),
    "backslash": ("file,label\na\\1.png,1\n", "with / separators"),
    "listed twice": ("file,label\na/1.png,1\n./a/1.png,2\n", "line 3: image './a/1.png' is already listed on line 2"),
    "bad split": ("file,label,split\na/1.png,1,validation\n", "line 2: split must be 'train' or 'test'"),
    "all test": ("file,label,split\na/1.png,1,test\n", "no training rows"),
    "malformed": ('file,label\n"a/1.png,1\n', "malformed CSV"),
}


@pytest.mark.parametrize("case", list(IMAGE_CSV_ERRORS))
def test_bad_labels_csv_raises_data_error_naming_csv_and_line(tmp_path: Path, case: str) -> None:
    csv, problem = IMAGE_CSV_ERRORS[case]
    root = _folder(tmp_path, csv)
    _raises(root / "labels.csv", problem, lambda: read_images(root))


def test_bad_image_folder_inputs(tmp_path: Path) -> None:
    _raises(tmp_path / "nowhere", "does not exist", lambda: read_images(tmp_path / "nowhere"))
    (tmp_path / "bare").mkdir()
    _raises(tmp_path / "bare" / "labels.csv", "labels.csv is missing", lambda: read_images(tmp_path / "bare"))
    root = _folder(tmp_path, "file,label\na/1.png,1\n")
    (root / "labels.csv").write_bytes(b"file,label\na/1.png,\xff\n")
    _raises(root / "labels.csv", "not UTF-8 text", lambda: read_images(root))

    (root / "labels.csv").write_text("file,label\na/1.png,1\na/9.png,2\n")
    _raises(
        root / "a" / "9.png", "image file does not exist (listed on line 3 of labels.csv)", lambda: read_images(root)
    )
    (root / "labels.csv").write_text("file,label\na,1\n")
    _raises(root / "a", "is not a file (listed on line 2", lambda: read_images(root))

    (root / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "labels.csv").write_text("file,label\na/1.png,1\na/bad.png,2\n")
    _raises(root / "a" / "bad.png", "unreadable or corrupt image (listed on line 3", lambda: read_images(root))
    png = (root / "a" / "2.png").read_bytes()
    (root / "a" / "bad.png").write_bytes(png[: len(png) - 20])
    _raises(root / "a" / "bad.png", "unreadable or corrupt image", lambda: read_images(root))

    _gray(root / "a" / "big.png", 0, size=(6, 4))
    (root / "labels.csv").write_text("file,label\na/1.png,1\na/big.png,2\n")
    _raises(
        root / "a" / "big.png",
        "image is 6×4 pixels (width×height) but a/1.png (line 2) is 5×4",
        lambda: read_images(root),
    )
    assert read_images(root, size=(4, 5)).train.x.shape == (2, 1, 4, 5)


# --------------------------------------------------------------------------------------------------------
# Partitioners
# --------------------------------------------------------------------------------------------------------

CLIENTS = ["a", "b", "c", "d"]


def _check_shares(shares: dict[str, np.ndarray], clients: list[str], n: int) -> np.ndarray:
    """The shares are sorted int64, disjoint and within range(n); returns their concatenation."""
    assert list(shares) == clients
    for share in shares.values():
        assert share.dtype == np.int64 and np.all(np.diff(share) > 0)
    together = np.concatenate(list(shares.values()))
    assert len(np.unique(together)) == len(together)
    assert together.min(initial=0) >= 0 and together.max(initial=0) < max(n, 1)
    return together


def test_iid_equal_shares_are_disjoint_complete_and_deterministic() -> None:
    shares = iid(103, CLIENTS, seed=1)
    assert len(_check_shares(shares, CLIENTS, 103)) == 103
    assert [len(s) for s in shares.values()] == [26, 26, 26, 25]
    again = iid(103, CLIENTS, seed=1)
    assert all(np.array_equal(shares[c], again[c]) for c in CLIENTS)
    other = iid(103, CLIENTS, seed=2)
    assert not all(np.array_equal(shares[c], other[c]) for c in CLIENTS)


def test_iid_with_sizes_leaves_the_rest_out() -> None:
    shares = iid(50, CLIENTS, seed=0, sizes=[10, 0, 5, 20])
    _check_shares(shares, CLIENTS, 50)
    assert [len(s) for s in shares.values()] == [10, 0, 5, 20]
    for bad, match in (
        ({"sizes": [10, 10, 10, 21]}, "more than the 50"),
        ({"sizes": [1, 2, 3]}, "3 entries for 4 clients"),
        ({"sizes": [1, -2, 3, 4]}, "non-negative"),
    ):
        with pytest.raises(ValueError, match=match):
            iid(50, CLIENTS, 0, **bad)
    with pytest.raises(ValueError, match="each of 4 clients"):
        iid(3, CLIENTS, 0)
    with pytest.raises(ValueError, match="named twice"):
        iid(10, ["a", "a"], 0)


LABELS = np.repeat(np.arange(10), 200)  # 2,000 samples, 10 balanced classes


def _class_fractions(shares: dict[str, np.ndarray]) -> np.ndarray:
    """Rows: clients; columns: the fraction of each client's samples in each class."""
    counts = np.array([np.bincount(LABELS[s], minlength=10) for s in shares.values()], dtype=float)
    return counts / counts.sum(axis=1, keepdims=True)


def test_dirichlet_shares_are_disjoint_complete_deterministic_and_respect_min_size() -> None:
    clients = [f"n{i}" for i in range(10)]
    shares = dirichlet(LABELS, clients, alpha=0.1, seed=3, min_size=20)
    assert len(_check_shares(shares, clients, len(LABELS))) == len(LABELS)
    assert min(len(s) for s in shares.values()) >= 20
    again = dirichlet(LABELS, clients, alpha=0.1, seed=3, min_size=20)
    assert all(np.array_equal(shares[c], again[c]) for c in clients)


def test_dirichlet_skews_labels_for_small_alpha_and_not_for_large() -> None:
    clients = [f"n{i}" for i in range(10)]
    # The mean share of a client's most common class: 0.1 for a perfect class mix, 1.0 for one class each.
    skewed = _class_fractions(dirichlet(LABELS, clients, alpha=0.05, seed=0)).max(axis=1).mean()
    mixed = _class_fractions(dirichlet(LABELS, clients, alpha=1000.0, seed=0))
    plain = _class_fractions(iid(len(LABELS), clients, seed=0)).max(axis=1).mean()
    assert skewed > 0.5  # 0.64 here; iid gives 0.13, alpha = 1 gives 0.26
    assert np.abs(mixed - 0.1).max() < 0.05
    assert plain < 0.2


def test_dirichlet_refuses_impossible_requests() -> None:
    with pytest.raises(ValueError, match="cannot give each of 4 clients 600"):
        dirichlet(LABELS, CLIENTS, 1.0, 0, min_size=600)
    with pytest.raises(ValueError, match="no draw in 3 gave each of 4 clients at least 450"):
        dirichlet(LABELS, CLIENTS, 0.01, 0, min_size=450, max_tries=3)
    with pytest.raises(ValueError, match="integer classes"):
        dirichlet(LABELS.astype(float), CLIENTS, 1.0, 0)
    for alpha in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha"):
            dirichlet(LABELS, CLIENTS, alpha, 0)


def test_parse_partitioner() -> None:
    assert parse_partitioner(" iid ") == Partitioner("iid")
    assert parse_partitioner("dirichlet:0.5") == Partitioner("dirichlet", 0.5)
    for text in ("iid", "dirichlet:0.5", "dirichlet:100.0"):
        assert parse_partitioner(str(parse_partitioner(text))) == parse_partitioner(text)
    bad = {
        "": "expected 'iid' or 'dirichlet:ALPHA'",
        "IID": "expected 'iid' or 'dirichlet:ALPHA'",
        "iid:2": "expected 'iid' or 'dirichlet:ALPHA'",
        "random": "expected 'iid' or 'dirichlet:ALPHA'",
        "dirichlet": "needs its concentration",
        "dirichlet:": "needs its concentration",
        "dirichlet:abc": "is not a number",
        "dirichlet:0": "finite and > 0",
        "dirichlet:-1": "finite and > 0",
        "dirichlet:nan": "finite and > 0",
        "dirichlet:inf": "finite and > 0",
    }
    for text, match in bad.items():
        with pytest.raises(ValueError, match=match):
            parse_partitioner(text)
    shares = parse_partitioner("dirichlet:0.5").split(LABELS, CLIENTS, seed=4, min_size=10)
    assert len(_check_shares(shares, CLIENTS, len(LABELS))) == len(LABELS)
    assert [len(s) for s in parse_partitioner("iid").split(LABELS, CLIENTS, seed=4).values()] == [500] * 4
