"""A development certificate authority and the certificates mutual TLS needs.

``fedgradnorm certs --out DIR`` writes ``ca.pem`` (and ``ca.key``), ``server.pem``/``server.key``
for the aggregator (with the DNS names and IP addresses it is reached by) and
``client.pem``/``client.key`` for edge nodes. For production, use your own PKI: the services only
need PEM files.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedgradnorm.atomic import atomic_write_bytes

DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "aggregator", "radcom-aggregator", "mtfl-aggregator")


def _name(common: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedgradnorm"), x509.NameAttribute(NameOID.COMMON_NAME, common)]
    )


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Replace ``path`` atomically; a private key is readable by its owner only from the start."""
    atomic_write_bytes(path, data, mode=0o600 if private else None, durable=False)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _sans(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def make_certificates(
    out: str | Path, server_names: Sequence[str] = DEFAULT_SERVER_NAMES, days: int = 365, client_name: str = "edge-node"
) -> dict[str, Path]:
    """Write a CA, a server certificate for ``server_names`` and a client certificate."""
    if not server_names:
        raise ValueError("at least one server name is needed")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = _key()
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("fedgradnorm dev CA"))
        .issuer_name(_name("fedgradnorm dev CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        common: str, usage: x509.ObjectIdentifier, sans: Sequence[str]
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = _key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(_sans(sans), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return cert, key

    server, server_key = leaf(server_names[0], ExtendedKeyUsageOID.SERVER_AUTH, server_names)
    client, client_key = leaf(client_name, ExtendedKeyUsageOID.CLIENT_AUTH, [client_name])
    pem = serialization.Encoding.PEM
    paths = {
        "ca": out / "ca.pem",
        "ca_key": out / "ca.key",
        "server_cert": out / "server.pem",
        "server_key": out / "server.key",
        "client_cert": out / "client.pem",
        "client_key": out / "client.key",
    }
    _write(paths["ca"], ca.public_bytes(pem))
    _write(paths["ca_key"], _pem_key(ca_key), private=True)
    _write(paths["server_cert"], server.public_bytes(pem))
    _write(paths["server_key"], _pem_key(server_key), private=True)
    _write(paths["client_cert"], client.public_bytes(pem))
    _write(paths["client_key"], _pem_key(client_key), private=True)
    return paths
