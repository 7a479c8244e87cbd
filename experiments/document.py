"""docs/results.md from the finished runs of a plan: every table, figure and verdict computed here.

:func:`render` writes one section per experiment of :class:`experiments.reproduce.Plan`. A section
whose runs are not all finished says how many are and is filled in by the invocation that finishes
them (``make reproduce`` resumes), so the document is true at every stage; the verdicts use only
finished sections.

Every result stands beside its task's reference level (the best constant prediction: the class
prior, the training mean) and a verdict between the algorithms is drawn only where both beat it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from experiments import analysis as an
from experiments.figures import LABELS, dial_figure, snr_figure, training_figure
from experiments.runs import (
    ALGORITHMS,
    DIAL_TASK,
    MASKING,
    RunSpec,
    alone_name,
    dial_name,
    federation_tasks,
    sweep_name,
)
from fedgradnorm.hyperparameters import ALPHA, BETA, GAMMA

if TYPE_CHECKING:
    from experiments.reproduce import Plan

# Table II of the paper (real MTFL, imbalanced allocation, after 100 epochs).
PAPER_TABLE_II = {
    "fedrep": {"landmarks": 33.28, "gender": 0.66, "smile": 0.60, "glasses": 0.44, "pose": 1.1},
    "fedgradnorm": {"landmarks": 33.25, "gender": 0.56, "smile": 0.57, "glasses": 0.43, "pose": 1.1},
}
REACH = 0.5  # time to target: rounds to cover this fraction of a task's loss drop


class Doc:
    """The finished runs of a plan, by experiment, and how many each experiment plans."""

    def __init__(self, grouped: an.Grouped, specs: Sequence[RunSpec]) -> None:
        self.grouped = grouped
        self.planned: dict[str, int] = {}
        self.arms: dict[str, set[str]] = {}
        for s in specs:
            self.planned[s.experiment] = self.planned.get(s.experiment, 0) + 1
            self.arms.setdefault(s.experiment, set()).add(s.algorithm)

    def count(self, experiment: str) -> int:
        return sum(len(by_seed) for by_seed in self.grouped.get(experiment, {}).values())

    def complete(self, *experiments: str) -> bool:
        """Every planned run of these experiments has finished."""
        return all(self.count(e) >= self.planned.get(e, 0) > 0 for e in experiments)

    def ready(self, *experiments: str) -> bool:
        """Each of these experiments has at least one seed finished in every arm."""
        return all(any(self.runs(e).values()) for e in experiments)

    def runs(self, experiment: str) -> an.Runs:
        """The finished runs, on the seeds that every planned arm of the experiment has finished."""
        found = self.grouped.get(experiment, {})
        arms = self.arms.get(experiment, set(found))
        seeds = set.intersection(*(set(found.get(a, {})) for a in arms)) if arms else set()
        return {a: {s: run for s, run in found.get(a, {}).items() if s in seeds} for a in arms}

    def status(self, *experiments: str) -> str:
        """Nothing when every run of these experiments has finished; else what the section stands on."""
        if self.complete(*experiments):
            return ""
        return self._note("Partial", experiments, "the tables use the seeds finished in every arm. ")

    def pending(self, *experiments: str) -> str:
        """The line of a section that cannot be drawn yet."""
        return self._note("Pending", experiments, "")

    def _note(self, head: str, experiments: Sequence[str], middle: str) -> str:
        done = sum(self.count(e) for e in experiments)
        planned = sum(self.planned.get(e, 0) for e in experiments)
        return (
            f"*{head}: {done} of {planned} runs of this section have finished; {middle}`make reproduce` trains the "
            "rest (it resumes where the last invocation stopped).*"
        )


def _f(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if abs(x) >= 1000 or (0 < abs(x) < 0.001) else f"{x:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _cell(values: dict[int, float], digits: int = 3) -> str:
    return an.stat(list(values.values())).fmt(digits) if values else "-"


# ---------------------------------------------------------------------------------------------
# The comparison table of one setting: reference level, controls, both algorithms, the verdict
# ---------------------------------------------------------------------------------------------


def comparison(
    doc: Doc, experiment: str, what: str, controls: dict[str, Callable[[str], str]]
) -> tuple[str, dict[str, an.Verdict]]:
    """Rows per task: reference level, each control (label -> the control's experiment for a task),
    FedRep, FedGradNorm, and the verdict. ``what``: ``test_loss`` or ``value``."""
    runs = doc.runs(experiment)
    tasks = an.tasks_of(next(iter(runs["fedrep"].values()))[1])
    first = next(iter(runs["fedrep"].values()))[0]["final"]
    header = ["task", "reference (constant)", *controls, "FedRep", "FedGradNorm", "FedGradNorm vs FedRep"]
    rows, verdicts = [], {}
    for t in tasks:
        ref = an.reference_values(runs["fedrep"], t, what)
        cells = [t, _cell(ref)]
        for control_of in controls.values():
            control = doc.runs(control_of(t)).get("fedrep", {})
            values = an.final_values(control, t, what) if control and t in _final_tasks(control) else {}
            cells.append(_cell(values))
        values = {a: an.final_values(runs[a], t, what) for a in ALGORITHMS}
        cells += [_cell(values["fedrep"]), _cell(values["fedgradnorm"])]
        lower = what == "test_loss" or not _higher(first, t)  # each task's own metric decides
        verdict = an.verdict_against_reference(runs, t, what, lower)
        verdicts[t] = verdict
        cells.append(_verdict_cell(verdict))
        rows.append(cells)
    return _table(header, rows), verdicts


LATE = 0.1  # the late-training average: the last 10 % of the rounds


def late_table(runs: an.Runs, key: str) -> tuple[str, dict[str, an.Verdict]]:
    """Per task, the per-round evaluation averaged over the last 10 % of the rounds (less noisy than one
    final model), both arms, the reference level on the same evaluation subset and the verdict."""
    first = next(iter(runs["fedrep"].values()))
    tasks = an.tasks_of(first[1])
    rounds = len(an.curve(first[1], tasks[0], "test_loss"))
    window = max(1, round(LATE * rounds))
    rows, verdicts = [], {}
    for t in tasks:
        lower = key == "test_loss" or not _higher(first[0]["final"], t)
        values = {
            a: {s: float(an.curve(recs, t, key)[-window:].mean()) for s, (_, recs) in runs[a].items()}
            for a in ALGORITHMS
        }
        ref_key = "test_loss" if key == "test_loss" else "value"
        ref = {s: float(r["final"][t]["reference_eval"][ref_key]) for s, (r, _) in runs["fedrep"].items()}
        beat = {a: an.beats_reference(values[a], ref, lower) for a in ALGORITHMS}
        v = an.paired_verdict(values["fedgradnorm"], values["fedrep"], lower)
        if not all(beat.values()):
            v = an.Verdict(an.reference_word(beat), v.diff, v.se, v.n)
        verdicts[t] = v
        rows.append([t, _cell(ref), _cell(values["fedrep"]), _cell(values["fedgradnorm"]), _verdict_cell(v)])
    header = ["task", "reference (constant)", "FedRep", "FedGradNorm", "FedGradNorm vs FedRep"]
    return f"(mean of the last {window} rounds)\n\n" + _table(header, rows), verdicts


def _final_tasks(runs: dict[int, tuple[dict[str, Any], Any]]) -> set[str]:
    return set(next(iter(runs.values()))[0]["final"])


def _higher(final: dict[str, Any], task: str) -> bool:
    return final[task]["metric"] in ("accuracy", "binary_accuracy")


def _verdict_cell(v: an.Verdict) -> str:
    if v.word in ("wins", "ties", "loses"):
        spread = f" ± {v.se:.2g}" if v.n > 1 else ", 1 seed"
        return f"**{v.word}** ({v.diff:+.2g}{spread})"
    return f"**{v.word}**"


def _summary(verdicts: dict[str, an.Verdict]) -> str:
    parts = []
    for word in an.VERDICT_WORDS:
        tasks = [t for t, v in verdicts.items() if v.word == word]
        if tasks:
            parts.append(
                f"{word} on {', '.join(tasks)}" if word in ("wins", "ties", "loses") else f"{word}: {', '.join(tasks)}"
            )
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

Section = Callable[[Doc, "Plan", Path, str], tuple[str, list[str]]]  # (markdown, verdict bullets)


def _fig(path: Path, img_dir: Path) -> str:
    return os.path.relpath(path, img_dir.parent)


def _references(runs: an.Runs) -> dict[str, float]:
    """Per task, its reference loss on the per-round evaluation subset (mean over FedRep's seeds)."""
    out: dict[str, float] = {}
    for result, _ in runs.get("fedrep", {}).values():
        for t, f in result["final"].items():
            if "reference_eval" in f:
                out.setdefault(t, 0.0)
                out[t] += f["reference_eval"]["test_loss"] / len(runs["fedrep"])
    return out


def _open(doc: Doc, title: str, main: str, exps: Sequence[str]) -> tuple[list[str], an.Runs, int, int]:
    """A section's heading and status line, its main experiment's runs, their rounds and seed count
    (no runs: the section cannot be drawn yet, the status says so)."""
    if not doc.ready(main):
        return [title, doc.pending(*exps)], {}, 0, 0
    runs = doc.runs(main)
    first = next(iter(runs["fedrep"].values()))[0]
    return [title, doc.status(*exps)], runs, int(first["spec"]["rounds"]), len(runs["fedrep"])


def section_mtfl(doc: Doc, plan: Plan, img_dir: Path, prefix: str) -> tuple[str, list[str]]:
    exps = ("mtfl-imbalanced", MASKING, *[alone_name("mtfl", t) for t in federation_tasks("mtfl")])
    out, runs, rounds, n = _open(doc, "## Table II: MTFL, imbalanced allocation, 100 epochs", exps[0], exps)
    if not runs:
        return "\n\n".join(out), []
    controls = {"alone (learnability)": lambda t: alone_name("mtfl", t), "FedRep without landmarks": lambda t: MASKING}
    loss_table, verdicts = comparison(doc, "mtfl-imbalanced", "test_loss", controls)
    metric_table, metric_verdicts = comparison(doc, "mtfl-imbalanced", "value", controls)
    late = late_table(runs, "metric")
    fig = training_figure(
        {**runs, **_alone_runs(doc, "mtfl")},
        "test_loss",
        f"MTFL imbalanced: test loss per round (mean over {n} seeds, band min-max); dotted: reference level",
        img_dir / f"{prefix}mtfl-imbalanced.png",
        references=_references(runs),
    )
    missing = [e for e in exps[1:] if not doc.ready(e)]
    out += [
        f"Final models (ω_K, h_K) after {rounds} rounds on each client's whole test split, mean ± standard deviation "
        f"over {n} seed(s). Test loss (landmarks: MSE of the standardized coordinates; the others: cross-entropy):",
        loss_table,
        "Test metric (landmarks: mean landmark error in pixels of the 40×40 image, lower is better; the others: "
        "accuracy, the reference is the majority class):",
        metric_table,
        "One final model is a noisy reading of a curve that still moves from round to round; the same metric averaged "
        "over the last rounds of the per-round evaluation (its fixed test subset) " + late[0],
        f"![MTFL imbalanced]({_fig(fig, img_dir)})",
        "The paper's Table II (real MTFL, 100 epochs; its landmark loss is in the units of its own image scale):",
        _paper_table(),
    ]
    if missing:
        out.append("Controls not finished yet (their cells show `-`): " + ", ".join(missing) + ".")
    out += [_weights_paragraph(runs, "landmarks")]
    bullets = [
        f"**MTFL imbalanced (Table II), {rounds} rounds, {n} seed(s)**: test loss: {_summary(verdicts)}; "
        f"test metric: {_summary(metric_verdicts)}; test metric averaged over the last {LATE:.0%} of the rounds: "
        f"{_summary(late[1])}."
    ]
    return "\n\n".join(out), bullets


def _alone_runs(doc: Doc, federation: str) -> dict[str, Any]:
    """The alone controls as one pseudo-algorithm ``alone``: seed -> (result, records of every task)."""
    merged: dict[int, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for name, by_algorithm in doc.grouped.items():
        if not name.startswith(f"alone-{federation}-"):
            continue
        for seed, (result, records) in by_algorithm.get("fedrep", {}).items():
            base = merged.setdefault(seed, ({"final": {}}, []))
            base[0]["final"].update(result["final"])
            base[1].extend(records)
    return {"alone": merged} if merged else {}


def _paper_table() -> str:
    tasks = list(PAPER_TABLE_II["fedrep"])
    return _table(
        ["", *tasks], [[f"paper, {LABELS[a]}", *(f"{PAPER_TABLE_II[a][t]:g}" for t in tasks)] for a in ALGORITHMS]
    )


def _weights_paragraph(runs: an.Runs, task: str) -> str:
    """FedGradNorm's weights beside each task's gradient norm on ω̃, and where ``task``'s weight went."""
    fgn = runs["fedgradnorm"]
    tasks = an.tasks_of(next(iter(fgn.values()))[1])
    rows = []
    for t in tasks:
        weights = [an.curve(recs, t, "weight") for _, recs in fgn.values()]
        balance = [an.balance_weights(recs, t) for _, recs in fgn.values()]
        reached = [an.first_within(w, b, 0.1) for w, b in zip(weights, balance, strict=True)]
        norms = {
            a: np.mean([an.curve(recs, t, "grad_norm").mean() for _, recs in runs[a].values()]) for a in ALGORITHMS
        }
        rows.append(
            [
                t,
                an.stat([float(w[-1]) for w in weights]).fmt(3),
                an.stat([float(np.mean(b[-5:])) for b in balance]).fmt(3),
                an.fmt_reach(reached),
                f"{min(float(w.min()) for w in weights):.3f} – {max(float(w.max()) for w in weights):.3f}",
                f"{norms['fedrep']:.4g}",
                f"{norms['fedgradnorm']:.4g}",
            ]
        )
    w = np.stack([an.curve(recs, task, "weight") for _, recs in fgn.values()]).mean(axis=0)
    return (
        f"FedGradNorm's weights (mean over seeds): the {task} weight goes from {w[0]:.3f} to {w[-1]:.3f} "
        f"(lowest {w.min():.3f} at round {int(w.argmin())}, highest {w.max():.3f} at round {int(w.argmax())}). "
        "The balance point of a weight is where GradNorm's rule stops moving it, p* = target / ‖∇_ω̃ F‖ "
        "(its weighted gradient norm on target; mean of the last 5 rounds), with the first round the weight came "
        "within 10 % of it; beside them the mean norm of each task's gradient on ω̃ (the last shared layer, which "
        "GradNorm balances):"
        + "\n\n"
        + _table(
            [
                "task",
                "final p",
                "balance p*",
                "first round within 10 % of p*",
                "p over rounds",
                "‖∇_ω̃ F‖ FedRep",
                "‖∇_ω̃ F‖ FedGradNorm",
            ],
            rows,
        )
    )


def section_radcom(doc: Doc, plan: Plan, img_dir: Path, prefix: str) -> tuple[str, list[str]]:
    exps = ("radcom", *[alone_name("radcom", t) for t in federation_tasks("radcom")])
    out, runs, rounds, n = _open(doc, "## Fig. 3: RadCom, 100 epochs", exps[0], exps)
    if not runs:
        return "\n\n".join(out), []
    controls = {"alone (learnability)": lambda t: alone_name("radcom", t)}
    acc_table, verdicts = comparison(doc, "radcom", "value", controls)
    loss_table, loss_verdicts = comparison(doc, "radcom", "test_loss", controls)
    late = late_table(runs, "metric")
    fig = training_figure(
        {**runs, **_alone_runs(doc, "radcom")},
        "metric",
        f"RadCom: test accuracy per round (mean over {n} seeds, band min-max)",
        img_dir / f"{prefix}radcom.png",
    )
    snr = snr_figure(
        runs, f"RadCom: final models' accuracy against SNR, mean over {n} seeds", img_dir / f"{prefix}radcom-snr.png"
    )
    out += [
        f"Final models after {rounds} rounds, whole test split, {n} seed(s). Test accuracy (reference: the majority class):",
        acc_table,
        "Test loss (cross-entropy; reference: the class prior):",
        loss_table,
        "One final model is a noisy reading of a curve that still moves from round to round; the accuracy averaged "
        "over the last rounds of the per-round evaluation (its fixed test subset) " + late[0],
        f"![RadCom]({_fig(fig, img_dir)})",
        f"![RadCom SNR]({_fig(snr, img_dir)})",
        _weights_paragraph(runs, "modulation"),
    ]
    missing = [e for e in exps[1:] if not doc.ready(e)]
    if missing:
        out.append("Controls not finished yet (their cells show `-`): " + ", ".join(missing) + ".")
    bullets = [
        f"**RadCom (Fig. 3), {rounds} rounds, {n} seed(s)**: test accuracy of the final models: {_summary(verdicts)}; "
        f"test loss: {_summary(loss_verdicts)}; accuracy averaged over the last {LATE:.0%} of the rounds: "
        f"{_summary(late[1])}."
    ]
    return "\n\n".join(out), bullets


def section_balanced(doc: Doc, plan: Plan, img_dir: Path, prefix: str) -> tuple[str, list[str]]:
    out, runs, rounds, n = _open(
        doc, "## Fig. 2: MTFL, balanced allocation, 100 epochs", "mtfl-balanced", ["mtfl-balanced"]
    )
    if not runs:
        return "\n\n".join(out), []
    table, verdicts = comparison(doc, "mtfl-balanced", "test_loss", {})
    fig = training_figure(
        runs,
        "test_loss",
        f"MTFL balanced: test loss per round ({n} seed(s)); dotted: reference level",
        img_dir / f"{prefix}mtfl-balanced.png",
        references=_references(runs),
    )
    out += [
        f"Final test loss after {rounds} rounds, {n} seed(s) (one seed: no error estimate):",
        table,
        f"![MTFL balanced]({_fig(fig, img_dir)})",
        _weights_paragraph(runs, "landmarks"),
    ]
    return "\n\n".join(out), [
        f"**MTFL balanced (Fig. 2), {rounds} rounds, {n} seed(s)**: test loss: {_summary(verdicts)}."
    ]


def section_masking(doc: Doc, plan: Plan, img_dir: Path, prefix: str) -> tuple[str, list[str]]:
    out = [
        "## Control: does the landmark task mask the others?",
        "FedRep with all five clients against FedRep without the landmark client (the same four attribute "
        "clients, data, seeds and rounds). If the landmark gradient dominates the aggregate, the attributes "
        "do better without it.",
    ]
    if not doc.ready(MASKING, "mtfl-imbalanced"):
        return "\n\n".join([*out, doc.pending(MASKING, "mtfl-imbalanced")]), []
    out.append(doc.status(MASKING, "mtfl-imbalanced"))
    with_ = doc.runs("mtfl-imbalanced")["fedrep"]
    without = doc.runs(MASKING)["fedrep"]
    tasks = sorted(_final_tasks(without), key=federation_tasks("mtfl").index)
    rows, verdicts = [], {}
    for t in tasks:
        a, b = an.final_values(with_, t, "test_loss"), an.final_values(without, t, "test_loss")
        v = an.paired_verdict(b, a)
        verdicts[t] = v
        rows.append([t, _cell(an.reference_values(with_, t, "test_loss")), _cell(a), _cell(b), _verdict_cell(v)])
    out.append(_table(["task", "reference", "FedRep, all five", "FedRep without landmarks", "without vs with"], rows))
    masked = [t for t, v in verdicts.items() if v.word == "wins"]
    helped = [t for t, v in verdicts.items() if v.word == "loses"]
    parts = [
        f"better without it on {', '.join(masked)} (masked by it)" if masked else "better without it on none",
        f"worse without it on {', '.join(helped)} (the landmark task helps them)" if helped else "",
    ]
    bullet = (
        "**Masking (FedRep without the landmark client)**: the attributes do " + "; ".join(p for p in parts if p) + "."
    )
    return "\n\n".join(out), [bullet]


def section_dial(doc: Doc, plan: Plan, img_dir: Path, prefix: str) -> tuple[str, list[str]]:
    names = [dial_name(s) for s in plan.loss_scales]
    out = [
        "## Where does FedGradNorm help? The dial",
        f"The same MTFL federation (imbalanced allocation) with the {DIAL_TASK} loss multiplied by "
        + ", ".join(f"{s:g}" for s in plan.loss_scales)
        + f", FedRep against FedGradNorm, {plan.dial_epochs:g} epochs. A larger factor makes the {DIAL_TASK} "
        "gradient dominate the aggregate, as pixel-unit targets did (their initial MSE was ~460 times the "
        "attributes' cross-entropies). Losses below are the *unscaled* task losses, so the rows compare.",
    ]
    scales = [(scale, name) for scale, name in zip(plan.loss_scales, names, strict=True) if doc.ready(name)]
    if not scales:
        return "\n\n".join([*out, doc.pending(*names)]), []
    out.append(doc.status(*names))
    if len(scales) < len(names):
        out.append("Scales drawn so far: " + ", ".join(f"×{s:g}" for s, _ in scales) + ".")
    tasks = list(federation_tasks("mtfl"))
    header = [
        "×",
        "task",
        "reference",
        "FedRep",
        "FedGradNorm",
        "FedGradNorm vs FedRep",
        f"rounds to {REACH:.0%} of the drop: FedRep",
        "FedGradNorm",
        f"final p_{DIAL_TASK}",
    ]
    rows, by_scale, final_p = [], {}, {}
    for scale, name in scales:
        runs = doc.runs(name)
        unscale = {DIAL_TASK: scale}
        verdicts = {}
        p = an.stat([float(an.curve(recs, DIAL_TASK, "weight")[-1]) for _, recs in runs["fedgradnorm"].values()])
        for t in tasks:
            div = unscale.get(t, 1.0)
            values = {a: {s: v / div for s, v in an.final_values(runs[a], t, "test_loss").items()} for a in ALGORITHMS}
            ref = {s: v / div for s, v in an.reference_values(runs["fedrep"], t, "test_loss").items()}
            v = an.verdict_from(values, ref, True)  # on the unscaled losses
            verdicts[t] = v
            reach = an.rounds_to_fraction(runs, t, REACH)
            race = (
                [an.fmt_reach(reach.rounds["fedrep"]), an.fmt_reach(reach.rounds["fedgradnorm"])]
                if reach.meaningful
                else ["no real drop", "-"]
            )
            rows.append(
                [
                    f"{scale:g}",
                    t,
                    _cell(ref),
                    _cell(values["fedrep"]),
                    _cell(values["fedgradnorm"]),
                    _verdict_cell(v),
                    *race,
                    p.fmt(3) if t == DIAL_TASK else "",
                ]
            )
        by_scale[scale] = verdicts
        final_p[scale] = p
    fig = dial_figure(
        {s: doc.runs(n) for s, n in scales},
        DIAL_TASK,
        f"The dial: {DIAL_TASK} loss ×{scales[0][0]:g} … ×{scales[-1][0]:g}; test loss per round (mean over seeds) and "
        f"p_{DIAL_TASK}",
        img_dir / f"{prefix}dial.png",
    )
    out += [_table(header, rows), f"![The dial]({_fig(fig, img_dir)})"]
    counts = {w: sum(v.word == w for vs in by_scale.values() for v in vs.values()) for w in an.VERDICT_WORDS}
    overview = ", ".join(f"{w} {n}" for w, n in counts.items() if n)
    bullets = [
        f"**The dial in all**: of its {sum(counts.values())} (scale, task) cells, on the unscaled test loss, "
        f"FedGradNorm against FedRep: {overview}."
    ]
    for scale, verdicts in by_scale.items():
        bullets.append(
            f"**Dial ×{scale:g}** ({DIAL_TASK} loss scaled, {plan.dial_epochs:g} epochs): FedGradNorm {_summary(verdicts)}; "
            f"its {DIAL_TASK} weight ends at {final_p[scale].fmt(3)}."
        )
    return "\n\n".join(out), bullets


def section_sweep(doc: Doc, plan: Plan, img_dir: Path, prefix: str) -> tuple[str, list[str]]:
    cells = [(a, g) for a in plan.alphas for g in plan.gammas]
    names = [dial_name(1) if (a, g) == (ALPHA, GAMMA) else sweep_name(a, g) for a, g in cells]
    out = [
        "## Sensitivity to α and γ",
        f"FedGradNorm on MTFL (imbalanced, {plan.dial_epochs:g} epochs, seed(s) "
        f"{', '.join(map(str, plan.sweep_seeds))}) for every (α, γ) below; the paper's α = {ALPHA:g}, γ = {GAMMA:g} "
        "is the primary cell (the dial's ×1 run). Every cell is reported; none was chosen. Final test loss per task "
        "(the FedRep row: the same seeds without weighting; the constant predictor row: each task's reference level).",
    ]
    if not doc.ready(*names):
        return "\n\n".join([*out, doc.pending(*dict.fromkeys(names))]), []
    out.append(doc.status(*dict.fromkeys(names)))
    tasks = list(federation_tasks("mtfl"))
    seeds = set(plan.sweep_seeds)
    rows = []
    fedrep = {s: r for s, r in doc.runs(dial_name(1))["fedrep"].items() if s in seeds}
    rows.append(["constant predictor", "-", *(_cell(an.reference_values(fedrep, t, "test_loss")) for t in tasks), ""])
    rows.append(["FedRep", "-", *(_cell(an.final_values(fedrep, t, "test_loss")) for t in tasks), ""])
    for (a, g), name in zip(cells, names, strict=True):
        runs = {s: r for s, r in doc.runs(name)["fedgradnorm"].items() if s in seeds}
        p = an.stat([float(an.curve(recs, "landmarks", "weight")[-1]) for _, recs in runs.values()])
        label = f"**{a:g}**" if (a, g) == (ALPHA, GAMMA) else f"{a:g}"
        rows.append([label, f"{g:g}", *(_cell(an.final_values(runs, t, "test_loss")) for t in tasks), p.fmt(3)])
    out.append(_table(["α", "γ", *tasks, "final p_landmarks"], rows))
    return "\n\n".join(out), []


SECTIONS: tuple[Section, ...] = (
    section_mtfl,
    section_masking,
    section_radcom,
    section_dial,
    section_sweep,
    section_balanced,
)


# ---------------------------------------------------------------------------------------------
# The document
# ---------------------------------------------------------------------------------------------


def _header(doc: Doc, specs: Sequence[RunSpec], info: dict[str, Any], timing: dict[str, Any], command: str) -> str:
    done = sum(doc.count(e) for e in doc.planned)
    planned = len(specs)
    load, load_end = info["loadavg_start"], info["loadavg_end"]
    left = _cpu_hours_left(doc, specs)
    status = (
        f"All {planned} runs of the plan have finished."
        if done >= planned
        else f"**{done} of {planned} runs of the plan have finished**; the sections still pending say so. "
        "`make reproduce` trains the rest: it keeps every finished run and resumes"
        + (
            f" (about {left:.1f} CPU-hours left, from the CPU time per client-round of the finished runs)."
            if left
            else "."
        )
    )
    lines = [
        "# Results: the paper's experiments, reproduced on synthetic data",
        f"Generated by `{command}` on {info['date']}. Nothing in this file is typed by hand except the paper's "
        "own numbers. Per-run metrics and results: the `--out` folder (`runs/reproduce` by default).",
        status,
        f"Machine: {info['nproc']} cores ({info['cpu']}, {info['isa']}), {info['mem_gib']} GiB, Python {info['python']}, torch "
        f"{info['torch']}; {timing['workers']} runs at a time, one torch thread each, niceness {info['niceness']}; load "
        f"average {'/'.join(f'{x:.1f}' for x in load[:3])} at the start, {'/'.join(f'{x:.1f}' for x in load_end[:3])} at "
        f"the end. This invocation took {timing['total_seconds'] / 60:.1f} min ({timing['train_seconds'] / 60:.1f} "
        f"training). The finished runs used {timing['cpu_seconds'] / 3600:.1f} CPU-hours in all.",
    ]
    return "\n\n".join(lines)


def _cpu_hours_left(doc: Doc, specs: Sequence[RunSpec]) -> float | None:
    """CPU-hours the unfinished runs need, from the finished runs' CPU seconds per client-round of
    the same federation (None if a federation has no finished run yet)."""
    per: dict[str, list[float]] = {}
    finished = set()
    for by_algorithm in doc.grouped.values():
        for by_seed in by_algorithm.values():
            for result, _ in by_seed.values():
                spec = RunSpec(**result["spec"])
                finished.add(spec.key)
                per.setdefault(spec.dataset, []).append(result["cpu_seconds"] / (spec.rounds * len(result["clients"])))
    total = 0.0
    for s in specs:
        if s.key in finished:
            continue
        if s.dataset not in per:
            return None
        total += s.rounds * len(s.clients) * float(np.median(per[s.dataset]))
    return total / 3600


def _setup(plan: Plan, specs: Sequence[RunSpec]) -> str:
    rounds = {s.experiment: s.rounds for s in specs}
    rows = [
        [
            "seeds",
            f"{', '.join(map(str, plan.seeds))} (partition, initialisation, minibatch order; both algorithms share each seed)",
        ],
        [
            "training length",
            f"{plan.epochs:g} epochs of the largest client, an epoch being one pass over its training data at "
            f"τ_h + τ_ω = {plan.tau_h + plan.tau_omega} minibatches of {plan.batch_size} per round: MTFL imbalanced "
            f"{rounds.get('mtfl-imbalanced')} rounds (3,000-face clients), balanced {rounds.get('mtfl-balanced')}, "
            f"RadCom {rounds.get('radcom')}. The dial and the sweep: {plan.dial_epochs:g} epochs "
            f"({rounds.get('dial-x1')} rounds). The other reading of the paper (one local epoch per round) is not run.",
        ],
        [
            "MTFL data",
            f"`fedgradnorm.data.synthetic_mtfl.generate_mtfl` (seed {plan.data_seed}): {plan.mtfl_size} training and "
            f"{plan.mtfl_size * 3 // 10} test faces, drawn at 250×250 and read as 40×40 grayscale; imbalanced: gender "
            "and glasses 500 faces, the others 3,000",
        ],
        [
            "landmark targets",
            "standardized by each landmark client on its own training targets (centred on the mean, unit variance per "
            "coordinate: `standardize = true` in `mtfl.toml`); the loss is MSE in those units, the error is reported in "
            "pixels of the 40×40 image",
        ],
        [
            "RadCom data",
            f"`fedgradnorm.data.synthetic_radcom.generate_radcom` (seed {plan.data_seed}): {plan.radcom_size} samples per "
            "(modulation, signal, SNR) key, 20 % of each client's share for testing; anomaly = SNR < −4 dB",
        ],
        ["networks", "Network 1 (MTFL), Network 2 (RadCom), Table I; a linear head per client"],
        [
            "hyperparameters",
            f"the paper's: γ = {GAMMA:g}, α = {ALPHA:g} (Adam on p), β = {BETA:g} (Adam on ω and on every local step); "
            "ω̃ = the last shared layer; p floored at 1e-3 and renormalised to sum N. Nothing was tuned.",
        ],
        [
            "reference level",
            "per task, the best constant prediction fitted on the client's training targets: the class prior "
            "(its arg-max, the majority class, for accuracy), the training mean for a regression",
        ],
        [
            "verdicts",
            "an arm *beats its reference* when its final value (test loss, or the metric in a metric table) is better "
            "than the reference level by more than two standard errors over seeds (one seed: by more than 2 %); a "
            "model can beat the majority class in accuracy and still have a worse test loss than the class prior "
            "(confident mistakes: over-fitting); FedGradNorm *wins*/*loses* against FedRep when "
            "the mean paired difference is beyond two standard errors (one seed: beyond 1 %), *ties* otherwise, and "
            "only when both arms beat the reference: otherwise the verdict says which arms stayed at it",
        ],
        [
            "evaluation",
            f"per round on a fixed {plan.mtfl_eval_test} (MTFL) / {plan.radcom_eval_test} (RadCom) test samples per client; "
            "the final model on the whole test split (the tables)",
        ],
        [
            "simulator",
            "`fedgradnorm.simulator.Simulation`, the same client and server steps as the gRPC services. A run "
            "repeats bit for bit on a machine of the same instruction set: oneDNN's convolutions round "
            "differently with AVX2 and AVX-512 (`ONEDNN_MAX_CPU_ISA=AVX2` on an AVX-512 machine changes the "
            "first round's losses), so the numbers below move in their last digits elsewhere",
        ],
    ]
    return "## Setup\n\n" + _table(["", ""], rows)


def _runs_table(doc: Doc, specs: Sequence[RunSpec], timing: dict[str, Any]) -> str:
    walls = {r["key"]: r for r in timing["runs"]}
    rows = []
    for s in specs:
        r = walls.get(s.key)
        rows.append([s.key, str(s.rounds), f"{r['wall']:.0f}" if r else "pending", f"{r['cpu']:.0f}" if r else ""])
    return "## Runs\n\n" + _table(["run", "rounds", "wall s", "CPU s"], rows)


def render(
    grouped: an.Grouped,
    plan: Plan,
    specs: Sequence[RunSpec],
    info: dict[str, Any],
    timing: dict[str, Any],
    img_dir: Path,
    img_prefix: str,
    command: str,
) -> str:
    """The text of docs/results.md (the figures of finished sections drawn into ``img_dir``)."""
    doc = Doc(grouped, specs)
    bodies, bullets = [], []
    for section in SECTIONS:
        body, said = section(doc, plan, img_dir, img_prefix)
        bodies.append(body)
        bullets += said
    verdict = "## Verdict\n\n" + (
        "\n".join(f"- {b}" for b in bullets) if bullets else "No section has finished yet: no verdict."
    )
    parts = [
        _header(doc, specs, info, timing, command),
        verdict,
        _setup(plan, specs),
        *bodies,
        _runs_table(doc, specs, timing),
    ]
    return "\n\n".join(parts) + "\n"
