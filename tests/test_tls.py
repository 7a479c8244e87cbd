"""Mutual TLS between the aggregator and edge nodes, over real sockets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc
from fedgradnorm.certs import make_certificates
from fedgradnorm.services import serde
from fedgradnorm.services.aggregator.config import CoordinatorConfig, ServiceConfig
from fedgradnorm.services.aggregator.server import RunningAggregator, start_aggregator
from fedgradnorm.services.tls import ClientTLS, TLSConfigError


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pki")
    make_certificates(root / "good")
    make_certificates(root / "rogue")  # another CA, same names
    return root / "good", root / "rogue"


@pytest.fixture
def mtls_aggregator(pki: tuple[Path, Path], tmp_path: Path) -> Iterator[RunningAggregator]:
    good, _ = pki
    service = ServiceConfig(
        listen="127.0.0.1:0",
        metrics_listen="",
        state_dir=str(tmp_path / "s"),
        tls_cert=str(good / "server.pem"),
        tls_key=str(good / "server.key"),
        tls_client_ca=str(good / "ca.pem"),
        health_listen="127.0.0.1:0",
    )
    agg = start_aggregator(service, CoordinatorConfig(federation="mtfl", min_nodes=2))
    try:
        yield agg
    finally:
        agg.stop(grace=0.2)


def call_register(channel: grpc.Channel) -> pb.RegisterResponse:
    return pb_grpc.AggregatorStub(channel).Register(
        pb.RegisterRequest(
            node_name="n", federation="mtfl", network=serde.federation_network("mtfl"), task="gender", num_samples=3
        ),
        timeout=5,
    )


def test_client_with_certificate_of_the_ca_is_served(
    mtls_aggregator: RunningAggregator, pki: tuple[Path, Path]
) -> None:
    good, _ = pki
    tls = ClientTLS(
        ca=str(good / "ca.pem"), cert=str(good / "client.pem"), key=str(good / "client.key"), server_name="localhost"
    )
    with tls.channel(f"127.0.0.1:{mtls_aggregator.grpc_port}", []) as ch:
        assert call_register(ch).node_id == "n"


@pytest.mark.parametrize("case", ["no client certificate", "rogue client certificate", "plaintext", "rogue server CA"])
def test_unauthenticated_peers_are_refused(
    mtls_aggregator: RunningAggregator, pki: tuple[Path, Path], case: str
) -> None:
    good, rogue = pki
    address = f"127.0.0.1:{mtls_aggregator.grpc_port}"
    tls = {
        "no client certificate": ClientTLS(ca=str(good / "ca.pem"), server_name="localhost"),
        "rogue client certificate": ClientTLS(
            ca=str(good / "ca.pem"),
            cert=str(rogue / "client.pem"),
            key=str(rogue / "client.key"),
            server_name="localhost",
        ),
        "plaintext": ClientTLS(insecure=True),
        "rogue server CA": ClientTLS(
            ca=str(rogue / "ca.pem"),
            cert=str(good / "client.pem"),
            key=str(good / "client.key"),
            server_name="localhost",
        ),
    }[case]
    with tls.channel(address, []) as ch, pytest.raises(grpc.RpcError) as e:
        call_register(ch)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert mtls_aggregator.coordinator.registered_count() == 0


def test_tls_configuration_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        ServiceConfig(state_dir=str(tmp_path))
    with pytest.raises(ValueError, match="choose one"):
        ServiceConfig(insecure=True, tls_cert="x", tls_key="y")
    with pytest.raises(TLSConfigError, match=r"missing\.key"):
        ServiceConfig(tls_cert=str(tmp_path / "missing.pem"), tls_key=str(tmp_path / "missing.key")).tls().credentials()
    with pytest.raises(TLSConfigError, match="tls_ca"):
        ClientTLS().channel("127.0.0.1:1", [])


def test_probe_port_serves_health_in_plaintext_and_nothing_else(mtls_aggregator: RunningAggregator) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{mtls_aggregator.health_port}") as ch:
        for service in ("", "fedgradnorm.v1.Aggregator"):
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            call_register(ch)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_development_pki_is_warned_about_and_other_certificates_are_not(tmp_path: Path) -> None:
    """Certificates marked as the development PKI of deploy/k8s (private keys in git) log tls.development_pki."""
    from structlog.testing import capture_logs

    from fedgradnorm.certs import DEVELOPMENT_ORGANIZATION
    from fedgradnorm.services.tls import ServerTLS

    make_certificates(tmp_path / "dev", organization=DEVELOPMENT_ORGANIZATION)
    make_certificates(tmp_path / "own")

    def events(folder: Path) -> list[dict]:
        with capture_logs() as logs:
            ServerTLS(
                cert=str(folder / "server.pem"), key=str(folder / "server.key"), client_ca=str(folder / "ca.pem")
            ).credentials()
            client = ClientTLS(
                ca=str(folder / "ca.pem"), cert=str(folder / "client.pem"), key=str(folder / "client.key")
            )
            client.channel("127.0.0.1:1", []).close()
        return [e for e in logs if e["event"] == "tls.development_pki"]

    server, client = events(tmp_path / "dev")
    assert server["log_level"] == client["log_level"] == "warning"
    assert server["files"] == [str(tmp_path / "dev" / "server.pem"), str(tmp_path / "dev" / "ca.pem")]
    assert client["files"] == [str(tmp_path / "dev" / "ca.pem"), str(tmp_path / "dev" / "client.pem")]
    assert "public" in server["why"]
    assert events(tmp_path / "own") == []


def test_ca_bundle_trusts_old_and_new_certificates_during_a_rotation(tmp_path: Path) -> None:
    """docs/operations.md, "Rotate the certificates": with the old and the new CA in one ca.crt, either
    side may hold a certificate of either CA (the key identifiers pick the right CA of the same name)."""
    old, new = tmp_path / "old", tmp_path / "new"
    make_certificates(old)
    make_certificates(new)
    both = tmp_path / "both.pem"
    both.write_bytes((old / "ca.pem").read_bytes() + (new / "ca.pem").read_bytes())
    for server in (old, new):
        service = ServiceConfig(
            listen="127.0.0.1:0",
            metrics_listen="",
            state_dir=str(tmp_path / "state"),
            tls_cert=str(server / "server.pem"),
            tls_key=str(server / "server.key"),
            tls_client_ca=str(both),
        )
        agg = start_aggregator(service, CoordinatorConfig(federation="mtfl", min_nodes=2))
        try:
            for client in (old, new):
                tls = ClientTLS(
                    ca=str(both),
                    cert=str(client / "client.pem"),
                    key=str(client / "client.key"),
                    server_name="localhost",
                )
                with tls.channel(f"127.0.0.1:{agg.grpc_port}", []) as ch:
                    state = pb_grpc.AggregatorStub(ch).GetState(pb.GetStateRequest(), timeout=5)
                assert state.round == 0, (server.name, client.name)
        finally:
            agg.stop(grace=0.2)
