"""A development certificate authority and the certificates mutual TLS needs.

``fedgradnorm certs --out DIR`` writes ``ca.pem`` (and ``ca.key``), ``server.pem``/``server.key``
for the aggregator (with the DNS names and IP addresses it is reached by), ``client.pem``/``client.key``
for edge nodes and ``relay.pem``/``relay.key`` for the relays of deploy/k8s (the relay role, with
the in-cluster names of their Services). ``--k8s-secrets FILE`` writes the same material as the three
Kubernetes Secrets the manifests of deploy/k8s mount (:data:`AGGREGATOR_SECRET`,
:data:`EDGE_NODE_SECRET`, :data:`RELAY_SECRET`); with ``--development`` the certificates carry
:data:`DEVELOPMENT_ORGANIZATION`, the mark of the development PKI committed to git, which the
services warn about (``tls.development_pki``). For production, use your own PKI: the services only
need PEM files.

``--san NAME`` (repeatable) adds names to the server certificate, such as the external name edge
devices outside the cluster dial (:func:`server_names`); ``--client NAME --ca-dir DIR`` issues one
more client certificate from the CA that ``--out DIR`` wrote, one per device (:func:`issue_client`),
and ``--relay NAME --ca-dir DIR`` one more relay certificate, for a site of its own (:func:`issue_relay`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedgradnorm.atomic import atomic_write_bytes

ORGANIZATION = "fedgradnorm"
# The Organizational Unit of a relay's certificate: the aggregator serves its Uplink service (what
# relays call) only to a client certificate that carries it (with mutual TLS).
RELAY_ROLE = "relay"
# The Organization of every certificate of the development PKI in deploy/k8s (its private keys are in git).
DEVELOPMENT_ORGANIZATION = "fedgradnorm development PKI (private keys in git: replace)"

# Kubernetes: the namespace, the aggregators' and the relays' gRPC Services of deploy/k8s, the Secrets' names.
K8S_NAMESPACE = "fedgradnorm"
K8S_AGGREGATOR_SERVICES = ("radcom-aggregator", "mtfl-aggregator")
K8S_RELAY_SERVICES = ("radcom-relay-site-a",)
AGGREGATOR_SECRET = "fedgradnorm-aggregator-tls"  # tls.crt/tls.key: server certificate; ca.crt: trusted client CA
EDGE_NODE_SECRET = "fedgradnorm-edge-node-tls"  # tls.crt/tls.key: client certificate; ca.crt: the aggregators' CA
# tls.crt/tls.key: relay certificate (server to its nodes, client to the aggregator); ca.crt: the CA of both
RELAY_SECRET = "fedgradnorm-relay-tls"
SECRET_KEYS = ("tls.crt", "tls.key", "ca.crt")


def k8s_service_names(service: str, namespace: str = K8S_NAMESPACE) -> tuple[str, ...]:
    """The DNS names a Service is reached by from inside the cluster."""
    return (
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    )


# Loopback (a local run, `kubectl port-forward`) and every in-cluster name of deploy/k8s's aggregator Services.
DEFAULT_SERVER_NAMES = (
    "localhost",
    "127.0.0.1",
    "aggregator",
    *(n for s in K8S_AGGREGATOR_SERVICES for n in k8s_service_names(s)),
)
# The relay certificate of --out and --k8s-secrets: loopback and every in-cluster name of deploy/k8s's
# relay Services (its edge nodes dial the Service of their site).
DEFAULT_RELAY_NAMES = (
    "localhost",
    "127.0.0.1",
    *(n for s in K8S_RELAY_SERVICES for n in k8s_service_names(s)),
)


# A DNS name of a certificate: labels of letters, digits and hyphens, optionally a leading wildcard label.
_DNS_NAME = re.compile(
    r"(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)


def check_server_name(name: str) -> str:
    """``name`` if it is an IP address or a DNS name a certificate can hold; ValueError otherwise."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if len(name) > 253 or not _DNS_NAME.fullmatch(name):
        raise ValueError(f"not a DNS name or IP address for a certificate: {name!r}")
    return name.lower()


def server_names(base: Sequence[str] = DEFAULT_SERVER_NAMES, extra: Sequence[str] = ()) -> list[str]:
    """``base`` then ``extra`` (``--san``), each checked, without repeats, in that order."""
    names: list[str] = []
    for name in (*base, *extra):
        checked = check_server_name(name.strip())
        if checked not in names:
            names.append(checked)
    if not names:
        raise ValueError("at least one server name is needed")
    return names


def _name(common: str, organization: str, unit: str = "") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            *([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit)] if unit else []),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
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


def _leaf(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common: str,
    organization: str,
    usage: x509.ObjectIdentifier | Sequence[x509.ObjectIdentifier],
    sans: Sequence[str],
    now: dt.datetime,
    not_after: dt.datetime,
    unit: str = "",
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A fresh key and its end-entity certificate for ``usage`` (server, client or both), signed by ``ca``."""
    key = _key()
    usages = [usage] if isinstance(usage, x509.ObjectIdentifier) else list(usage)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common, organization, unit))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(_sans(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


@dataclass(frozen=True)
class Certificates:
    """PEM bytes of a CA, a server (aggregator), a client (edge node) and a relay certificate."""

    ca: bytes
    ca_key: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes
    relay_cert: bytes
    relay_key: bytes
    not_after: dt.datetime


def issue(
    server_names: Sequence[str] = DEFAULT_SERVER_NAMES,
    days: int = 365,
    client_name: str = "edge-node",
    organization: str = ORGANIZATION,
    relay_names: Sequence[str] = DEFAULT_RELAY_NAMES,
) -> Certificates:
    """A fresh CA and the three leaf certificates it signs, all valid for ``days`` days."""
    if not server_names or not relay_names:
        raise ValueError("at least one server name and one relay name are needed")
    if days < 1:
        raise ValueError("days must be at least 1")
    now = dt.datetime.now(dt.UTC)
    not_after = now + dt.timedelta(days=days)
    ca_key = _key()
    ca_name = _name("fedgradnorm dev CA", organization)
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        # Key identifiers let a verifier trusting several CAs of the same name (during a rotation) find the right one.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
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
        common: str, usage: x509.ObjectIdentifier | Sequence[x509.ObjectIdentifier], sans: Sequence[str], unit: str = ""
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        return _leaf(ca, ca_key, common, organization, usage, sans, now, not_after, unit=unit)

    server, server_key = leaf(server_names[0], ExtendedKeyUsageOID.SERVER_AUTH, server_names)
    client, client_key = leaf(client_name, ExtendedKeyUsageOID.CLIENT_AUTH, [client_name])
    # A relay is a server to its site's nodes and a client of the aggregator (the relay role: OU relay).
    relay_usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    relay, relay_key = leaf(RELAY_ROLE, relay_usages, relay_names, unit=RELAY_ROLE)
    pem = serialization.Encoding.PEM
    return Certificates(
        ca=ca.public_bytes(pem),
        ca_key=_pem_key(ca_key),
        server_cert=server.public_bytes(pem),
        server_key=_pem_key(server_key),
        client_cert=client.public_bytes(pem),
        client_key=_pem_key(client_key),
        relay_cert=relay.public_bytes(pem),
        relay_key=_pem_key(relay_key),
        not_after=not_after,
    )


def write_certificates(certs: Certificates, out: str | Path) -> dict[str, Path]:
    """Write ``certs`` as ca.pem/ca.key, server.pem/.key, client.pem/.key and relay.pem/.key into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "ca": out / "ca.pem",
        "ca_key": out / "ca.key",
        "server_cert": out / "server.pem",
        "server_key": out / "server.key",
        "client_cert": out / "client.pem",
        "client_key": out / "client.key",
        "relay_cert": out / "relay.pem",
        "relay_key": out / "relay.key",
    }
    _write(paths["ca"], certs.ca)
    _write(paths["ca_key"], certs.ca_key, private=True)
    _write(paths["server_cert"], certs.server_cert)
    _write(paths["server_key"], certs.server_key, private=True)
    _write(paths["client_cert"], certs.client_cert)
    _write(paths["client_key"], certs.client_key, private=True)
    _write(paths["relay_cert"], certs.relay_cert)
    _write(paths["relay_key"], certs.relay_key, private=True)
    return paths


def make_certificates(
    out: str | Path,
    server_names: Sequence[str] = DEFAULT_SERVER_NAMES,
    days: int = 365,
    client_name: str = "edge-node",
    organization: str = ORGANIZATION,
) -> dict[str, Path]:
    """Write a CA, a server certificate for ``server_names``, a client and a relay certificate."""
    return write_certificates(issue(server_names, days, client_name, organization), out)


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    ca_public = ca.public_key()
    if (
        not isinstance(ca_key, ec.EllipticCurvePrivateKey)
        or not isinstance(ca_public, ec.EllipticCurvePublicKey)
        or ca_key.public_key().public_numbers() != ca_public.public_numbers()
    ):
        raise ValueError(f"{ca_dir / 'ca.key'} is not the key of {ca_dir / 'ca.pem'}")
    return ca, ca_key


def issue_relay(
    ca_dir: str | Path, name: str, names: Sequence[str], days: int = 365, out: str | Path | None = None
) -> dict[str, Path]:
    """A relay's certificate from the CA that ``--out ca_dir`` wrote: one key for both of its faces.

    A relay is a server to the edge nodes of its site (``names``: the DNS names and addresses they
    dial it by, checked by the nodes against the CA) and a client of the aggregator, whose Uplink
    service requires the relay role (OU :data:`RELAY_ROLE`). Writes ``NAME.pem`` and ``NAME.key``.
    """
    if days < 1:
        raise ValueError("days must be at least 1")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", name):
        raise ValueError(f"relay name {name!r}: letters, digits, '.', '_', '-' (a file name and the certificate's CN)")
    sans = server_names(names or ("localhost", "127.0.0.1"), ())
    ca_dir = Path(ca_dir)
    ca, ca_key = _load_ca(ca_dir)
    now = dt.datetime.now(dt.UTC)
    not_after = min(now + dt.timedelta(days=days), ca.not_valid_after_utc)
    organization = str(ca.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert, key = _leaf(ca, ca_key, name, organization, usages, sans, now, not_after, unit=RELAY_ROLE)
    out = Path(out) if out else ca_dir
    out.mkdir(parents=True, exist_ok=True)
    paths = {"relay_cert": out / f"{name}.pem", "relay_key": out / f"{name}.key"}
    _write(paths["relay_cert"], cert.public_bytes(serialization.Encoding.PEM))
    _write(paths["relay_key"], _pem_key(key), private=True)
    return paths


def issue_client(ca_dir: str | Path, name: str, days: int = 365, out: str | Path | None = None) -> dict[str, Path]:
    """One more client certificate (an edge device of its own) from the CA that ``--out ca_dir`` wrote.

    Reads ``ca_dir/ca.pem`` and ``ca_dir/ca.key``; writes ``NAME.pem`` and ``NAME.key`` (0600) into
    ``out`` (default ``ca_dir``). The certificate is valid no longer than the CA. The aggregators accept
    it as they accept every client certificate of their client CA (``ca.crt`` of their Secret).
    """
    if days < 1:
        raise ValueError("days must be at least 1")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", name):
        raise ValueError(f"client name {name!r}: letters, digits, '.', '_', '-' (a file name and the certificate's CN)")
    ca_dir = Path(ca_dir)
    ca, ca_key = _load_ca(ca_dir)
    now = dt.datetime.now(dt.UTC)
    not_after = min(now + dt.timedelta(days=days), ca.not_valid_after_utc)
    organization = ca.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    cert, key = _leaf(ca, ca_key, name, str(organization), ExtendedKeyUsageOID.CLIENT_AUTH, [name], now, not_after)
    out = Path(out) if out else ca_dir
    out.mkdir(parents=True, exist_ok=True)
    paths = {"client_cert": out / f"{name}.pem", "client_key": out / f"{name}.key"}
    _write(paths["client_cert"], cert.public_bytes(serialization.Encoding.PEM))
    _write(paths["client_key"], _pem_key(key), private=True)
    return paths


# --- Kubernetes Secrets ----------------------------------------------------------------------------

_DEVELOPMENT_HEADER = """\
# DEVELOPMENT ONLY: a development PKI for mutual TLS between edge nodes, relays and aggregators, so
# that `kubectl apply -f deploy/k8s` works out of the box. Its PRIVATE KEYS ARE PUBLIC (they are in
# git): anyone can pose as an aggregator, a relay or an edge node of a cluster that uses them. REPLACE
# ALL THREE SECRETS BEFORE A REAL DEPLOYMENT. Every certificate here carries the Organization
#   "{org}"
# and the services log the warning tls.development_pki at start while they use it.
#
# Generated (`make k8s-secrets`) by
#   {command}
# valid until {not_after}. Regenerating makes new keys: restart the pods afterwards.
"""

_HEADER = """\
# TLS material for mutual TLS between edge nodes, relays and aggregators, with PRIVATE KEYS: keep this
# file out of git. Apply it with `kubectl apply -f FILE`, then restart as below. Generated by
#   {command}
# valid until {not_after}.
"""

_COMMON = """\
#
# {aggregator}: mounted by the aggregators at /etc/fedgradnorm/tls: their server
#   certificate (tls.crt, tls.key) and the CA whose client certificates they accept (ca.crt).
# {edge}: mounted by the edge nodes at /etc/fedgradnorm/tls: their client certificate
#   (tls.crt, tls.key) and the CA that signed the aggregators' and the relays' certificates (ca.crt).
# {relay}: mounted by the relays at /etc/fedgradnorm/tls: their certificate (tls.crt,
#   tls.key; Organizational Unit "relay", which the aggregators require of a relay; a server
#   certificate to the site's edge nodes and a client certificate to the aggregator) and the CA of
#   both the edge nodes' and the aggregators' certificates (ca.crt).
# The server certificate's names:
{names}
# The relay certificate's names:
{relay_names}
#
# Replace them with certificates of your own PKI, or with a fresh set whose CA key stays with you
# (by default `fedgradnorm certs` puts loopback and the in-cluster names of radcom-aggregator and
# mtfl-aggregator in the server certificate, and those of the relay Services of deploy/k8s in the
# relay certificate; add external names with --san NAME, or choose others with --server-names; a
# relay of another site: `fedgradnorm certs --relay NAME --ca-dir certs --server-names ...`):
#
#   fedgradnorm certs --out certs --days 365
#   kubectl -n {namespace} create secret generic {aggregator} --type=kubernetes.io/tls \\
#     --from-file=tls.crt=certs/server.pem --from-file=tls.key=certs/server.key --from-file=ca.crt=certs/ca.pem \\
#     --dry-run=client -o yaml | kubectl apply -f -
#   kubectl -n {namespace} create secret generic {edge} --type=kubernetes.io/tls \\
#     --from-file=tls.crt=certs/client.pem --from-file=tls.key=certs/client.key --from-file=ca.crt=certs/ca.pem \\
#     --dry-run=client -o yaml | kubectl apply -f -
#   kubectl -n {namespace} create secret generic {relay} --type=kubernetes.io/tls \\
#     --from-file=tls.crt=certs/relay.pem --from-file=tls.key=certs/relay.key --from-file=ca.crt=certs/ca.pem \\
#     --dry-run=client -o yaml | kubectl apply -f -
#   kubectl -n {namespace} rollout restart statefulset -l app.kubernetes.io/component=aggregator
#   kubectl -n {namespace} rollout restart deployment -l app.kubernetes.io/component=relay
#   kubectl -n {namespace} rollout restart statefulset -l app.kubernetes.io/component=edge-node
#
# and drop this file from your copy of deploy/k8s (a later `kubectl apply -f deploy/k8s` would put it
# back). Rotate the same way before the certificates expire: the services read the files at start only,
# so restart them after replacing the Secrets, aggregators first, then relays. A new CA without a pause:
# put the old and the new CA certificate together into every ca.crt first and restart, then swap the
# certificates and keys and restart, then drop the old CA. See docs/operations.md, "Transport security".
"""


def _secret(name: str, component: str, namespace: str, data: dict[str, bytes]) -> str:
    lines = [
        "apiVersion: v1",
        "kind: Secret",
        "metadata:",
        f"  name: {name}",
        f"  namespace: {namespace}",
        "  labels:",
        f"    app.kubernetes.io/part-of: {K8S_NAMESPACE}",
        f"    app.kubernetes.io/component: {component}",
        "type: kubernetes.io/tls",
        "stringData:",
    ]
    for key in SECRET_KEYS:
        lines.append(f"  {key}: |")
        lines.extend("    " + line for line in data[key].decode("ascii").splitlines())
    return "\n".join(lines) + "\n"


def k8s_secrets_yaml(
    certs: Certificates,
    server_names: Sequence[str],
    command: str,
    development: bool,
    namespace: str = K8S_NAMESPACE,
    relay_names: Sequence[str] = DEFAULT_RELAY_NAMES,
) -> str:
    """The aggregators', the edge nodes' and the relays' Secrets (``type: kubernetes.io/tls``) as one YAML stream.

    ``relay_names``: the names the relay certificate of ``certs`` holds (for the header)."""

    def wrapped(names: Sequence[str]) -> str:
        lines = textwrap.wrap(", ".join(names), width=96, break_long_words=False, break_on_hyphens=False)
        return "\n".join("#   " + line for line in lines)

    fmt = {
        "org": DEVELOPMENT_ORGANIZATION,
        "command": command,
        "not_after": certs.not_after.strftime("%Y-%m-%d"),
        "aggregator": AGGREGATOR_SECRET,
        "edge": EDGE_NODE_SECRET,
        "relay": RELAY_SECRET,
        "namespace": namespace,
        "names": wrapped(server_names),
        "relay_names": wrapped(relay_names),
    }
    header = (_DEVELOPMENT_HEADER if development else _HEADER).format(**fmt) + _COMMON.format(**fmt)
    aggregator = _secret(
        AGGREGATOR_SECRET,
        "aggregator",
        namespace,
        {"tls.crt": certs.server_cert, "tls.key": certs.server_key, "ca.crt": certs.ca},
    )
    edge = _secret(
        EDGE_NODE_SECRET,
        "edge-node",
        namespace,
        {"tls.crt": certs.client_cert, "tls.key": certs.client_key, "ca.crt": certs.ca},
    )
    relay = _secret(
        RELAY_SECRET,
        "relay",
        namespace,
        {"tls.crt": certs.relay_cert, "tls.key": certs.relay_key, "ca.crt": certs.ca},
    )
    return header + aggregator + "---\n" + edge + "---\n" + relay


def write_k8s_secrets(
    path: str | Path,
    certs: Certificates,
    server_names: Sequence[str],
    development: bool = False,
    command: str = "fedgradnorm certs --k8s-secrets FILE",
) -> Path:
    """Write ``certs`` to ``path`` as the three Secrets; without ``development`` readable by the owner only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = k8s_secrets_yaml(certs, server_names, command, development)
    # The committed development file is meant to be read by anyone; any other holds live keys.
    _write(path, text.encode(), private=not development)
    return path
