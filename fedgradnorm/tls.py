"""Transport security for both services: mutual TLS by default, plaintext only when asked for.

The aggregator presents ``server.pem`` and, with a client CA, requires and verifies every edge
node's certificate; an edge node verifies the aggregator against its CA and presents its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

log = structlog.get_logger("fedgradnorm.tls")


class TLSConfigError(ValueError):
    pass


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TLSConfigError(f"{path}: cannot read the {what} ({e.strerror})") from e


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
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA"),
            private_key=_read(self.key, "TLS key") if self.key else None,
            certificate_chain=_read(self.cert, "TLS certificate") if self.cert else None,
        )
        opts = list(options)
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.secure_channel(address, creds, options=opts)
