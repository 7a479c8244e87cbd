"""Data sources by name: the readers a federation spec's ``[data] reader`` names, and the synthetic sets.

A reader is ``path -> Pools``. The built-in names: ``radcom`` (a RadComDynamic HDF5 file), ``mtfl`` (an
unzipped MTFL folder: training.txt is the train pool, testing.txt the test pool), ``arrays`` (an NPZ or
HDF5 file of ``x``/``y`` arrays, :mod:`fedgradnorm.data.arrays`) and ``images`` (a folder of images with
a labels.csv, :mod:`fedgradnorm.data.images`); anything else is a user reader ``package.module:attr``.
A synthetic set is ``(seed=, size=) -> Pools``; RadCom's and MTFL's are generated once into the cache
folder in their published formats and read back by their readers.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from fedgradnorm.data.base import DataError, Pools
from fedgradnorm.data.cache import default_cache_dir
from fedgradnorm.factory import FactoryError, resolve


def _radcom(path: Path) -> Pools:
    from fedgradnorm.data.radcom import read_radcom

    return Pools(read_radcom(path))


def _mtfl(path: Path) -> Pools:
    from fedgradnorm.data.mtfl import read_mtfl

    return Pools(read_mtfl(path, "training"), read_mtfl(path, "testing"))


def _arrays(path: Path) -> Pools:
    from fedgradnorm.data.arrays import read_arrays

    return read_arrays(path)


def _images(path: Path) -> Pools:
    from fedgradnorm.data.images import read_images

    return read_images(path)


READERS: dict[str, Callable[[Path], Pools]] = {"radcom": _radcom, "mtfl": _mtfl, "arrays": _arrays, "images": _images}


def read_pools(reader: str, path: str | Path) -> Pools:
    """What ``reader`` (a built-in name or ``package.module:attr``) reads from ``path``.

    A user reader's failure that is not a :class:`DataError` is reported as one, naming the file."""
    path = Path(path)
    if reader in READERS:
        return READERS[reader](path)
    try:
        fn = resolve(reader)
    except FactoryError as err:
        raise DataError(path, f"reader {err}") from err
    try:
        pools = fn(path)
    except DataError:
        raise
    except Exception as err:
        raise DataError(path, f"reader {reader} failed: {type(err).__name__}: {err}") from err
    if not isinstance(pools, Pools):
        raise DataError(path, f"reader {reader} returned {type(pools).__name__}, not fedgradnorm.data.Pools")
    return pools


def cache_dir() -> Path:
    """Where synthetic data sets are generated (see :func:`fedgradnorm.data.cache.default_cache_dir`); created."""
    path = default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


# What one unit of ``size`` costs, measured on the generators' output (size 13,000 MTFL: 307 MB on disk for
# 16,900 faces; RadCom size 150: 36 MB), rounded up: the cache on disk, and the arrays read into memory.
MTFL_FACE_DISK_BYTES = 20_000  # a 250x250 JPEG and its line of labels
MTFL_FACE_MEMORY_BYTES = 8_000  # a 40x40 float32 image and its targets
RADCOM_SIZE_BYTES = 250_000  # one sample (128x2 float32 and labels) for every (modulation, signal, SNR) key


def _check_room(target: Path, size: int, disk_bytes: float, memory_bytes: float) -> None:
    """Refuse, before writing anything, a synthetic set that would fill the cache's disk or outgrow the
    machine's memory (a --synthetic-size of 10^12 would otherwise write until the disk is full)."""
    free = shutil.disk_usage(target.parent).free
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for need, have, where in ((disk_bytes, free, f"free in {target.parent}"), (memory_bytes, memory, "of memory")):
        if need > have:
            raise DataError(
                target,
                f"a synthetic set of size {size} needs about {need / 2**30:,.1f} GiB, more than the "
                f"{have / 2**30:,.1f} GiB {where}; give a smaller --synthetic-size",
            )


def _generate_once(target: Path, generate: Callable[[Path], object]) -> None:
    """Generate into a private path and rename it into place, so that processes generating the same
    synthetic set at once (edge nodes sharing a cache) never read a half-written one."""
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    _remove(tmp)
    generate(tmp)
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished first: its copy is identical (same seed)
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def synthetic_radcom(seed: int, size: int) -> Pools:
    """Synthetic RadComDynamic: ``size`` samples per (modulation, signal, SNR), written once as HDF5."""
    from fedgradnorm.data.synthetic_radcom import generate_radcom

    path = cache_dir() / f"radcom-seed{seed}-n{size}.hdf5"
    if not path.exists():
        _check_room(path, size, size * RADCOM_SIZE_BYTES, size * RADCOM_SIZE_BYTES)
        _generate_once(path, lambda tmp: generate_radcom(tmp, samples_per_key=size, seed=seed))
    return _radcom(path)


def synthetic_mtfl(seed: int, size: int) -> Pools:
    """Synthetic MTFL: ``size`` training faces and 30 % as many test faces, written once as a folder named
    by the generator's version, so that a set drawn by an older generator is never read."""
    from fedgradnorm.data.synthetic_mtfl import GENERATOR_VERSION, generate_mtfl

    root = cache_dir() / f"mtfl-v{GENERATOR_VERSION}-seed{seed}-n{size}"
    if not (root / "testing.txt").exists():
        n_test = max(10, size * 3 // 10)
        faces = size + n_test
        _check_room(root, size, faces * MTFL_FACE_DISK_BYTES, faces * MTFL_FACE_MEMORY_BYTES)
        _generate_once(root, lambda tmp: generate_mtfl(tmp, n_train=size, n_test=n_test, seed=seed))
    return _mtfl(root)
