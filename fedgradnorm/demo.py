"""The main job (``make run``): the deployed form on loopback.

For each algorithm: one aggregator and three RadCom edge nodes (modulation, signal, anomaly) as
separate processes, a short training whose per-round per-task weights and losses are printed as
they arrive, then everything stopped. Finally a side-by-side table and plot of both algorithms.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from fedgradnorm.certs import make_certificates
from fedgradnorm.launch import ServiceProcess, start_aggregator, start_edge_node
from fedgradnorm.plotting import plot_comparison
from fedgradnorm.report import final_table
from fedgradnorm.tasks import federation


def _format_round(records: list[dict[str, Any]]) -> str:
    parts = []
    for r in sorted(records, key=lambda r: r["task"]):
        metric = r.get("test_metric")
        value = f" {metric[:3]}={r[metric]:.3f}" if metric and r.get(metric) is not None else ""
        parts.append(f"{r['task']}: p={r['weight']:.3f} loss={r['train_loss']:.3f}{value}")
    return f"round {records[0]['round']:>3} | " + " | ".join(parts)


def follow_rounds(metrics: Path, seen: int, expected_per_round: int) -> int:
    """Print every complete round in ``metrics`` past line ``seen``; return the new line count."""
    if not metrics.exists():
        return seen
    lines = metrics.read_text().splitlines()
    complete = len(lines) - len(lines) % expected_per_round if expected_per_round else len(lines)
    for start in range(seen, complete, expected_per_round):
        print(_format_round([json.loads(x) for x in lines[start : start + expected_per_round]]), flush=True)
    return max(seen, complete)


def run_federation(out: Path, algorithm: str, rounds: int, seed: int, synthetic_size: int, certs: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    tasks = federation("radcom").task_names
    common = ["--seed", str(seed)]
    procs: list[ServiceProcess] = []
    agg, ready = start_aggregator(
        out,
        [
            *common,
            "--dataset",
            "radcom",
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
            f"\n== {algorithm}: aggregator on 127.0.0.1:{ready['grpc_port']} (metrics :{ready['metrics_port']}), "
            f"edge nodes {', '.join(tasks)}; mutual TLS",
            flush=True,
        )
        for task in tasks:
            procs.append(
                start_edge_node(
                    out,
                    ready["grpc_port"],
                    task,
                    # three nodes share the machine's cores: one torch thread each avoids oversubscription
                    [*common, "--synthetic-size", str(synthetic_size), "--torch-threads", "1"],
                    certs=certs,
                )
            )
        seen = 0
        while any(p.alive() for p in procs[1:]):
            seen = follow_rounds(metrics, seen, len(tasks))
            dead = [p for p in procs if p.proc is not None and p.proc.poll() not in (None, 0)]
            if dead:
                raise RuntimeError(f"{dead[0].name} failed:\n{dead[0].log_text()[-3000:]}")
            time.sleep(0.2)
        follow_rounds(metrics, seen, len(tasks))
    finally:
        for p in reversed(procs):
            p.stop()
    return metrics


def run_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    runs = {}
    t0 = time.perf_counter()
    certs = out / "certs"
    make_certificates(certs)  # the deployed default: mutual TLS, also on loopback
    for algorithm in [a for a in args.algorithms.split(",") if a]:
        runs[algorithm] = run_federation(out / algorithm, algorithm, args.rounds, args.seed, args.synthetic_size, certs)
    png = plot_comparison(runs, out / "comparison.png")
    print()
    print(final_table(runs))
    print(f"\nplot: {png}\nlogs and state: {out}/<algorithm>/   wall time {time.perf_counter() - t0:.0f} s")
    return 0
