"""RadComDynamic (Jagannath & Jagannath, 2021): reader of the published HDF5 file.

Published format (``RadComDynamic.hdf5``; ``RadComAWGN.hdf5`` and ``RadComOta2.45GHz.hdf5`` share it):

- one HDF5 dataset per sample, directly at the root of the file, no groups;
- the dataset name is ``str()`` of a Python tuple ``(modulation, signal, snr, index)``, for example
  ``"('pulsed', 'Airborne-detection', 10, 0)"``, with ``snr`` in dB and ``index`` 0..699 as Python ints;
- the value is 256 floats: the in-phase samples 0..127, then the quadrature samples 128..255, of 128
  complex baseband samples at 10 MS/s (12.8 µs);
- SNR −20 dB to 18 dB in steps of 2; 700 samples per (modulation, signal, SNR); the 9 (modulation,
  signal) pairs of :data:`PAIRS`: 9 × 20 × 700 = 126,000 samples.

:func:`read_radcom` parses every name with :func:`ast.literal_eval` (never ``eval``) and accepts a value of
shape (256,), (256, 1), (1, 256) or (2, 128) (row 0 = I, row 1 = Q) of any real integer or float type, or
128 complex values (shape (128,), (128, 1) or (1, 128)); each of these flattens to I then Q without
ambiguity. Shape (128, 2) and anything else is refused, as are non-finite values. The signal label
``Raw`` of ``RadComAWGN.hdf5`` is read as ``Satcom``. Any (modulation, signal) combination of known labels
is accepted (the pairs of the dynamic file are inferred, not published), and any integer SNR. Samples come
back sorted by (modulation, signal, snr, index); the class index of a label is its position in
:data:`MODULATIONS` or :data:`SIGNALS`, and the anomaly label is 1 exactly when ``snr < -4``.

Reading 126,000 tiny datasets is dominated by HDF5's per-object cost, so the reader opens each dataset
through h5py's low-level API, checks its type and shape, and for the usual contiguous layout takes only
the file offset; the raw bytes are then read in one pass over the file. The decoded arrays are cached in an
``.npz`` (see :func:`read_radcom`).

:func:`fedgradnorm.data.synthetic_radcom.generate_radcom` writes the same format from synthetic waveforms.
"""

from __future__ import annotations

import ast
import math
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import structlog

from fedgradnorm.data.base import DataError, MultiTaskArrays
from fedgradnorm.data.cache import ArrayCache, CacheEntry

__all__ = [
    "ANOMALY_SNR_DB",
    "MODULATIONS",
    "N_IQ",
    "PAIRS",
    "SAMPLES_PER_KEY",
    "SAMPLE_RATE",
    "SIGNALS",
    "SNRS",
    "TASKS",
    "read_radcom",
]

log = structlog.get_logger("fedgradnorm.data.radcom")

MODULATIONS: tuple[str, ...] = ("amdsb", "amssb", "ask", "bpsk", "fmcw", "pulsed")
SIGNALS: tuple[str, ...] = (
    "AM radio",
    "Air-Ground-MTI",
    "Airborne-detection",
    "Airborne-range",
    "Ground mapping",
    "Radar-Altimeter",
    "Satcom",
    "short-range",
)
PAIRS: tuple[tuple[str, str], ...] = (
    ("amdsb", "AM radio"),
    ("amssb", "AM radio"),
    ("ask", "short-range"),
    ("bpsk", "Satcom"),
    ("fmcw", "Radar-Altimeter"),
    ("pulsed", "Air-Ground-MTI"),
    ("pulsed", "Airborne-detection"),
    ("pulsed", "Airborne-range"),
    ("pulsed", "Ground mapping"),
)
SNRS: tuple[int, ...] = tuple(range(-20, 20, 2))
ANOMALY_SNR_DB = -4
SAMPLES_PER_KEY = 700
SAMPLE_RATE = 10e6
N_IQ = 128
TASKS: tuple[str, ...] = ("modulation", "signal", "anomaly")

_VECTOR = 2 * N_IQ
_MOD_INDEX = {name: i for i, name in enumerate(MODULATIONS)}
_SIG_INDEX = {name: i for i, name in enumerate(SIGNALS)}
_SIGNAL_ALIASES = {"Raw": "Satcom"}
_KEY_FORM = "\"('modulation', 'signal', snr, index)\""
_MAX_KEY_CHARS = 200
_REAL_SHAPES = {(_VECTOR,), (_VECTOR, 1), (1, _VECTOR), (2, N_IQ)}
_COMPLEX_SHAPES = {(N_IQ,), (N_IQ, 1), (1, N_IQ)}

_CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Decoded:
    """The arrays a file decodes to (and the cache holds), in sorted sample order."""

    x: np.ndarray
    modulation: np.ndarray
    signal: np.ndarray
    snr: np.ndarray

    def fields(self) -> dict[str, np.ndarray]:
        return {"x": self.x, "modulation": self.modulation, "signal": self.signal, "snr": self.snr}

    def to_arrays(self) -> MultiTaskArrays:
        anomaly = (self.snr < ANOMALY_SNR_DB).astype(np.int64)
        return MultiTaskArrays(
            x=self.x,
            targets={"modulation": self.modulation, "signal": self.signal, "anomaly": anomaly},
            extras={"snr": self.snr},
        )


def read_radcom(path: str | Path, *, cache: bool = True) -> MultiTaskArrays:
    """Read a RadCom HDF5 file of the published format (see the module docstring).

    Returns ``x`` float32 [n, 256] (I then Q), targets ``modulation``, ``signal`` and ``anomaly`` (int64
    class indices) and extras ``snr`` (int64, dB), sorted by (modulation, signal, snr, index).

    With ``cache`` the decoded arrays are kept in an ``.npz`` in the first writable folder of
    ``$FEDGRADNORM_CACHE_DIR`` (when set), ``.fedgradnorm_cache`` beside the file, ``~/.cache/fedgradnorm``;
    the cache is keyed by the file's absolute path, size, mtime and inode, so a changed or replaced file is
    decoded again, and
    a cache that fails to load or to validate is ignored and rebuilt. Raises :class:`DataError` naming the
    file and the problem for every unusable input.
    """
    path = Path(path)
    stat = _stat_input(path)
    if cache:
        entry = _cache_entry(path, stat)
        cached = _CACHE.load(entry, _valid_decoded)
        if cached is not None:
            return _Decoded(**cached).to_arrays()
    decoded = _decode_file(path)
    if cache:
        if _identity(_stat_input(path)) == _identity(stat):
            _CACHE.store(entry, decoded.fields())
        else:
            log.warning("radcom.changed_while_read", path=str(path), action="decoded arrays not cached")
    return decoded.to_arrays()


def _stat_input(path: Path) -> os.stat_result:
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except OSError as err:
        raise DataError(path, f"cannot access the file: {err.strerror or err}") from None
    if path.is_dir():
        raise DataError(path, "is a directory, not an HDF5 file")
    if stat.st_size == 0:
        raise DataError(path, "file is empty (0 bytes); expected an HDF5 file")
    return stat


def _identity(stat: os.stat_result) -> tuple[int, int, int]:
    """What must stay the same for decoded arrays to remain valid: size, modification time, inode."""
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def _decode_file(path: Path) -> _Decoded:
    try:
        is_hdf5 = h5py.is_hdf5(str(path))
    except OSError as err:
        raise DataError(path, f"cannot open the file: {err}") from None
    if not is_hdf5:
        raise DataError(path, "not an HDF5 file (no HDF5 signature found)")
    try:
        with h5py.File(path, "r") as f:
            names = _root_names(path, f)
            x, labels = _read_datasets(path, f, names)
    except DataError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as err:
        raise DataError(path, f"cannot read the HDF5 file: {err}") from None
    return _finish(path, names, x, labels)


def _root_names(path: Path, f: h5py.File) -> list[str]:
    names = []
    for raw in f.id:
        try:
            names.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise DataError(path, f"dataset name {raw!r} is not UTF-8 text") from None
    if not names:
        raise DataError(path, f"no datasets at the root; expected one dataset per sample named {_KEY_FORM}")
    return names


def _parse_key(path: Path, key: str) -> tuple[int, int, int, int]:
    """(modulation index, signal index, snr, index) of a dataset name of the published form."""
    bad_form = DataError(path, f"dataset name {key!r} is not of the published form {_KEY_FORM}")
    if len(key) > _MAX_KEY_CHARS:
        raise bad_form
    try:
        value = ast.literal_eval(key)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise bad_form from None
    if not isinstance(value, tuple) or len(value) != 4:
        raise bad_form
    modulation, signal, snr, index = value
    if not (isinstance(modulation, str) and isinstance(signal, str) and _is_int(snr) and _is_int(index)):
        raise bad_form
    if modulation not in _MOD_INDEX:
        raise DataError(path, f"dataset {key!r}: unknown modulation {modulation!r} (known: {', '.join(MODULATIONS)})")
    signal = _SIGNAL_ALIASES.get(signal, signal)
    if signal not in _SIG_INDEX:
        raise DataError(path, f"dataset {key!r}: unknown signal {signal!r} (known: {', '.join(SIGNALS)})")
    if index < 0:
        raise DataError(path, f"dataset {key!r}: negative sample index {index}")
    return _MOD_INDEX[modulation], _SIG_INDEX[signal], snr, index


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_datasets(path: Path, f: h5py.File, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All vectors as float32 [n, 256] and the parsed keys as int64 [n, 4], in file order.

    The names are parsed first, in a pass of their own (faster than alternating with HDF5 calls).
    Datasets of the first real type met (the whole file, in practice) that have contiguous storage are
    read afterwards in one pass over the raw file bytes at their offsets; the others through HDF5, which
    converts the type. Comparing HDF5 types is cheaper than building a numpy dtype for every dataset.
    """
    n = len(names)
    labels = np.array([_parse_key(path, name) for name in names], np.int64).reshape(n, 4)
    x = np.empty((n, _VECTOR), np.float32)
    offsets = np.full(n, -1, np.int64)
    raw_type: h5py.h5t.TypeID | None = None
    raw_dtype = np.dtype(np.float32)
    for i, name in enumerate(names):
        dsid = _open_dataset(path, f, name)
        tid, shape = dsid.get_type(), dsid.shape
        same = raw_type is not None and tid.equal(raw_type)
        dtype = raw_dtype if same else tid.dtype
        complex_values = _check_value_type(path, name, dtype, shape)
        if raw_type is None and not complex_values:
            raw_type, raw_dtype, same = tid, dtype, True
        offset = dsid.get_offset() if same else None
        if offset is None:
            x[i] = _read_through_hdf5(dsid, shape, complex_values)
        else:
            offsets[i] = offset
    _read_raw(path, f, names, offsets, raw_dtype, x)
    return x, labels


def _open_dataset(path: Path, f: h5py.File, name: str) -> h5py.h5d.DatasetID:
    raw = name.encode("utf-8")
    try:
        return h5py.h5d.open(f.id, raw)
    except KeyError as err:
        problem = str(err).strip("'\"")
    try:
        kind = h5py.h5o.get_info(f.id, raw).type
    except (KeyError, RuntimeError) as err:
        raise DataError(path, f"cannot open {name!r}: {problem} ({err})") from None
    if kind == h5py.h5o.TYPE_GROUP:
        raise DataError(path, f"{name!r} is a group; expected a dataset of 256 floats at the root")
    raise DataError(path, f"{name!r} is not a dataset; expected a dataset of 256 floats at the root")


def _check_value_type(path: Path, name: str, dtype: np.dtype, shape: tuple[int, ...] | None) -> bool:
    """Whether the dataset holds complex values; raises unless its type and shape are accepted."""
    if dtype.kind in "fiu":
        if shape in _REAL_SHAPES:
            return False
        expected = "256 floats (128 I then 128 Q) of shape (256,), (256, 1), (1, 256) or (2, 128)"
    elif dtype.kind == "c":
        if shape in _COMPLEX_SHAPES:
            return True
        expected = "128 complex values of shape (128,), (128, 1) or (1, 128)"
    else:
        raise DataError(path, f"dataset {name!r} holds values of type {dtype}; expected 256 floats")
    size = math.prod(shape) if shape is not None else 0
    raise DataError(path, f"dataset {name!r} has shape {shape} ({size} values); expected {expected}")


def _read_through_hdf5(dsid: h5py.h5d.DatasetID, shape: tuple[int, ...], complex_values: bool) -> np.ndarray:
    buf = np.empty(shape, np.complex64 if complex_values else np.float32)
    dsid.read(h5py.h5s.ALL, h5py.h5s.ALL, buf)
    if complex_values:
        flat = buf.reshape(N_IQ)
        return np.concatenate([flat.real, flat.imag])
    return buf.reshape(_VECTOR)


def _read_raw(path: Path, f: h5py.File, names: list[str], offsets: np.ndarray, dtype: np.dtype, x: np.ndarray) -> None:
    """Fill the rows of ``x`` whose ``offsets`` are set from the raw bytes of the file."""
    rows = np.flatnonzero(offsets >= 0)
    if len(rows) == 0:
        return
    width = _VECTOR * dtype.itemsize
    raw = np.empty((len(rows), width), np.uint8)
    order = np.argsort(offsets[rows], kind="stable")
    with open(path, "rb") as fh:
        view = raw.reshape(-1).data
        for j in order:
            fh.seek(int(offsets[rows[j]]))
            if fh.readinto(view[j * width : (j + 1) * width]) != width:
                raise DataError(path, f"dataset {names[rows[j]]!r} lies beyond the end of the file")
    x[rows] = raw.view(dtype).reshape(len(rows), _VECTOR)
    _check_raw_matches_hdf5(path, f, names[rows[0]], x[rows[0]])


def _check_raw_matches_hdf5(path: Path, f: h5py.File, name: str, row: np.ndarray) -> None:
    """Guard the raw-offset read: one row read both ways must agree."""
    dsid = h5py.h5o.open(f.id, name.encode("utf-8"))
    expected = _read_through_hdf5(dsid, dsid.shape, False)
    if not np.array_equal(expected, row, equal_nan=True):
        raise DataError(path, f"dataset {name!r}: raw bytes at its file offset disagree with HDF5's read")


def _finish(path: Path, names: list[str], x: np.ndarray, labels: np.ndarray) -> _Decoded:
    """Sort by (modulation, signal, snr, index) and check for duplicates and non-finite values."""
    order = np.lexsort((labels[:, 3], labels[:, 2], labels[:, 1], labels[:, 0]))
    labels = labels[order]
    same = np.flatnonzero((labels[1:] == labels[:-1]).all(axis=1))
    if len(same):
        first, second = names[order[same[0]]], names[order[same[0] + 1]]
        raise DataError(path, f"datasets {first!r} and {second!r} name the same sample")
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = names[int(np.flatnonzero(~finite)[0])]
        raise DataError(path, f"dataset {bad!r} holds non-finite values (NaN or infinity)")
    return _Decoded(
        x=x[order],
        modulation=np.ascontiguousarray(labels[:, 0]),
        signal=np.ascontiguousarray(labels[:, 1]),
        snr=np.ascontiguousarray(labels[:, 2]),
    )


# --------------------------------------------------------------------------------------------------------
# Cache of decoded arrays
# --------------------------------------------------------------------------------------------------------

_CACHE = ArrayCache("radcom", "RadCom", ("x", "modulation", "signal", "snr"), version=_CACHE_VERSION, logger=log)


def _cache_entry(path: Path, stat: os.stat_result) -> CacheEntry:
    size, mtime_ns, inode = _identity(stat)
    return _CACHE.entry(path, {"path": str(path.resolve()), "bytes": size, "mtime_ns": mtime_ns, "inode": inode})


def _valid_decoded(arrays: dict[str, np.ndarray]) -> bool:
    d = _Decoded(**arrays)
    n = len(d.x)
    labels_ok = all(a.dtype == np.int64 and a.shape == (n,) for a in (d.modulation, d.signal, d.snr))
    return (
        n > 0
        and d.x.dtype == np.float32
        and d.x.shape == (n, _VECTOR)
        and labels_ok
        and 0 <= int(d.modulation.min()) <= int(d.modulation.max()) < len(MODULATIONS)
        and 0 <= int(d.signal.min()) <= int(d.signal.max()) < len(SIGNALS)
    )
