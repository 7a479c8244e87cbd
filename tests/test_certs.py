"""`fedgradnorm certs --san NAME` and `--client NAME --ca-dir DIR`: certificates for edge devices outside a cluster."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc
from fedgradnorm.certs import DEFAULT_SERVER_NAMES, server_names
from fedgradnorm.cli import build_parser
from fedgradnorm.services.aggregator.config import CoordinatorConfig, ServiceConfig
from fedgradnorm.services.aggregator.server import start_aggregator
from fedgradnorm.services.tls import ClientTLS


def certs(*argv: str) -> int:
    args = build_parser().parse_args(["certs", *argv])
    return args.func(args)


def sans(path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in ext.get_values_for_type(x509.DNSName) + ext.get_values_for_type(x509.IPAddress)]


def test_san_adds_external_names_to_the_defaults(tmp_path: Path) -> None:
    assert (
        certs("--out", str(tmp_path), "--san", "FedGradNorm.Example.org", "--san", "192.0.2.7", "--san", "localhost")
        == 0
    )
    names = sans(tmp_path / "server.pem")
    assert "fedgradnorm.example.org" in names and "192.0.2.7" in names
    assert set(DEFAULT_SERVER_NAMES) <= set(names)
    assert len(names) == len(set(names)), "a name given twice is kept once"


def test_san_adds_to_server_names_and_goes_into_the_secrets_header(tmp_path: Path) -> None:
    out = tmp_path / "secrets.yaml"
    assert certs("--k8s-secrets", str(out), "--server-names", "a.example", "--san", "*.edge.example") == 0
    text = out.read_text()
    assert "--server-names a.example --san *.edge.example" in text, "the header repeats the command"
    assert "#   a.example, *.edge.example" in text


@pytest.mark.parametrize(
    "bad", ["two words", "under_score.example", "-lead.example", "a..b", "x" * 64 + ".example", ""]
)
def test_san_refuses_what_a_certificate_cannot_hold(bad: str) -> None:
    with pytest.raises(ValueError):
        server_names(["localhost"], [bad]) if bad else server_names([], [])


def test_a_device_certificate_of_the_same_ca_is_accepted_under_the_external_name(tmp_path: Path) -> None:
    """The whole path of an edge device outside the cluster: --san, --client, then a real mTLS call by that name."""
    pki = tmp_path / "pki"
    assert certs("--out", str(pki), "--san", "radcom.fedgradnorm.example.org") == 0
    assert certs("--ca-dir", str(pki), "--client", "lab-1", "--days", "30") == 0
    device = x509.load_pem_x509_certificate((pki / "lab-1.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    device.verify_directly_issued_by(ca)
    eku = device.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert (pki / "lab-1.key").stat().st_mode & 0o077 == 0, "the device key is private"
    other = tmp_path / "other"
    assert certs("--out", str(other)) == 0
    with pytest.raises(ValueError, match="not the key"):
        (pki / "ca.key").write_bytes((other / "ca.key").read_bytes())
        certs("--ca-dir", str(pki), "--client", "lab-2")
    (pki / "ca.key").write_bytes(b"")  # the CA key is not needed any more by the services

    service = ServiceConfig(
        listen="127.0.0.1:0",
        metrics_listen="",
        state_dir=str(tmp_path / "state"),
        tls_cert=str(pki / "server.pem"),
        tls_key=str(pki / "server.key"),
        tls_client_ca=str(pki / "ca.pem"),
    )
    running = start_aggregator(service, CoordinatorConfig(federation="radcom", min_nodes=3))
    address = f"127.0.0.1:{running.grpc_port}"
    try:
        device_tls = ClientTLS(
            ca=str(pki / "ca.pem"),
            cert=str(pki / "lab-1.pem"),
            key=str(pki / "lab-1.key"),
            server_name="radcom.fedgradnorm.example.org",
        )
        with device_tls.channel(address, []) as channel:
            assert pb_grpc.AggregatorStub(channel).GetState(pb.GetStateRequest(), timeout=10).round == 0
        # A name that is not in the certificate fails the handshake.
        wrong = ClientTLS(ca=device_tls.ca, cert=device_tls.cert, key=device_tls.key, server_name="other.example.org")
        with wrong.channel(address, []) as channel, pytest.raises(grpc.RpcError) as refused:
            pb_grpc.AggregatorStub(channel).GetState(pb.GetStateRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(grace=0.2)


def test_out_and_k8s_secrets_hold_a_relay_certificate_for_the_relay_services(tmp_path: Path) -> None:
    """`--out` writes relay.pem/.key and `--k8s-secrets` the Secret fedgradnorm-relay-tls: the relay role
    (OU relay), server and client usages, the in-cluster names of deploy/k8s's relay Services."""
    import yaml
    from cryptography.x509.oid import NameOID

    from fedgradnorm.certs import DEFAULT_RELAY_NAMES, RELAY_ROLE, RELAY_SECRET

    secrets_file = tmp_path / "secrets.yaml"
    assert certs("--out", str(tmp_path), "--k8s-secrets", str(secrets_file)) == 0
    relay = x509.load_pem_x509_certificate((tmp_path / "relay.pem").read_bytes())
    relay.verify_directly_issued_by(x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes()))
    assert [a.value for a in relay.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)] == [RELAY_ROLE]
    eku = relay.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert sorted(sans(tmp_path / "relay.pem")) == sorted(DEFAULT_RELAY_NAMES)
    assert "radcom-relay-site-a.fedgradnorm.svc" in DEFAULT_RELAY_NAMES
    assert (tmp_path / "relay.key").stat().st_mode & 0o077 == 0, "the relay key is private"
    docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all(secrets_file.read_text())}
    secret = docs[RELAY_SECRET]
    assert secret["metadata"]["labels"]["app.kubernetes.io/component"] == "relay"
    assert x509.load_pem_x509_certificate(secret["stringData"]["tls.crt"].encode()).subject == relay.subject
    assert "# The relay certificate's names:" in secrets_file.read_text()
