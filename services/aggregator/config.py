"""The aggregator service's own settings (transport, files); the round settings are CoordinatorConfig."""

from __future__ import annotations

from dataclasses import dataclass

from fedgradnorm.tls import ServerTLS
from fedgradnorm.wire import DEFAULT_CHUNK_BYTES, DTYPE_BY_NAME

WIRE_DTYPES = tuple(DTYPE_BY_NAME)


@dataclass(frozen=True)
class ServiceConfig:
    listen: str = "127.0.0.1:50051"
    metrics_listen: str = "127.0.0.1:9464"  # "" disables the metrics endpoint
    torch_threads: int = 0  # 0: torch's default (one per core)
    health_listen: str = ""  # plaintext gRPC health service only, for probes; "" disables
    state_dir: str = "aggregator-state"
    metrics_log: str = ""  # JSON lines per round and node; default <state_dir>/metrics.jsonl
    ready_file: str = ""  # written once serving: {"grpc_port": ..., "metrics_port": ...}
    max_workers: int = 64
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    wire_dtype: str = "float32"
    max_fetch_wait: float = 30.0
    tls_cert: str = ""  # PEM certificate the aggregator presents
    tls_key: str = ""
    tls_client_ca: str = ""  # set: mutual TLS, every edge node must present a certificate signed by it
    insecure: bool = False  # plaintext gRPC; only when asked for explicitly (logged as a warning)

    def __post_init__(self) -> None:
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {WIRE_DTYPES}, not {self.wire_dtype!r}")
        if self.max_workers < 4:
            raise ValueError("max_workers must be at least 4")
        if not 1024 <= self.chunk_bytes <= 3 << 20:
            raise ValueError("chunk_bytes must be between 1 KiB and 3 MiB (gRPC's message limit is 4 MiB)")
        if self.insecure and (self.tls_cert or self.tls_key or self.tls_client_ca):
            raise ValueError("insecure is set together with TLS files; choose one")
        if not self.insecure and not (self.tls_cert and self.tls_key):
            raise ValueError(
                "TLS needs tls_cert and tls_key (make them with `fedgradnorm certs`); set insecure=true for plaintext"
            )
        if ":" not in self.listen:
            raise ValueError(f"listen must be HOST:PORT, not {self.listen!r}")

    def tls(self) -> ServerTLS:
        return ServerTLS(cert=self.tls_cert, key=self.tls_key, client_ca=self.tls_client_ca, insecure=self.insecure)
