"""A loopback deployment for benchmarks: the aggregator and edge nodes as real processes.

Round boundaries are read from the aggregator's metrics.jsonl: a watcher thread polls its size
every millisecond and stamps the moment each round's records appear (they are appended after the
server step and the state commit, so close-to-close intervals hold the whole round).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedgradnorm.federation import load_federation
from fedgradnorm.launch import ServiceProcess, start_aggregator, start_edge_node


def fresh(workdir: Path) -> None:
    """Remove what an earlier benchmark left in ``workdir`` (aggregator state, node state, logs), so
    every deployment starts a new federation instead of resuming the last one."""
    if not workdir.is_dir():
        return
    for path in workdir.iterdir():
        if path.name in ("aggregator-state", "metrics.jsonl") or path.name.startswith("node-"):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        elif path.suffix == ".log" or path.name.endswith(".ready.json"):
            path.unlink()


class RoundWatcher(threading.Thread):
    """Stamps (monotonic time) the appearance of each complete round in metrics.jsonl."""

    def __init__(self, path: Path, per_round: int, poll: float = 0.001) -> None:
        super().__init__(name="round-watcher", daemon=True)
        self.path = path
        self.per_round = per_round
        self.poll = poll
        self.stamps: list[float] = []  # stamps[k]: when round k's records were seen
        self._stop = threading.Event()
        self._cond = threading.Condition()

    def run(self) -> None:
        size = 0
        lines = 0
        while not self._stop.is_set():
            try:
                st = self.path.stat().st_size
            except FileNotFoundError:
                st = 0
            if st != size:
                now = time.perf_counter()
                with self.path.open("rb") as f:
                    data = f.read()
                size = len(data)
                lines = data.count(b"\n")
                with self._cond:
                    while len(self.stamps) < lines // self.per_round:
                        self.stamps.append(now)
                    self._cond.notify_all()
            time.sleep(self.poll)

    def wait_rounds(self, n: int, timeout: float, alive: Sequence[ServiceProcess] = ()) -> None:
        end = time.monotonic() + timeout
        with self._cond:
            while len(self.stamps) < n:
                if time.monotonic() > end:
                    raise TimeoutError(f"only {len(self.stamps)} of {n} rounds after {timeout} s")
                dead = [p for p in alive if not p.alive()]
                if dead:
                    raise RuntimeError(f"{dead[0].name} exited:\n{dead[0].log_text()[-3000:]}")
                self._cond.wait(0.2)

    def stop(self) -> None:
        self._stop.set()


class CountingProxy(threading.Thread):
    """A TCP relay on 127.0.0.1 that counts the bytes going each way."""

    def __init__(self, target_port: int) -> None:
        super().__init__(name="counting-proxy", daemon=True)
        self.target = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.up = 0  # client -> server
        self.down = 0  # server -> client
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []

    def _pump(self, src: socket.socket, dst: socket.socket, upward: bool) -> None:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        try:
            while True:
                n = src.recv_into(view)
                if n == 0:
                    break
                dst.sendall(view[:n])
                with self._lock:
                    if upward:
                        self.up += n
                    else:
                        self.down += n
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        self.server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def total(self) -> int:
        with self._lock:
            return self.up + self.down

    def close(self) -> None:
        self._stop.set()
        self.server.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()


@dataclass
class Deployment:
    """Aggregator + one edge node per entry of ``nodes`` (task names), plaintext on 127.0.0.1."""

    workdir: Path
    federation: str = "radcom"
    nodes: Sequence[str] = ()
    aggregator_flags: Sequence[str] = ()
    node_flags: Sequence[str] = ()
    node_metrics: bool = False  # give every node a Prometheus endpoint on a free port
    via_proxy: bool = False  # nodes reach the aggregator through a CountingProxy (``self.proxy``)
    env: dict[str, str] = field(default_factory=dict)
    procs: list[ServiceProcess] = field(default_factory=list)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    watcher: RoundWatcher | None = None
    grpc_port: int = 0
    agg_metrics_port: int | None = None
    proxy: CountingProxy | None = None

    def __enter__(self) -> Deployment:
        from benchmarks.common import free_port

        fresh(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        nodes = list(self.nodes) or list(load_federation(self.federation).task_names)
        metrics = self.workdir / "metrics.jsonl"
        try:
            agg, ready = start_aggregator(
                self.workdir,
                [
                    "--federation",
                    self.federation,
                    "--min-nodes",
                    str(len(nodes)),
                    "--state-dir",
                    str(self.workdir / "aggregator-state"),
                    "--metrics-log",
                    str(metrics),
                    *self.aggregator_flags,
                ],
                env=self.env,
            )
            self.procs.append(agg)
            self.grpc_port = int(ready["grpc_port"])
            self.agg_metrics_port = ready.get("metrics_port")
            self.watcher = RoundWatcher(metrics, len(nodes))
            self.watcher.start()
            node_port = self.grpc_port
            if self.via_proxy:
                self.proxy = CountingProxy(self.grpc_port)
                self.proxy.start()
                node_port = self.proxy.port
            for i, task in enumerate(nodes):
                name = f"{task}-{i}" if nodes.count(task) > 1 else task
                flags = ["--federation", self.federation, *self.node_flags]
                if self.node_metrics:
                    port = free_port()
                    self.metrics_ports[name] = port
                    flags += ["--metrics-listen", f"127.0.0.1:{port}"]
                self.procs.append(start_edge_node(self.workdir, node_port, task, flags, name=name, env=self.env))
        except BaseException:
            self.close()
            raise
        return self

    def wait_rounds(self, n: int, timeout: float) -> list[float]:
        assert self.watcher is not None
        self.watcher.wait_rounds(n, timeout, self.procs)
        return list(self.watcher.stamps)

    def scrape(self, port: int) -> dict[str, float]:
        """Unlabelled and labelled samples of a Prometheus endpoint, name{labels} -> value."""
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    continue
        return out

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        for p in reversed(self.procs):
            p.stop(timeout=10)
        if self.proxy is not None:
            self.proxy.close()

    def __exit__(self, *exc: object) -> None:
        self.close()


def intervals(stamps: Sequence[float], skip: int) -> list[float]:
    """Close-to-close round times after the first ``skip`` rounds (start-up and warm-up)."""
    return [b - a for a, b in zip(stamps[skip:], stamps[skip + 1 :], strict=False)]
