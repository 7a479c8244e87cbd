"""MTFL (Multi-Task Facial Landmark, Zhang et al., ECCV 2014): reader of the published layout.

Layout of the unzipped ``MTFL.zip`` (the folder passed as ``root``)::

    root/
        AFLW/0001-image20056.jpg ...
        lfw_5590/Aaron_Eckhart_0001.jpg ...
        net_7876/_40_1154_0.jpg ...
        training.txt
        testing.txt

Each annotation file holds one face per line, 15 fields separated by whitespace (a line may start with a
space; blank lines are skipped)::

     lfw_5590\\Aaron_Eckhart_0001.jpg 107.2 147.7 126.2 106.2 140.7 108.7 113.2 143.7 158.7 162.7 1 2 2 3

- field 1: the image path relative to ``root`` with Windows backslashes;
- fields 2-11: the five landmarks in pixel coordinates of the image, all five x then all five y, in the
  order left eye, right eye, nose tip, left mouth corner, right mouth corner ("left" = smaller x);
- fields 12-15: the attributes, 1-based: gender (1 male, 2 female), smile (1 smiling, 2 not), glasses
  (1 wearing, 2 not), head pose (1 left profile, 2 left, 3 frontal, 4 right, 5 right profile).

:func:`read_mtfl` turns a split into the inputs of Network 1: every image in grayscale, resized to
``size`` × ``size`` with Pillow's bilinear filter (which antialiases when it shrinks), as float32 in
[0, 1]; the landmarks scaled by the same per-axis ratio into pixel units of the small image (or into
[0, 1] with ``normalize_landmarks``); the attributes as class indices (value − 1).

:func:`fedgradnorm.data.synthetic_mtfl.generate_mtfl` writes the same layout with drawn faces.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

import numpy as np
import structlog
from PIL import Image

from fedgradnorm.data.base import DataError, MultiTaskArrays
from fedgradnorm.data.cache import ArrayCache, CacheEntry

__all__ = [
    "ATTRIBUTES",
    "FOLDERS",
    "IMAGE_SIZE",
    "LANDMARK_NAMES",
    "NUM_CLASSES",
    "SPLITS",
    "TASKS",
    "read_mtfl",
]

log = structlog.get_logger("fedgradnorm.data.mtfl")

TASKS: tuple[str, ...] = ("landmarks", "gender", "smile", "glasses", "pose")
NUM_CLASSES: dict[str, int] = {"gender": 2, "smile": 2, "glasses": 2, "pose": 5}
ATTRIBUTES: tuple[str, ...] = ("gender", "smile", "glasses", "pose")
IMAGE_SIZE = 40
LANDMARK_NAMES: tuple[str, ...] = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
SPLITS: tuple[str, ...] = ("training", "testing")
FOLDERS: tuple[str, ...] = ("AFLW", "lfw_5590", "net_7876")

_N_FIELDS = 15
_ATTRIBUTE_MEANING = {
    "gender": "1 male, 2 female",
    "smile": "1 smiling, 2 not smiling",
    "glasses": "1 wearing, 2 not wearing",
    "pose": "1 left profile, 2 left, 3 frontal, 4 right, 5 right profile",
}
_RESAMPLE = Image.Resampling.BILINEAR
_CACHE_VERSION = 1
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


# --------------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    """One parsed annotation line: the image, its landmarks in source pixels and its 0-based labels."""

    line_no: int
    rel_path: str
    landmarks: tuple[float, ...]
    labels: tuple[int, ...]


def read_mtfl(
    root: str | Path,
    split: str = "training",
    *,
    size: int = IMAGE_SIZE,
    normalize_landmarks: bool = False,
    cache: bool = True,
) -> MultiTaskArrays:
    """Read one split of an unzipped MTFL folder.

    Returns ``x`` float32 ``[n, 1, size, size]`` in [0, 1] and targets ``landmarks`` float32 ``[n, 10]``
    (x1..x5, y1..y5 in pixels of the resized image, or divided by ``size`` when ``normalize_landmarks``)
    and ``gender``, ``smile``, ``glasses``, ``pose`` int64 ``[n]`` class indices.

    With ``cache`` the decoded arrays are kept in an ``.npz`` file (see :mod:`fedgradnorm.data.cache`) keyed by the
    annotation file's absolute path, size in bytes and mtime_ns and by ``size``; editing or touching the
    annotation file invalidates it. Normalisation is a division applied after loading, so both settings
    share one cache file. Raises :class:`DataError` naming the file and the problem for every bad input.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    root = Path(root)
    annotation = _annotation_path(root, split)
    pixels, landmarks, labels = _load_or_decode(root, annotation, size, cache)
    x = pixels.astype(np.float32) / np.float32(255.0)
    if normalize_landmarks:
        landmarks = landmarks / np.float32(size)
    targets: dict[str, np.ndarray] = {"landmarks": landmarks.astype(np.float32, copy=False)}
    for i, name in enumerate(ATTRIBUTES):
        targets[name] = labels[:, i].astype(np.int64)
    return MultiTaskArrays(x=x, targets=targets)


def _annotation_path(root: Path, split: str) -> Path:
    if not root.exists():
        raise DataError(root, "MTFL root folder does not exist")
    if not root.is_dir():
        raise DataError(root, "MTFL root is not a folder (expected the unzipped MTFL.zip)")
    annotation = root / f"{split}.txt"
    if not annotation.is_file():
        raise DataError(annotation, f"annotation file {split}.txt is missing from the MTFL folder")
    return annotation


def _load_or_decode(root: Path, annotation: Path, size: int, cache: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if cache:
        entry = _cache_entry(annotation, size)
        cached = _CACHE.load(entry, lambda arrays: _valid_cache(arrays, size))
        if cached is not None:
            return cached["pixels"], cached["landmarks"], cached["labels"]
    records = _parse_annotations(annotation)
    arrays = _decode(root, annotation, records, size)
    if cache:
        pixels, landmarks, labels = arrays
        _CACHE.store(entry, {"pixels": pixels, "landmarks": landmarks, "labels": labels})
    return arrays


def _parse_annotations(annotation: str | Path) -> list[_Record]:
    """Parse and validate an MTFL annotation file; raise :class:`DataError` at the first bad line."""
    annotation = Path(annotation)
    try:
        text = annotation.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(annotation, f"annotation file is not UTF-8 text ({err.reason})") from err
    except OSError as err:
        raise DataError(annotation, f"cannot read annotation file: {err.strerror or err}") from err
    records = [
        _parse_line(annotation, line_no, line)
        for line_no, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]
    if not records:
        raise DataError(annotation, "annotation file is empty (no face lines)")
    return records


def _parse_line(annotation: Path, line_no: int, line: str) -> _Record:
    fields = line.split()
    where = f"line {line_no}"
    if len(fields) != _N_FIELDS:
        raise DataError(
            annotation,
            f"{where}: expected {_N_FIELDS} fields (path, 5 x, 5 y, gender, smile, glasses, pose), got {len(fields)}",
        )
    landmarks = tuple(_parse_coordinate(annotation, where, i, tok) for i, tok in enumerate(fields[1:11]))
    labels = tuple(
        _parse_attribute(annotation, where, name, tok) for name, tok in zip(ATTRIBUTES, fields[11:], strict=True)
    )
    return _Record(line_no=line_no, rel_path=fields[0], landmarks=landmarks, labels=labels)


def _parse_coordinate(annotation: Path, where: str, index: int, token: str) -> float:
    axis = "x" if index < 5 else "y"
    name = f"{axis}{index % 5 + 1} ({LANDMARK_NAMES[index % 5]})"
    try:
        value = float(token)
    except ValueError:
        raise DataError(annotation, f"{where}: landmark {name} is not a number: {token!r}") from None
    if not math.isfinite(value):
        raise DataError(annotation, f"{where}: landmark {name} is not finite: {token!r}")
    return value


def _parse_attribute(annotation: Path, where: str, name: str, token: str) -> int:
    n = NUM_CLASSES[name]
    allowed = f"allowed values 1..{n} ({_ATTRIBUTE_MEANING[name]})"
    try:
        value = int(token)
    except ValueError:
        raise DataError(annotation, f"{where}: {name} is not an integer: {token!r}; {allowed}") from None
    if not 1 <= value <= n:
        raise DataError(annotation, f"{where}: {name} = {value} is out of range; {allowed}")
    return value - 1


def _image_path(root: Path, annotation: Path, record: _Record) -> Path:
    rel = PureWindowsPath(record.rel_path)
    if rel.is_absolute() or rel.drive or rel.root or ".." in rel.parts:
        raise DataError(
            annotation, f"line {record.line_no}: image path {record.rel_path!r} is not inside the MTFL folder"
        )
    return root.joinpath(*rel.parts)


def _decode(
    root: Path, annotation: Path, records: Sequence[_Record], size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode every image: uint8 pixels ``[n,1,size,size]``, landmarks ``[n,10]``, labels ``[n,4]``.

    Images are decoded by a few threads (Pillow releases the GIL while decoding and resizing); results and
    errors come back in file order, so the first bad image in the file is the one reported.
    """
    n = len(records)
    paths = [_image_path(root, annotation, record) for record in records]
    pixels = np.empty((n, 1, size, size), dtype=np.uint8)
    landmarks = np.empty((n, 10), dtype=np.float32)
    labels = np.array([r.labels for r in records], dtype=np.int64).reshape(n, len(ATTRIBUTES))
    pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
    try:
        loaded = pool.map(lambda i: _load_image(paths[i], annotation, records[i].line_no, size), range(n))
        for i, (image, (width, height)) in enumerate(loaded):
            pixels[i, 0] = image
            coords = np.asarray(records[i].landmarks, dtype=np.float64)
            coords[:5] *= size / width
            coords[5:] *= size / height
            landmarks[i] = coords
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return pixels, landmarks, labels


def _load_image(path: Path, annotation: Path, line_no: int, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Grayscale, bilinear-resized uint8 pixels of one image and its original (width, height)."""
    source = f"listed on line {line_no} of {annotation.name}"
    if not path.is_file():
        raise DataError(path, f"image file does not exist ({source})")
    try:
        with Image.open(path) as img:
            original = img.size
            gray = img.convert("L")
        small = gray.resize((size, size), resample=_RESAMPLE)
    except _IMAGE_ERRORS as err:
        raise DataError(path, f"unreadable or corrupt image ({source}): {err}") from err
    if original[0] < 1 or original[1] < 1:
        raise DataError(path, f"image has no pixels ({source})")
    return np.asarray(small, dtype=np.uint8), original


# --------------------------------------------------------------------------------------------------------
# Cache of decoded arrays
# --------------------------------------------------------------------------------------------------------

_CACHE = ArrayCache(
    "mtfl",
    "MTFL",
    ("pixels", "landmarks", "labels"),
    version=_CACHE_VERSION,
    contents="decoded images",
    mode=0o644,
    logger=log,
)


def _cache_entry(annotation: Path, size: int) -> CacheEntry:
    """The entry of one (annotation file, size); see :mod:`fedgradnorm.data.cache` for where it lives."""
    stat = annotation.stat()
    fields = {
        "annotation": str(annotation.resolve()),
        "bytes": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "size": size,
        "resample": _RESAMPLE.name,
    }
    return _CACHE.entry(annotation, fields, variant=f"s{size}-")


def _valid_cache(arrays: dict[str, np.ndarray], size: int) -> bool:
    pixels, landmarks, labels = arrays["pixels"], arrays["landmarks"], arrays["labels"]
    n = len(pixels)
    return (
        pixels.dtype == np.uint8
        and pixels.shape == (n, 1, size, size)
        and landmarks.dtype == np.float32
        and landmarks.shape == (n, 10)
        and labels.dtype == np.int64
        and labels.shape == (n, len(ATTRIBUTES))
        and n > 0
        and all(labels[:, i].min() >= 0 and labels[:, i].max() < NUM_CLASSES[a] for i, a in enumerate(ATTRIBUTES))
    )
