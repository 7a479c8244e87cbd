"""The main job (``make run``): the deployed form on loopback.

For each algorithm: one aggregator and one edge node per task of the federation as separate processes,
a training whose per-round per-task weights and losses are printed as they arrive, then everything
stopped. Finally a side-by-side table and plot of both algorithms.

By default it is one cell of the loss-scale dial of ``docs/results.md`` (``experiments.reproduce``):
synthetic MTFL, the imbalanced allocation of Table II, the landmark loss scaled by 100, 20 epochs
(94 rounds), seed 0, the paper's hyperparameters: the regime the dial was built to probe, where one
task's gradient dominates the shared network and FedGradNorm's weights have something to do.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedgradnorm.config import setting
from fedgradnorm.errors import FatalError
from fedgradnorm.hyperparameters import ALGORITHMS
from fedgradnorm.launch import ServiceProcess, start_aggregator, start_edge_node
from fedgradnorm.simulation_config import parse_loss_scales

# The test share of a node's data when its pool has no test part (RadCom); MTFL has its own test faces.
NODE_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DemoConfig:
    """`fedgradnorm demo` (`make run`), from flags or FEDGRADNORM_* variables like every command."""

    out: str = setting("runs/main", "output folder: certificates, each algorithm's logs, state and metrics, the plot")
    rounds: int = setting(94, "rounds of each algorithm (94: 20 epochs of the largest MTFL client)")
    seed: int = setting(0, "seed of data, models and batches")
    federation: str = setting("mtfl", "the federation: mtfl, radcom, or a spec file (.toml) with a synthetic set")
    synthetic_size: int = setting(
        13000, "size of the federation's synthetic set (MTFL: training faces; RadCom: samples per key)"
    )
    allocation: str = setting(
        "imbalanced", "how the synthetic set is shared out among the nodes: imbalanced (Table II), balanced, ..."
    )
    loss_scale: str = setting(
        "landmarks=100",
        "task=factor,...: multiply those nodes' task losses by the factor, the dial of docs/results.md (empty: none)",
    )
    algorithms: tuple[str, ...] = setting(ALGORITHMS, "comma-separated algorithms, run one after the other")

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.synthetic_size < 1:
            raise ValueError("rounds and synthetic_size must be at least 1")
        unknown = [a for a in self.algorithms if a not in ALGORITHMS]
        if unknown or not self.algorithms:
            raise ValueError(f"algorithms must be among {', '.join(ALGORITHMS)}, got {', '.join(self.algorithms)}")
        from fedgradnorm.data.partition import Allocation
        from fedgradnorm.federation import load_federation

        Allocation.parse(self.allocation, NODE_TEST_FRACTION)
        fed = load_federation(self.federation)
        unknown = [t for t in self.loss_scales if t not in fed.task_names]
        if unknown:  # the default scales an MTFL task: say so when another federation is chosen
            raise ValueError(
                f"loss_scale {self.loss_scale!r} names {', '.join(unknown)}, not a task of {fed.name} "
                f"({', '.join(fed.task_names)}); give --loss-scale '' for none"
            )

    @property
    def loss_scales(self) -> dict[str, float]:
        return parse_loss_scales(self.loss_scale)


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
        self.printed = -1  # the last round printed
        self.parsed = 0  # characters of the metrics log read into by_round
        self.by_round: dict[int, list[dict[str, Any]]] = {}
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

    def follow(self, metrics: Path, final: bool = False) -> None:
        """Print every round of ``metrics`` not printed yet: those before the last round in it (the
        aggregator writes a round's records together), and that one too when ``final``. A round
        holds a record per node whose update its step used."""
        if not metrics.exists():
            return
        with metrics.open() as f:
            f.seek(self.parsed)
            new = f.read()
        complete = new[: new.rfind("\n") + 1]  # what follows the last newline is a line being written
        self.parsed += len(complete)
        for line in complete.splitlines():
            record = json.loads(line)
            self.by_round.setdefault(record["round"], []).append(record)
        last = max(self.by_round, default=-1)
        for k in sorted(r for r in self.by_round if r > self.printed and (final or r < last)):
            self.done += 1
            if self.first_round is None:
                self.first_round = time.monotonic()
            print(_format_round(self.by_round[k], self.rounds, self.eta()), flush=True)
            self.printed = k


def _failure(proc: ServiceProcess, status: int | None) -> str:
    """One line on a process that exited with an error: its last log line (its error), and its log."""
    lines = [x for x in proc.log_text().splitlines() if x.strip()]
    last = lines[-1].strip() if lines else "no output"
    return f"{proc.name} exited with status {status}: {last[:500]} (log: {proc.log_path})"


def _report_left_out(nodes: list[ServiceProcess]) -> None:
    """Say which edge nodes had updates that the aggregator's step did not use (norm outliers)."""
    for p in nodes:
        done = p.events("node.done")
        left_out = done[-1].get("left_out", 0) if done else 0
        if left_out:
            print(
                f"  {p.name}: the aggregator left out {left_out} of its updates (a gradient norm far above the "
                f"other nodes': see update.dropped in aggregator.log and update.left_out in {p.log_path.name})",
                flush=True,
            )


def run_federation(out: Path, algorithm: str, config: DemoConfig, certs: Path) -> Path:
    rounds, federation = config.rounds, config.federation
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    # A fresh federation every time: an earlier demo's aggregator state and node identities (another
    # setting, certificates since replaced) would be resumed or refused.
    for stale in [out / "aggregator-state", *out.glob("node-*/")]:
        shutil.rmtree(stale, ignore_errors=True)
    from fedgradnorm.federation import load_federation

    tasks = load_federation(federation).task_names
    common = ["--seed", str(config.seed), "--federation", federation]
    scales = config.loss_scales
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
                    # the nodes share the machine's cores: one torch thread each avoids oversubscription
                    [
                        *common,
                        "--synthetic-size",
                        str(config.synthetic_size),
                        "--allocation",
                        config.allocation,
                        "--test-fraction",
                        str(NODE_TEST_FRACTION),
                        "--torch-threads",
                        "1",
                        *(["--loss-scale", repr(scales[task])] if task in scales else []),
                    ],
                    certs=certs,
                )
            )
        progress = Progress(rounds, procs[1:])
        while any(p.alive() for p in procs[1:]):
            progress.waiting()
            progress.follow(metrics)
            dead = [(p, rc) for p in procs if p.proc is not None and (rc := p.proc.poll()) not in (None, 0)]
            if dead:
                raise FatalError(_failure(*dead[0]))
            time.sleep(0.2)
        progress.follow(metrics, final=True)
        _report_left_out(procs[1:])
    finally:
        print(f"== {algorithm}: stopping its aggregator and edge nodes", flush=True)
        for p in reversed(procs):
            p.stop()
    return metrics


def reference_levels(config: DemoConfig) -> dict[str, dict[str, float]]:
    """Per task, the test loss and metric of its best constant prediction on the data each edge node of
    the demo holds (its share of the synthetic set, as the node builds it, its loss scaled as the
    node's): the level to beat. Generates the synthetic set if the cache has none yet."""
    from fedgradnorm.algorithm import ClientConfig
    from fedgradnorm.client import LocalClient
    from fedgradnorm.data.partition import Allocation, DataSource, load_clients
    from fedgradnorm.federation import load_federation

    fed = load_federation(config.federation).with_loss_scales(config.loss_scales)
    source = DataSource(fed, None, config.seed, config.synthetic_size)
    alloc = Allocation.parse(config.allocation, NODE_TEST_FRACTION)
    data = load_clients(source, fed.task_names, alloc, config.seed)
    out = {}
    for task, d in data.items():
        ref = LocalClient(task, fed, d, ClientConfig(), config.seed).reference()
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
    scaled = ", ".join(f"{t} loss x{f:g}" for t, f in config.loss_scales.items()) or "no loss scaled"
    print(
        f"== {config.federation}, {config.allocation} allocation, {scaled}, {config.rounds} rounds, seed {config.seed}: "
        f"preparing the synthetic set ({config.synthetic_size}) once for every node, and each task's reference level",
        flush=True,
    )
    references = reference_levels(config)  # before the nodes start: they find the set in the cache
    certs = out / "certs"
    make_certificates(certs)  # the deployed default: mutual TLS, also on loopback
    for algorithm in config.algorithms:
        runs[algorithm] = run_federation(out / algorithm, algorithm, config, certs)
    png = plot_comparison(runs, out / "comparison.png", references=references)
    print()
    print(final_table(runs))
    print(
        "reference levels (the best constant prediction, the dotted lines of the plot): "
        + ", ".join(f"{t} test loss {r['test_loss']:.3f} metric {r['metric']:.3f}" for t, r in references.items())
    )
    print(f"\nplot: {png}\nlogs and state: {out}/<algorithm>/   wall time {time.perf_counter() - t0:.0f} s")
    return 0
