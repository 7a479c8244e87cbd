"""Text tables of runs: the last round's per-task weights, losses and metrics, side by side."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fedgradnorm.plotting import load_metrics


def final_records(path: str | Path) -> dict[str, dict]:
    records = load_metrics(path)
    last = max(r["round"] for r in records)
    return {r["task"]: r for r in records if r["round"] == last}


def final_table(runs: Mapping[str, str | Path]) -> str:
    finals = {label: final_records(p) for label, p in runs.items()}
    tasks = list(next(iter(finals.values())))
    header = f"{'task':<12}" + "".join(
        f"{label + ' ' + col:>26}" for label in finals for col in ("p", "train loss", "test loss", "metric")
    )
    lines = [header, "-" * len(header)]
    for task in tasks:
        row = f"{task:<12}"
        for recs in finals.values():
            r = recs[task]
            metric = r["test_metric"]
            short = "acc" if metric == "accuracy" else "err px"
            row += f"{r['weight']:>26.3f}{r['train_loss']:>26.4f}{r['test_loss']:>26.4f}"
            row += f"{f'{r[metric]:.3f} {short}':>26}"
        lines.append(row)
    last_round = max(r["round"] for r in next(iter(finals.values())).values())
    return f"after round {last_round} (rounds counted from 0)\n" + "\n".join(lines)
