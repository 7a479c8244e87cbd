"""The simulator: every client and the server of a federation on one machine, round after round.

This is the reference the gRPC deployment must match: it calls exactly the same client step
(:class:`fedgradnorm.client.LocalClient`) and server step (:func:`fedgradnorm.algorithm.server_step`).

The clients run in a :class:`~fedgradnorm.client_pool.ClientPool`: in turn in this process
(``workers`` 1, :class:`~fedgradnorm.client_pool.InProcessPool`), or spread over worker processes
(``workers`` > 1, :class:`~fedgradnorm.process_pool.ProcessPool`). The server step always runs here,
on the updates in the clients' order, so both give the same records and the same omega and p, bit for
bit, when their client steps use the same number of torch threads. That number matters: a run with
two threads differs from one with one in the last bits (a matrix product's sums are split
differently), so a run pins it with ``client_threads``, or takes this process's count (``workers`` 1)
or that count shared out among the workers. The server step runs with the same count.

Bit-identity needs networks whose forward pass draws no random numbers from torch's global generator
(no dropout: the clients in turn draw from one stream, workers each from their own) and a shared
network without buffers (batch-norm statistics ride from one client to the next in the one module the
clients in turn share); ``workers`` > 1 refuses a shared network with buffers.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn
from tqdm import tqdm

from fedgradnorm.algorithm import (
    ClientUpdate,
    ServerState,
    server_step,
)
from fedgradnorm.atomic import atomic_write_text
from fedgradnorm.client import LocalClient
from fedgradnorm.client_pool import ClientPool, InProcessPool
from fedgradnorm.data.partition import Allocation, ClientData, load_clients
from fedgradnorm.machine import torch_threads
from fedgradnorm.process_pool import ProcessPool
from fedgradnorm.records import round_record
from fedgradnorm.simulation_config import SimulationConfig

log = structlog.get_logger("fedgradnorm.simulator")


@dataclass
class Simulation:
    """A running simulation; iterate :meth:`rounds` to advance it one round at a time, and close it
    (``with Simulation.build(...) as sim:``) to stop its worker processes."""

    config: SimulationConfig
    pool: ClientPool
    state: ServerState
    threads: int | None  # torch threads of every round's client and server steps; None: as the process has
    records: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def build(cls, config: SimulationConfig, data: dict[str, ClientData] | None = None) -> Simulation:
        fed = config.spec
        shared = fed.build_shared(config.seed)
        state = ServerState.initial(dict(shared.named_parameters()))
        missing = [n for n in config.server_config().omega_tilde if n not in state.omega]
        if missing:  # before any data is loaded
            raise ValueError(f"omega_tilde names {missing} are not parameters of {fed.network.ref}")
        workers = config.worker_count
        buffers = [n for n, _ in shared.named_buffers()]
        if workers > 1 and buffers:
            raise ValueError(
                f"workers > 1 needs a shared network without buffers; {fed.network.ref} has {buffers[:3]}, which the "
                "clients in turn carry from one client to the next in one module and worker processes cannot: "
                "use workers 1"
            )
        if data is None:
            data = load_clients(
                config.source(),
                config.task_names,
                Allocation.parse(config.allocation, config.test_fraction),
                config.seed,
            )
        data = {name: data[name] for name in config.task_names}
        if workers == 1:
            clients = {name: LocalClient(name, fed, d, config.client_config(), config.seed) for name, d in data.items()}
            return cls(config, InProcessPool(clients, shared), state, config.client_threads or None)
        threads = config.client_threads or max(1, torch.get_num_threads() // workers)
        pool = ProcessPool(
            fed,
            data,
            config.client_config(),
            config.seed,
            workers=workers,
            threads=threads,
            omega=state.omega,
            shared=shared,
        )
        return cls(config, pool, state, threads)

    @property
    def clients(self) -> dict[str, LocalClient]:
        """The clients themselves, where they live in this process (``workers`` 1)."""
        return self._in_process().clients

    @property
    def shared(self) -> nn.Module:
        """The shared-network module the clients in turn train on (``workers`` 1)."""
        return self._in_process().shared

    def _in_process(self) -> InProcessPool:
        if not isinstance(self.pool, InProcessPool):
            raise TypeError(f"the clients live in {self.config.worker_count} worker processes, not in this one")
        return self.pool

    def step(self) -> list[dict[str, Any]]:
        """Run one round over every client; returns the round's metric records."""
        k = self.state.round
        with torch_threads(self.threads) if self.threads else contextlib.nullcontext():
            results = self.pool.run_round(self.state.omega, k)
            updates = [ClientUpdate(r.client, r.gradient, r.loss_ratio) for r in results]
            step = server_step(self.state, updates, self.config.server_config())
        members = self.pool.members
        records = [
            round_record(
                round_=k,
                client=r.client,
                task=members[r.client].task,
                algorithm=self.config.algorithm,
                report=step.reports[r.client],
                f_grad=step.f_grad,
                train_loss=r.loss,
                test_loss=r.evaluation.test_loss,
                test_metric=r.evaluation.metric,
                test_value=r.evaluation.value,
                num_samples=members[r.client].num_samples,
            )
            for r in results
        ]
        self.records.extend(records)
        return records

    def rounds(self) -> Iterator[list[dict[str, Any]]]:
        while self.state.round < self.config.rounds:
            yield self.step()

    def close(self) -> None:
        """Stop the worker processes, if any (idempotent)."""
        self.pool.close()

    def __enter__(self) -> Simulation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace ``path`` atomically with one JSON object a line."""
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records), durable=False)


def run_simulation(config: SimulationConfig, out_dir: str | Path, progress: bool = True) -> Path:
    """Run all rounds, write ``metrics.jsonl``, ``summary.json`` and the plot; return the metrics path."""
    from fedgradnorm.plotting import plot_run

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with Simulation.build(config) as sim:  # closed (its worker processes stopped) however the rounds end
        t_data = time.perf_counter() - t0
        log.info(
            "simulation.start",
            federation=config.federation,
            algorithm=config.algorithm,
            rounds=config.rounds,
            clients={n: c.num_samples for n, c in sim.pool.members.items()},
            data=config.source().describe(),
            workers=config.worker_count,
            client_threads=sim.threads,
        )
        bar = tqdm(
            total=config.rounds, desc=f"{config.algorithm} {config.spec.name}", unit="round", disable=not progress
        )
        for records in sim.rounds():
            bar.update(1)
            bar.set_postfix({r["task"][:6]: f"p={r['weight']:.2f}" for r in records})
        bar.close()
    wall = time.perf_counter() - t0
    metrics = out / "metrics.jsonl"
    write_jsonl(metrics, sim.records)
    summary = {
        "config": asdict(config),
        "wall_seconds": wall,
        "data_seconds": t_data,
        "final": {r["client"]: r for r in sim.records[-len(sim.pool.members) :]},
        "torch_threads": torch.get_num_threads(),
        "workers": config.worker_count,
        "client_threads": sim.threads or torch.get_num_threads(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    plot_run(metrics, out / "training.png")
    log.info("simulation.done", out=str(out), wall_seconds=round(wall, 2))
    return metrics
