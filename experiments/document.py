"""docs/results.md from finished runs: the prose is ``results_template.md``, each slot is computed here.

:func:`render` fills the template's ``${slot}`` placeholders (:class:`string.Template`) with the values
the functions below compute from the grouped runs: tables, figures, verdict sentences and the numbers
of the machine and of the invocation.
"""

from __future__ import annotations

import os
import string
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from experiments import analysis as an
from experiments.figures import LABELS, snr_figure, training_figure
from experiments.runs import ALGORITHMS

if TYPE_CHECKING:
    from experiments.reproduce import Plan

TEMPLATE = string.Template(Path(__file__).with_name("results_template.md").read_text(encoding="utf-8"))

# Table II of the paper (real MTFL, imbalanced allocation, after 100 epochs).
PAPER_TABLE_II = {
    "fedrep": {"landmarks": 33.28, "gender": 0.66, "smile": 0.60, "glasses": 0.44, "pose": 1.1},
    "fedgradnorm": {"landmarks": 33.25, "gender": 0.56, "smile": 0.57, "glasses": 0.43, "pose": 1.1},
}
PAPER_TASK_NAMES = {
    "landmarks": "face landmark",
    "gender": "gender",
    "smile": "smile",
    "glasses": "glass",
    "pose": "pose",
}
FRACTIONS = (0.5, 0.9)  # the loss levels of the races: this much of each task's drop


# ---------------------------------------------------------------------------------------------
# Tables and sentences
# ---------------------------------------------------------------------------------------------


def _verdict_cell(v: an.Verdict) -> str:
    if v.n > 1:
        return f"**{v.word}** ({v.diff:+.2g} ± {v.se:.2g})"
    return f"**{v.word}** ({v.diff:+.2g}, 1 seed)"


def _final_table(runs: dict, tasks: list[str], what: str, lower: bool, digits: int = 3) -> tuple[list[str], dict]:
    """Markdown rows (FedRep, FedGradNorm, verdict) of a final quantity, and the verdicts per task."""
    header = "| | " + " | ".join(tasks) + " |"
    lines = [header, "|---" * (len(tasks) + 1) + "|"]
    values = {a: {t: an.final_values(runs[a], t, what) for t in tasks} for a in ALGORITHMS}
    for a in ALGORITHMS:
        cells = [an.stat(list(values[a][t].values())).fmt(digits) for t in tasks]
        lines.append(f"| {LABELS[a]} | " + " | ".join(cells) + " |")
    verdicts = {t: an.paired_verdict(values["fedgradnorm"][t], values["fedrep"][t], lower) for t in tasks}
    lines.append("| FedGradNorm − FedRep | " + " | ".join(_verdict_cell(verdicts[t]) for t in tasks) + " |")
    return lines, verdicts


def _reach_table(runs: dict, tasks: list[str], fractions: Sequence[float]) -> list[str]:
    lines = [
        "| task | level | target loss | FedRep rounds | FedGradNorm rounds |",
        "|---|---|---|---|---|",
    ]
    for t in tasks:
        for f in fractions:
            reach = an.rounds_to_fraction(runs, t, f)
            if not reach.meaningful:
                lines.append(
                    f"| {t} | {int(f * 100)} % of the drop | - | no real drop: {reach.start:.4g} at round 0, "
                    f"{reach.start - reach.drop:.4g} at best | - |"
                )
                continue
            lines.append(
                f"| {t} | {int(f * 100)} % of the drop | {reach.target:.4g} | "
                f"{an.fmt_reach(reach.rounds['fedrep'])} | {an.fmt_reach(reach.rounds['fedgradnorm'])} |"
            )
    return lines


def _race_counts(experiments: Sequence[tuple[dict, list[str]]], fractions: Sequence[float]) -> dict[str, int]:
    """How often FedGradNorm reaches a loss level sooner, at the same round, or later than FedRep."""
    counts = {"faster": 0, "same": 0, "slower": 0}
    for runs, tasks in experiments:
        horizon = len(an.curve(next(iter(runs["fedrep"].values()))[1], tasks[0], "test_loss"))
        for t in tasks:
            for f in fractions:
                reach = an.rounds_to_fraction(runs, t, f)
                if not reach.meaningful:
                    continue
                mean = {
                    a: sum(horizon if r is None else r for r in rounds) / len(rounds)
                    for a, rounds in reach.rounds.items()
                }
                diff = mean["fedgradnorm"] - mean["fedrep"]
                counts["faster" if diff <= -1 else "slower" if diff >= 1 else "same"] += 1
    return counts


def _summary_words(verdicts: dict[str, an.Verdict]) -> str:
    parts = []
    for word in ("wins", "ties", "loses"):
        tasks = [t for t, v in verdicts.items() if v.word == word]
        if tasks:
            parts.append(f"{word} on {', '.join(tasks)}")
    return "; ".join(parts)


def _weights_course(runs: dict, task: str) -> str:
    """What ``task``'s weight did (mean over seeds) and which task ends with the largest weight."""
    weights = np.stack([an.curve(recs, task, "weight") for _, recs in runs["fedgradnorm"].values()]).mean(axis=0)
    finals = {
        t: float(np.mean([an.curve(recs, t, "weight")[-1] for _, recs in runs["fedgradnorm"].values()]))
        for t in an.tasks_of(next(iter(runs["fedgradnorm"].values()))[1])
    }
    top = max(finals, key=lambda t: finals[t])
    peak = int(weights.argmax())
    course = (
        f"rises to {weights.max():.3f} by round {peak}, then ends at {weights[-1]:.3f}"
        if weights.max() > 1.0 + 1e-3
        else f"never rises above 1 and ends at {weights[-1]:.3f} (lowest {weights.min():.3f})"
    )
    return (
        f"the {task} weight (mean over seeds) {course}; the largest final weight is that of {top} ({finals[top]:.3f})"
    )


def _weights_table(runs: dict, tasks: list[str]) -> list[str]:
    """FedGradNorm's weights (final, and their range over rounds) beside each task's gradient norm."""
    lines = [
        "| task | final p | p range over rounds | ‖∇_ω̃ F‖, mean over rounds (FedRep) | (FedGradNorm) |",
        "|---|---|---|---|---|",
    ]
    for t in tasks:
        weights = [an.curve(recs, t, "weight") for _, recs in runs["fedgradnorm"].values()]
        final = an.stat([float(w[-1]) for w in weights])
        lo = min(float(w.min()) for w in weights)
        hi = max(float(w.max()) for w in weights)
        norms = {
            a: an.stat([float(an.curve(recs, t, "grad_norm").mean()) for _, recs in runs[a].values()])
            for a in ALGORITHMS
        }
        lines.append(
            f"| {t} | {final.fmt(3)} | {lo:.3f} – {hi:.3f} | {norms['fedrep'].mean:.4g} | {norms['fedgradnorm'].mean:.4g} |"
        )
    return lines


def _snr_table(runs: dict, tasks: list[str]) -> list[str]:
    snrs = sorted(
        {
            int(s)
            for a in ALGORITHMS
            for r, _ in runs[a].values()
            for t in tasks
            for s in r["final"][t]["accuracy_by_snr"]
        }
    )
    lines = [
        "| task | algorithm | " + " | ".join(f"{s} dB" for s in snrs) + " |",
        "|---|---" + "|---" * len(snrs) + "|",
    ]
    for t in tasks:
        for a in ALGORITHMS:
            cells = []
            for s in snrs:
                by_snr = [r["final"][t]["accuracy_by_snr"] for r, _ in runs[a].values()]
                vals = [d[str(s)] for d in by_snr if str(s) in d]
                cells.append(f"{sum(vals) / len(vals):.2f}" if vals else "-")
            lines.append(f"| {t} | {LABELS[a]} | " + " | ".join(cells) + " |")
    return lines


def _paper_table(tasks: list[str]) -> list[str]:
    """The paper's own Table II, in the columns of ``tasks``."""
    lines = ["| | " + " | ".join(PAPER_TASK_NAMES[t] for t in tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for a in ALGORITHMS:
        lines.append(f"| paper, {LABELS[a]} | " + " | ".join(f"{PAPER_TABLE_II[a][t]:g}" for t in tasks) + " |")
    return lines


def _runs_table(timing: dict[str, Any]) -> list[str]:
    lines = ["| run | wall s | CPU s |", "|---|---|---|"]
    for r in sorted(timing["runs"], key=lambda r: r["key"]):
        lines.append(f"| {r['key']} | {r['wall']:.0f} | {r['cpu']:.0f} |")
    return lines


# ---------------------------------------------------------------------------------------------
# Slots
# ---------------------------------------------------------------------------------------------


def _machine_slots(info: dict[str, Any], timing: dict[str, Any]) -> dict[str, Any]:
    """The machine, its load and what this invocation took."""
    load, load_end = info["loadavg_start"], info["loadavg_end"]
    return {
        "date": info["date"],
        "nproc": info["nproc"],
        "cpu": info["cpu"],
        "mem_gib": info["mem_gib"],
        "python": info["python"],
        "torch": info["torch"],
        "niceness": info["niceness"],
        "workers": timing["workers"],
        "load_start": "/".join(f"{x:.1f}" for x in load[:3]),
        "load_end": "/".join(f"{x:.1f}" for x in load_end[:3]),
        "busy": " (other work shared the machine, so the times are pessimistic)" if max(load) > info["nproc"] else "",
        "total_minutes": f"{timing['total_seconds'] / 60:.1f}",
        "data_seconds": f"{timing['data_seconds']:.0f}",
        "runs": len(timing["runs"]),
        "train_minutes": f"{timing['train_seconds'] / 60:.1f}",
        "reused": timing["reused"],
        "cpu_minutes": f"{timing['cpu_seconds'] / 60:.1f}",
        "idle_minutes": f"{timing['cpu_seconds'] / 60 / 2:.0f}",
        "earlier_invocations": "".join(
            f"\n\n{_invocation_sentence(inv)}" for inv in timing.get("trained_by", []) if inv["date"] != info["date"]
        ),
    }


def _invocation_sentence(inv: dict[str, Any]) -> str:
    """An earlier invocation that trained some of the runs reused here."""
    note = f", {inv['note']}" if inv.get("note") else ""
    return (
        f"Runs reused here were trained by the invocation of {inv['date']}: {inv['runs_trained']} runs in "
        f"{inv['minutes']:.1f} min of wall time, {inv['workers']} at a time, niceness {inv['niceness']}, load "
        f"average {inv['loadavg_start'][0]:.1f} at its start and {inv['loadavg_end'][0]:.1f} at its end{note}. "
        "Runs it did not train come from an earlier invocation that was stopped after finishing them; "
        "every run's own wall time is in the last table."
    )


def _figure_slots(grouped: an.Grouped, plan: Plan, img_dir: Path, img_prefix: str) -> dict[str, str]:
    """Draw the four figures into ``img_dir``; their paths relative to the document's folder."""
    imb, bal, rad = grouped["mtfl-imbalanced"], grouped["mtfl-balanced"], grouped["radcom"]
    n, nb = len(plan.seeds), len(plan.balanced_seeds)
    figs = {
        "imbalanced_figure": training_figure(
            imb,
            "test_loss",
            f"MTFL imbalanced (Table II): test loss per round, mean over {n} seeds (band: min-max)",
            img_dir / f"{img_prefix}mtfl-imbalanced.png",
            log_tasks=("landmarks",),
        ),
        "balanced_figure": training_figure(
            bal,
            "test_loss",
            f"MTFL balanced (Fig. 2): test loss per round, seed {', '.join(map(str, plan.balanced_seeds))}"
            if nb == 1
            else f"MTFL balanced (Fig. 2): test loss per round, mean over {nb} seeds (band: min-max)",
            img_dir / f"{img_prefix}mtfl-balanced.png",
            log_tasks=("landmarks",),
        ),
        "radcom_figure": training_figure(
            rad,
            "metric",
            f"RadCom (Fig. 3): test accuracy per round, mean over {n} seeds (band: min-max)",
            img_dir / f"{img_prefix}radcom.png",
        ),
        "snr_figure": snr_figure(
            rad,
            f"RadCom: final models' accuracy against SNR, mean over {n} seeds",
            img_dir / f"{img_prefix}radcom-snr.png",
        ),
    }
    return {k: os.path.relpath(v, img_dir.parent) for k, v in figs.items()}


def _tasks(grouped: an.Grouped) -> dict[str, list[str]]:
    """Each experiment's tasks in the order of the records (both MTFL experiments: those of the imbalanced one)."""
    mtfl = an.tasks_of(next(iter(grouped["mtfl-imbalanced"]["fedrep"].values()))[1])
    radcom = an.tasks_of(next(iter(grouped["radcom"]["fedrep"].values()))[1])
    return {"mtfl-imbalanced": mtfl, "mtfl-balanced": mtfl, "radcom": radcom}


def _result_slots(grouped: an.Grouped, plan: Plan) -> dict[str, Any]:
    """The final-value tables and the verdict sentences drawn from them."""
    imb, bal, rad = grouped["mtfl-imbalanced"], grouped["mtfl-balanced"], grouped["radcom"]
    tasks = _tasks(grouped)
    mtfl_tasks, rad_tasks = tasks["mtfl-imbalanced"], tasks["radcom"]
    tables = {
        "imbalanced_test": _final_table(imb, mtfl_tasks, "test_loss", True, 3),
        "imbalanced_train": _final_table(imb, mtfl_tasks, "train_loss", True, 3),
        "balanced_test": _final_table(bal, mtfl_tasks, "test_loss", True, 3),
        "radcom_accuracy": _final_table(rad, rad_tasks, "value", False, 3),
        "radcom_loss": _final_table(rad, rad_tasks, "test_loss", True, 3),
    }
    slots: dict[str, Any] = {}
    for name, (lines, verdicts) in tables.items():
        slots[f"{name}_table"] = "\n".join(lines)
        slots[f"{name}_verdicts"] = _summary_words(verdicts)
    counted = [tables[k][1] for k in ("imbalanced_test", "balanced_test", "radcom_accuracy")]
    for word in ("wins", "ties", "loses"):
        slots[word] = sum(1 for vs in counted for v in vs.values() if v.word == word)
    slots["comparisons"] = slots["wins"] + slots["ties"] + slots["loses"]
    nb = len(plan.balanced_seeds)
    slots["one_seed_note"] = " (one seed: no error estimate)" if nb == 1 else ""
    slots["balanced_seeds_note"] = (
        f"one seed, {plan.balanced_seeds[0]}: no error estimate, see the verdict rule" if nb == 1 else f"{nb} seeds"
    )
    slots["snr_table"] = "\n".join(_snr_table(rad, rad_tasks))
    slots["paper_table"] = "\n".join(_paper_table(mtfl_tasks))
    return slots


def _landmark_slots(grouped: an.Grouped) -> dict[str, str]:
    """The landmark task's loss at round 0 and at the end, and its final error in pixels."""
    imb = grouped["mtfl-imbalanced"]
    final = {a: an.stat(list(an.final_values(imb[a], "landmarks", "test_loss").values())) for a in ALGORITHMS}
    px = {a: an.stat(list(an.final_values(imb[a], "landmarks", "value").values())) for a in ALGORITHMS}
    start = float(an.mean_curve(imb["fedrep"], "landmarks", "test_loss")[0][0])
    return {
        "landmark_start": f"{start:.1f}",
        **{f"landmark_final_{a}": final[a].fmt(1) for a in ALGORITHMS},
        **{f"landmark_px_{a}": px[a].fmt(2) for a in ALGORITHMS},
    }


def _training_slots(grouped: an.Grouped) -> dict[str, Any]:
    """Per experiment: the races to a loss level, the weights' course and the weights beside the norms."""
    experiments = {"imbalanced": "mtfl-imbalanced", "balanced": "mtfl-balanced", "radcom": "radcom"}
    focus = {"imbalanced": "landmarks", "balanced": "landmarks", "radcom": "modulation"}
    slots: dict[str, Any] = {}
    raced = []
    for name, experiment in experiments.items():
        runs, tasks = grouped[experiment], _tasks(grouped)[experiment]
        raced.append((runs, tasks))
        slots[f"{name}_reach_table"] = "\n".join(_reach_table(runs, tasks, FRACTIONS))
        slots[f"{name}_weights_table"] = "\n".join(_weights_table(runs, tasks))
        slots[f"{name}_weights"] = _weights_course(runs, focus[name])
    races = _race_counts(raced, FRACTIONS)
    return {**slots, **races, "races": sum(races.values())}


def _setup_slots(grouped: an.Grouped, plan: Plan) -> dict[str, Any]:
    """The plan's sizes, the clients' shares and the hyperparameters of the runs."""
    imb_result = next(iter(grouped["mtfl-imbalanced"]["fedrep"].values()))[0]
    bal_result = next(iter(grouped["mtfl-balanced"]["fedrep"].values()))[0]
    rad_result = next(iter(grouped["radcom"]["fedrep"].values()))[0]
    hp = imb_result["spec"]
    return {
        **asdict(plan),
        "seed_list": ", ".join(map(str, plan.seeds)),
        "seed_count": len(plan.seeds),
        "mtfl_test_faces": plan.mtfl_size * 3 // 10,
        "imbalanced_clients": ", ".join(f"{t} {c['train']}" for t, c in imb_result["clients"].items()),
        "mtfl_test_per_client": next(iter(imb_result["clients"].values()))["test"],
        "balanced_train_per_client": next(iter(bal_result["clients"].values()))["train"],
        "radcom_clients": ", ".join(f"{t} {c['train']}" for t, c in rad_result["clients"].items()),
        "radcom_test_per_client": next(iter(rad_result["clients"].values()))["test"],
        "gamma": hp["gamma"],
        "alpha": hp["alpha"],
        "beta": hp["beta"],
        "round_minibatches": plan.tau_h + plan.tau_omega,
        "passes": f"{plan.mtfl_rounds * (plan.tau_h + plan.tau_omega) * plan.batch_size / 3000:.1f}",
    }


def render(
    grouped: an.Grouped,
    plan: Plan,
    info: dict[str, Any],
    timing: dict[str, Any],
    img_dir: Path,
    img_prefix: str,
    command: str,
) -> str:
    """The text of docs/results.md; draws its four figures into ``img_dir`` on the way."""
    return TEMPLATE.substitute(
        command=command,
        **_machine_slots(info, timing),
        **_setup_slots(grouped, plan),
        **_result_slots(grouped, plan),
        **_landmark_slots(grouped),
        **_training_slots(grouped),
        **_figure_slots(grouped, plan, img_dir, img_prefix),
        runs_table="\n".join(_runs_table(timing)),
    )
