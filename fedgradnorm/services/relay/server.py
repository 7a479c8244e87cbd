"""Assemble and run a relay process: the Aggregator service for its site's nodes (the aggregator's
own servicer over a RelayCoordinator, GetState asked of the aggregator), health, metrics, and the
uplink to the aggregator."""

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
from prometheus_client import Counter, Gauge, start_http_server

from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc
from fedgradnorm.atomic import atomic_write_text
from fedgradnorm.errors import FatalError
from fedgradnorm.services.aggregator.codec import WireCodec
from fedgradnorm.services.aggregator.metrics import NodeTrafficMetrics
from fedgradnorm.services.aggregator.server import GRPC_OPTIONS, SERVICE_NAME, _bind, _cannot_listen, _split_host_port
from fedgradnorm.services.aggregator.servicer import AggregatorServicer
from fedgradnorm.services.relay.config import RelayConfig
from fedgradnorm.services.relay.coordinator import RelayCoordinator

log = structlog.get_logger("fedgradnorm.relay")


class RelayMetrics(NodeTrafficMetrics):
    """The relay's /metrics: its nodes' traffic (fedgradnorm_relay_*) and its uplink."""

    def __init__(self) -> None:
        super().__init__(prefix="fedgradnorm_relay")
        r = self.registry
        self.round = Gauge("fedgradnorm_relay_round", "The aggregator's round as the relay last saw it", registry=r)
        self.connected = Gauge(
            "fedgradnorm_relay_upstream_connected", "1 while the aggregator answers the relay, 0 otherwise", registry=r
        )
        self.uplink_bytes = Counter(
            "fedgradnorm_relay_uplink_bytes_total",
            "Payload bytes between the relay and the aggregator (omega down, partial sums up)",
            ("direction",),
            registry=r,
        )
        self.partial_sums = Counter(
            "fedgradnorm_relay_partial_sums_total", "Partial sums the relay sent up", registry=r
        )
        self.rounds = Counter("fedgradnorm_relay_rounds_total", "Rounds the relay took part in", registry=r)
        for direction in ("sent", "received"):
            self.uplink_bytes.labels(direction)
        self._synced: dict[str, float] = {}

    def sync(self, relay: RelayCoordinator) -> None:
        up = relay.upstream
        self.round.set(relay.round)
        self.connected.set(1 if up.connected else 0)
        self.registered.set(relay.registered_count())
        for key, counter, total in (
            ("sent", self.uplink_bytes.labels("sent"), up.bytes_sent),
            ("received", self.uplink_bytes.labels("received"), up.bytes_received),
            ("partial_sums", self.partial_sums, relay.stats["partial_sums"]),
            ("rounds", self.rounds, relay.stats["rounds"]),
        ):
            delta = total - self._synced.get(key, 0)
            if delta > 0:
                counter.inc(delta)
                self._synced[key] = total


@dataclass
class RunningRelay:
    server: grpc.Server
    relay: RelayCoordinator
    servicer: AggregatorServicer
    health: health.HealthServicer
    metrics: RelayMetrics
    grpc_port: int
    metrics_port: int | None
    health_port: int | None = None
    health_server: grpc.Server | None = None
    metrics_httpd: WSGIServer | None = None

    def stop(self, grace: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()
        if self.metrics_httpd is not None:
            self.metrics_httpd.shutdown()
            self.metrics_httpd.server_close()
        self.relay.stop()
        self.servicer.streams.close()


def start_relay(config: RelayConfig) -> RunningRelay:
    """Bind, attach to the aggregator (retrying while it is away), then serve: health says
    NOT_SERVING until the relay is attached."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    metrics = RelayMetrics()
    relay = RelayCoordinator(config)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    workers = 2 * config.max_nodes + config.max_workers
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers), options=GRPC_OPTIONS, interceptors=[WireCodec()]
    )
    servicer = AggregatorServicer(relay, config, metrics, relay.get_state)  # GetState: the aggregator's
    pb_grpc.add_AggregatorServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    creds = config.server_tls().credentials()
    health_server, health_port, httpd, metrics_port = None, None, None, None
    try:
        if config.metrics_listen:
            host, mport = _split_host_port(config.metrics_listen)
            try:
                httpd, _ = start_http_server(mport, addr=host, registry=metrics.registry)
            except OSError as e:
                raise FatalError(_cannot_listen(config.metrics_listen, "--metrics-listen", e)) from e
            metrics_port = httpd.server_port
        if config.health_listen:
            health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[WireCodec()])
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
            health_port = _bind(health_server, config.health_listen, "--health-listen", None)
            health_server.start()
        port = _bind(server, config.listen, "--listen", creds)
        server.start()
        log.info(
            "relay.listening", relay=config.name, grpc_port=port, metrics_port=metrics_port, upstream=config.upstream
        )
        relay.start()  # attaches: blocks until the aggregator answers (or the relay is stopped)
    except BaseException:
        server.stop(0).wait()
        if health_server is not None:
            health_server.stop(0).wait()
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        relay.stop()
        raise
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = RunningRelay(
        server, relay, servicer, health_servicer, metrics, port, metrics_port, health_port, health_server, httpd
    )
    threading.Thread(target=_watch, args=(running,), name="relay-metrics", daemon=True).start()
    if config.ready_file:
        ready = {"grpc_port": port, "metrics_port": metrics_port, "health_port": health_port, "pid": os.getpid()}
        atomic_write_text(Path(config.ready_file), json.dumps(ready), durable=False)
    return running


def _watch(running: RunningRelay) -> None:
    while not running.relay._stop.is_set():
        running.metrics.sync(running.relay)
        time.sleep(1.0)


def serve_forever(config: RelayConfig) -> int:
    done = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        log.info("relay.stopping", signal=signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    running = start_relay(config)
    done.wait()
    running.stop()
    log.info("relay.stopped", **running.relay.describe())
    return 0
