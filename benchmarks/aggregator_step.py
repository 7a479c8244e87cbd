"""The aggregator's server step for 3 to 256 nodes on Network 2, against the memory bandwidth floor.

The step reads every node's gradient at least once (validation, the norm on omega_tilde, the
weighted sum), so N x 15.7 MB / (memory read bandwidth) is a floor no implementation beats; the
bandwidth is measured in the same run with the same torch thread count.

Peak memory: the step's resident-set high-water mark above the resident set before it, read
from /proc/self/status (VmHWM after resetting it through /proc/self/clear_refs; Linux). torch's
CPU allocations are plain malloc/mmap, so they show in the RSS; tracemalloc would not see them.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from benchmarks.common import MB, Table, fmt_s, median
from fedgradnorm.algorithm import ClientUpdate, ServerConfig, ServerState, server_step
from fedgradnorm.federation import load_federation
from fedgradnorm.machine import torch_threads


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def read_bandwidth(nbytes: int = 512 * MB, repeats: int = 5) -> float:
    """Bytes per second of a full read of a large float32 tensor (``sum``), best of ``repeats``."""
    x = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        float(x.sum())
        best = min(best, time.perf_counter() - t0)
    del x
    return nbytes / best


def measure(nodes: int, repeats: int) -> dict[str, float]:
    shared = load_federation("radcom").build_shared(0)
    state = ServerState.initial(dict(shared.named_parameters()))
    config = ServerConfig()
    # Distinct gradients per node (the step must read each from memory, not from a cache).
    updates = [
        ClientUpdate(f"node{i:04d}", {k: torch.full_like(v, 1e-4 * (i + 1)) for k, v in state.omega.items()}, 1.0)
        for i in range(nodes)
    ]
    grad_bytes = sum(v.numel() * 4 for v in state.omega.values())
    server_step(state, updates, config)  # warm-up: Adam moments, weights of every node
    gc.collect()
    times, peaks = [], []
    for _ in range(repeats):
        rss0 = _status_kib("VmRSS")
        exact = reset_peak()
        t0 = time.perf_counter()
        server_step(state, updates, config)
        times.append(time.perf_counter() - t0)
        peak = _status_kib("VmHWM") if exact else _status_kib("VmRSS")
        peaks.append((peak - rss0) * 1024)
    out = {
        "nodes": nodes,
        "seconds": median(times),
        "best": min(times),
        "peak_bytes": max(peaks),
        "input_bytes": nodes * grad_bytes,
        "exact_peak": float(exact),
    }
    del updates, state
    gc.collect()
    return out


def run(node_counts: tuple[int, ...] = (3, 16, 64, 256), repeats: int = 3, bandwidth_bytes: int = 512 * MB) -> Table:
    default_threads = torch.get_num_threads()
    thread_counts = sorted({default_threads, 1}, reverse=True)
    t = Table(
        "Aggregator server step on Network 2 (15.7 MB per gradient) vs the memory-bandwidth floor",
        [
            "nodes",
            "torch threads",
            "gradients in",
            "step time (median)",
            "best",
            "floor (read once)",
            "best / floor",
            "per node",
            "peak memory above RSS",
        ],
    )
    rows = []
    bandwidth = {}
    for threads in thread_counts:
        with torch_threads(threads):
            bw = bandwidth[threads] = read_bandwidth(bandwidth_bytes)
            for n in node_counts:
                m = measure(n, repeats)
                m["threads"] = threads
                floor = m["input_bytes"] / bw
                t.add(
                    n,
                    threads,
                    f"{m['input_bytes'] / MB:,.0f} MB",
                    fmt_s(m["seconds"]),
                    fmt_s(m["best"]),
                    fmt_s(floor),
                    f"{m['best'] / floor:.1f}×",
                    fmt_s(m["seconds"] / n),
                    f"{m['peak_bytes'] / MB:.0f} MB",
                )
                rows.append(m)
    exact = all(r["exact_peak"] for r in rows)
    t.notes += [
        f"Memory read bandwidth, same run (sum over a {bandwidth_bytes / MB:.0f} MB float32 tensor, best of 5): "
        + ", ".join(f"{bw / 1e9:.1f} GB/s with {k} thread{'s' if k > 1 else ''}" for k, bw in bandwidth.items())
        + f". The aggregator runs with torch's default, {default_threads} threads here. "
        f"Step: median and best of {repeats} after a warm-up step; floor = gradient bytes / read bandwidth at the same "
        "thread count, a best case, so it is compared with the best step. A median far above the best means other "
        "work on the machine got in the way during that measurement.",
        "Peak memory: "
        + (
            "VmHWM after resetting it via /proc/self/clear_refs, minus VmRSS before the step"
            if exact
            else "VmRSS after minus before (clear_refs was not allowed, so this may miss a transient peak)"
        )
        + "; the gradients themselves are already resident and not counted.",
    ]
    t.data = {"bandwidth": bandwidth, "rows": rows}
    return t
