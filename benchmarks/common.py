"""What every benchmark shares: result tables, the machine's description, loopback helpers."""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MB = 1_000_000
MIB = 1 << 20


@dataclass
class Table:
    """One benchmark's result: a titled table plus notes (all strings, already formatted)."""

    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # raw numbers, for the doc's prose and for tests

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def text(self) -> str:
        widths = [
            max(len(h), *(len(r[i]) for r in self.rows)) if self.rows else len(h) for i, h in enumerate(self.headers)
        ]
        line = "  ".join(h.ljust(w) for h, w in zip(self.headers, widths, strict=True))
        out = [self.title, line, "-" * len(line)]
        out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in self.rows]
        return "\n".join(out + [f"  {n}" for n in self.notes])

    def markdown(self) -> str:
        out = ["| " + " | ".join(self.headers) + " |", "|" + "---|" * len(self.headers)]
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.notes:
            out.append("")
            out += [f"- {n}" for n in self.notes]
        return "\n".join(out)


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback_copy(nbytes: int, repeats: int = 3, block: int = 4 * MIB) -> float:
    """Best time (s) to push ``nbytes`` through a plain TCP socket on 127.0.0.1, from a sender
    thread into a preallocated receive buffer: the floor any transport on this machine pays."""
    payload = memoryview(bytes(nbytes))
    sink = bytearray(block)
    best = float("inf")
    for _ in range(repeats):
        with socket.create_server(("127.0.0.1", 0)) as server:
            port = server.getsockname()[1]

            def send(port: int = port) -> None:
                with socket.create_connection(("127.0.0.1", port)) as c:
                    c.sendall(payload)

            sender = threading.Thread(target=send, daemon=True)
            t0 = time.perf_counter()
            sender.start()
            conn, _ = server.accept()
            with conn:
                got = 0
                view = memoryview(sink)
                while got < nbytes:
                    n = conn.recv_into(view, min(block, nbytes - got))
                    if n == 0:
                        break
                    got += n
            sender.join()
            best = min(best, time.perf_counter() - t0)
        if got != nbytes:
            raise RuntimeError(f"loopback copy moved {got} of {nbytes} bytes")
    return best


def read_metrics_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def fmt_s(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "-"
    size = abs(seconds)
    if size < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if size < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"
