"""The edge node's settings, from flags or FEDGRADNORM_* environment variables."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from fedgradnorm.services.netcheck import check_host_port
from fedgradnorm.services.tls import ClientTLS
from fedgradnorm.tasks import federation


@dataclass(frozen=True)
class EdgeConfig:
    aggregator: str = "127.0.0.1:50051"
    dataset: str = "radcom"
    task: str = "modulation"
    name: str = ""  # default: the task name (simulator-compatible); in Kubernetes, the pod's name
    data: str = ""  # real data file/folder; "" generates the synthetic set from seed
    seed: int = 0  # seed of the synthetic data and of the partition (must match the federation's)
    synthetic_size: int = 100
    allocation: str = "balanced"
    test_fraction: float = 0.2
    state_dir: str = "edge-state"
    enrollment_token: str = field(default="", repr=False)
    fetch_wait: float = 10.0
    max_backoff: float = 10.0
    metrics_listen: str = ""  # e.g. 0.0.0.0:9465; "" disables
    wire_dtype: str = ""  # "" takes the aggregator's announcement
    no_train: bool = False  # benchmark switch: submit a zero gradient without training
    torch_threads: int = 0  # 0: torch's default
    tls_ca: str = ""  # CA that signed the aggregator's certificate
    tls_cert: str = ""  # this node's client certificate (mutual TLS)
    tls_key: str = ""
    tls_server_name: str = ""  # name to check in the aggregator's certificate when dialling an IP
    insecure: bool = False  # plaintext gRPC; only when asked for explicitly (logged as a warning)

    def __post_init__(self) -> None:
        check_host_port(self.aggregator, "aggregator (--aggregator, FEDGRADNORM_AGGREGATOR)")
        if self.metrics_listen:
            check_host_port(
                self.metrics_listen, "metrics_listen (--metrics-listen, FEDGRADNORM_METRICS_LISTEN)", listen=True
            )
        fed = federation(self.dataset)
        if self.task not in fed.task_names:
            raise ValueError(f"task {self.task!r} is not a {self.dataset} task; tasks: {list(fed.task_names)}")
        if self.fetch_wait <= 0 or self.max_backoff <= 0:
            raise ValueError("fetch_wait and max_backoff must be positive")
        if self.insecure and (self.tls_ca or self.tls_cert or self.tls_key):
            raise ValueError("insecure is set together with TLS files; choose one")
        if not self.insecure and not self.tls_ca:
            raise ValueError("TLS needs tls_ca (and tls_cert/tls_key for mutual TLS); set insecure=true for plaintext")
        if self.wire_dtype not in ("", "float32", "float16", "bfloat16"):
            raise ValueError(f"wire_dtype must be float32, float16 or bfloat16, not {self.wire_dtype!r}")

    @property
    def node_name(self) -> str:
        return self.name or self.task or socket.gethostname()

    def tls(self) -> ClientTLS:
        return ClientTLS(
            ca=self.tls_ca,
            cert=self.tls_cert,
            key=self.tls_key,
            server_name=self.tls_server_name,
            insecure=self.insecure,
        )
