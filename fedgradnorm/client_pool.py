"""Where a simulated round's client steps run: the interface the simulator drives, and the in-process pool.

A :class:`ClientPool` owns the round's clients for the whole run (their data, heads, optimiser states,
F_0) and runs one round of every client on a given omega_k, returning per client what the server step
and the metrics records take. The simulator keeps the server step: a pool never sees the server state.

:class:`InProcessPool` is the sequential reference (the clients in turn, in this process);
:class:`fedgradnorm.process_pool.ProcessPool` runs them in worker processes with the same result. Another
engine (a Ray actor pool on a cluster, say) fits behind the same three members.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from fedgradnorm.client import Evaluation, LocalClient, load_omega_


@dataclass(frozen=True)
class ClientInfo:
    """What the records say of a client besides its round's numbers."""

    name: str
    task: str
    num_samples: int


@dataclass(frozen=True)
class ClientRoundResult:
    """One client's round: its update for the server step and its numbers for the records."""

    client: str
    gradient: Mapping[str, torch.Tensor]
    loss: float
    loss_ratio: float
    evaluation: Evaluation
    seconds: float  # the client step's wall time where it ran (loading omega excluded)


def run_client_round(
    client: LocalClient, shared: nn.Module, omega: Mapping[str, torch.Tensor], round_: int
) -> ClientRoundResult:
    """One client's round on ``shared`` loaded with omega: what every pool runs for each client."""
    load_omega_(shared, omega)
    t0 = time.perf_counter()
    result, evaluation = client.run_round(shared, round_)
    seconds = time.perf_counter() - t0
    return ClientRoundResult(client.name, result.gradient, result.loss, result.loss_ratio, evaluation, seconds)


class ClientPool(Protocol):
    """The clients of a simulation, wherever they run."""

    @property
    def members(self) -> Mapping[str, ClientInfo]:
        """Every client, in the order :meth:`run_round` returns them."""
        ...

    def run_round(self, omega: Mapping[str, torch.Tensor], round_: int) -> list[ClientRoundResult]:
        """Round ``round_`` of every client from ``omega`` (left unchanged), in the order of :attr:`members`.

        A result's gradient may live in the pool's own memory: it is valid until the next call."""
        ...

    def close(self) -> None:
        """Release what the pool holds (processes, memory); idempotent."""
        ...


class InProcessPool:
    """The clients in turn in this process, on one shared-network module: the simulator's reference path."""

    def __init__(self, clients: Mapping[str, LocalClient], shared: nn.Module) -> None:
        self.clients = dict(clients)
        self.shared = shared
        self._members = {n: ClientInfo(n, c.task.name, c.num_samples) for n, c in self.clients.items()}

    @property
    def members(self) -> Mapping[str, ClientInfo]:
        return self._members

    def run_round(self, omega: Mapping[str, torch.Tensor], round_: int) -> list[ClientRoundResult]:
        return [run_client_round(client, self.shared, omega, round_) for client in self.clients.values()]

    def close(self) -> None:
        """Nothing to release: the clients are plain objects of this process."""
