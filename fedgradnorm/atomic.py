"""Atomic file replacement: readers see the old file or the new one, never a partial write.

Every writer goes through a temporary file created beside the target with :func:`tempfile.mkstemp`
(a fresh name each call, created exclusively, so concurrent writers in one or several processes never
share a temporary), and :func:`os.replace` renames it over the target once it is complete. Any failure
(an exception from the caller's writer included) removes the temporary and leaves the previous file, if
any, untouched, then re-raises the original exception unchanged.

With ``durable`` (the default) the data is also made to survive a crash or power cut: the file is
fsynced before the rename and the folder after it, so after a crash the target holds the old content or
the new one. Without it the replacement is still atomic for other processes, only not crash-safe, which
suits caches and anything that can be rebuilt.

The new file's permission bits are ``mode`` when given; otherwise those a plain ``open(path, "w")``
would create a new file with (``0o666`` less the process umask), not mkstemp's ``0o600``.

- :func:`atomic_write`: hand a binary file object to a callback (for serializers that write to a file,
  such as ``torch.save`` or ``np.savez``);
- :func:`atomic_write_bytes` / :func:`atomic_write_text`: write a ready value;
- :func:`atomic_replace`: a context manager yielding the temporary's path, for libraries that must open
  the file themselves by name (h5py, say).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_replace", "atomic_write", "atomic_write_bytes", "atomic_write_text"]

_UMASK_LOCK = threading.Lock()


def atomic_write(
    path: str | Path,
    write: Callable[[BinaryIO], object],
    *,
    mode: int | None = None,
    durable: bool = True,
) -> None:
    """Replace ``path`` atomically with what ``write`` writes to the binary file object it is given.

    ``write`` must not close the file. The folder of ``path`` must exist. On any failure the temporary
    file is removed, ``path`` is left as it was and the exception propagates unchanged (an ``OSError``
    from the file system, or whatever ``write`` raised). ``mode``: the new file's permission bits
    (default: as ``open`` would create it); ``durable``: fsync the file and its folder (see the module
    docstring).
    """
    with _replacing(Path(path), mode, durable) as (fd, _), os.fdopen(fd, "wb") as f:
        write(f)
        f.flush()
        if durable:
            os.fsync(f.fileno())


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int | None = None, durable: bool = True) -> None:
    """Replace ``path`` atomically with ``data``; see :func:`atomic_write`."""
    atomic_write(path, lambda f: f.write(data), mode=mode, durable=durable)


def atomic_write_text(
    path: str | Path,
    text: str,
    *,
    encoding: str = "utf-8",
    mode: int | None = None,
    durable: bool = True,
) -> None:
    """Replace ``path`` atomically with ``text`` encoded with ``encoding`` (newlines written as given)."""
    atomic_write_bytes(path, text.encode(encoding), mode=mode, durable=durable)


@contextlib.contextmanager
def atomic_replace(path: str | Path, *, mode: int | None = None, durable: bool = True) -> Iterator[Path]:
    """Yield the path of a new, empty temporary file beside ``path``; on a normal exit, rename it over ``path``.

    The body writes the temporary by name (it exists, so open it in a mode that truncates or overwrites,
    such as ``"wb"``, ``"r+b"`` or h5py's ``"w"``) and must have closed it by the end of the block. If the
    body raises, the temporary is removed, ``path`` is left as it was and the exception propagates
    unchanged. ``mode`` and ``durable`` as for :func:`atomic_write`.
    """
    with _replacing(Path(path), mode, durable) as (fd, tmp):
        os.close(fd)
        yield tmp
        if durable:
            _fsync(tmp)


@contextlib.contextmanager
def _replacing(path: Path, mode: int | None, durable: bool) -> Iterator[tuple[int, Path]]:
    """Yield the open descriptor (the body closes it) and path of a new temporary file beside ``path``,
    with its final mode; rename it over ``path`` when the body ends normally, remove it when it raises."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        try:
            os.fchmod(fd, _default_mode() if mode is None else mode)
        except BaseException:
            os.close(fd)
            raise
        yield fd, tmp
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    if durable:
        _fsync(path.parent)  # makes the rename itself durable


def _discard(tmp: Path) -> None:
    """Remove a temporary file, if it is still there; a failure here must not hide the original error."""
    with contextlib.suppress(OSError):
        tmp.unlink()


def _fsync(path: Path) -> None:
    """fsync a file or a folder by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _default_mode() -> int:
    """The permission bits ``open`` gives a new file: 0o666 less the umask."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where the system allows (Linux 4.7 and later).

    Elsewhere it is read with :func:`os.umask`, which has to set it; the value set meanwhile keeps the
    owner's bits and clears the others, so a file another thread creates in that instant gets fewer
    permissions, never more, and stays usable by its owner.
    """
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        old = os.umask(0o077)
        os.umask(old)
    return old
