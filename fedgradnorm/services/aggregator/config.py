"""The aggregator's settings: the service's own (transport, files) and the rounds' (CoordinatorConfig)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fedgradnorm.algorithm import ServerConfig, default_omega_tilde
from fedgradnorm.services.netcheck import check_host_port
from fedgradnorm.services.tls import ServerTLS
from fedgradnorm.tasks import Federation, federation
from fedgradnorm.wire import DEFAULT_CHUNK_BYTES, DTYPE_BY_NAME

WIRE_DTYPES = tuple(DTYPE_BY_NAME)

# Enrolment tokens known to the world: the placeholder the Kubernetes manifests shipped until they
# stopped shipping the Secret (commit 38f06f2), and its common spellings. The aggregator refuses
# them (no override: a deployment that forgot to set the Secret must not start open to anyone).
PLACEHOLDER_TOKENS = frozenset({"change-me-before-deploying", "change-me", "changeme", "replace-me", "placeholder"})


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
        check_host_port(self.listen, "listen (--listen, FEDGRADNORM_LISTEN)", listen=True)
        if self.metrics_listen:
            check_host_port(
                self.metrics_listen, "metrics_listen (--metrics-listen, FEDGRADNORM_METRICS_LISTEN)", listen=True
            )
        if self.health_listen:
            check_host_port(
                self.health_listen, "health_listen (--health-listen, FEDGRADNORM_HEALTH_LISTEN)", listen=True
            )

    def tls(self) -> ServerTLS:
        return ServerTLS(cert=self.tls_cert, key=self.tls_key, client_ca=self.tls_client_ca, insecure=self.insecure)


@dataclass(frozen=True)
class CoordinatorConfig:
    dataset: str = "radcom"
    algorithm: str = "fedgradnorm"
    gamma: float = 0.9
    alpha: float = 0.004
    beta: float = 0.0002
    omega_tilde: tuple[str, ...] = ()
    tau_h: int = 5
    tau_omega: int = 5
    batch_size: int = 64
    min_nodes: int = 3
    rounds: int = 0  # 0: train until stopped
    round_timeout: float = 60.0
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 30.0
    seed: int = 0
    max_nodes: int = 1024
    enrollment_token: str = field(default="", repr=False)
    register_burst: int = 5  # registration attempts per (peer, node name) before the rate applies
    register_rate: float = 0.2  # refill per second of that bucket; failed enrolments share one per peer
    new_node_burst: int = 64  # enrolments of new names per peer before new_node_rate applies
    new_node_rate: float = 1.0  # new names per second and peer after the burst
    departed_retention: float = 86400.0  # seconds a departed node's p, F_0 and identity are kept
    max_departed: int = 1024  # departed nodes kept at most (the longest gone are forgotten first)
    update_norm_factor: float = 1e4  # drop an update whose norm exceeds this x the round's median (0: off)

    def __post_init__(self) -> None:
        federation(self.dataset)
        ServerConfig(algorithm=self.algorithm, gamma=self.gamma, alpha=self.alpha, beta=self.beta)  # type: ignore[arg-type]
        if self.min_nodes < 1 or self.max_nodes < self.min_nodes:
            raise ValueError("need 1 <= min_nodes <= max_nodes")
        if self.round_timeout <= 0 or self.heartbeat_interval <= 0 or self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("round_timeout and heartbeat_interval must be positive, heartbeat_timeout larger")
        if self.register_burst < 1 or self.register_rate <= 0 or self.new_node_burst < 1 or self.new_node_rate <= 0:
            raise ValueError("register_burst and new_node_burst must be >= 1, register_rate and new_node_rate positive")
        if self.departed_retention < 0 or self.max_departed < 0:
            raise ValueError("departed_retention and max_departed must be non-negative")
        if not (self.update_norm_factor == 0 or self.update_norm_factor >= 1):
            raise ValueError("update_norm_factor must be 0 (off) or at least 1")
        if self.enrollment_token.strip().lower() in PLACEHOLDER_TOKENS:
            raise ValueError(
                f"the enrolment token (FEDGRADNORM_ENROLLMENT_TOKEN or --enrollment-token) is the placeholder "
                f"{self.enrollment_token!r}, public in the manifests' history: set a random one, "
                "e.g. $(openssl rand -hex 32) (docs/operations.md, 'Rotate the enrollment token')"
            )
        if self.tau_h < 0 or self.tau_omega < 1 or self.batch_size < 1 or self.rounds < 0:
            raise ValueError("need tau_h >= 0, tau_omega >= 1, batch_size >= 1, rounds >= 0")

    @property
    def federation(self) -> Federation:
        return federation(self.dataset)

    @property
    def network(self) -> str:
        return self.federation.network

    def server_config(self, omega: Mapping[str, torch.Tensor]) -> ServerConfig:
        return ServerConfig(
            algorithm=self.algorithm,  # type: ignore[arg-type]
            gamma=self.gamma,
            alpha=self.alpha,
            beta=self.beta,
            omega_tilde=self.omega_tilde or default_omega_tilde(omega),
        )

    def identity(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "network": self.network, "algorithm": self.algorithm, "seed": self.seed}
