"""The relay's settings, from flags or FEDGRADNORM_* environment variables."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedgradnorm.config import setting
from fedgradnorm.services.aggregator.config import NAME_RE
from fedgradnorm.services.netcheck import check_host_port
from fedgradnorm.services.tls import ClientTLS, ServerTLS
from fedgradnorm.wire_format import DEFAULT_CHUNK_BYTES, DTYPE_BY_NAME

if TYPE_CHECKING:
    from fedgradnorm.federation import Federation


@dataclass(frozen=True)
class RelayConfig:
    name: str = setting("", "this relay's name at the aggregator, e.g. site-north (required)")
    upstream: str = setting("127.0.0.1:50051", "the aggregator's gRPC address HOST:PORT")
    federation: str = setting("radcom", "the federation: radcom, mtfl, or a federation spec file (.toml) of yours")
    enrollment_token: str = setting("", "the federation's enrolment secret (the relay attaches with it)", secret=True)
    listen: str = setting("127.0.0.1:50061", "gRPC address HOST:PORT the site's edge nodes dial (port 0: a free one)")
    metrics_listen: str = setting("127.0.0.1:9466", "Prometheus /metrics address HOST:PORT; empty: no endpoint")
    health_listen: str = setting("", "plaintext gRPC health-only address HOST:PORT for probes; empty: none")
    ready_file: str = setting("", "file written once serving, with the bound ports (for scripts)", hidden=True)
    max_nodes: int = setting(1024, "edge nodes this relay serves at most (sizes its worker pool)")
    max_workers: int = setting(64, "gRPC worker threads beyond one FetchRound and one SubmitUpdate per node")
    chunk_bytes: int = setting(DEFAULT_CHUNK_BYTES, "largest payload chunk, bytes (1 KiB to 3 MiB)")
    wire_dtype: str = setting("float32", f"dtype of omega towards the nodes: one of {', '.join(DTYPE_BY_NAME)}")
    max_fetch_wait: float = setting(30.0, "longest FetchRound long-poll of a node, seconds")
    report_interval: float = setting(0.01, "how long accepted updates gather before their scalars go up, seconds")
    max_backoff: float = setting(5.0, "longest wait between retries while the aggregator is away, seconds")
    torch_threads: int = setting(0, "torch threads for validating updates and the partial sum (0: one per core)")
    tls_cert: str = setting("", "PEM relay certificate (`fedgradnorm certs --relay NAME`): to nodes and aggregator")
    tls_key: str = setting("", "PEM private key of that certificate (file)")
    tls_client_ca: str = setting("", "PEM CA of the edge nodes' certificates (file): set, mutual TLS with the nodes")
    tls_ca: str = setting("", "PEM CA that signed the aggregator's certificate (file)")
    tls_server_name: str = setting("", "name to check in the aggregator's certificate (when dialling an IP)")
    insecure: bool = setting(False, "plaintext gRPC both ways (no TLS); only for loopback tests and demos")

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"name (--name, FEDGRADNORM_NAME) must match {NAME_RE.pattern}, not {self.name[:64]!r}")
        if self.wire_dtype not in DTYPE_BY_NAME:
            raise ValueError(f"wire_dtype must be one of {tuple(DTYPE_BY_NAME)}, not {self.wire_dtype!r}")
        if not 1024 <= self.chunk_bytes <= 3 << 20:
            raise ValueError("chunk_bytes must be between 1 KiB and 3 MiB (gRPC's message limit is 4 MiB)")
        if self.max_nodes < 1 or self.max_workers < 4:
            raise ValueError("max_nodes must be >= 1 and max_workers >= 4")
        if not (0 <= self.report_interval <= 1 and self.max_backoff > 0 and self.max_fetch_wait > 0):
            raise ValueError("report_interval must be in [0, 1], max_backoff and max_fetch_wait positive")
        tls_files = (self.tls_cert, self.tls_key, self.tls_client_ca, self.tls_ca)
        if self.insecure and any(tls_files):
            raise ValueError("insecure is set together with TLS files; choose one")
        if not self.insecure and not (self.tls_cert and self.tls_key and self.tls_ca):
            raise ValueError(
                "TLS needs tls_cert and tls_key (a relay certificate: `fedgradnorm certs --relay NAME`) and tls_ca; "
                "set insecure=true for plaintext"
            )
        check_host_port(self.upstream, "upstream (--upstream, FEDGRADNORM_UPSTREAM)")
        check_host_port(self.listen, "listen (--listen, FEDGRADNORM_LISTEN)", listen=True)
        for what in ("metrics_listen", "health_listen"):
            if getattr(self, what):
                flag = "--" + what.replace("_", "-")
                check_host_port(getattr(self, what), f"{what} ({flag}, FEDGRADNORM_{what.upper()})", listen=True)
        _ = self.spec

    @functools.cached_property
    def spec(self) -> Federation:
        from fedgradnorm.federation import load_federation

        return load_federation(self.federation)

    def server_tls(self) -> ServerTLS:
        """Towards the nodes: the relay's certificate, and their CA for mutual TLS."""
        return ServerTLS(cert=self.tls_cert, key=self.tls_key, client_ca=self.tls_client_ca, insecure=self.insecure)

    def client_tls(self) -> ClientTLS:
        """Towards the aggregator: the same certificate as a client (its OU carries the relay role)."""
        return ClientTLS(
            ca=self.tls_ca,
            cert=self.tls_cert,
            key=self.tls_key,
            server_name=self.tls_server_name,
            insecure=self.insecure,
        )
