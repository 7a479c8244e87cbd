"""Generic arrays files: one ``.npz`` or HDF5 file of inputs and targets, read into :class:`Pools`.

Format: named arrays, the members of an ``.npz`` archive (numpy's ``np.savez``; never pickled) or the
datasets at the root of an HDF5 file (no groups, no links):

- ``x``: the inputs, one row per sample on axis 0 (any number of further axes): real integers or floats,
  at least one sample and at least one value per sample, all finite; read as float32 (a value beyond the
  float32 range is refused, not turned into infinity);
- the targets, one array per target column, at least one: ``y`` is the column named ``y`` and
  ``y_<column>`` the column named ``<column>`` (``y_age`` is column ``age``). A target is 1-D (one value
  per sample) or 2-D (one row of values per sample) with as many rows as ``x``: integers are read as
  int64 (class indices, say), floats as float32 (finite);
- optionally a test pool: ``x_test`` with the same shape per sample as ``x``, and ``y_test`` /
  ``y_test_<column>`` for exactly the training columns, each with the same kind (integer or float) and
  shape per sample as its training column. ``x_test`` and its targets come together or not at all.

Hence the names ``y_test`` and ``y_test_...`` always belong to the test pool, so a training column cannot
be called ``test`` or ``test_...``; column ``y`` is only ever spelled ``y`` (``y_y`` is refused). Any
other array name is refused, as are booleans, complex numbers, text, Python objects and structured
values.

The format is recognised by the suffix (``.npz``; ``.h5``, ``.hdf5``, ``.hdf``), which the file's
signature must then confirm, and otherwise by the signature alone (a zip archive, ``PK\\x03\\x04``; HDF5,
``\\x89HDF\\r\\n\\x1a\\n`` at offset 0, 512, 1024, 2048, ...). Every unusable input raises
:class:`DataError` naming the file and the problem.

:func:`write_arrays` writes the ``.npz`` form (uncompressed, or compressed with ``compress``), for
example one file per client of a partition; :func:`read_arrays` reads back what it wrote.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import BinaryIO, Literal

import h5py
import numpy as np

from fedgradnorm.atomic import atomic_write
from fedgradnorm.data.base import DataError, MultiTaskArrays, Pools

__all__ = ["FORMATS", "read_arrays", "write_arrays"]

FORMATS = ".npz (numpy zip archive) or .h5/.hdf5/.hdf (HDF5)"

_Format = Literal["npz", "hdf5"]
_SUFFIXES: dict[str, _Format] = {".npz": "npz", ".h5": "hdf5", ".hdf5": "hdf5", ".hdf": "hdf5"}
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; the end record of an empty archive
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_NAMES = "x, y and/or y_<column>, optionally x_test with y_test and/or y_test_<column>"
_NPZ_ERRORS = (
    OSError,
    ValueError,
    KeyError,
    EOFError,
    RuntimeError,
    NotImplementedError,
    zipfile.BadZipFile,
    zlib.error,
)
_HDF5_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError)
_KIND_NAMES = {
    "b": "boolean",
    "c": "complex",
    "O": "Python object",
    "U": "text",
    "S": "byte string",
    "V": "structured or raw",
    "M": "datetime",
    "m": "timedelta",
}


# --------------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------------


def read_arrays(path: str | Path) -> Pools:
    """Read an arrays file (see the module docstring) into a training pool and an optional test pool.

    ``x`` comes back float32 and each target column int64 or float32, in file order; ``test`` is ``None``
    when the file has no ``x_test``. Raises :class:`DataError` naming the file and the problem for every
    unusable input: a missing file, a folder, an unknown format, a truncated or corrupt file, a missing,
    unexpected or ill-typed array, rows that disagree, non-finite values.
    """
    path = Path(path)
    arrays = _load_npz(path) if _detect_format(path) == "npz" else _load_hdf5(path)
    return _to_pools(path, arrays)


def _detect_format(path: Path) -> _Format:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            is_hdf5 = _has_hdf5_signature(f, head)
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except IsADirectoryError:
        raise DataError(path, f"is a folder, not an arrays file ({FORMATS})") from None
    except OSError as err:
        raise DataError(path, f"cannot read the file: {err.strerror or err}") from None
    if not head:
        raise DataError(path, f"file is empty (0 bytes); expected {FORMATS}")
    by_signature: _Format | None = "npz" if head[:4] in _ZIP_MAGIC else "hdf5" if is_hdf5 else None
    by_suffix = _SUFFIXES.get(path.suffix.lower())
    if by_suffix is None:
        if by_signature is None:
            raise DataError(path, f"unrecognised format (neither a zip archive nor HDF5); expected {FORMATS}")
        return by_signature
    if by_signature is not None and by_signature != by_suffix:
        found = "a zip archive" if by_signature == "npz" else "an HDF5 file"
        raise DataError(path, f"is {found} despite its {path.suffix} suffix; rename it")
    if by_signature is None:
        missing = (
            "does not start with the zip signature PK\\x03\\x04" if by_suffix == "npz" else "has no HDF5 signature"
        )
        raise DataError(path, f"not a valid {path.suffix} file: it {missing} (corrupt, or another format?)")
    return by_suffix


def _has_hdf5_signature(f: BinaryIO, head: bytes) -> bool:
    """Whether the HDF5 signature is at offset 0 or after a user block (offsets 512, 1024, 2048, ...)."""
    if head == _HDF5_MAGIC:
        return True
    offset = 512
    while True:
        f.seek(offset)
        sig = f.read(8)
        if len(sig) < 8:
            return False
        if sig == _HDF5_MAGIC:
            return True
        offset *= 2


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            _check_names(path, names)
            arrays: dict[str, np.ndarray] = {}
            for name in names:
                try:
                    value = npz[name]
                except ValueError as err:
                    if "pickle" in str(err):
                        raise DataError(
                            path, f"array {name!r} holds Python objects, which need pickle (never loaded)"
                        ) from None
                    raise
                if not isinstance(value, np.ndarray):
                    raise DataError(path, f"member {name!r} of the archive is not a .npy array")
                arrays[name] = value
    except DataError:
        raise
    except _NPZ_ERRORS as err:
        raise DataError(path, f"cannot read the .npz archive (truncated or corrupt?): {err}") from None
    return arrays


def _load_hdf5(path: Path) -> dict[str, np.ndarray]:
    try:
        with h5py.File(path, "r") as f:
            names = list(f.keys())
            _check_names(path, names)
            arrays: dict[str, np.ndarray] = {}
            for name in names:
                if not isinstance(f.get(name, getlink=True), h5py.HardLink):
                    raise DataError(path, f"{name!r} is a link; expected a dataset at the root")
                dataset = f[name]
                if not isinstance(dataset, h5py.Dataset):
                    raise DataError(path, f"{name!r} is a group; expected a dataset at the root")
                if h5py.check_string_dtype(dataset.dtype) is not None:
                    raise DataError(path, f"array {name!r} holds text values; expected real integers or floats")
                _check_dtype(path, name, dataset.dtype)
                if dataset.shape is None:
                    raise DataError(path, f"dataset {name!r} is empty (no dataspace); expected one row per sample")
                arrays[name] = np.asarray(dataset[()])
    except DataError:
        raise
    except _HDF5_ERRORS as err:
        raise DataError(path, f"cannot read the HDF5 file (truncated or corrupt?): {err}") from None
    return arrays


def _check_names(path: Path, names: Iterable[str]) -> None:
    for name in names:
        _column_of(path, name)


def _column_of(path: Path, name: str) -> tuple[str, str] | None:
    """(pool, column) of a target array name, ``None`` for ``x`` and ``x_test``; raises for other names."""
    if name in ("x", "x_test"):
        return None
    if name == "y" or name == "y_test":
        return ("train" if name == "y" else "test"), "y"
    if name.startswith("y_test_"):
        pool, column = "test", name[len("y_test_") :]
    elif name.startswith("y_"):
        pool, column = "train", name[len("y_") :]
    else:
        raise DataError(path, f"unexpected array {name!r}; an arrays file holds {_NAMES}")
    if not column:
        raise DataError(path, f"array {name!r} names no column after the prefix")
    if column == "y":
        raise DataError(path, f"array {name!r}: column 'y' is spelled {'y' if pool == 'train' else 'y_test'!r}")
    return pool, column


def _target_name(column: str, pool: str) -> str:
    prefix = "y" if pool == "train" else "y_test"
    return prefix if column == "y" else f"{prefix}_{column}"


def _to_pools(path: Path, arrays: Mapping[str, np.ndarray]) -> Pools:
    columns: dict[str, list[str]] = {"train": [], "test": []}
    for name in arrays:
        found = _column_of(path, name)
        if found is not None:
            columns[found[0]].append(found[1])
    if "x" not in arrays:
        raise DataError(path, f"no array 'x' (the inputs); an arrays file holds {_NAMES}")
    if not columns["train"]:
        raise DataError(path, f"no target array; expected 'y' or 'y_<column>' (an arrays file holds {_NAMES})")
    x = _inputs(path, "x", arrays["x"])
    targets = {
        c: _target(path, _target_name(c, "train"), arrays[_target_name(c, "train")], ("x", len(x)))
        for c in columns["train"]
    }
    train = MultiTaskArrays(x=x, targets=targets)
    if "x_test" not in arrays:
        if columns["test"]:
            raise DataError(
                path, f"array {_target_name(columns['test'][0], 'test')!r} without 'x_test'; give both or neither"
            )
        return Pools(train=train)
    if not columns["test"]:
        raise DataError(
            path, "array 'x_test' without test targets ('y_test' or 'y_test_<column>'); give both or neither"
        )
    return Pools(train=train, test=_test_pool(path, arrays, train, columns))


def _test_pool(
    path: Path, arrays: Mapping[str, np.ndarray], train: MultiTaskArrays, columns: dict[str, list[str]]
) -> MultiTaskArrays:
    for column in columns["train"]:
        if column not in columns["test"]:
            raise DataError(path, f"test pool lacks column {column!r}: no array {_target_name(column, 'test')!r}")
    for column in columns["test"]:
        if column not in columns["train"]:
            raise DataError(
                path,
                f"array {_target_name(column, 'test')!r} has no training column {_target_name(column, 'train')!r}",
            )
    x = _inputs(path, "x_test", arrays["x_test"])
    if x.shape[1:] != train.x.shape[1:]:
        raise DataError(path, f"array 'x_test' has samples of shape {x.shape[1:]} but 'x' has {train.x.shape[1:]}")
    targets: dict[str, np.ndarray] = {}
    for column in columns["train"]:
        name, train_name = _target_name(column, "test"), _target_name(column, "train")
        value = _target(path, name, arrays[name], ("x_test", len(x)))
        expected = train.targets[column]
        if value.dtype != expected.dtype:
            raise DataError(
                path, f"array {name!r} holds {_kind_word(value)} but {train_name!r} holds {_kind_word(expected)}"
            )
        if value.shape[1:] != expected.shape[1:]:
            raise DataError(
                path, f"array {name!r} has rows of shape {value.shape[1:]} but {train_name!r} has {expected.shape[1:]}"
            )
        targets[column] = value
    return MultiTaskArrays(x=x, targets=targets)


def _kind_word(a: np.ndarray) -> str:
    return "integers" if a.dtype == np.int64 else "floats"


def _check_dtype(path: Path, name: str, dtype: np.dtype) -> None:
    if dtype.kind not in "iuf":
        kind = _KIND_NAMES.get(dtype.kind, str(dtype))
        raise DataError(path, f"array {name!r} holds {kind} values ({dtype}); expected real integers or floats")


def _check_rows(path: Path, name: str, a: np.ndarray) -> None:
    _check_dtype(path, name, a.dtype)
    if a.ndim == 0:
        raise DataError(path, f"array {name!r} is a single value; expected one row per sample on axis 0")


def _inputs(path: Path, name: str, a: np.ndarray) -> np.ndarray:
    _check_rows(path, name, a)
    if len(a) == 0:
        raise DataError(path, f"array {name!r} has no samples (0 rows)")
    if a.size == 0:
        raise DataError(path, f"array {name!r} has shape {a.shape}: no values per sample")
    return _as_float32(path, name, a)


def _target(path: Path, name: str, a: np.ndarray, x: tuple[str, int]) -> np.ndarray:
    """A target array checked against ``x`` (the name and row count of its pool's inputs), as int64 or float32."""
    _check_rows(path, name, a)
    if a.ndim > 2:
        raise DataError(path, f"array {name!r} has shape {a.shape}; expected 1-D or 2-D (one row per sample)")
    if len(a) != x[1]:
        raise DataError(
            path, f"array {name!r} has {len(a)} rows but {x[0]!r} has {x[1]}; every array needs one row per sample"
        )
    if a.ndim == 2 and a.shape[1] == 0:
        raise DataError(path, f"array {name!r} has shape {a.shape}: no values per sample")
    if a.dtype.kind == "f":
        return _as_float32(path, name, a)
    if a.dtype == np.uint64 and a.size and int(a.max()) > np.iinfo(np.int64).max:
        raise DataError(path, f"array {name!r} holds integers beyond the int64 range")
    return a.astype(np.int64)


def _as_float32(path: Path, name: str, a: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "f":
        _check_finite(path, name, a, "holds NaN or infinity")
    with np.errstate(over="ignore"):
        out = a.astype(np.float32)
    _check_finite(path, name, out, "holds values beyond the float32 range")
    return out


def _check_finite(path: Path, name: str, a: np.ndarray, problem: str) -> None:
    finite = np.isfinite(a).reshape(len(a), -1).all(axis=1)
    if not finite.all():
        raise DataError(path, f"array {name!r} {problem} (first at row {int(np.flatnonzero(~finite)[0])})")


# --------------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------------


def write_arrays(path: str | Path, data: Pools | MultiTaskArrays, *, compress: bool = False) -> None:
    """Write ``data`` to ``path`` as an ``.npz`` arrays file that :func:`read_arrays` reads back.

    A :class:`MultiTaskArrays` is written as a training pool alone. Targets are stored as the arrays of
    the module docstring (column ``y`` as ``y``, any other column ``c`` as ``y_c``) after the reader's
    checks and conversions, so what is written reads back equal; the format holds inputs and targets only,
    so ``extras`` are not written. The file is replaced atomically (:func:`fedgradnorm.atomic.atomic_write`):
    readers see the old file or the new one. ``compress`` stores the members deflated.

    Raises :class:`ValueError` for a path not ending in ``.npz`` or a column name the format cannot hold
    (empty, ``test`` or ``test_...``), :class:`DataError` naming ``path`` for arrays the reader would
    refuse, and :class:`OSError` when the file cannot be written.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: write_arrays writes .npz files; the name must end in .npz")
    pools = data if isinstance(data, Pools) else Pools(train=data)
    arrays = _file_arrays(pools.train, "train")
    if pools.test is not None:
        if set(pools.test.targets) != set(pools.train.targets):
            raise ValueError(
                f"{path}: the test pool has target columns {sorted(pools.test.targets)}, "
                f"the training pool {sorted(pools.train.targets)}; they must be the same"
            )
        arrays.update(_file_arrays(pools.test, "test"))
    checked = _to_pools(path, arrays)
    canonical = _file_arrays(checked.train, "train")
    if checked.test is not None:
        canonical.update(_file_arrays(checked.test, "test"))
    save = np.savez_compressed if compress else np.savez
    atomic_write(path, lambda f: save(f, allow_pickle=False, **canonical))


def _file_arrays(arrays: MultiTaskArrays, pool: str) -> dict[str, np.ndarray]:
    out = {"x" if pool == "train" else "x_test": np.asarray(arrays.x)}
    for column, value in arrays.targets.items():
        if not column or column == "test" or column.startswith("test_"):
            raise ValueError(
                f"target column {column!r} cannot be stored in an arrays file (empty, 'test' or 'test_...')"
            )
        out[_target_name(column, pool)] = np.asarray(value)
    return out
