"""Round overhead: the loopback deployment against the in-process simulator, same configuration.

RadCom federation, Network 2 (15.7 MB of float32 shared weights), three edge nodes. Two cases:

* no training (``--no-train true``): each node fetches omega and submits a zero gradient; the
  in-process counterpart is the server step alone on three zero gradients. The difference is the
  pure system cost: 6 x 15.7 MB through gRPC, coordination and the per-round state commit.
* training, tau_h + tau_omega = 10 steps of batch 64: the in-process simulator's round (clients one
  after the other, one torch thread, as each edge node has) against the loopback round (three
  single-threaded nodes sharing the machine's cores). The overhead is what the loopback round
  spends beyond its compute: round time - (slowest node's client step, as the node itself
  measures it) - (the server step, measured in-process).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import MB, Table, fmt_s, loopback_copy, median
from benchmarks.deploy import Deployment, intervals
from fedgradnorm.algorithm import ClientUpdate, ServerState, server_step
from fedgradnorm.client import load_omega_
from fedgradnorm.federation import load_federation
from fedgradnorm.machine import torch_threads
from fedgradnorm.simulation_config import SimulationConfig
from fedgradnorm.simulator import Simulation


def server_step_seconds(nodes: int, repeats: int, config: SimulationConfig) -> float:
    """Best time of the server step on ``nodes`` zero gradients (Network 2): the in-process cost
    with the least interference from other work on the machine (a conservative reference: it
    makes the overhead larger, never smaller)."""
    shared = config.spec.build_shared(0)
    state = ServerState.initial(dict(shared.named_parameters()))
    zeros = {k: torch.zeros_like(v) for k, v in state.omega.items()}
    updates = [ClientUpdate(f"n{i}", zeros, 1.0) for i in range(nodes)]
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        server_step(state, updates, config.server_config())
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def commit_seconds(workdir: Path, repeats: int) -> float:
    """Median time of the aggregator's atomic state commit (omega + Adam moments) on this disk."""
    from fedgradnorm.services.aggregator.store import FileStateStore, Snapshot

    shared = load_federation("radcom").build_shared(0)
    state = ServerState.initial(dict(shared.named_parameters()))
    store = FileStateStore(str(workdir / "commit-probe"))
    snap = Snapshot(identity={"federation": "radcom"}, server=state, members={})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        store.save(snap)
        times.append(time.perf_counter() - t0)
    return median(times)


def simulator_round(config: SimulationConfig, rounds: int, skip: int) -> dict[str, float]:
    """The in-process simulator's rounds, one torch thread: per-round total, clients' steps, server step."""
    with torch_threads(1):
        sim = Simulation.build(config)
        totals, client_sums, client_max, steps = [], [], [], []
        for _ in range(rounds + skip):
            t_round = time.perf_counter()
            updates, per_client = [], []
            for name, client in sim.clients.items():
                load_omega_(sim.shared, sim.state.omega)
                t0 = time.perf_counter()
                result, _ = client.run_round(sim.shared, sim.state.round)
                per_client.append(time.perf_counter() - t0)
                updates.append(ClientUpdate(name, result.gradient, result.loss_ratio))
            t0 = time.perf_counter()
            server_step(sim.state, updates, config.server_config())
            steps.append(time.perf_counter() - t0)
            totals.append(time.perf_counter() - t_round)
            client_sums.append(sum(per_client))
            client_max.append(max(per_client))
    return {
        "round": median(totals[skip:]),
        "clients_sum": median(client_sums[skip:]),
        "client_max": median(client_max[skip:]),
        "server_step": median(steps[skip:]),
    }


def _node_step_means(dep: Deployment, before: dict[str, dict[str, float]]) -> dict[str, float]:
    out = {}
    for name, port in dep.metrics_ports.items():
        now = dep.scrape(port)
        s = now["fedgradnorm_edge_step_seconds_sum"] - before[name]["fedgradnorm_edge_step_seconds_sum"]
        c = now["fedgradnorm_edge_step_seconds_count"] - before[name]["fedgradnorm_edge_step_seconds_count"]
        out[name] = s / c if c else float("nan")
    return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat; Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def deployment_flags(
    config: SimulationConfig, train: bool, state_dir: Path | None = None
) -> tuple[list[str], list[str]]:
    """The aggregator's and every edge node's flags in these deployments (benchmarks/peers.py runs
    the same workload): Network 2 nodes of one torch thread, ``--no-train true`` unless ``train``."""
    agg_flags = [
        *(["--state-dir", str(state_dir)] if state_dir else []),
        "--seed",
        str(config.seed),
        "--tau-h",
        str(config.tau_h),
        "--tau-omega",
        str(config.tau_omega),
        "--batch-size",
        str(config.batch_size),
        "--rounds",
        "0",
        "--round-timeout",
        "120",
    ]
    node_flags = ["--seed", str(config.seed), "--synthetic-size", str(config.synthetic_size), "--torch-threads", "1"]
    if not train:
        node_flags += ["--no-train", "true"]
    return agg_flags, node_flags


def loopback_rounds(
    workdir: Path,
    config: SimulationConfig,
    train: bool,
    rounds: int,
    skip: int,
    timeout: float,
    state_dir: Path | None = None,
) -> dict[str, Any]:
    agg_flags, node_flags = deployment_flags(config, train, state_dir)
    with Deployment(workdir, "radcom", (), agg_flags, node_flags, node_metrics=train) as dep:
        dep.wait_rounds(skip + 1, timeout)
        before = {n: dep.scrape(p) for n, p in dep.metrics_ports.items()}
        cpu0 = {p.name: _cpu_seconds(p.pid) for p in dep.procs}
        stamps = dep.wait_rounds(skip + rounds + 1, timeout)
        cpu = {p.name: (_cpu_seconds(p.pid) - cpu0[p.name]) / rounds for p in dep.procs}
        steps = _node_step_means(dep, before) if train else {}
    times = intervals(stamps[: skip + rounds + 1], skip)
    return {
        "cpu": cpu,  # CPU seconds per measured round, per process (counted from the close of the last warm-up round)
        "round": median(times),
        "mean": statistics.fmean(times),
        "max": max(times),
        "n": len(times),
        "steps": steps,
        "phases": _phase_medians(workdir / "metrics.jsonl", skip, skip + rounds),
    }


def _phase_medians(metrics: Path, first: int, last: int) -> dict[str, float]:
    """Median collect/step/commit seconds of rounds first..last from the aggregator's metrics.jsonl."""
    by_round: dict[int, dict[str, Any]] = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        by_round.setdefault(record["round"], record)
    rows = [by_round[k] for k in range(first, last + 1) if k in by_round]
    keys = ("collect_seconds", "step_seconds", "commit_seconds")
    return {k.removesuffix("_seconds"): median([r[k] for r in rows]) for k in keys} if rows else {}


def _cpu_text(result: dict[str, Any]) -> str:
    cpu: dict[str, float] = result["cpu"]
    total = sum(cpu.values())
    share = total / ((os.cpu_count() or 1) * result["round"])
    parts = ", ".join(f"{name} {fmt_s(sec)}" for name, sec in cpu.items())
    return f"{parts} ({fmt_s(total)} in all, {share:.0%} of the cores)"


def _phases(result: dict[str, Any]) -> str:
    phases = result.get("phases") or {}
    return ", ".join(f"{k} {fmt_s(v)}" for k, v in phases.items()) or "not recorded"


def workload(synthetic_size: int = 20) -> SimulationConfig:
    """RadCom on Network 2, tau_h = tau_omega = 5 steps of batch 64 (benchmarks/peers.py runs it too)."""
    return SimulationConfig(federation="radcom", synthetic_size=synthetic_size, tau_h=5, tau_omega=5, batch_size=64)


def run(workdir: Path, synthetic_size: int = 20, rounds_idle: int = 20, rounds_train: int = 10) -> Table:
    config = workload(synthetic_size)
    model_bytes = sum(p.numel() * 4 for p in load_federation("radcom").build_shared(0).parameters())
    per_round_bytes = 2 * 3 * model_bytes
    floor = loopback_copy(per_round_bytes)
    step3 = server_step_seconds(3, 7, config)
    commit = commit_seconds(workdir, 3)
    idle = loopback_rounds(workdir / "no-train", config, False, rounds_idle, 3, timeout=600)
    shm = Path(tempfile.mkdtemp(prefix="fedgradnorm-bench-", dir="/dev/shm")) if Path("/dev/shm").is_dir() else None
    try:
        idle_mem = (
            loopback_rounds(workdir / "no-train-tmpfs", config, False, rounds_idle, 3, 600, shm / "state")
            if shm
            else None
        )
    finally:
        if shm is not None:
            shutil.rmtree(shm, ignore_errors=True)
    sim = simulator_round(config, rounds_train, 1)
    busy = loopback_rounds(workdir / "train", config, True, rounds_train, 2, timeout=900)

    t = Table(
        "Round overhead: loopback deployment (aggregator + 3 RadCom edge nodes) vs in-process, Network 2",
        ["case", "in-process per round", "loopback per round", "overhead per round", "overhead / loopback round"],
    )
    over_idle = idle["round"] - step3
    t.add(
        "no training (zero gradients)",
        f"{fmt_s(step3)} (server step, best of 7)",
        fmt_s(idle["round"]),
        fmt_s(over_idle),
        f"{over_idle / idle['round']:.0%}",
    )
    if idle_mem is not None:
        over_mem = idle_mem["round"] - step3
        t.add(
            "no training, state commit to tmpfs (/dev/shm)",
            f"{fmt_s(step3)} (server step, best of 7)",
            fmt_s(idle_mem["round"]),
            fmt_s(over_mem),
            f"{over_mem / idle_mem['round']:.0%}",
        )
    node_step = max(busy["steps"].values()) if busy["steps"] else float("nan")
    over_busy = busy["round"] - node_step - sim["server_step"]
    t.add(
        "training, τ_h + τ_ω = 10 steps of batch 64",
        f"{fmt_s(sim['round'])} (3 clients in turn)",
        fmt_s(busy["round"]),
        fmt_s(over_busy),
        f"{over_busy / busy['round']:.1%}",
    )
    t.notes += [
        f"Model {model_bytes / MB:.1f} MB float32; a round moves {per_round_bytes / MB:.1f} MB (3 fetches + 3 submits). "
        f"Plain loopback socket floor for those bytes, same run: {fmt_s(floor)} ({per_round_bytes / floor / 1e9:.2f} GB/s).",
        f"No-training case: median of {idle['n']} close-to-close rounds after 3 warm-up rounds "
        f"(mean {fmt_s(idle['mean'])}, max {fmt_s(idle['max'])}). Phases (median, from the aggregator's "
        f"metrics.jsonl): {_phases(idle)}. The state commit (ω and its Adam moments, {3 * model_bytes / MB:.0f} MB, "
        f"fsync; {fmt_s(commit)} measured alone in-process) runs beside the next round's collect phase, so it "
        "adds to the round only what it takes from the CPU.",
        f"Training case: median of {busy['n']} rounds after 2 warm-up rounds. Nodes' own mean client step "
        f"(Prometheus fedgradnorm_edge_step_seconds over the measured rounds): "
        + ", ".join(f"{k} {fmt_s(v)}" for k, v in sorted(busy["steps"].items()))
        + f"; server step {fmt_s(sim['server_step'])}. Overhead = loopback round − slowest node's step − server step. "
        f"Phases (median): {_phases(busy)}.",
        "CPU time per measured round (user + system, /proc/PID/stat): no training: "
        + _cpu_text(idle)
        + "; training: "
        + _cpu_text(busy)
        + ". The share is of the machine's "
        + f"{os.cpu_count()} cores over the median round: near 100 % the round is bound by the cores the four "
        "processes share, and time beyond the slowest node's step is partly waiting for a core.",
        f"In-process simulator, one torch thread: clients' steps {fmt_s(sim['clients_sum'])} in all "
        f"(slowest {fmt_s(sim['client_max'])}) + server step {fmt_s(sim['server_step'])}; the loopback nodes "
        "train concurrently, so the loopback round can be shorter than the simulator's.",
        f"RadCom synthetic set of {synthetic_size} samples per key (the per-round test evaluation is part of every client step).",
    ]
    t.data = {
        "idle": idle,
        "idle_tmpfs": idle_mem,
        "busy": busy,
        "sim": sim,
        "step3": step3,
        "commit": commit,
        "floor": floor,
    }
    return t
