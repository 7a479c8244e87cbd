"""What both service processes (the aggregator, a relay) do to serve: the gRPC server and its
options, the health service, the side ports (Prometheus /metrics, a plaintext health-only port for
probes), binding with one clear error per address, and the ready file scripts wait for."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server
from structlog.typing import FilteringBoundLogger

from fedgradnorm.atomic import atomic_write_text
from fedgradnorm.errors import FatalError
from fedgradnorm.services.aggregator.codec import WireCodec
from fedgradnorm.services.netcheck import bind_error, os_reason
from fedgradnorm.wire_format import MESSAGE_LIMITS

GRPC_OPTIONS = [
    *MESSAGE_LIMITS,
    ("grpc.so_reuseport", 0),
    # Edge nodes ping idle connections so that a dead wireless link is noticed (see the node's options).
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
    ("grpc.http2.max_ping_strikes", 0),
]


def stop_signals(log: FilteringBoundLogger, event: str) -> threading.Event:
    """An event set by SIGTERM or SIGINT (logged as ``event`` with the signal's name)."""
    done = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        log.info(event, signal=signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return done


def grpc_server(workers: int) -> grpc.Server:
    """The services' gRPC server: strict request decoding, pre-serialized responses (codec.py)."""
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers), options=GRPC_OPTIONS, interceptors=[WireCodec()]
    )


def health_servicer(names: Sequence[str]) -> health.HealthServicer:
    """A health service that says NOT_SERVING for ``names`` (and "") until told otherwise."""
    servicer = health.HealthServicer(experimental_non_blocking=True)
    set_health(servicer, names, serving=False)
    return servicer


def set_health(servicer: health.HealthServicer, names: Sequence[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *names):
        servicer.set(name, status)


def _split_host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def _cannot_listen(address: str, flag: str, cause: OSError | str) -> str:
    if isinstance(cause, OSError):
        cause = os_reason(cause)
    hint = f"stop the other process or give another {flag} (port 0 picks a free one)"
    if flag == "--metrics-listen":
        hint += ', or --metrics-listen "" to serve no metrics'
    return f"cannot listen on {address} ({flag}): {cause}; {hint}"


def _bind(server: grpc.Server, address: str, flag: str, creds: grpc.ServerCredentials | None) -> int:
    """Bind ``address`` (gRPC binds when the port is added); FatalError with the system's reason if it cannot."""
    cause = bind_error(address)  # first, so that gRPC's own log line does not precede the error
    if cause is None:
        try:
            port: int = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
        except RuntimeError:  # grpc: "Failed to bind to address ...", without the reason
            port = 0
        if port:
            return port
        cause = bind_error(address) or "gRPC could not bind it"
    raise FatalError(_cannot_listen(address, flag, cause))


@dataclass
class Ports:
    """The ports a service process serves on, and the side servers it started for them."""

    server: grpc.Server
    grpc_port: int
    metrics_port: int | None = None
    health_port: int | None = None
    health_server: grpc.Server | None = None
    metrics_httpd: WSGIServer | None = field(default=None, repr=False)

    def close(self, grace: float | None = 0) -> None:
        """Stop serving on every port (``grace`` seconds for calls in flight on the gRPC port)."""
        self.server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()
        if self.metrics_httpd is not None:
            self.metrics_httpd.shutdown()
            self.metrics_httpd.server_close()

    def write_ready(self, path: str) -> None:
        """The ready file: the bound ports and the pid, written once serving (empty path: none)."""
        if path:
            ready = {
                "grpc_port": self.grpc_port,
                "metrics_port": self.metrics_port,
                "health_port": self.health_port,
                "pid": os.getpid(),
            }
            atomic_write_text(Path(path), json.dumps(ready), durable=False)


class RunningService:
    """What the aggregator's and a relay's running handles share (a base of their dataclasses, which
    declare ``health`` and ``ports`` as fields): the ports, and how serving stops."""

    health: health.HealthServicer
    ports: Ports

    @property
    def server(self) -> grpc.Server:
        return self.ports.server

    @property
    def grpc_port(self) -> int:
        return self.ports.grpc_port

    @property
    def metrics_port(self) -> int | None:
        return self.ports.metrics_port

    @property
    def health_port(self) -> int | None:
        return self.ports.health_port

    def stop_serving(self, grace: float) -> None:
        """Health says NOT_SERVING, then every port stops (``grace`` seconds for calls in flight)."""
        self.health.enter_graceful_shutdown()
        self.ports.close(grace)


def open_ports(
    server: grpc.Server,
    health_: health.HealthServicer,
    *,
    listen: str,
    creds: grpc.ServerCredentials | None,
    metrics_listen: str,
    registry: CollectorRegistry,
    health_listen: str,
) -> Ports:
    """Bind and start: /metrics, the probe port, then the gRPC port. The side ports come first and
    the gRPC port last: a gRPC server releases a bound port only once started, so every port bound
    before a failure belongs to something that can be stopped, and on failure nothing stays bound."""
    ports = Ports(server, 0)
    try:
        if metrics_listen:
            host, mport = _split_host_port(metrics_listen)  # plaintext HTTP: scraped inside the cluster
            try:
                ports.metrics_httpd, _ = start_http_server(mport, addr=host, registry=registry)
            except OSError as e:
                raise FatalError(_cannot_listen(metrics_listen, "--metrics-listen", e)) from e
            ports.metrics_port = ports.metrics_httpd.server_port
        if health_listen:
            # Plaintext, health service only: for probes (the kubelet's gRPC probes cannot speak TLS).
            ports.health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[WireCodec()])
            health_pb2_grpc.add_HealthServicer_to_server(health_, ports.health_server)
            ports.health_port = _bind(ports.health_server, health_listen, "--health-listen", None)
            ports.health_server.start()
        ports.grpc_port = _bind(server, listen, "--listen", creds)
        server.start()
    except BaseException:
        ports.close()
        raise
    return ports
