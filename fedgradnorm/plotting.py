"""Figures in the style of the paper's Fig. 2 and 3: per-task curves per round, and the task weights."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

Records = list[dict[str, Any]]
QUANTITIES = ("auto", "test_loss", "train_loss", "metric", "loss_ratio")


def load_metrics(path: str | Path) -> Records:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such metrics file")
    records = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{n}: not a JSON line ({e.msg})") from e
    if not records:
        raise ValueError(f"{p}: no records")
    return records


def series(records: Records, key: str) -> dict[str, tuple[list[int], list[float]]]:
    """task -> (rounds, values) of ``key`` (``metric`` picks each record's own test metric)."""
    out: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for r in records:
        value = r[r["test_metric"]] if key == "metric" else r.get(key)
        if value is None:
            continue
        xs, ys = out[r["task"]]
        xs.append(int(r["round"]))
        ys.append(float(value))
    return dict(out)


def _label(records: Records, key: str, task: str) -> str:
    if key != "metric":
        return key.replace("_", " ")
    metric = next(r["test_metric"] for r in records if r["task"] == task)
    return {"accuracy": "test accuracy", "landmark_error_px": "landmark error (px)"}.get(metric, str(metric))


def _auto_quantity(records: Records) -> str:
    return "metric" if all(r["test_metric"] == "accuracy" for r in records) else "test_loss"


def plot_comparison(
    runs: Mapping[str, str | Path],
    out_png: str | Path,
    quantity: str = "auto",
    references: Mapping[str, Mapping[str, float]] | None = None,
) -> Path:
    """One panel per task with every run's curve, and a last panel with the task weights.

    ``references``: task -> {"test_loss": ..., "metric": ...}, the task's reference level (its best
    constant prediction, :meth:`fedgradnorm.client.LocalClient.reference`), drawn dotted."""
    loaded = {label: load_metrics(path) for label, path in runs.items()}
    first = next(iter(loaded.values()))
    key = _auto_quantity(first) if quantity == "auto" else quantity
    tasks: Sequence[str] = list(dict.fromkeys(r["task"] for r in first))
    n = len(tasks) + 1
    cols = 2 if n <= 4 else 3
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    flat = axes.ravel()
    styles = ["-", "--", ":", "-."]
    for i, task in enumerate(tasks):
        ax = flat[i]
        for j, (label, records) in enumerate(loaded.items()):
            xs, ys = series(records, key).get(task, ([], []))
            ax.plot(xs, ys, styles[j % len(styles)], label=label)
        level = (references or {}).get(task, {}).get(key)  # "test_loss" or "metric"; none for other quantities
        if level is not None:
            ax.axhline(level, color="0.3", ls=":", lw=1.3, label="constant predictor")
        ax.set_title(f"({chr(97 + i)}) {task}")
        ax.set_xlabel("round")
        ax.set_ylabel(_label(first, key, task))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = flat[len(tasks)]
    for j, (label, records) in enumerate(loaded.items()):
        for task, (xs, ys) in series(records, "weight").items():
            ax.plot(xs, ys, styles[j % len(styles)], label=f"{task} ({label})" if len(loaded) > 1 else task)
    ax.set_title(f"({chr(97 + len(tasks))}) task weights p")
    ax.set_xlabel("round")
    ax.set_ylabel("p")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    for extra in flat[n:]:
        extra.set_visible(False)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_run(metrics: str | Path, out_png: str | Path, quantity: str = "auto") -> Path:
    records = load_metrics(metrics)
    return plot_comparison({records[0].get("algorithm", "run"): metrics}, out_png, quantity)
