"""Generic image folders: images listed in a ``labels.csv`` with their targets, read into :class:`Pools`.

Layout (the folder, or its ``labels.csv``, is what :func:`read_images` is given)::

    folder/
        labels.csv
        cats/0001.png ...
        dogs/0001.jpg ...

``labels.csv`` is UTF-8 CSV (an initial byte-order mark is allowed; fields may be quoted; blank lines are
skipped; spaces around a field are ignored)::

    file,species,weight_kg,split
    cats/0001.png,0,4.2,train
    dogs/0001.jpg,1,20.5,test

- the header names every column once: first ``file``, then one or more target columns, in any order with
  an optional ``split`` column;
- ``file``: the image path relative to the folder, with ``/`` as separator; absolute paths, backslashes
  and ``..`` are refused, and each image is listed once;
- a target column becomes a target of that name: int64 when every value in it is an integer (``-3``,
  ``+7``), otherwise float32 (any finite number Python's ``float`` reads, ``1e-3`` say). Every cell holds
  a value: an empty cell or a non-number is refused;
- ``split``: ``train`` or ``test``; rows marked ``test`` form the test pool. Without the column, or when no
  row says ``test``, there is no test pool; at least one row must be for training.

Every image is decoded with Pillow and converted to grayscale (``mode="L"``) or colour (``mode="RGB"``).
Images must all have the same size unless ``size=(height, width)`` is given, in which case each is resized
with Pillow's bilinear filter (which antialiases when it shrinks). ``x`` is float32 in [0, 1] of shape
``(n, channels, height, width)``, rows in file order. Every unusable input raises :class:`DataError`
naming the file (the CSV, with its line number, or the image) and the problem.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from fedgradnorm.data.base import DataError, MultiTaskArrays, Pools

__all__ = ["LABELS_FILE", "MODES", "read_images"]

LABELS_FILE = "labels.csv"
MODES: dict[str, int] = {"L": 1, "RGB": 3}

_RESAMPLE = Image.Resampling.BILINEAR
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_INTEGER = re.compile(r"[+-]?[0-9]+")
_INT64 = np.iinfo(np.int64)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_SPLITS = ("train", "test")


@dataclass(frozen=True)
class _Row:
    """One CSV record: its line number, the image path as written and its cells by column name."""

    line_no: int
    file: str
    cells: dict[str, str]


def read_images(path: str | Path, *, mode: str = "L", size: tuple[int, int] | None = None) -> Pools:
    """Read an image folder with its ``labels.csv`` (see the module docstring).

    ``path`` is the folder or the CSV file (the images are then found relative to the CSV's folder).
    ``mode``: ``"L"`` (grayscale, one channel) or ``"RGB"`` (three); ``size``: ``(height, width)`` to
    resize every image to, or ``None`` to require one size throughout. Returns ``x`` float32
    ``(n, channels, height, width)`` in [0, 1] and one target per target column (int64 or float32, 1-D);
    ``test`` holds the rows whose ``split`` is ``test``, or is ``None`` when there are none.

    Raises :class:`ValueError` for a bad ``mode`` or ``size`` and :class:`DataError` naming the file and
    the problem for every unusable input.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    if size is not None and (len(size) != 2 or not all(_is_positive_int(v) for v in size)):
        raise ValueError(f"size must be (height, width), two positive integers, got {size!r}")
    csv_path = _labels_path(Path(path))
    header, rows = _read_csv(csv_path)
    columns = [name for name in header[1:] if name != "split"]
    targets = {name: _column(csv_path, name, rows) for name in columns}
    is_test = np.array([row.cells.get("split") == "test" for row in rows], dtype=bool)
    if is_test.all():
        raise DataError(csv_path, "no training rows: every row has split 'test'")
    x = _decode(csv_path, rows, mode, size)
    train = MultiTaskArrays(x=x[~is_test], targets={k: v[~is_test] for k, v in targets.items()})
    if not is_test.any():
        return Pools(train=train)
    return Pools(train=train, test=MultiTaskArrays(x=x[is_test], targets={k: v[is_test] for k, v in targets.items()}))


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and bool(value > 0)


def _labels_path(path: Path) -> Path:
    if path.is_dir():
        csv_path = path / LABELS_FILE
        if not csv_path.is_file():
            raise DataError(csv_path, f"{LABELS_FILE} is missing from the image folder")
        return csv_path
    if not path.exists():
        raise DataError(path, f"does not exist; expected an image folder with {LABELS_FILE}, or that CSV file")
    return path


# --------------------------------------------------------------------------------------------------------
# labels.csv
# --------------------------------------------------------------------------------------------------------


def _read_csv(csv_path: Path) -> tuple[list[str], list[_Row]]:
    """The header and the data rows, checked for shape, paths and splits (values are parsed later)."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(csv_path, f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise DataError(csv_path, f"cannot read the file: {err.strerror or err}") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    rows: list[_Row] = []
    seen: dict[str, int] = {}
    try:
        for record in reader:
            if not record or (len(record) == 1 and not record[0].strip()):
                continue
            cells = [cell.strip() for cell in record]
            if header is None:
                header = _check_header(csv_path, reader.line_num, cells)
                continue
            rows.append(_check_row(csv_path, reader.line_num, header, cells, seen))
    except csv.Error as err:
        raise DataError(csv_path, f"line {reader.line_num}: malformed CSV ({err})") from None
    if header is None:
        raise DataError(csv_path, "file is empty; expected a header line such as file,label")
    if not rows:
        raise DataError(csv_path, "no image rows after the header")
    return header, rows


def _check_header(csv_path: Path, line_no: int, names: list[str]) -> list[str]:
    where = f"line {line_no} (header)"
    for i, name in enumerate(names):
        if not name:
            raise DataError(csv_path, f"{where}: column {i + 1} has no name")
        if name in names[:i]:
            raise DataError(csv_path, f"{where}: column {name!r} appears twice")
    if names[0] != "file":
        problem = "'file' must be the first column" if "file" in names else "no 'file' column"
        raise DataError(csv_path, f"{where}: {problem}; the header starts with file (the image path)")
    if not [name for name in names[1:] if name != "split"]:
        raise DataError(csv_path, f"{where}: no target column after 'file'")
    return names


def _check_row(csv_path: Path, line_no: int, header: list[str], cells: list[str], seen: dict[str, int]) -> _Row:
    where = f"line {line_no}"
    if len(cells) != len(header):
        raise DataError(csv_path, f"{where}: {len(cells)} fields, but the header has {len(header)}")
    by_name = dict(zip(header, cells, strict=True))
    file = by_name["file"]
    if not file:
        raise DataError(csv_path, f"{where}: the 'file' cell is empty")
    rel = PurePosixPath(file)
    if "\\" in file or rel.is_absolute() or ".." in rel.parts:
        raise DataError(
            csv_path, f"{where}: image path {file!r} must be relative to the folder, with / separators and no '..'"
        )
    key = str(rel)
    if key in seen:
        raise DataError(csv_path, f"{where}: image {file!r} is already listed on line {seen[key]}")
    seen[key] = line_no
    split = by_name.get("split")
    if split is not None and split not in _SPLITS:
        raise DataError(csv_path, f"{where}: split must be 'train' or 'test', got {split!r}")
    return _Row(line_no=line_no, file=file, cells=by_name)


def _column(csv_path: Path, name: str, rows: Sequence[_Row]) -> np.ndarray:
    """A target column: int64 when every cell is an integer, else float32; raises at the first bad cell."""
    values: list[float] = []
    integers = True
    for row in rows:
        cell = row.cells[name]
        where = f"line {row.line_no}, column {name!r}"
        if not cell:
            raise DataError(csv_path, f"{where}: empty cell; every target needs a value")
        if _INTEGER.fullmatch(cell):
            number = int(cell)
            if not _INT64.min <= number <= _INT64.max:
                raise DataError(csv_path, f"{where}: {cell} is beyond the int64 range")
            values.append(number)
            continue
        integers = False
        try:
            value = float(cell)
        except ValueError:
            raise DataError(csv_path, f"{where}: not a number: {cell!r}") from None
        if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
            raise DataError(csv_path, f"{where}: {cell!r} is not a finite float32 number")
        values.append(value)
    if integers:
        return np.array(values, dtype=np.int64)
    return np.array(values, dtype=np.float64).astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------


def _decode(csv_path: Path, rows: Sequence[_Row], mode: str, size: tuple[int, int] | None) -> np.ndarray:
    """Every row's image as float32 ``(n, channels, height, width)`` in [0, 1], in row order."""
    folder = csv_path.parent
    pixels: np.ndarray | None = None
    first = rows[0]
    for i, row in enumerate(rows):
        image = _load_image(folder.joinpath(*PurePosixPath(row.file).parts), csv_path, row.line_no, mode, size)
        if pixels is None:
            pixels = np.empty((len(rows), *image.shape), dtype=np.uint8)
        elif image.shape != pixels.shape[1:]:
            raise DataError(
                folder / row.file,
                f"image is {_describe(image.shape)} but {first.file} (line {first.line_no}) is "
                f"{_describe(pixels.shape[1:])}; images must share one size, or pass size=(height, width)",
            )
        pixels[i] = image
    assert pixels is not None  # rows is never empty
    return pixels.astype(np.float32) / np.float32(255.0)


def _describe(shape: tuple[int, ...]) -> str:
    return f"{shape[2]}×{shape[1]} pixels (width×height)"


def _load_image(path: Path, csv_path: Path, line_no: int, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    """uint8 pixels ``(channels, height, width)`` of one image in ``mode``, resized to ``size`` if given."""
    source = f"listed on line {line_no} of {csv_path.name}"
    if not path.is_file():
        problem = "is not a file" if path.exists() else "image file does not exist"
        raise DataError(path, f"{problem} ({source})")
    try:
        with Image.open(path) as img:
            converted = img.convert(mode)
        if size is not None:
            converted = converted.resize((size[1], size[0]), resample=_RESAMPLE)
        pixels = np.asarray(converted, dtype=np.uint8)
    except _IMAGE_ERRORS as err:
        raise DataError(path, f"unreadable or corrupt image ({source}): {err}") from None
    return pixels.reshape(pixels.shape[0], pixels.shape[1], MODES[mode]).transpose(2, 0, 1)
