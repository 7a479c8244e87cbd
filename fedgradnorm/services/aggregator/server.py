"""Assemble and run the aggregator process: gRPC (service, health, reflection), metrics, state."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
import structlog
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc
from fedgradnorm._proto.fedgradnorm.v1 import relay_pb2 as rpb
from fedgradnorm._proto.fedgradnorm.v1 import relay_pb2_grpc as rpb_grpc
from fedgradnorm.atomic import atomic_write_text
from fedgradnorm.errors import FatalError
from fedgradnorm.services.aggregator.codec import WireCodec
from fedgradnorm.services.aggregator.config import CoordinatorConfig, ServiceConfig
from fedgradnorm.services.aggregator.coordinator import RoundCoordinator
from fedgradnorm.services.aggregator.metrics import AggregatorMetrics
from fedgradnorm.services.aggregator.roundlog import RoundLog
from fedgradnorm.services.aggregator.servicer import AggregatorServicer, own_state
from fedgradnorm.services.aggregator.store import FileStateStore
from fedgradnorm.services.aggregator.uplink import UplinkServicer
from fedgradnorm.services.domain import Phase
from fedgradnorm.services.netcheck import bind_error, os_reason

log = structlog.get_logger("fedgradnorm.aggregator")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Aggregator"].full_name
UPLINK_NAME = rpb.DESCRIPTOR.services_by_name["Uplink"].full_name
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 4 << 20),
    ("grpc.max_send_message_length", 4 << 20),
    ("grpc.so_reuseport", 0),
    # Edge nodes ping idle connections so that a dead wireless link is noticed (see the node's options).
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
    ("grpc.http2.max_ping_strikes", 0),
]


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
class RunningAggregator:
    server: grpc.Server
    coordinator: RoundCoordinator
    health: health.HealthServicer
    metrics: AggregatorMetrics
    grpc_port: int
    metrics_port: int | None
    health_port: int | None = None
    health_server: grpc.Server | None = None
    servicer: AggregatorServicer | None = None
    metrics_httpd: WSGIServer | None = None

    def stop(self, grace: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()
        if self.metrics_httpd is not None:
            self.metrics_httpd.shutdown()
            self.metrics_httpd.server_close()
        self.coordinator.stop()
        if self.servicer is not None:
            self.servicer.streams.close()


def start_aggregator(service: ServiceConfig, rounds: CoordinatorConfig) -> RunningAggregator:
    """Start serving: health says NOT_SERVING until the state is loaded, SERVING after."""
    if service.torch_threads:
        torch.set_num_threads(service.torch_threads)
    metrics = AggregatorMetrics()
    store = FileStateStore(service.state_dir)
    round_log = RoundLog(Path(service.metrics_log or os.path.join(service.state_dir, "metrics.jsonl")))
    coordinator = RoundCoordinator(rounds, store, listeners=[metrics.on_round, round_log])

    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    # Each FetchRound or SubmitUpdate in flight holds a worker, at most one of each per node
    # (streams.py): the pool has one of each for every node plus max_workers to spare, so node
    # traffic cannot starve health, GetState or Register (threads are only created as needed).
    # Relays hold up to four streams each (round, weights, partial sum, a report) beside their nodes'.
    workers = 2 * rounds.max_nodes + service.max_workers + 4 * 256
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers), options=GRPC_OPTIONS, interceptors=[WireCodec()]
    )
    servicer = AggregatorServicer(coordinator, service, metrics, own_state(coordinator))
    pb_grpc.add_AggregatorServicer_to_server(servicer, server)
    uplink = UplinkServicer(coordinator, servicer, mutual_tls=bool(service.tls_client_ca))
    rpb_grpc.add_UplinkServicer_to_server(uplink, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            UPLINK_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    creds = service.tls().credentials()
    # The side ports first and the gRPC port last: a gRPC server releases a bound port only once
    # started, so every port bound before a failure belongs to something that can be stopped.
    health_server, health_port, httpd, metrics_port = None, None, None, None
    try:
        if service.metrics_listen:
            host, mport = _split_host_port(service.metrics_listen)  # plaintext HTTP: scraped inside the cluster
            try:
                httpd, _ = start_http_server(mport, addr=host, registry=metrics.registry)
            except OSError as e:
                raise FatalError(_cannot_listen(service.metrics_listen, "--metrics-listen", e)) from e
            metrics_port = httpd.server_port
        if service.health_listen:
            # Plaintext, health service only: for probes (the kubelet's gRPC probes cannot speak TLS).
            health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[WireCodec()])
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
            health_port = _bind(health_server, service.health_listen, "--health-listen", None)
            health_server.start()
        port = _bind(server, service.listen, "--listen", creds)
        server.start()
        log.info(
            "aggregator.listening",
            grpc_port=port,
            metrics_port=metrics_port,
            state=store.describe(),
            tls="off" if creds is None else ("mutual" if service.tls_client_ca else "server"),
        )
        coordinator.load()  # or initialise the state; raises StateError on a corrupt one
        round_log.reconcile(coordinator.last_round_records)
        coordinator.start()
    except BaseException:
        # Nothing stays bound or running: the ports are free again for the next attempt.
        server.stop(0).wait()
        if health_server is not None:
            health_server.stop(0).wait()
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        coordinator.stop()
        raise
    metrics.round.set(coordinator.round)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = RunningAggregator(
        server, coordinator, health_servicer, metrics, port, metrics_port, health_port, health_server, servicer, httpd
    )
    threading.Thread(target=_watch_halt, args=(running,), name="health-watch", daemon=True).start()
    if service.ready_file:
        ready = {"grpc_port": port, "metrics_port": metrics_port, "health_port": health_port, "pid": os.getpid()}
        atomic_write_text(Path(service.ready_file), json.dumps(ready), durable=False)
    return running


def _watch_halt(running: RunningAggregator) -> None:
    """Readiness follows the coordinator: NOT_SERVING for the service while it is halted."""
    last = None
    coord, streams = running.coordinator, running.servicer.streams if running.servicer else None
    while coord.running:
        running.metrics.sync_counts(
            {
                "rounds_refused": coord.refused_rounds,
                "dropped_updates": coord.dropped_updates,
                "relay_lost": coord.lost_relay_updates,
                **({f"streams_{k}": v for k, v in streams.cancelled.items()} if streams else {}),
            }
        )
        halted = coord.phase is Phase.HALTED
        if halted != last:
            status = health_pb2.HealthCheckResponse.NOT_SERVING if halted else health_pb2.HealthCheckResponse.SERVING
            running.health.set(SERVICE_NAME, status)
            running.metrics.halted.set(1 if halted else 0)
            last = halted
        running.metrics.registered.set(running.coordinator.registered_count())
        running.metrics.sync_relays(coord.relay_stats())
        time.sleep(1.0)


def serve_forever(service: ServiceConfig, rounds: CoordinatorConfig) -> int:
    running = start_aggregator(service, rounds)
    done = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        log.info("aggregator.stopping", signal=signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    done.wait()
    running.stop()
    log.info("aggregator.stopped", round=running.coordinator.round)
    return 0
