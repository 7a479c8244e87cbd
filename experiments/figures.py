"""Figures in the layout of the paper's Fig. 2 and Fig. 3, with the spread over seeds shaded."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from experiments.analysis import Records, mean_curve, tasks_of

Runs = Mapping[str, Mapping[int, tuple[dict[str, Any], Records]]]  # algorithm -> seed -> run
LABELS = {"fedgradnorm": "FedGradNorm", "fedrep": "FedRep", "alone": "the task alone"}
COLORS = {"fedgradnorm": "tab:red", "fedrep": "tab:blue", "alone": "tab:green"}
STYLES = {"fedgradnorm": "--", "fedrep": "-", "alone": ":"}  # dashed on top, so identical curves stay visible
YLABELS = {
    "test_loss": "test loss",
    "train_loss": "train loss F_k",
    "metric": "test accuracy",
}


def _grid(n: int) -> tuple[Any, np.ndarray]:
    cols = 2 if n <= 4 else 3
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.1 * rows), squeeze=False)
    return fig, axes.ravel()


def training_figure(
    runs: Runs,
    key: str,
    title: str,
    out_png: str | Path,
    log_tasks: tuple[str, ...] = (),
    references: Mapping[str, float] | None = None,
) -> Path:
    """One panel per task (each arm: mean over seeds, min-max shaded; an arm without the task is
    skipped), the task's reference level dotted where given, and one panel with the weights."""
    first = next(iter(runs["fedrep"].values()))[1]
    tasks = tasks_of(first)
    fig, flat = _grid(len(tasks) + 1)
    for i, task in enumerate(tasks):
        ax = flat[i]
        for algorithm, by_seed in sorted(runs.items(), key=lambda kv: kv[0] == "fedgradnorm"):
            if not by_seed or task not in tasks_of(next(iter(by_seed.values()))[1]):
                continue
            mean, lo, hi = mean_curve(by_seed, task, key)
            xs = np.arange(len(mean))
            ax.plot(
                xs,
                mean,
                STYLES.get(algorithm, "-"),
                color=COLORS.get(algorithm),
                label=LABELS.get(algorithm, algorithm),
                lw=1.3,
            )
            if len(by_seed) > 1:
                ax.fill_between(xs, lo, hi, color=COLORS.get(algorithm), alpha=0.18, lw=0)
        if references and task in references:
            ax.axhline(references[task], color="0.3", ls=":", lw=1.2, label="reference (constant)")
        if task in log_tasks:
            ax.set_yscale("log")
        ax.set_title(f"({chr(97 + i)}) {task}")
        ax.set_xlabel("round")
        ax.set_ylabel(YLABELS.get(key, key))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = flat[len(tasks)]
    fgn = runs.get("fedgradnorm", {})
    for task in tasks:
        if fgn:
            mean, lo, hi = mean_curve(fgn, task, "weight")
            xs = np.arange(len(mean))
            (line,) = ax.plot(xs, mean, lw=1.3, label=task)
            if len(fgn) > 1:
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    ax.axhline(1.0, color="0.4", ls="--", lw=1, label="FedRep (all 1)")
    ax.set_title(f"({chr(97 + len(tasks))}) task weights p (FedGradNorm)")
    ax.set_xlabel("round")
    ax.set_ylabel("p")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    for extra in flat[len(tasks) + 1 :]:
        extra.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)


def dial_figure(by_scale: Mapping[float, Runs], task: str, title: str, out_png: str | Path) -> Path:
    """The dial: per scale, one column: the mean test loss of every task over rounds for FedRep
    (solid) and FedGradNorm (dashed), and below it FedGradNorm's weight of the scaled ``task``."""
    scales = list(by_scale)
    fig, axes = plt.subplots(2, len(scales), figsize=(3.6 * len(scales), 5.4), squeeze=False, sharex=True)
    for col, scale in enumerate(scales):
        runs = by_scale[scale]
        tasks = tasks_of(next(iter(runs["fedrep"].values()))[1])
        ax, wax = axes[0][col], axes[1][col]
        for j, t in enumerate(tasks):
            color = f"C{j}"
            for algorithm in ("fedrep", "fedgradnorm"):
                mean, _, _ = mean_curve(runs[algorithm], t, "test_loss")
                mean = mean / (scale if t == task else 1.0)
                ax.plot(mean, STYLES[algorithm], color=color, lw=1.1, label=t if algorithm == "fedrep" else None)
            wmean, _, _ = mean_curve(runs["fedgradnorm"], t, "weight")
            wax.plot(wmean, color=color, lw=1.1)
        ax.set_title(f"{task} loss ×{scale:g}")
        ax.set_ylabel("test loss (unscaled)")
        ax.grid(alpha=0.3)
        wax.set_ylabel("p (FedGradNorm)")
        wax.set_xlabel("round")
        wax.grid(alpha=0.3)
        if col == 0:
            ax.legend(fontsize=7, title="solid FedRep, dashed FedGradNorm", title_fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)


def snr_figure(runs: Runs, title: str, out_png: str | Path) -> Path:
    """Accuracy of the final models against SNR, one panel per task (mean over seeds, min-max bars)."""
    first_result = next(iter(next(iter(runs.values())).values()))[0]
    tasks = [t for t, f in first_result["final"].items() if "accuracy_by_snr" in f]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.3 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes.ravel(), tasks, strict=True):
        for algorithm, by_seed in runs.items():
            per_seed = [r["final"][task]["accuracy_by_snr"] for r, _ in by_seed.values()]
            snrs = sorted({int(s) for d in per_seed for s in d})
            acc = np.array([[d.get(str(s), np.nan) for s in snrs] for d in per_seed])
            mean = np.nanmean(acc, axis=0)
            err = np.stack([mean - np.nanmin(acc, axis=0), np.nanmax(acc, axis=0) - mean])
            ax.errorbar(
                snrs,
                mean,
                yerr=err if len(per_seed) > 1 else None,
                marker="o",
                ms=3,
                capsize=2,
                color=COLORS.get(algorithm),
                label=LABELS.get(algorithm, algorithm),
            )
        ax.set_title(task)
        ax.set_xlabel("SNR (dB)")
        ax.set_ylabel("test accuracy, final model")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)


def _save(fig: Any, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
