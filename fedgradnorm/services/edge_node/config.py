"""The edge node's settings, from flags or FEDGRADNORM_* environment variables."""

from __future__ import annotations

import functools
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedgradnorm.config import setting
from fedgradnorm.machine import check_device_text
from fedgradnorm.services.netcheck import check_host_port
from fedgradnorm.services.tls import ClientTLSSettings
from fedgradnorm.wire_format import DTYPE_BY_NAME

if TYPE_CHECKING:
    from fedgradnorm.federation import Federation

AFTER_TRAINING = ("exit", "stay")


@dataclass(frozen=True)
class EdgeConfig(ClientTLSSettings):
    aggregator: str = setting("127.0.0.1:50051", "the aggregator's gRPC address HOST:PORT")
    federation: str = setting(
        "radcom", "the federation this node joins: radcom, mtfl, or a federation spec file (.toml) of yours"
    )
    task: str = setting(
        "modulation",
        "this node's task in its federation (radcom: modulation, signal, anomaly; mtfl: landmarks, gender, smile, glasses, pose)",
    )
    loss_scale: float = setting(
        0.0,
        "multiply this node's task loss (and so its gradient) by this factor, the dial of docs/results.md "
        "(0: as the federation declares)",
    )
    name: str = setting("", "node name in logs and dashboards (empty: the task's name)")
    data: str = setting(
        "",
        "this node's own data, all of it used, in the federation reader's format (empty: its share of the "
        "federation's synthetic set from --seed, a simulated deployment)",
    )
    seed: int = setting(0, "seed of the test split, and of the synthetic set and its partition (the federation's)")
    synthetic_size: int = setting(100, "synthetic set size (RadCom: samples per key; MTFL: training faces)")
    allocation: str = setting(
        "balanced", "without --data: how the synthetic set is shared out: balanced | imbalanced | task=N,...,*=N"
    )
    test_fraction: float = setting(0.2, "test share of this node's data when it has no test part (in (0, 1))")
    write_model: bool = setting(
        True, "write the personalized model when training ends (false: the final omega is not even sent)"
    )
    after_training: str = setting(
        "exit",
        "once training has ended: exit, or stay (keep serving --metrics-listen until SIGTERM, so that a "
        "StatefulSet's pod stays Running instead of restarting)",
    )
    device: str = setting("auto", "where the node trains: auto (a GPU if present), cpu, cuda or cuda:N")
    model_dir: str = setting(
        "",
        "where the personalized model (omega + this node's head) is written when training ends (empty: STATE_DIR/model)",
    )
    state_dir: str = setting("edge-state", "folder of this node's identity and personal head")
    enrollment_token: str = setting("", "the federation's enrolment secret", secret=True)
    fetch_wait: float = setting(10.0, "how long one FetchRound waits for a round, seconds")
    max_backoff: float = setting(10.0, "longest wait between retries while the aggregator is away, seconds")
    metrics_listen: str = setting("", "Prometheus /metrics address HOST:PORT (e.g. 0.0.0.0:9465); empty: none")
    wire_dtype: str = setting(
        "", "dtype of this node's gradients on the wire: float32, float16, bfloat16 (empty: the aggregator's)"
    )
    no_train: bool = setting(False, "submit zero gradients without training (benchmarks)", hidden=True)
    torch_threads: int = setting(0, "torch threads for the local step (0: one per core)")

    def __post_init__(self) -> None:
        check_host_port(self.aggregator, "aggregator (--aggregator, FEDGRADNORM_AGGREGATOR)")
        if self.metrics_listen:
            check_host_port(
                self.metrics_listen, "metrics_listen (--metrics-listen, FEDGRADNORM_METRICS_LISTEN)", listen=True
            )
        if not (self.loss_scale == 0 or 0 < self.loss_scale < float("inf")):
            raise ValueError(
                f"loss_scale must be 0 (as the federation declares) or a finite factor above 0, not {self.loss_scale}"
            )
        fed = self.spec
        if self.task not in fed.task_names:
            raise ValueError(f"task {self.task!r} is not a {fed.name} task; tasks: {list(fed.task_names)}")
        check_device_text(self.device)
        if self.after_training not in AFTER_TRAINING:
            raise ValueError(f"after_training must be one of {', '.join(AFTER_TRAINING)}, not {self.after_training!r}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must lie in (0, 1), not {self.test_fraction}")
        if self.fetch_wait <= 0 or self.max_backoff <= 0:
            raise ValueError("fetch_wait and max_backoff must be positive")
        if self.insecure and (self.tls_ca or self.tls_cert or self.tls_key):
            raise ValueError("insecure is set together with TLS files; choose one")
        if not self.insecure and not self.tls_ca:
            raise ValueError("TLS needs tls_ca (and tls_cert/tls_key for mutual TLS); set insecure=true for plaintext")
        if self.wire_dtype and self.wire_dtype not in DTYPE_BY_NAME:
            raise ValueError(f"wire_dtype must be one of {', '.join(DTYPE_BY_NAME)} or empty, not {self.wire_dtype!r}")

    @functools.cached_property
    def spec(self) -> Federation:
        """The federation ``federation`` names, read once (torch: when a config is built, not for --help),
        with this node's task loss scaled when ``loss_scale`` is set."""
        from fedgradnorm.federation import load_federation

        fed = load_federation(self.federation)
        scaled = self.loss_scale and self.task in fed.task_names  # an unknown task fails in __post_init__
        return fed.with_loss_scales({self.task: self.loss_scale}) if scaled else fed

    @property
    def model_path(self) -> str:
        return self.model_dir or str(Path(self.state_dir) / "model")

    @property
    def node_name(self) -> str:
        return self.name or self.task or socket.gethostname()
