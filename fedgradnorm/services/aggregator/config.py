"""The aggregator's settings: the service's own (transport, files) and the rounds' (CoordinatorConfig)."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedgradnorm.config import setting
from fedgradnorm.hyperparameters import ALPHA, BATCH_SIZE, BETA, GAMMA, TAU_H, TAU_OMEGA, Algorithm
from fedgradnorm.services.netcheck import check_host_port
from fedgradnorm.services.tls import ServerTLS
from fedgradnorm.wire_format import DEFAULT_CHUNK_BYTES, DTYPE_BY_NAME

if TYPE_CHECKING:  # torch is loaded when a config is used, not when --help lists its fields
    import torch

    from fedgradnorm.algorithm import ServerConfig
    from fedgradnorm.federation import Federation

WIRE_DTYPES = tuple(DTYPE_BY_NAME)
# A node's or a relay's name (also its id): a DNS-label-like word, at most 63 characters.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

# A node's or a relay's name (the relay's config checks it too, so it lives here, away from torch).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# Enrolment tokens known to the world: the placeholder the Kubernetes manifests shipped until they
# stopped shipping the Secret (commit 38f06f2), and its common spellings. The aggregator refuses
# them (no override: a deployment that forgot to set the Secret must not start open to anyone).
PLACEHOLDER_TOKENS = frozenset({"change-me-before-deploying", "change-me", "changeme", "replace-me", "placeholder"})


@dataclass(frozen=True)
class ServiceConfig:
    listen: str = setting("127.0.0.1:50051", "gRPC address HOST:PORT (port 0 picks a free one)")
    metrics_listen: str = setting("127.0.0.1:9464", "Prometheus /metrics address HOST:PORT; empty: no endpoint")
    torch_threads: int = setting(0, "torch threads for the server step (0: one per core)")
    health_listen: str = setting("", "plaintext gRPC health-only address HOST:PORT for probes; empty: none")
    state_dir: str = setting("aggregator-state", "folder of the state file (committed atomically every round)")
    metrics_log: str = setting("", "metrics.jsonl path (one line per round and node); empty: in --state-dir")
    ready_file: str = setting("", "file written once serving, with the bound ports (for scripts)", hidden=True)
    max_workers: int = setting(64, "gRPC worker threads beyond one FetchRound and one SubmitUpdate per node")
    chunk_bytes: int = setting(DEFAULT_CHUNK_BYTES, "largest payload chunk, bytes (1 KiB to 3 MiB)")
    wire_dtype: str = setting("float32", f"dtype of omega on the wire: one of {', '.join(WIRE_DTYPES)}")
    max_fetch_wait: float = setting(30.0, "longest FetchRound long-poll, seconds")
    tls_cert: str = setting("", "PEM certificate the aggregator presents (file)")
    tls_key: str = setting("", "PEM private key of that certificate (file)")
    tls_client_ca: str = setting("", "PEM CA of the edge nodes' certificates (file): set, mutual TLS")
    insecure: bool = setting(False, "plaintext gRPC (no TLS); only for loopback tests and demos")

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
    federation: str = setting(
        "radcom", "the federation this aggregator trains: radcom, mtfl, or a federation spec file (.toml) of yours"
    )
    algorithm: Algorithm = setting("fedgradnorm", "the server step: FedGradNorm's weights, or FedRep (p = 1)")
    gamma: float = setting(GAMMA, "GradNorm's asymmetry gamma")
    alpha: float = setting(ALPHA, "learning rate of the Adam on the weights p")
    beta: float = setting(BETA, "learning rate of the Adam on omega (server) and of the nodes' local Adam")
    omega_tilde: tuple[str, ...] = setting(
        (), "comma-separated shared parameters of the gradient norm (empty: the spec's, else the last layer)"
    )
    tau_h: int = setting(TAU_H, "local head updates per round (minibatches)")
    tau_omega: int = setting(TAU_OMEGA, "local shared-network updates per round (minibatches)")
    batch_size: int = setting(BATCH_SIZE, "minibatch of every local update (samples)")
    min_nodes: int = setting(3, "live nodes needed before a round opens")
    rounds: int = setting(0, "stop after this many rounds (0: train until stopped)")
    round_timeout: float = setting(60.0, "how long a round waits for updates, seconds")
    heartbeat_interval: float = setting(5.0, "heartbeat period the nodes are told, seconds")
    heartbeat_timeout: float = setting(30.0, "a node silent this long is dropped, seconds")
    seed: int = setting(0, "seed of omega's initialisation and of the nodes' batches")
    max_nodes: int = setting(1024, "registered nodes at most")
    enrollment_token: str = setting("", "shared secret a node must present to enrol (empty: none)", secret=True)
    register_burst: int = setting(5, "registration attempts per (peer, node name) before the rate applies")
    register_rate: float = setting(0.2, "registration attempts per second per (peer, name) after the burst")
    new_node_burst: int = setting(64, "new node names per peer host before new_node_rate applies")
    new_node_rate: float = setting(1.0, "new node names per second per peer host after the burst")
    departed_retention: float = setting(86400.0, "how long a departed node's id, p and F_0 are kept, seconds")
    max_departed: int = setting(1024, "departed nodes kept at most (the longest gone are forgotten first)")
    participation: str = setting(
        "",
        "nodes per round: empty (every live node), a count N, or a fraction in (0, 1]; "
        "drawn from --seed and the round number",
    )
    relay_timeout: float = setting(
        10.0, "how long a closing round waits for a relay's partial sum before its nodes are left out, seconds"
    )
    update_norm_factor: float = setting(
        1e4, "leave out an update whose norm is above this x the round's median (0: off)"
    )

    def __post_init__(self) -> None:
        from fedgradnorm.algorithm import ServerConfig

        _ = self.spec  # fails fast on an unknown federation or a bad spec
        ServerConfig(algorithm=self.algorithm, gamma=self.gamma, alpha=self.alpha, beta=self.beta)
        if self.min_nodes < 1 or self.max_nodes < self.min_nodes:
            raise ValueError("need 1 <= min_nodes <= max_nodes")
        if self.round_timeout <= 0 or self.heartbeat_interval <= 0 or self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("round_timeout and heartbeat_interval must be positive, heartbeat_timeout larger")
        if self.register_burst < 1 or self.register_rate <= 0 or self.new_node_burst < 1 or self.new_node_rate <= 0:
            raise ValueError("register_burst and new_node_burst must be >= 1, register_rate and new_node_rate positive")
        if not self.relay_timeout > 0:
            raise ValueError("relay_timeout must be positive")
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
        self.participants_of(1)  # fails fast on a bad participation
        if self.tau_h < 0 or self.tau_omega < 1 or self.batch_size < 1 or self.rounds < 0:
            raise ValueError("need tau_h >= 0, tau_omega >= 1, batch_size >= 1, rounds >= 0")

    def participants_of(self, live: int) -> int:
        """How many of ``live`` nodes take part in a round (partial participation), at least one."""
        text = self.participation.strip()
        if not text:
            return live
        try:
            value = float(text) if any(c in text for c in ".eE") else int(text)
        except ValueError:
            value = -1
        if isinstance(value, int) and value >= 1:
            return min(live, value)
        if isinstance(value, float) and 0 < value <= 1:
            return min(live, max(1, math.ceil(value * live)))
        raise ValueError(f"participation must be empty, a count >= 1 or a fraction in (0, 1], not {text!r}")

    @functools.cached_property
    def spec(self) -> Federation:
        """The federation ``federation`` names (a shipped one or a spec file), read once: the same
        spec for the whole run even if its file changes on disk."""
        from fedgradnorm.federation import load_federation

        return load_federation(self.federation)

    @property
    def network(self) -> str:
        """The shared network's factory, e.g. fedgradnorm.models:Network2."""
        return self.spec.network.ref

    def server_config(self, omega: Mapping[str, torch.Tensor]) -> ServerConfig:
        from fedgradnorm.algorithm import ServerConfig, default_omega_tilde

        return ServerConfig(
            algorithm=self.algorithm,
            gamma=self.gamma,
            alpha=self.alpha,
            beta=self.beta,
            omega_tilde=self.omega_tilde or self.spec.omega_tilde or default_omega_tilde(omega),
        )

    def identity(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "federation": spec.name,
            "network": spec.architecture.fingerprint,
            "algorithm": self.algorithm,
            "seed": self.seed,
        }
