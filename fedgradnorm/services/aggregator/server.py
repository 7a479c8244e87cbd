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

import grpc
import structlog
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc
from fedgradnorm.atomic import atomic_write_text
from fedgradnorm.services.aggregator.codec import WireCodec
from fedgradnorm.services.aggregator.config import CoordinatorConfig, ServiceConfig
from fedgradnorm.services.aggregator.coordinator import RoundCoordinator
from fedgradnorm.services.aggregator.metrics import AggregatorMetrics
from fedgradnorm.services.aggregator.roundlog import RoundLog
from fedgradnorm.services.aggregator.servicer import AggregatorServicer
from fedgradnorm.services.aggregator.store import FileStateStore
from fedgradnorm.services.domain import Phase

log = structlog.get_logger("fedgradnorm.aggregator")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Aggregator"].full_name
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

    def stop(self, grace: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()
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
    workers = 2 * rounds.max_nodes + service.max_workers
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers), options=GRPC_OPTIONS, interceptors=[WireCodec()]
    )
    servicer = AggregatorServicer(coordinator, service, metrics)
    pb_grpc.add_AggregatorServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    creds = service.tls().credentials()
    port = server.add_secure_port(service.listen, creds) if creds else server.add_insecure_port(service.listen)
    if port == 0:
        raise OSError(f"cannot listen on {service.listen}")
    health_server, health_port = None, None
    if service.health_listen:
        # Plaintext, health service only: for probes (the kubelet's gRPC probes cannot speak TLS).
        health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[WireCodec()])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_port = health_server.add_insecure_port(service.health_listen)
        if health_port == 0:
            raise OSError(f"cannot listen on {service.health_listen}")
        health_server.start()
    metrics_port = None
    if service.metrics_listen:
        host, mport = _split_host_port(service.metrics_listen)  # plaintext HTTP: scraped inside the cluster
        httpd, _ = start_http_server(mport, addr=host, registry=metrics.registry)
        metrics_port = httpd.server_port
    server.start()
    log.info(
        "aggregator.listening",
        grpc_port=port,
        metrics_port=metrics_port,
        state=store.describe(),
        tls="off" if creds is None else ("mutual" if service.tls_client_ca else "server"),
    )

    try:
        coordinator.load()  # or initialise the state; raises StateError on a corrupt one
        round_log.reconcile(coordinator.last_round_records)
        coordinator.start()
    except BaseException:
        server.stop(0)
        raise
    metrics.round.set(coordinator.round)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = RunningAggregator(
        server, coordinator, health_servicer, metrics, port, metrics_port, health_port, health_server, servicer
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
