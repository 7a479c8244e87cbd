"""Start and stop the services as real processes (the demo, the tests and the benchmarks use it)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


@dataclass
class ServiceProcess:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> ServiceProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        env = {**os.environ, "FEDGRADNORM_LOG_FORMAT": "json", **self.env}
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the crash the state must survive."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; always reaps the process."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines (events) of the process, those named ``name`` when given; other lines are skipped."""
        out = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict) and (name is None or obj.get("event") == name):
                    out.append(obj)
        return out


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedgradnorm.cli", "--log-format", "json", *args]


def wait_ready(ready_file: Path, proc: ServiceProcess, timeout: float = 120.0) -> dict[str, Any]:
    """Wait until the aggregator wrote its ready file; fail with its log if it died first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ready_file.exists():
            ready: dict[str, Any] = json.loads(ready_file.read_text())
            return ready
        if not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited with {proc.proc.returncode if proc.proc else '?'}:\n{proc.log_text()[-4000:]}"
            )
        time.sleep(0.05)
    raise TimeoutError(f"{proc.name} not ready after {timeout} s:\n{proc.log_text()[-4000:]}")


def server_tls_flags(certs: Path | None) -> list[str]:
    """Mutual TLS with the certificates of `fedgradnorm certs` in ``certs``; plaintext when None."""
    if certs is None:
        return ["--insecure", "true"]
    return [
        "--tls-cert",
        str(certs / "server.pem"),
        "--tls-key",
        str(certs / "server.key"),
        "--tls-client-ca",
        str(certs / "ca.pem"),
    ]


def client_tls_flags(certs: Path | None) -> list[str]:
    if certs is None:
        return ["--insecure", "true"]
    return [
        "--tls-ca",
        str(certs / "ca.pem"),
        "--tls-cert",
        str(certs / "client.pem"),
        "--tls-key",
        str(certs / "client.key"),
        "--tls-server-name",
        "localhost",
    ]


def start_aggregator(
    workdir: Path,
    flags: Sequence[str],
    name: str = "aggregator",
    env: dict[str, str] | None = None,
    certs: Path | None = None,
    wrap: Sequence[str] = (),
) -> tuple[ServiceProcess, dict[str, Any]]:
    """An aggregator process on 127.0.0.1:0 (``flags`` may name another --listen: the last one
    counts); returns once it serves. ``wrap`` prefixes the command (e.g. ``ip netns exec NS``)."""
    ready = workdir / f"{name}.ready.json"
    if ready.exists():
        ready.unlink()
    proc = ServiceProcess(
        name,
        [
            *wrap,
            *cli(
                "aggregator",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--ready-file",
                str(ready),
                *server_tls_flags(certs),
                *flags,
            ),
        ],
        workdir / f"{name}.log",
        env=env or {},
    ).start()
    try:
        return proc, wait_ready(ready, proc)
    except BaseException:
        proc.stop()
        raise


def start_edge_node(
    workdir: Path,
    port: int,
    task: str,
    flags: Sequence[str],
    name: str | None = None,
    env: dict[str, str] | None = None,
    certs: Path | None = None,
    wrap: Sequence[str] = (),
) -> ServiceProcess:
    """An edge node of ``task`` dialling 127.0.0.1:``port`` (an aggregator or a relay). ``wrap``
    prefixes the command (e.g. ``ip netns exec NS``)."""
    name = name or task
    return ServiceProcess(
        name,
        [
            *wrap,
            *cli(
                "edge-node",
                "--aggregator",
                f"127.0.0.1:{port}",
                "--task",
                task,
                "--name",
                name,
                "--state-dir",
                str(workdir / f"node-{name}"),
                *client_tls_flags(certs),
                *flags,
            ),
        ],
        workdir / f"node-{name}.log",
        env=env or {},
    ).start()


def relay_tls_flags(certs: Path | None, name: str) -> list[str]:
    """A relay with its certificate ``certs/NAME.pem`` (`fedgradnorm certs --relay NAME`): mutual TLS
    with its nodes (their CA) and with the aggregator; plaintext when None."""
    if certs is None:
        return ["--insecure", "true"]
    return [
        "--tls-cert",
        str(certs / f"{name}.pem"),
        "--tls-key",
        str(certs / f"{name}.key"),
        "--tls-client-ca",
        str(certs / "ca.pem"),
        "--tls-ca",
        str(certs / "ca.pem"),
        "--tls-server-name",
        "localhost",
    ]


def start_relay(
    workdir: Path,
    upstream: str,
    name: str,
    flags: Sequence[str] = (),
    env: dict[str, str] | None = None,
    certs: Path | None = None,
    listen: str = "127.0.0.1:0",
    wrap: Sequence[str] = (),
    timeout: float = 120.0,
) -> tuple[ServiceProcess, dict[str, Any]]:
    """A relay process for site ``name``, attached to the aggregator at ``upstream``; returns once
    it serves (its ready file: the bound ports). ``wrap`` prefixes the command (e.g. ``ip netns exec NS``)."""
    ready = workdir / f"relay-{name}.ready.json"
    if ready.exists():
        ready.unlink()
    proc = ServiceProcess(
        f"relay-{name}",
        [
            *wrap,
            *cli(
                "relay",
                "--name",
                name,
                "--upstream",
                upstream,
                "--listen",
                listen,
                "--metrics-listen",
                "127.0.0.1:0",
                "--ready-file",
                str(ready),
                *relay_tls_flags(certs, name),
                *flags,
            ),
        ],
        workdir / f"relay-{name}.log",
        env=env or {},
    ).start()
    try:
        return proc, wait_ready(ready, proc, timeout)
    except BaseException:
        proc.stop()
        raise
