"""Text tables of runs: the last round's per-task weights, losses and metrics, side by side."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedgradnorm.plotting import load_metrics

SHORT = {"accuracy": "accuracy", "landmark_error_px": "error px"}


def final_records(path: str | Path) -> dict[str, dict[str, Any]]:
    records = load_metrics(path)
    last = max(r["round"] for r in records)
    return {r["task"]: r for r in records if r["round"] == last}


def final_table(runs: Mapping[str, str | Path]) -> str:
    """One row per task and run: weight p, train loss F_k, test loss and the task's test metric."""
    finals = {label: final_records(p) for label, p in runs.items()}
    tasks = list(next(iter(finals.values())))
    width = max(len(label) for label in finals)
    header = f"{'task':<12} {'run':<{width}} {'p':>7} {'train loss':>11} {'test loss':>10} {'test metric':>20}"
    lines = [header, "-" * len(header)]
    for task in tasks:
        for label, recs in finals.items():
            r = recs.get(task)
            if r is None:
                continue
            metric = r.get("test_metric")
            shown = f"{r[metric]:.3f} {SHORT.get(metric, metric)}" if metric and r.get(metric) is not None else "-"
            test_loss = f"{r['test_loss']:.4f}" if r.get("test_loss") is not None else "-"
            lines.append(
                f"{task:<12} {label:<{width}} {r['weight']:>7.3f} {r['train_loss']:>11.4f} {test_loss:>10} {shown:>20}"
            )
    last_round = max(r["round"] for r in next(iter(finals.values())).values())
    return f"after round {last_round} (rounds counted from 0)\n" + "\n".join(lines)
