"""fedgradnorm.machine: the malloc arena cap the services start with, seen in real processes."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from fedgradnorm.machine import limit_malloc_arenas

# Eight threads allocate at once (ctypes drops the GIL), then glibc's malloc_info() lists the arenas.
PROBE = r"""
import ctypes, sys, tempfile, threading
from fedgradnorm.machine import limit_malloc_arenas
if sys.argv[1] == "cap":
    assert limit_malloc_arenas(1)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes, libc.fclose.argtypes = [ctypes.c_int, ctypes.c_void_p], [ctypes.c_void_p]
start = threading.Barrier(8)
def work():
    start.wait()
    for _ in range(20000):
        libc.free(libc.malloc(4096))
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
with tempfile.NamedTemporaryFile("r") as out:
    fp = libc.fopen(out.name.encode(), b"w")
    libc.malloc_info(0, fp)
    libc.fclose(fp)
    print(out.read().count("<heap nr="))
"""


def _arenas(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120, env=env, check=True
    )
    return int(done.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")
def test_the_cap_holds_threads_to_the_given_arenas() -> None:
    assert _arenas("free") >= 2  # the probe does make glibc open arenas for contending threads
    assert _arenas("cap") == 1


def test_an_operators_malloc_arena_max_stands_and_bad_counts_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False
    with pytest.raises(ValueError, match="at least 1"):
        limit_malloc_arenas(0)
