"""Transport security for both services: mutual TLS by default, plaintext only when asked for.

The aggregator presents ``server.pem`` and, with a client CA, requires and verifies every edge
node's certificate; an edge node verifies the aggregator against its CA and presents its own.
Either warns (``tls.development_pki``) when a certificate it uses belongs to the development PKI
committed in deploy/k8s, whose private keys are public.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

from fedgradnorm.config import setting

log = structlog.get_logger("fedgradnorm.services.tls")


class TLSConfigError(ValueError):
    pass


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TLSConfigError(f"{path}: cannot read the {what} ({e.strerror})") from e


def development_pki(pems: dict[str, bytes]) -> list[str]:
    """The paths among ``pems`` (path -> PEM) holding a certificate of the development PKI, with a warning."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from fedgradnorm.certs import DEVELOPMENT_ORGANIZATION

    marked = []
    for path, pem in pems.items():
        try:
            certs = x509.load_pem_x509_certificates(pem)
        except ValueError:
            continue  # not PEM certificates: grpc reports it
        names = [name for c in certs for name in (c.subject, c.issuer)]
        if any(
            a.value == DEVELOPMENT_ORGANIZATION
            for n in names
            for a in n.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        ):
            marked.append(path)
    if marked:
        log.warning(
            "tls.development_pki",
            files=marked,
            why="certificates of the development PKI, whose private keys are public (in git): replace them",
        )
    return marked


@dataclass(frozen=True)
class ServerTLS:
    cert: str = ""
    key: str = ""
    client_ca: str = ""  # set: clients must present a certificate signed by this CA (mTLS)
    insecure: bool = False

    def credentials(self) -> grpc.ServerCredentials | None:
        """None means plaintext (only with ``insecure``); raises TLSConfigError otherwise."""
        if self.insecure:
            if self.cert or self.key or self.client_ca:
                raise TLSConfigError("insecure is set together with TLS files; choose one")
            log.warning("tls.disabled", why="insecure requested: the aggregator serves plaintext gRPC")
            return None
        if not (self.cert and self.key):
            raise TLSConfigError(
                "TLS needs tls_cert and tls_key (see `fedgradnorm certs`); set insecure=true for plaintext"
            )
        pair = (_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))
        ca = _read(self.client_ca, "client CA") if self.client_ca else None
        development_pki({self.cert: pair[1], **({self.client_ca: ca} if ca else {})})
        if ca is None:
            log.warning("tls.no_client_auth", why="no client CA: edge nodes are not authenticated by certificate")
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


@dataclass(frozen=True)
class ClientTLS:
    ca: str = ""
    cert: str = ""
    key: str = ""
    server_name: str = ""  # override the name checked against the server certificate
    insecure: bool = False

    def channel(self, address: str, options: list[tuple[str, object]]) -> grpc.Channel:
        if self.insecure:
            log.warning("tls.disabled", why="insecure requested: plaintext channel to the aggregator")
            return grpc.insecure_channel(address, options=options)
        if not self.ca:
            raise TLSConfigError("TLS needs tls_ca to verify the aggregator; set insecure=true for plaintext")
        if bool(self.cert) != bool(self.key):
            raise TLSConfigError("tls_cert and tls_key go together")
        ca = _read(self.ca, "CA")
        cert = _read(self.cert, "TLS certificate") if self.cert else None
        development_pki({self.ca: ca, **({self.cert: cert} if cert else {})})
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=_read(self.key, "TLS key") if self.key else None,
            certificate_chain=cert,
        )
        opts = list(options)
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.secure_channel(address, creds, options=opts)


@dataclass(frozen=True)
class ClientTLSSettings:
    """How a client dials the aggregator: the TLS settings every client command shares (the edge
    node's config extends it; `fedgradnorm state` uses it as is), declared once."""

    tls_ca: str = setting("", "PEM CA that signed the aggregator's certificate (file)")
    tls_cert: str = setting("", "PEM client certificate, for mutual TLS (file)")
    tls_key: str = setting("", "PEM private key of that certificate (file)")
    tls_server_name: str = setting("", "name to check in the aggregator's certificate (when dialling an IP)")
    insecure: bool = setting(False, "plaintext gRPC (no TLS); only for loopback tests and demos")

    def tls(self) -> ClientTLS:
        return ClientTLS(
            ca=self.tls_ca,
            cert=self.tls_cert,
            key=self.tls_key,
            server_name=self.tls_server_name,
            insecure=self.insecure,
        )
