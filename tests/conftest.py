"""Shared fixtures: free ports, real processes that are always stopped, small real disks."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults_helpers import Processes


@pytest.fixture
def procs() -> Iterator[Processes]:
    """Service processes a test starts; every one is stopped when the test ends, pass or fail."""
    p = Processes()
    try:
        yield p
    finally:
        p.stop_all()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs (so writes fail with ENOSPC); skipped where mounting is not allowed."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Synthetic data sets are generated once per test session into a private cache folder,
    shared with the service processes the tests start (they inherit the environment)."""
    import os

    old = os.environ.get("FEDGRADNORM_CACHE_DIR")
    os.environ["FEDGRADNORM_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FEDGRADNORM_CACHE_DIR", None)
        else:
            os.environ["FEDGRADNORM_CACHE_DIR"] = old


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave without running interpreter and C++ static teardown: native threads of in-process gRPC
    servers and clients can abort the process at exit ("terminate called without an active
    exception") after every test has passed. The summary is already printed; keep the status."""
    import os
    import sys

    if _EXIT_STATUS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
