"""On-disk cache of the arrays a reader decodes from an input file, shared by the data set readers.

One cache entry is an uncompressed ``.npz`` holding the named arrays and the entry's ``key``. It lives in
the first usable folder of :func:`cache_dirs`: ``$FEDGRADNORM_CACHE_DIR`` when set, ``.fedgradnorm_cache``
beside the input file, ``~/.cache/fedgradnorm``; a folder that cannot be created or written is skipped.

The file name is ``{kind}-{input stem}-{hash of the input's absolute path}-{variant}{key}.npz``. Everything
before the key (the *prefix*) is shared by all entries of one input (and variant, such as an image size),
so storing a new entry removes the stale ones of the same prefix from its folder. The key hashes the cache
version and the reader's identifying fields (the input's size and mtime, say): when the input changes, the
key changes. An entry that fails to load, holds another key or fails the reader's validation is ignored
(and logged) and rebuilt by the reader. Writes go through :func:`fedgradnorm.atomic.atomic_write`, so a
concurrent reader never sees a partial entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from fedgradnorm.atomic import atomic_write

__all__ = ["CACHE_ENV", "ArrayCache", "CacheEntry", "cache_dirs", "default_cache_dir"]

CACHE_ENV = "FEDGRADNORM_CACHE_DIR"
_BESIDE = ".fedgradnorm_cache"
_LOAD_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)

log = structlog.get_logger("fedgradnorm.data.cache")


def _user_cache_dir() -> Path:
    return Path.home() / ".cache" / "fedgradnorm"


def cache_dirs(source: Path | None = None) -> list[Path]:
    """Where cache files may live, in order of preference.

    ``$FEDGRADNORM_CACHE_DIR`` when set (``~`` expanded), then ``.fedgradnorm_cache`` beside ``source``
    (when given), then ``~/.cache/fedgradnorm``. Whether a folder can be written is for the caller to find.
    """
    dirs = []
    env = os.environ.get(CACHE_ENV)
    if env:
        dirs.append(Path(env).expanduser())
    if source is not None:
        dirs.append(source.parent / _BESIDE)
    dirs.append(_user_cache_dir())
    return dirs


def default_cache_dir() -> Path:
    """The folder for files made without an input to sit beside (generated data sets).

    ``$FEDGRADNORM_CACHE_DIR`` when set, taken literally (no ``~`` expansion, as it always was here), else
    ``~/.cache/fedgradnorm``. Not created.
    """
    return Path(os.environ.get(CACHE_ENV) or _user_cache_dir())


@dataclass(frozen=True)
class CacheEntry:
    """The cache entry of one input: its file-name ``prefix`` and ``key`` (see the module docstring)."""

    source: Path
    prefix: str
    key: str

    @property
    def name(self) -> str:
        return f"{self.prefix}{self.key}.npz"


class ArrayCache:
    """The decode cache of one kind of input.

    ``kind`` starts the file names (``"radcom"``); ``label`` names the data set in log events
    (``"RadCom"``); ``arrays`` are the names of the arrays an entry holds; ``version`` goes into every key
    (raise it when what is stored changes); ``contents`` says what is not cached when no folder is
    writable (``"decoded arrays"``); ``mode`` gives the permission bits of the files (default: as
    ``open`` would create them); ``logger`` is where events go (the reader's structlog logger, by default this module's).
    """

    def __init__(
        self,
        kind: str,
        label: str,
        arrays: tuple[str, ...],
        *,
        version: int = 1,
        contents: str = "decoded arrays",
        mode: int | None = None,
        logger: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.kind = kind
        self.label = label
        self.arrays = arrays
        self.version = version
        self.contents = contents
        self.mode = mode
        self.log = logger or log

    def entry(self, source: Path, fields: Mapping[str, object], variant: str = "") -> CacheEntry:
        """The entry of ``source`` whose key hashes the version and ``fields`` (JSON values).

        ``variant`` (ending with ``-``) separates entries of one input that must coexist, such as image sizes.
        """
        payload = {"version": self.version, **fields}
        key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]
        owner = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:10]
        return CacheEntry(source=source, prefix=f"{self.kind}-{source.stem}-{owner}-{variant}", key=key)

    def load(self, entry: CacheEntry, valid: Callable[[dict[str, np.ndarray]], bool]) -> dict[str, np.ndarray] | None:
        """The stored arrays of ``entry`` from the first folder holding a usable copy, or None.

        A copy is usable when it loads, holds ``entry.key`` and every array, and ``valid`` accepts the arrays.
        """
        for folder in cache_dirs(entry.source):
            file = folder / entry.name
            if not file.is_file():
                continue
            arrays = self._read(file, entry.key, valid)
            if arrays is not None:
                return arrays
            self.log.warning("cache.corrupt", dataset=self.label, file=str(file), action="ignored, rebuilt")
        return None

    def _read(
        self, file: Path, key: str, valid: Callable[[dict[str, np.ndarray]], bool]
    ) -> dict[str, np.ndarray] | None:
        try:
            with np.load(file, allow_pickle=False) as data:
                stored_key = str(data["key"])
                arrays = {name: data[name] for name in self.arrays}
        except _LOAD_ERRORS:
            return None
        return arrays if stored_key == key and valid(arrays) else None

    def store(self, entry: CacheEntry, arrays: Mapping[str, np.ndarray]) -> None:
        """Write ``arrays`` to the first writable folder and remove that folder's stale entries of the input."""
        for folder in cache_dirs(entry.source):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                atomic_write(
                    folder / entry.name,
                    lambda f: np.savez(f, key=np.array(entry.key), **dict(arrays)),  # type: ignore[arg-type]
                    mode=self.mode,
                    durable=False,  # a lost entry is only decoded again
                )
            except OSError as err:
                self.log.debug(
                    "cache.folder_not_writable",
                    dataset=self.label,
                    folder=str(folder),
                    error=str(err),
                    action="trying the next one",
                )
                continue
            self._remove_stale(folder, entry)
            return
        self.log.warning("cache.no_writable_folder", source=str(entry.source), not_cached=self.contents)

    def _remove_stale(self, folder: Path, entry: CacheEntry) -> None:
        for old in folder.glob(f"{entry.prefix}*.npz"):
            if old.name != entry.name:
                try:
                    old.unlink()
                except OSError:
                    self.log.debug("cache.stale_not_removed", dataset=self.label, file=str(old))
