"""The in-process simulator: every client and the server in one process, round after round.

This is the reference the gRPC deployment must match: it calls exactly the same client step
(:class:`fedgradnorm.client.LocalClient`) and server step (:func:`fedgradnorm.algorithm.server_step`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch
from tqdm import tqdm

from fedgradnorm.algorithm import (
    ClientUpdate,
    ServerState,
    server_step,
)
from fedgradnorm.atomic import atomic_write_text
from fedgradnorm.client import LocalClient, load_omega_
from fedgradnorm.data.partition import Allocation, ClientData, load_clients
from fedgradnorm.records import round_record
from fedgradnorm.simulation_config import SimulationConfig

log = structlog.get_logger("fedgradnorm.simulator")


@dataclass
class Simulation:
    """A running simulation; iterate :meth:`rounds` to advance it one round at a time."""

    config: SimulationConfig
    clients: dict[str, LocalClient]
    state: ServerState
    shared: torch.nn.Module
    records: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def build(cls, config: SimulationConfig, data: dict[str, ClientData] | None = None) -> Simulation:
        fed = config.spec
        shared = fed.build_shared(config.seed)
        state = ServerState.initial(dict(shared.named_parameters()))
        missing = [n for n in config.server_config().omega_tilde if n not in state.omega]
        if missing:  # before any data is loaded
            raise ValueError(f"omega_tilde names {missing} are not parameters of {fed.network.ref}")
        if data is None:
            data = load_clients(
                config.source(),
                config.task_names,
                Allocation.parse(config.allocation, config.test_fraction),
                config.seed,
            )
        clients = {
            name: LocalClient(name, fed, data[name], config.client_config(), config.seed) for name in config.task_names
        }
        return cls(config=config, clients=clients, state=state, shared=shared)

    def step(self) -> list[dict[str, Any]]:
        """Run one round over every client; returns the round's metric records."""
        k = self.state.round
        updates, losses, evals = [], {}, {}
        for name, client in self.clients.items():
            load_omega_(self.shared, self.state.omega)
            result, evaluation = client.run_round(self.shared, k)
            updates.append(ClientUpdate(name, result.gradient, result.loss_ratio))
            losses[name], evals[name] = result.loss, evaluation
        step = server_step(self.state, updates, self.config.server_config())
        records = [
            round_record(
                round_=k,
                client=n,
                task=c.task.name,
                algorithm=self.config.algorithm,
                report=step.reports[n],
                f_grad=step.f_grad,
                train_loss=losses[n],
                test_loss=evals[n].test_loss,
                test_metric=evals[n].metric,
                test_value=evals[n].value,
                num_samples=c.num_samples,
            )
            for n, c in self.clients.items()
        ]
        self.records.extend(records)
        return records

    def rounds(self) -> Iterator[list[dict[str, Any]]]:
        while self.state.round < self.config.rounds:
            yield self.step()


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace ``path`` atomically with one JSON object a line."""
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records), durable=False)


def run_simulation(config: SimulationConfig, out_dir: str | Path, progress: bool = True) -> Path:
    """Run all rounds, write ``metrics.jsonl``, ``summary.json`` and the plot; return the metrics path."""
    from fedgradnorm.plotting import plot_run

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sim = Simulation.build(config)
    t_data = time.perf_counter() - t0
    log.info(
        "simulation.start",
        federation=config.federation,
        algorithm=config.algorithm,
        rounds=config.rounds,
        clients={n: c.num_samples for n, c in sim.clients.items()},
        data=config.source().describe(),
    )
    bar = tqdm(total=config.rounds, desc=f"{config.algorithm} {config.spec.name}", unit="round", disable=not progress)
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
        "final": {r["client"]: r for r in sim.records[-len(sim.clients) :]},
        "torch_threads": torch.get_num_threads(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    plot_run(metrics, out / "training.png")
    log.info("simulation.done", out=str(out), wall_seconds=round(wall, 2))
    return metrics
