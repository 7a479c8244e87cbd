"""Edge node: the client step's throughput inside the service against the same loop outside it.

Inside: one RadCom edge node (one torch thread) trains against a loopback aggregator alone; its
own Prometheus histogram ``fedgradnorm_edge_step_seconds`` gives the mean client-step time over
the measured rounds. Outside: the same ``LocalClient.run_round`` on the same data, seed and
thread count, called in a plain loop in this process. Samples per second =
(tau_h + tau_omega) x batch / step time in both (the step includes the per-round test evaluation).
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import Table, fmt_s, median
from benchmarks.deploy import Deployment
from fedgradnorm.client import LocalClient, load_omega_
from fedgradnorm.data.partition import Allocation, DataSource, load_clients
from fedgradnorm.machine import torch_threads
from fedgradnorm.simulation_config import SimulationConfig


def outside(config: SimulationConfig, task: str, rounds: int, skip: int) -> float:
    with torch_threads(1):
        fed = config.spec
        data = load_clients(
            DataSource(fed, None, config.seed, config.synthetic_size),
            fed.task_names,
            Allocation.parse("balanced", config.test_fraction),
            config.seed,
        )
        client = LocalClient(task, fed, data[task], config.client_config(), config.seed)
        shared = fed.build_shared(config.seed)
        omega = {k: v.detach().clone() for k, v in shared.named_parameters()}
        times = []
        for k in range(rounds + skip):
            load_omega_(shared, omega)
            t0 = time.perf_counter()
            client.run_round(shared, k)
            times.append(time.perf_counter() - t0)
        return median(times[skip:])


def inside(workdir: Path, config: SimulationConfig, task: str, rounds: int, skip: int) -> float:
    agg = ["--rounds", "0", "--tau-h", str(config.tau_h), "--tau-omega", str(config.tau_omega)]
    agg += ["--batch-size", str(config.batch_size), "--seed", str(config.seed)]
    nodes = ["--torch-threads", "1", "--synthetic-size", str(config.synthetic_size), "--seed", str(config.seed)]
    with Deployment(workdir, "radcom", (task,), agg, nodes, node_metrics=True) as dep:
        port = dep.metrics_ports[task]
        dep.wait_rounds(skip, 600)
        a = dep.scrape(port)
        dep.wait_rounds(skip + rounds, 600)
        b = dep.scrape(port)
    key_s, key_n = "fedgradnorm_edge_step_seconds_sum", "fedgradnorm_edge_step_seconds_count"
    n = b[key_n] - a[key_n]
    if n <= 0:
        raise RuntimeError("the edge node reported no client step in the measured rounds")
    return (b[key_s] - a[key_s]) / n


def run(workdir: Path, synthetic_size: int = 20, rounds: int = 8, skip: int = 2) -> Table:
    config = SimulationConfig(federation="radcom", synthetic_size=synthetic_size)
    task = "modulation"
    t_out = outside(config, task, rounds, skip)
    t_in = inside(workdir / "edge", config, task, rounds, skip)
    samples = (config.tau_h + config.tau_omega) * config.batch_size
    t = Table(
        "Edge node: client step inside the service vs the same loop outside (RadCom modulation, 1 torch thread)",
        ["where", "client step", "samples / s", "relative"],
    )
    t.add("outside: LocalClient.run_round in a loop", fmt_s(t_out), f"{samples / t_out:,.0f}", "1.00")
    t.add(
        "inside: edge-node process, loopback aggregator", fmt_s(t_in), f"{samples / t_in:,.0f}", f"{t_out / t_in:.2f}"
    )
    t.notes.append(
        f"{samples} training samples per step (τ_h + τ_ω = {config.tau_h + config.tau_omega} minibatches of "
        f"{config.batch_size}) plus the test evaluation; outside: median of {rounds} steps, inside: mean over "
        f"{rounds} rounds from the node's histogram, both after {skip} warm-up rounds."
    )
    t.data = {"outside": t_out, "inside": t_in, "samples": samples}
    return t
