"""Tools shared by the hostile-input, fault and load tests.

Everything here talks to real things on 127.0.0.1 only: aggregator and edge-node processes
started through :mod:`fedgradnorm.launch`, a TCP proxy that can cut a link without closing it,
a real tmpfs, the real Prometheus endpoint. Every resource comes with a way to release it that
the tests call from ``finally`` blocks or fixtures.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import structlog
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm.data.base import MultiTaskArrays
from fedgradnorm.data.partition import ClientData
from fedgradnorm.launch import ServiceProcess, start_aggregator
from fedgradnorm.services.aggregator.store import STATE_FILE, Snapshot, decode_snapshot
from tests.grpc_client import RawNode, connect, register, state

T = TypeVar("T")

SERVICE = "fedgradnorm.v1.Aggregator"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# ---------------------------------------------------------------------------------------------
# Waiting and logging
# ---------------------------------------------------------------------------------------------


def wait_until(pred: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``pred`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def safe_structlog() -> Iterator[None]:
    """Log in-process services to whatever sys.stdout is at write time.

    ``fedgradnorm.logs.configure_logging`` (run by any test that calls ``cli.main`` in-process)
    binds the sys.stderr of that moment, which pytest closes after the test; an in-process
    aggregator logging later would then fail. The defaults resolve the stream per call.
    """
    old = structlog.get_config()
    structlog.reset_defaults()
    try:
        yield
    finally:
        structlog.configure(**old)


def log_events(proc: ServiceProcess) -> list[dict[str, Any]]:
    """The JSON log lines of a service process (non-JSON lines are skipped)."""
    return proc.events()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


class Processes:
    """Every process a test starts; ``stop_all`` (from a finally block) always reaps them all."""

    def __init__(self) -> None:
        self.procs: list[ServiceProcess] = []

    def add(self, proc: ServiceProcess) -> ServiceProcess:
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                if p.alive():
                    os.kill(p.pid, signal.SIGCONT)  # a frozen process cannot handle SIGTERM
            p.stop(timeout=10)


def aggregator_process(
    procs: Processes, workdir: Path, flags: Sequence[str], name: str = "aggregator"
) -> tuple[ServiceProcess, dict[str, Any]]:
    """A plaintext aggregator process on 127.0.0.1:0 with its metrics endpoint on 127.0.0.1:0."""
    proc, ready = start_aggregator(workdir, list(flags), name=name)
    procs.add(proc)
    return proc, ready


# ---------------------------------------------------------------------------------------------
# Probing a running aggregator
# ---------------------------------------------------------------------------------------------


def health(port: int, service: str = SERVICE, timeout: float = 5.0) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return (
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
        )


def scrape(metrics_port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the Prometheus endpoint: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def metric(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def nodes_of(stub: Any) -> dict[str, pb.NodeState]:
    return {n.node_id: n for n in state(stub).nodes}


def read_committed(state_dir: Path) -> tuple[bytes, Snapshot]:
    """The committed state file's bytes and its decoded snapshot (StateError if corrupt)."""
    path = state_dir / STATE_FILE
    blob = path.read_bytes()
    return blob, decode_snapshot(blob, str(path))


def stale_temp_files(state_dir: Path) -> list[Path]:
    """Temporary files of unfinished commits (fedgradnorm.atomic names them .<file>.<random>.tmp)."""
    return sorted(state_dir.glob(f".{STATE_FILE}.*.tmp"))


def metrics_records(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-identical: same names, shapes, dtypes and bytes (NaN-safe, unlike torch.equal)."""
    if list(a) != list(b):
        return False
    return all(
        a[k].dtype == b[k].dtype
        and a[k].shape == b[k].shape
        and a[k].contiguous().view(torch.uint8).numpy().tobytes()
        == b[k].contiguous().view(torch.uint8).numpy().tobytes()
        for k in a
    )


# ---------------------------------------------------------------------------------------------
# Raw participants: protocol-level nodes that play every round they are offered
# ---------------------------------------------------------------------------------------------


def gradient_like(omega: dict[str, torch.Tensor], value: float = 0.01) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) for k, v in omega.items()}


@dataclass
class Participant:
    """A raw node in a thread: fetch, submit a constant gradient, repeat, until stopped."""

    port: int
    name: str
    task: str
    federation: str = "mtfl"
    wait: float = 0.5
    accepted: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.channel, stub = connect(self.port)
        self.node: RawNode = register(stub, self.name, self.task, federation=self.federation)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"participant-{self.name}", daemon=True)

    def start(self) -> Participant:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                header, omega = self.node.fetch(wait=self.wait)
                if header.status == pb.ROUND_STATUS_FINISHED:
                    return
                if omega is None:
                    continue
                if self.node.submit(header.round, gradient_like(omega)).accepted:
                    self.accepted.append(header.round)
            except grpc.RpcError as e:
                self.errors.append(f"{e.code().name}: {e.details()}")
                self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.channel.close()


def small_client_data(task: str = "gender", n: int = 12) -> ClientData:
    """A tiny random MTFL share (40x40 images, every task's targets) for in-process edge nodes."""
    rng = np.random.default_rng(0)

    def arrays(k: int) -> MultiTaskArrays:
        targets: dict[str, np.ndarray] = {"landmarks": rng.random((k, 10), dtype=np.float32) * 40}
        for name, classes in (("gender", 2), ("smile", 2), ("glasses", 2), ("pose", 5)):
            targets[name] = rng.integers(0, classes, k).astype(np.int64)
        return MultiTaskArrays(x=rng.random((k, 1, 40, 40), dtype=np.float32), targets=targets)

    return ClientData(task=task, train=arrays(n), test=arrays(4))


# ---------------------------------------------------------------------------------------------
# A link that can be cut without closing it
# ---------------------------------------------------------------------------------------------


class StallProxy:
    """A loopback TCP proxy to 127.0.0.1:``target_port`` that can partition the link.

    ``partition()`` does what a dead radio link does: open connections stay open but no byte
    moves either way (no FIN, no RST: the peers only notice through their own timeouts), and new
    connections are refused. ``heal()`` lets the buffered bytes flow again and accepts new
    connections. ``close()`` tears everything down.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.connections = 0
        self.refused = 0
        self._accepter = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        self._accepter.start()

    def partition(self) -> None:
        self._flowing.clear()

    def heal(self) -> None:
        self._flowing.set()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._flowing.is_set():
                # Refused like a host whose route is gone: reset, not a graceful close.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                self.refused += 1
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
                self.connections += 1
                for src, dst in ((client, upstream), (upstream, client)):
                    t = threading.Thread(target=self._pump, args=(src, dst), name="proxy-pump", daemon=True)
                    self._threads.append(t)
                    t.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                if not self._flowing.wait(0.1):
                    continue  # partitioned: leave the bytes in the kernel's buffers
                readable, _, _ = select.select([src], [], [], 0.1)
                if not readable:
                    continue
                data = src.recv(1 << 16)
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                while not self._flowing.is_set() and not self._closed.is_set():
                    self._flowing.wait(0.1)  # a partition that begins mid-copy holds this chunk too
                dst.sendall(data)
        except (OSError, ValueError):  # ValueError: select() on a socket that close() just closed
            return

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()
            threads = list(self._threads)
        self._accepter.join(timeout=5)
        for t in threads:
            t.join(timeout=5)


# ---------------------------------------------------------------------------------------------
# Real small disks
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    """Mount a real tmpfs of ``size`` (e.g. "2m"); raises OSError where mounting is not allowed.
    Always unmounted (lazily, so an open file cannot keep it) on the way out."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)], capture_output=True, text=True
    )
    if res.returncode != 0:
        raise OSError(f"cannot mount a tmpfs: {res.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mountpoint)], capture_output=True, check=False)
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)


def remount(mountpoint: Path, mode: str) -> None:
    """``mode`` "ro" or "rw"."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mountpoint)], check=True, capture_output=True)


def fill_disk(path: Path) -> Path:
    """Write zeros into ``path`` until the file system is full; returns the filler file."""
    block = b"\0" * 4096
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                return path
    finally:
        os.close(fd)
