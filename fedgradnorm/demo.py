"""The main job (``make run``): the deployed form on loopback.

For each algorithm: one aggregator and one edge node per task of the federation (by default RadCom:
modulation, signal, anomaly) as separate processes, a short training whose per-round per-task weights and losses are printed as
they arrive, then everything stopped. Finally a side-by-side table and plot of both algorithms.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedgradnorm.config import setting
from fedgradnorm.hyperparameters import ALGORITHMS
from fedgradnorm.launch import ServiceProcess, start_aggregator, start_edge_node

# How each edge node of the demo shares out the synthetic set (passed to every node, and used to
# compute the reference levels the plot shows).
NODE_ALLOCATION = "balanced"
NODE_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DemoConfig:
    """`fedgradnorm demo` (`make run`), from flags or FEDGRADNORM_* variables like every command."""

    out: str = setting("runs/main", "output folder: certificates, each algorithm's logs, state and metrics, the plot")
    rounds: int = setting(30, "rounds of each algorithm")
    seed: int = setting(0, "seed of data, models and batches")
    federation: str = setting("radcom", "the federation: radcom, mtfl, or a spec file (.toml) with a synthetic set")
    synthetic_size: int = setting(60, "size of the federation's synthetic set (RadCom: samples per key)")
    algorithms: tuple[str, ...] = setting(ALGORITHMS, "comma-separated algorithms, run one after the other")

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.synthetic_size < 1:
            raise ValueError("rounds and synthetic_size must be at least 1")
        unknown = [a for a in self.algorithms if a not in ALGORITHMS]
        if unknown or not self.algorithms:
            raise ValueError(f"algorithms must be among {', '.join(ALGORITHMS)}, got {', '.join(self.algorithms)}")


def _format_round(records: list[dict[str, Any]], rounds: int = 0, eta: float | None = None) -> str:
    parts = []
    for r in sorted(records, key=lambda r: r["task"]):
        metric = r.get("test_metric")
        value = f" {metric[:3]}={r[metric]:.3f}" if metric and r.get(metric) is not None else ""
        parts.append(f"{r['task']}: p={r['weight']:.3f} loss={r['train_loss']:.3f}{value}")
    k = records[0]["round"]
    head = f"round {k + 1:>3}/{rounds}" if rounds else f"round {k:>3}"
    tail = f" | ETA {eta:.0f} s" if eta is not None else ""
    return f"{head} | " + " | ".join(parts) + tail


class Progress:
    """What the demo is waiting for, and round i/N with an ETA from the rounds so far."""

    def __init__(self, rounds: int, nodes: list[ServiceProcess]) -> None:
        self.rounds, self.nodes = rounds, nodes
        self.t0 = time.monotonic()
        self.first_round: float | None = None  # when round 0 was printed
        self.done = 0
        self.last_wait = ""
        self.last_wait_at = 0.0

    def eta(self) -> float | None:
        if self.first_round is None or self.done < 2 or not self.rounds:
            return None
        per_round = (time.monotonic() - self.first_round) / (self.done - 1)
        return per_round * max(0, self.rounds - self.done)

    def waiting(self) -> None:
        """Before round 0: how many edge nodes have registered, every 10 s or when it changes."""
        if self.first_round is not None:
            return
        registered = sum('"node.registered"' in p.log_text() for p in self.nodes)
        what = (
            f"{registered}/{len(self.nodes)} edge nodes registered (each loads its data set first)"
            if registered < len(self.nodes)
            else "round 0 (every node trains, then the aggregator steps)"
        )
        now = time.monotonic()
        if what != self.last_wait or now - self.last_wait_at >= 10:
            print(f"  waiting for {what}... {now - self.t0:.0f} s", flush=True)
            self.last_wait, self.last_wait_at = what, now

    def follow(self, metrics: Path, seen: int, per_round: int) -> int:
        """Print every complete round in ``metrics`` past line ``seen``; return the new line count."""
        if not metrics.exists():
            return seen
        lines = metrics.read_text().splitlines()
        complete = len(lines) - len(lines) % per_round if per_round else len(lines)
        for start in range(seen, complete, per_round):
            self.done += 1
            if self.first_round is None:
                self.first_round = time.monotonic()
            records = [json.loads(x) for x in lines[start : start + per_round]]
            print(_format_round(records, self.rounds, self.eta()), flush=True)
        return max(seen, complete)


def run_federation(
    out: Path, algorithm: str, rounds: int, seed: int, synthetic_size: int, certs: Path, federation: str = "radcom"
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    from fedgradnorm.federation import load_federation

    tasks = load_federation(federation).task_names
    common = ["--seed", str(seed), "--federation", federation]
    procs: list[ServiceProcess] = []
    print(f"\n== {algorithm}: starting the aggregator (loads torch, builds the model)...", flush=True)
    agg, ready = start_aggregator(
        out,
        [
            *common,
            "--algorithm",
            algorithm,
            "--rounds",
            str(rounds),
            "--min-nodes",
            str(len(tasks)),
            "--state-dir",
            str(out / "aggregator-state"),
            "--metrics-log",
            str(metrics),
        ],
        certs=certs,
    )
    procs.append(agg)
    try:
        print(
            f"== {algorithm}: aggregator on 127.0.0.1:{ready['grpc_port']} (metrics :{ready['metrics_port']}), "
            f"starting edge nodes {', '.join(tasks)}; mutual TLS; {rounds} rounds",
            flush=True,
        )
        for task in tasks:
            procs.append(
                start_edge_node(
                    out,
                    ready["grpc_port"],
                    task,
                    # three nodes share the machine's cores: one torch thread each avoids oversubscription
                    [
                        *common,
                        "--synthetic-size",
                        str(synthetic_size),
                        "--allocation",
                        NODE_ALLOCATION,
                        "--test-fraction",
                        str(NODE_TEST_FRACTION),
                        "--torch-threads",
                        "1",
                    ],
                    certs=certs,
                )
            )
        seen = 0
        progress = Progress(rounds, procs[1:])
        while any(p.alive() for p in procs[1:]):
            progress.waiting()
            seen = progress.follow(metrics, seen, len(tasks))
            dead = [p for p in procs if p.proc is not None and p.proc.poll() not in (None, 0)]
            if dead:
                raise RuntimeError(f"{dead[0].name} failed:\n{dead[0].log_text()[-3000:]}")
            time.sleep(0.2)
        progress.follow(metrics, seen, len(tasks))
    finally:
        print(f"== {algorithm}: stopping its aggregator and edge nodes", flush=True)
        for p in reversed(procs):
            p.stop()
    return metrics


def reference_levels(federation: str, seed: int, synthetic_size: int) -> dict[str, dict[str, float]]:
    """Per task, the test loss and metric of its best constant prediction on the data each edge node of
    the demo holds (its share of the synthetic set, as the node builds it): the level to beat."""
    from fedgradnorm.algorithm import ClientConfig
    from fedgradnorm.client import LocalClient
    from fedgradnorm.data.partition import Allocation, DataSource, load_clients
    from fedgradnorm.federation import load_federation

    fed = load_federation(federation)
    source = DataSource(fed, None, seed, synthetic_size)
    data = load_clients(source, fed.task_names, Allocation.parse(NODE_ALLOCATION, NODE_TEST_FRACTION), seed)
    out = {}
    for task, d in data.items():
        ref = LocalClient(task, fed, d, ClientConfig(), seed).reference()
        if ref is not None:
            out[task] = {"test_loss": ref.test_loss, "metric": ref.value}
    return out


def run_demo(config: DemoConfig) -> int:
    from fedgradnorm.certs import make_certificates
    from fedgradnorm.plotting import plot_comparison
    from fedgradnorm.report import final_table

    out = Path(config.out)
    runs = {}
    t0 = time.perf_counter()
    certs = out / "certs"
    make_certificates(certs)  # the deployed default: mutual TLS, also on loopback
    for algorithm in config.algorithms:
        runs[algorithm] = run_federation(
            out / algorithm, algorithm, config.rounds, config.seed, config.synthetic_size, certs, config.federation
        )
    references = reference_levels(config.federation, config.seed, config.synthetic_size)
    png = plot_comparison(runs, out / "comparison.png", references=references)
    print()
    print(final_table(runs))
    print(
        "reference levels (the best constant prediction, the dotted lines of the plot): "
        + ", ".join(f"{t} test loss {r['test_loss']:.3f} metric {r['metric']:.3f}" for t, r in references.items())
    )
    print(f"\nplot: {png}\nlogs and state: {out}/<algorithm>/   wall time {time.perf_counter() - t0:.0f} s")
    return 0
