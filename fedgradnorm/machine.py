"""What machine a number was measured on, for the reports (`make bench`, `make reproduce`), how
many torch threads a block of work runs with, and how the services' processes allocate memory."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

#: glibc malloc arenas a service process may use (glibc's default is 8 per core). gRPC serves each
#: stream on a thread of its pool, and every thread that allocates while another holds the main
#: arena gets an arena of its own, where freed payload buffers stay cached: the aggregator's peak
#: resident set in the round-overhead run fell from 685-729 MiB to 503-559 MiB with 1-2 arenas
#: (docs/benchmarks.md, "Memory").
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt parameter number (malloc.h)


def check_device_text(text: str) -> None:
    """Fail fast (ValueError) on a device name other than auto, cpu, cuda or cuda:N (no torch needed)."""
    if not DEVICE_RE.match(text):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {text!r}")


def resolve_device(text: str) -> torch.device:
    """``auto`` (a GPU when one is present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; a GPU
    that is not there is an error naming what is."""
    import torch

    check_device_text(text)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"device {text!r}: this machine has {count} CUDA device(s)")
    return device


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the count it had (also on error).

    ``torch.set_num_threads`` is process-wide: a bare call in a library function or a test leaks
    into everything the process runs afterwards.
    """
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for this process; call it first thing in a service's process, before
    threads start allocating. Returns False (and does nothing) off glibc, or when the operator set
    ``MALLOC_ARENA_MAX`` (glibc reads it at start-up; that choice stands)."""
    if arenas < 1:
        raise ValueError(f"arenas must be at least 1, got {arenas}")
    if "MALLOC_ARENA_MAX" in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return bool(libc.mallopt(_M_ARENA_MAX, arenas))


def _isa(flags: set[str]) -> str:
    """The widest vector instruction set oneDNN's kernels use here (it decides how they round: a run
    repeats bit for bit only on the same one), capped where ONEDNN_MAX_CPU_ISA says so."""
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        isa = "AVX-512"
    elif "avx2" in flags:
        isa = "AVX2"
    else:
        isa = "no AVX2" if flags else "unknown ISA"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"{isa}, ONEDNN_MAX_CPU_ISA={cap}" if cap else isa


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, memory, kernel, Python, torch (version and threads), niceness, load average."""
    import torch

    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cpu = platform.processor() or "unknown CPU"
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
        flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "isa": _isa(flags),
        "mem_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "niceness": os.nice(0),
        "loadavg": os.getloadavg(),
    }
