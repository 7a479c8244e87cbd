"""Assemble and run the aggregator process: gRPC (service, health, reflection), metrics, state."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc
from fedgradnorm._proto.fedgradnorm.v1 import relay_pb2 as rpb
from fedgradnorm._proto.fedgradnorm.v1 import relay_pb2_grpc as rpb_grpc
from fedgradnorm.services.aggregator.config import CoordinatorConfig, ServiceConfig
from fedgradnorm.services.aggregator.coordinator import RoundCoordinator
from fedgradnorm.services.aggregator.metrics import AggregatorMetrics
from fedgradnorm.services.aggregator.relays import MAX_RELAYS
from fedgradnorm.services.aggregator.roundlog import RoundLog
from fedgradnorm.services.aggregator.servicer import AggregatorServicer, own_state
from fedgradnorm.services.aggregator.store import FileStateStore
from fedgradnorm.services.aggregator.uplink import UplinkServicer
from fedgradnorm.services.domain import Phase
from fedgradnorm.services.serving import (
    Ports,
    RunningService,
    grpc_server,
    health_servicer,
    open_ports,
    set_health,
    stop_signals,
)

log = structlog.get_logger("fedgradnorm.aggregator")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Aggregator"].full_name
UPLINK_NAME = rpb.DESCRIPTOR.services_by_name["Uplink"].full_name


@dataclass
class RunningAggregator(RunningService):
    coordinator: RoundCoordinator
    health: health.HealthServicer
    metrics: AggregatorMetrics
    servicer: AggregatorServicer
    ports: Ports

    def stop(self, grace: float = 2.0) -> None:
        self.stop_serving(grace)
        self.coordinator.stop()
        self.servicer.streams.close()


def start_aggregator(service: ServiceConfig, rounds: CoordinatorConfig) -> RunningAggregator:
    """Start serving: health says NOT_SERVING until the state is loaded, SERVING after."""
    if service.torch_threads:
        torch.set_num_threads(service.torch_threads)
    metrics = AggregatorMetrics()
    store = FileStateStore(service.state_dir)
    round_log = RoundLog(Path(service.metrics_log or os.path.join(service.state_dir, "metrics.jsonl")))
    coordinator = RoundCoordinator(rounds, store, listeners=[metrics.on_round, round_log])

    health_ = health_servicer([SERVICE_NAME])
    # Each FetchRound or SubmitUpdate in flight holds a worker, at most one of each per node
    # (streams.py): the pool has one of each for every node plus max_workers to spare, so node
    # traffic cannot starve health, GetState or Register (threads are only created as needed).
    # Relays hold up to four streams each (round, weights, partial sum, a report) beside their nodes'.
    server = grpc_server(2 * rounds.max_nodes + service.max_workers + 4 * MAX_RELAYS)
    servicer = AggregatorServicer(coordinator, service, metrics, own_state(coordinator))
    pb_grpc.add_AggregatorServicer_to_server(servicer, server)
    uplink = UplinkServicer(coordinator, servicer, mutual_tls=bool(service.tls_client_ca))
    rpb_grpc.add_UplinkServicer_to_server(uplink, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_, server)
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
    try:
        ports = open_ports(
            server,
            health_,
            listen=service.listen,
            creds=creds,
            metrics_listen=service.metrics_listen,
            registry=metrics.registry,
            health_listen=service.health_listen,
        )
    except BaseException:
        coordinator.stop()
        raise
    try:
        log.info(
            "aggregator.listening",
            grpc_port=ports.grpc_port,
            metrics_port=ports.metrics_port,
            state=store.describe(),
            tls="off" if creds is None else ("mutual" if service.tls_client_ca else "server"),
        )
        coordinator.load()  # or initialise the state; raises StateError on a corrupt one
        round_log.reconcile(coordinator.last_round_records)
        coordinator.start()
    except BaseException:
        # Nothing stays bound or running: the ports are free again for the next attempt.
        ports.close()
        coordinator.stop()
        raise
    metrics.round.set(coordinator.round)
    set_health(health_, [SERVICE_NAME], serving=True)
    running = RunningAggregator(coordinator, health_, metrics, servicer, ports)
    threading.Thread(target=_watch_halt, args=(running,), name="health-watch", daemon=True).start()
    ports.write_ready(service.ready_file)
    return running


def _watch_halt(running: RunningAggregator) -> None:
    """Readiness follows the coordinator: NOT_SERVING for the service while it is halted."""
    last = None
    coord, streams = running.coordinator, running.servicer.streams
    while coord.running:
        running.metrics.sync_counts(
            {
                "rounds_refused": coord.refused_rounds,
                "dropped_updates": coord.dropped_updates,
                "relay_lost": coord.lost_relay_updates,
                **{f"streams_{k}": v for k, v in streams.cancelled.items()},
            }
        )
        halted = coord.phase is Phase.HALTED
        if halted != last:
            running.health.set(
                SERVICE_NAME,
                health_pb2.HealthCheckResponse.NOT_SERVING if halted else health_pb2.HealthCheckResponse.SERVING,
            )
            running.metrics.halted.set(1 if halted else 0)
            last = halted
        running.metrics.registered.set(running.coordinator.registered_count())
        running.metrics.sync_relays(coord.relay_stats())
        time.sleep(1.0)


def serve_forever(service: ServiceConfig, rounds: CoordinatorConfig) -> int:
    running = start_aggregator(service, rounds)
    stop_signals(log, "aggregator.stopping").wait()
    running.stop()
    log.info("aggregator.stopped", round=running.coordinator.round)
    return 0
