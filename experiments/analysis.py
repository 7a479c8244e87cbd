"""Numbers from finished runs: final-loss tables over seeds, paired verdicts, rounds to a loss level."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Records = list[dict[str, Any]]
# experiment -> algorithm -> seed -> (result, records)
Grouped = dict[str, dict[str, dict[int, tuple[dict[str, Any], Records]]]]
Runs = Mapping[str, Mapping[int, tuple[dict[str, Any], Records]]]  # algorithm -> seed -> run


def group(results: Sequence[tuple[dict[str, Any], Records]]) -> Grouped:
    out: Grouped = defaultdict(lambda: defaultdict(dict))
    for result, records in results:
        spec = result["spec"]
        out[spec["experiment"]][spec["algorithm"]][spec["seed"]] = (result, records)
    return {k: dict(v) for k, v in out.items()}


def tasks_of(records: Records) -> list[str]:
    return list(dict.fromkeys(r["task"] for r in records))


def curve(records: Records, task: str, key: str) -> np.ndarray:
    """Per-round values of ``key`` for one task (``metric``: the task's own test metric)."""
    rows = sorted((r for r in records if r["task"] == task), key=lambda r: r["round"])
    return np.array([float(r[r["test_metric"]] if key == "metric" else r[key]) for r in rows])


def moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` rounds (causal: round k sees rounds k-window+1..k)."""
    c = np.cumsum(np.insert(x, 0, 0.0))
    out = np.empty_like(x, dtype=float)
    for k in range(len(x)):
        lo = max(0, k + 1 - window)
        out[k] = (c[k + 1] - c[lo]) / (k + 1 - lo)
    return out


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float  # sample standard deviation over seeds (0 for one seed)
    n: int

    def fmt(self, digits: int = 3) -> str:
        if self.n < 2:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def stat(values: Sequence[float]) -> Stat:
    vals = [float(v) for v in values]
    return Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))


def final_values(runs: Mapping[int, tuple[dict[str, Any], Records]], task: str, what: str) -> dict[int, float]:
    """Per seed: ``test_loss`` / ``value`` of the final model on the whole test split, or
    ``train_loss`` = the mean F_k of the last five rounds."""
    out = {}
    for seed, (result, records) in sorted(runs.items()):
        if what == "train_loss":
            out[seed] = float(np.mean(curve(records, task, "train_loss")[-5:]))
        else:
            out[seed] = float(result["final"][task][what])
    return out


@dataclass(frozen=True)
class Verdict:
    word: str  # "wins" | "ties" | "loses"
    diff: float  # mean over seeds of (FedGradNorm - FedRep)
    se: float  # standard error of that mean (paired over seeds)
    n: int


def paired_verdict(fgn: Mapping[int, float], rep: Mapping[int, float], lower_is_better: bool = True) -> Verdict:
    """FedGradNorm against FedRep on the same seeds (same data, partition and initial model).

    "wins"/"loses" when the mean paired difference is beyond two standard errors in its favour /
    against it; "ties" otherwise. With one seed there is no error estimate: any difference under
    1 % of FedRep's value is a tie, anything else is reported as a (single-seed) win or loss.
    """
    seeds = sorted(set(fgn) & set(rep))
    diffs = [fgn[s] - rep[s] for s in seeds]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else 0.0
    better = -mean if lower_is_better else mean
    if n > 1:
        word = "wins" if better > 2 * se else ("loses" if better < -2 * se else "ties")
    else:
        scale = abs(statistics.fmean(rep[s] for s in seeds)) or 1.0
        word = "ties" if abs(mean) < 0.01 * scale else ("wins" if better > 0 else "loses")
    return Verdict(word, mean, se, n)


def reference_values(runs: Mapping[int, tuple[dict[str, Any], Records]], task: str, what: str) -> dict[int, float]:
    """Per seed: the task's reference level (its best constant prediction) on the whole test split."""
    return {
        seed: float(result["final"][task]["reference"][what])
        for seed, (result, _) in sorted(runs.items())
        if "reference" in result["final"][task]
    }


def beats_reference(values: Mapping[int, float], reference: Mapping[int, float], lower_is_better: bool) -> bool:
    """Whether an arm's final values beat the reference level on the same seeds: by more than two
    standard errors of the paired difference over seeds, or with one seed by more than 2 %."""
    seeds = sorted(set(values) & set(reference))
    if not seeds:
        return True  # no reference (a user loss): nothing to hold the arm against
    gains = [(reference[s] - values[s]) * (1 if lower_is_better else -1) for s in seeds]
    mean = statistics.fmean(gains)
    if len(gains) > 1:
        return mean > 2 * statistics.stdev(gains) / math.sqrt(len(gains))
    return mean > 0.02 * abs(statistics.fmean(reference[s] for s in seeds))


VERDICT_WORDS = (
    "wins",
    "ties",
    "loses",
    "neither beats the reference",
    "only FedRep beats the reference",
    "only FedGradNorm beats the reference",
)


def verdict_against_reference(runs: Runs, task: str, what: str, lower_is_better: bool) -> Verdict:
    """FedGradNorm against FedRep (:func:`paired_verdict`) when both beat the task's reference level;
    otherwise a verdict that says which arms stayed at it."""
    values = {a: final_values(runs[a], task, what) for a in ("fedrep", "fedgradnorm")}
    return verdict_from(values, reference_values(runs["fedrep"], task, what), lower_is_better)


def verdict_from(
    values: Mapping[str, Mapping[int, float]], reference: Mapping[int, float], lower_is_better: bool
) -> Verdict:
    """:func:`verdict_against_reference` on given values (algorithm -> seed -> value) and reference."""
    beat = {a: beats_reference(values[a], reference, lower_is_better) for a in values}
    verdict = paired_verdict(values["fedgradnorm"], values["fedrep"], lower_is_better)
    if all(beat.values()):
        return verdict
    return Verdict(reference_word(beat), verdict.diff, verdict.se, verdict.n)


def reference_word(beat: Mapping[str, bool]) -> str:
    """The verdict when not both arms beat the reference (``beat``: algorithm -> whether it does)."""
    if not any(beat.values()):
        return "neither beats the reference"
    return "only FedRep beats the reference" if beat["fedrep"] else "only FedGradNorm beats the reference"


def balance_weights(records: Records, task: str) -> np.ndarray:
    """Per round, the weight at which GradNorm's rule would stop moving ``task``'s weight:
    p* = target / ||grad_omega_tilde F|| (its weighted norm p * n equal to G_bar * r^gamma)."""
    norms = curve(records, task, "grad_norm")
    targets = curve(records, task, "target_grad_norm")
    return np.divide(targets, norms, out=np.full_like(targets, np.nan), where=norms > 0)


def first_within(values: np.ndarray, goal: np.ndarray, tolerance: float) -> int | None:
    """The first round whose value is within ``tolerance`` (relative) of the goal; None if never."""
    hit = np.nonzero(np.abs(values - goal) <= tolerance * np.abs(goal))[0]
    return int(hit[0]) if len(hit) else None


@dataclass(frozen=True)
class Reach:
    target: float  # the loss level to reach
    rounds: dict[str, list[int | None]]  # algorithm -> per seed, first round at the level (None: never)
    start: float = 0.0  # the round-0 loss
    drop: float = 0.0  # start - the better final loss

    @property
    def meaningful(self) -> bool:
        """False when the loss hardly falls (under 2 % of its round-0 value): the race is noise."""
        return self.drop > 0.02 * abs(self.start)


def rounds_to_fraction(
    runs: Mapping[str, Mapping[int, tuple[dict[str, Any], Records]]],
    task: str,
    fraction: float,
    key: str = "test_loss",
    window: int = 5,
) -> Reach:
    """Rounds each algorithm needs to cover ``fraction`` of the drop of a task's loss.

    The drop runs from the round-0 loss (identical for both algorithms on a seed: same data and
    initial model) down to the *better* of the two algorithms' final losses (the mean over seeds
    of the last ``window`` rounds), so both race to one common level. A run reaches the level at
    the first round whose trailing ``window``-round mean loss is at or below it.
    """
    curves = {a: {s: curve(recs, task, key) for s, (_, recs) in by_seed.items()} for a, by_seed in runs.items()}
    start = statistics.fmean(c[0] for by_seed in curves.values() for c in by_seed.values())
    finals = [statistics.fmean(float(np.mean(c[-window:])) for c in by_seed.values()) for by_seed in curves.values()]
    best = min(finals)
    target = start - fraction * (start - best)
    rounds: dict[str, list[int | None]] = {}
    for algorithm, by_seed in curves.items():
        rounds[algorithm] = []
        for _, c in sorted(by_seed.items()):
            hit = np.nonzero(moving_average(c, window) <= target)[0]
            rounds[algorithm].append(int(hit[0]) if len(hit) else None)
    return Reach(target, rounds, start, start - best)


def fmt_reach(values: Sequence[int | None]) -> str:
    reached = [v for v in values if v is not None]
    if not reached:
        return f"not reached (0/{len(values)})"
    text = f"{statistics.fmean(reached):.1f}"
    if len(values) > 1:
        text += f" [{', '.join('-' if v is None else str(v) for v in values)}]"
    return text


def mean_curve(runs: Mapping[int, tuple[dict[str, Any], Records]], task: str, key: str) -> tuple[np.ndarray, ...]:
    """(mean, min, max) over seeds, per round."""
    stack = np.stack([curve(recs, task, key) for _, recs in runs.values()])
    return stack.mean(axis=0), stack.min(axis=0), stack.max(axis=0)
