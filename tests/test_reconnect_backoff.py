"""The edge node's and the relay's channel: gRPC's reconnect backoff capped at max_backoff.

Uncapped, gRPC waits 1 s, then 1.6 times longer after each failed connect (up to 120 s) and fails
calls at once meanwhile, so a client whose server was away for a while stayed away for many
seconds after it was back."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedgradnorm.services.edge_node.node import channel_options
from tests.faults_helpers import free_port

DOWN_S = 20.0  # long enough that gRPC's own backoff is past 10 s (1 + 1.6 + 2.56 + 4.1 + 6.55 + ...)
CAP_S = 1.0


def _serve(port: int) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server


def _serving(stub: health_pb2_grpc.HealthStub) -> bool:
    try:
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


@pytest.mark.long  # waits out DOWN_S: make test-faults
def test_a_channel_is_back_within_the_cap_after_its_server_returns() -> None:
    port = free_port()
    server = _serve(port)
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options(CAP_S)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            assert _serving(stub)
            server.stop(0).wait()
            end = time.monotonic() + DOWN_S
            while time.monotonic() < end:  # calls fail at once while the channel backs off
                assert not _serving(stub)
                time.sleep(0.5)
            server = _serve(port)
            back = time.monotonic()
            while not _serving(stub):
                assert time.monotonic() - back < 10 * CAP_S, "the channel did not reconnect within 10x its cap"
                time.sleep(0.05)
            # gRPC adds up to 20 % jitter to the capped delay; the uncapped backoff is past 10 s by now.
            assert time.monotonic() - back < 3 * CAP_S
        finally:
            server.stop(0).wait()
