"""The simulator's configuration: one frozen dataclass, its defaults from fedgradnorm.hyperparameters.

Kept apart from the simulator and free of torch at import, so that `fedgradnorm --help` can list its
flags without loading torch; torch comes in when a configuration is built or used.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedgradnorm.hyperparameters import ALPHA, BATCH_SIZE, BETA, GAMMA, TAU_H, TAU_OMEGA, Algorithm

if TYPE_CHECKING:
    from fedgradnorm.algorithm import ClientConfig, ServerConfig
    from fedgradnorm.data.partition import DataSource
    from fedgradnorm.federation import Federation


@dataclass(frozen=True)
class SimulationConfig:
    federation: str = "radcom"
    data: str | None = None
    algorithm: Algorithm = "fedgradnorm"
    rounds: int = 20
    seed: int = 0
    tau_h: int = TAU_H
    tau_omega: int = TAU_OMEGA
    batch_size: int = BATCH_SIZE
    allocation: str = "balanced"
    test_fraction: float = 0.2
    gamma: float = GAMMA
    alpha: float = ALPHA
    beta: float = BETA
    omega_tilde: tuple[str, ...] = ()
    synthetic_size: int = 100
    tasks: tuple[str, ...] = ()  # empty: every task of the data set
    loss_scale: str = ""  # "task=factor,...": those tasks' losses multiplied (an experiment's dial); empty: none
    # How the rounds run, not what they compute: a run's numbers depend on the torch thread count of
    # its client and server steps (``client_threads`` once resolved), never on ``workers``.
    workers: int = 1  # 1: the clients in turn in this process; N: N worker processes (at most one per client)
    client_threads: int = 0  # 0: the process's count (workers 1), that count shared out (workers > 1)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError("rounds must be at least 1")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1 (1: the clients in turn in this process), not {self.workers}")
        if self.client_threads < 0:
            raise ValueError(f"client_threads must be 0 (automatic) or a positive count, not {self.client_threads}")
        fed = self.spec  # fails fast on an unknown federation, a bad spec or a bad loss_scale
        for t in self.tasks:
            fed.task(t)

    @functools.cached_property
    def spec(self) -> Federation:
        """The federation ``federation`` names (a shipped one or a spec file), read once: the same
        spec for the whole run even if its file changes on disk."""
        from fedgradnorm.federation import load_federation

        fed = load_federation(self.federation)
        return fed.with_loss_scales(self.loss_scales) if self.loss_scale else fed

    @property
    def loss_scales(self) -> dict[str, float]:
        """``loss_scale`` parsed: task -> factor."""
        return parse_loss_scales(self.loss_scale)

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.tasks or self.spec.task_names

    @property
    def worker_count(self) -> int:
        """The worker processes a run uses: ``workers``, clamped to one per client."""
        return min(self.workers, len(self.task_names))

    def server_config(self) -> ServerConfig:
        from fedgradnorm.algorithm import ServerConfig

        return ServerConfig(
            algorithm=self.algorithm,
            gamma=self.gamma,
            alpha=self.alpha,
            beta=self.beta,
            omega_tilde=self.omega_tilde or self.spec.omega_tilde,
        )

    def client_config(self) -> ClientConfig:
        from fedgradnorm.algorithm import ClientConfig

        return ClientConfig(tau_h=self.tau_h, tau_omega=self.tau_omega, beta=self.beta, batch_size=self.batch_size)

    def source(self) -> DataSource:
        from fedgradnorm.data.partition import DataSource

        return DataSource(self.spec, self.data, synthetic_seed=self.seed, synthetic_size=self.synthetic_size)


def parse_loss_scales(text: str) -> dict[str, float]:
    """``"task=factor,..."`` as a dict; ValueError naming the bad item."""
    out: dict[str, float] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        task, sep, value = item.partition("=")
        try:
            factor = float(value)
        except ValueError:
            factor = float("nan")
        if not sep or not task.strip() or not (0 < factor < float("inf")):
            raise ValueError(f"loss_scale item {item!r}: expected task=factor with a finite factor above 0")
        out[task.strip()] = factor
    return out
