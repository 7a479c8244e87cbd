"""What machine a number was measured on, for the reports (`make bench`, `make reproduce`), and
how many torch threads a block of work runs with."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from typing import Any


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


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, memory, kernel, Python, torch (version and threads), niceness, load average."""
    import torch

    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "niceness": os.nice(0),
        "loadavg": os.getloadavg(),
    }
