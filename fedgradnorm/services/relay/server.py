"""Assemble and run a relay process: the Aggregator service for its site's nodes (the aggregator's
own servicer over a RelayCoordinator, GetState asked of the aggregator), health, metrics, and the
uplink to the aggregator."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import structlog
import torch
from grpc_health.v1 import health, health_pb2_grpc
from prometheus_client import Counter, Gauge

from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc
from fedgradnorm.services.aggregator.metrics import NodeTrafficMetrics, Totals
from fedgradnorm.services.aggregator.server import SERVICE_NAME
from fedgradnorm.services.aggregator.servicer import AggregatorServicer
from fedgradnorm.services.relay.config import RelayConfig
from fedgradnorm.services.relay.coordinator import RelayCoordinator
from fedgradnorm.services.serving import (
    Ports,
    RunningService,
    grpc_server,
    health_servicer,
    open_ports,
    set_health,
    stop_signals,
)

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
        self._totals = Totals()

    def sync(self, relay: RelayCoordinator) -> None:
        up = relay.upstream
        self.round.set(relay.round)
        self.connected.set(1 if up.connected else 0)
        self.registered.set(relay.registered_count())
        self._totals.advance("sent", self.uplink_bytes.labels("sent"), up.bytes_sent)
        self._totals.advance("received", self.uplink_bytes.labels("received"), up.bytes_received)
        self._totals.advance("partial_sums", self.partial_sums, relay.stats["partial_sums"])
        self._totals.advance("rounds", self.rounds, relay.stats["rounds"])


@dataclass
class RunningRelay(RunningService):
    relay: RelayCoordinator
    servicer: AggregatorServicer
    health: health.HealthServicer
    metrics: RelayMetrics
    ports: Ports

    def stop(self, grace: float = 2.0) -> None:
        self.stop_serving(grace)
        self.relay.stop()
        self.servicer.streams.close()


def start_relay(config: RelayConfig) -> RunningRelay:
    """Bind, attach to the aggregator (retrying while it is away), then serve: health says
    NOT_SERVING until the relay is attached."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    metrics = RelayMetrics()
    relay = RelayCoordinator(config)
    health_ = health_servicer([SERVICE_NAME])
    server = grpc_server(2 * config.max_nodes + config.max_workers)
    servicer = AggregatorServicer(relay, config, metrics, relay.get_state)  # GetState: the aggregator's
    pb_grpc.add_AggregatorServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_, server)
    try:
        ports = open_ports(
            server,
            health_,
            listen=config.listen,
            creds=config.server_tls().credentials(),
            metrics_listen=config.metrics_listen,
            registry=metrics.registry,
            health_listen=config.health_listen,
        )
    except BaseException:
        relay.stop()
        raise
    try:
        log.info(
            "relay.listening",
            relay=config.name,
            grpc_port=ports.grpc_port,
            metrics_port=ports.metrics_port,
            upstream=config.upstream,
        )
        relay.start()  # attaches: blocks until the aggregator answers (or the relay is stopped)
    except BaseException:
        ports.close()
        relay.stop()
        raise
    set_health(health_, [SERVICE_NAME], serving=True)
    running = RunningRelay(relay, servicer, health_, metrics, ports)
    threading.Thread(target=_watch, args=(running,), name="relay-metrics", daemon=True).start()
    ports.write_ready(config.ready_file)
    return running


def _watch(running: RunningRelay) -> None:
    while not running.relay.stopping:
        running.metrics.sync(running.relay)
        time.sleep(1.0)


def serve_forever(config: RelayConfig) -> int:
    done = stop_signals(log, "relay.stopping")  # before the attach, which may wait for the aggregator
    running = start_relay(config)
    done.wait()
    running.stop()
    log.info("relay.stopped", **running.relay.describe())
    return 0
