"""The experiment code paths at tiny scale (the full `make reproduce` is not run by the tests)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments import analysis as an
from experiments.document import Doc, comparison
from experiments.reproduce import FULL, SMOKE, largest_clients, main
from experiments.runs import DIAL_TASK, dial_name, finished
from fedgradnorm.demo import DemoConfig
from fedgradnorm.machine import torch_threads


def _records(task_losses: dict[str, list[float]], algorithm: str) -> list[dict]:
    out = []
    for task, losses in task_losses.items():
        for k, loss in enumerate(losses):
            out.append(
                {
                    "round": k,
                    "task": task,
                    "algorithm": algorithm,
                    "test_loss": loss,
                    "train_loss": loss,
                    "weight": 1.0,
                    "test_metric": "accuracy",
                    "accuracy": 0.5,
                }
            )
    return out


def test_moving_average_is_trailing() -> None:
    np.testing.assert_allclose(an.moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])


def test_paired_verdict_words() -> None:
    rep = {0: 1.0, 1: 1.1, 2: 0.9}
    assert an.paired_verdict({0: 0.8, 1: 0.9, 2: 0.7}, rep).word == "wins"
    assert an.paired_verdict({0: 1.2, 1: 1.3, 2: 1.1}, rep).word == "loses"
    assert an.paired_verdict({0: 1.05, 1: 1.0, 2: 0.95}, rep).word == "ties"
    # higher is better (accuracy): a higher value wins
    assert an.paired_verdict({0: 0.8, 1: 0.9, 2: 0.7}, rep, lower_is_better=False).word == "loses"
    one = an.paired_verdict({0: 0.5}, {0: 1.0})
    assert (one.word, one.n, one.se) == ("wins", 1, 0.0)


def test_rounds_to_fraction_common_level() -> None:
    fast = [10.0, 5.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    slow = [10.0, 9.0, 8.0, 6.0, 4.0, 2.0, 1.0, 1.0]
    runs = {
        "fedgradnorm": {0: ({}, _records({"t": fast}, "fedgradnorm"))},
        "fedrep": {0: ({}, _records({"t": slow}, "fedrep"))},
    }
    reach = an.rounds_to_fraction(runs, "t", 0.5, window=1)
    assert reach.target == pytest.approx(10.0 - 0.5 * 9.0)
    assert reach.rounds == {"fedgradnorm": [1], "fedrep": [4]}
    never = an.rounds_to_fraction(runs, "t", 1.5, window=1)
    assert never.rounds["fedrep"] == [None]
    assert an.fmt_reach([None, None]).startswith("not reached")
    assert an.fmt_reach([2, None]) == "2.0 [2, -]"


def test_a_verdict_needs_both_arms_above_the_reference() -> None:
    def runs(fgn: list[float], rep: list[float], ref: list[float]) -> dict:
        def arm(values: list[float]) -> dict:
            return {
                s: ({"final": {"t": {"test_loss": v, "reference": {"test_loss": ref[s]}}}}, [])
                for s, v in enumerate(values)
            }

        return {"fedgradnorm": arm(fgn), "fedrep": arm(rep)}

    ref = [0.69, 0.70, 0.68]
    assert (
        an.verdict_against_reference(runs([0.5, 0.52, 0.49], [0.6, 0.61, 0.6], ref), "t", "test_loss", True).word
        == "wins"
    )
    at_prior = runs([0.689, 0.701, 0.679], [0.69, 0.70, 0.68], ref)
    assert an.verdict_against_reference(at_prior, "t", "test_loss", True).word == "neither beats the reference"
    one_sided = runs([0.689, 0.701, 0.679], [0.6, 0.61, 0.6], ref)
    assert an.verdict_against_reference(one_sided, "t", "test_loss", True).word == "only FedRep beats the reference"
    # accuracy: higher is better, the reference is the majority class
    assert an.beats_reference({0: 0.9, 1: 0.91}, {0: 0.5, 1: 0.52}, lower_is_better=False)
    assert not an.beats_reference({0: 0.5, 1: 0.53}, {0: 0.5, 1: 0.52}, lower_is_better=False)
    assert not an.beats_reference({0: 0.685}, {0: 0.69}, lower_is_better=True)  # one seed: under 2 %


def test_each_task_of_a_table_is_judged_by_its_own_metric() -> None:
    """A landmark error (lower is better) beside accuracies (higher is better) in one metric table."""

    def run(seed: int, error: float, accuracy: float) -> tuple[dict, list]:
        final = {
            "landmarks": {"metric": "landmark_error_px", "value": error, "reference": {"value": 4.0}},
            "gender": {"metric": "accuracy", "value": accuracy, "reference": {"value": 0.5}},
        }
        records = [{"task": t, "round": 0, "test_loss": 1.0} for t in final]
        return {"final": final, "spec": {"rounds": 1}}, records

    grouped = {"e": {"fedrep": {0: run(0, 2.0, 0.70)}, "fedgradnorm": {0: run(0, 3.0, 0.80)}}}
    doc = Doc(grouped, [])
    _, verdicts = comparison(doc, "e", "value", {})
    assert verdicts["landmarks"].word == "loses" and verdicts["gender"].word == "wins"


def _run_smoke(out: Path, doc: Path, *extra: str) -> None:
    with torch_threads(3):  # one worker: the runs take one torch thread in this process and give it back
        assert main(["--scale", "smoke", "--out", str(out), "--doc", str(doc), "--workers", "1", *extra]) == 0
        assert torch.get_num_threads() == 3


def test_smoke_reproduce_writes_the_document_and_resumes(tmp_path: Path) -> None:
    doc = tmp_path / "docs" / "results.md"
    out = tmp_path / "runs"
    # a first invocation trains the RadCom runs only: every other section says it is pending
    _run_smoke(out, doc, "--only", "radcom,alone-radcom")
    specs = SMOKE.specs(largest_clients(SMOKE))
    radcom = [s for s in specs if s.experiment.startswith(("radcom", "alone-radcom"))]
    text = doc.read_text()
    assert f"**{len(radcom)} of {len(specs)} runs of the plan have finished**" in text
    assert "## Fig. 3: RadCom" in text and "img/results-radcom.png" in text
    assert text.count("*Pending:") == 5  # Table II, masking, the dial, the sweep, Fig. 2
    assert "- **RadCom (Fig. 3)" in text and "MTFL imbalanced (Table II), " not in text.split("## Setup")[0]

    # the next invocation keeps those runs and trains the rest
    _run_smoke(out, doc)
    text = doc.read_text()
    assert f"All {len(specs)} runs of the plan have finished." in text and "*Pending:" not in text
    for needle in (
        "Table II",
        "Fig. 2",
        "reference (constant)",
        "alone (learnability)",
        "FedRep without landmarks",
        "does the landmark task mask the others?",
        "The dial",
        "Sensitivity to α and γ",
        "paper, FedRep",
    ):
        assert needle in text, needle
    for name in ("mtfl-imbalanced", "mtfl-balanced", "radcom", "radcom-snr", "dial"):
        png = doc.parent / "img" / f"results-{name}.png"
        assert png.exists() and png.stat().st_size > 1000, png
        assert f"img/results-{name}.png" in text
    # every planned run left its metrics and a result with the final evaluation and the reference levels
    for spec in specs:
        result = json.loads((out / spec.key / "result.json").read_text())
        assert result["spec"]["seed"] == spec.seed and result["torch_threads"] == 1
        assert set(result["final"]) == set(result["clients"]) == set(spec.task_names or result["clients"])
        assert all({"reference", "reference_eval"} <= set(f) for f in result["final"].values())
        lines = (out / spec.key / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == spec.rounds * len(result["clients"])
    radcom_result = json.loads((out / "radcom/fedgradnorm/seed0/result.json").read_text())
    assert all("accuracy_by_snr" in f for f in radcom_result["final"].values())
    alone = json.loads((out / "alone-mtfl-gender/fedrep/seed0/result.json").read_text())
    full = json.loads((out / "mtfl-imbalanced/fedrep/seed0/result.json").read_text())
    assert alone["clients"] == {"gender": full["clients"]["gender"]}  # the same client's data, alone
    dial = json.loads((out / "dial-x100/fedrep/seed0/result.json").read_text())
    assert dial["spec"]["loss_scale"] == "landmarks=100"
    # a third invocation trains nothing
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    _run_smoke(out, doc)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("result.json")} == mtimes
    # a run of an older drawing of the data, or of another specification, is not reused
    spec = next(s for s in specs if s.dataset == "mtfl")
    assert finished(spec, out) is not None and finished(replace(spec, rounds=spec.rounds + 1), out) is None
    path = out / spec.key / "result.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "data_version": "mtfl-v1"}))
    assert finished(spec, out) is None


def test_the_full_plan_reads_the_paper_epochs() -> None:
    specs = FULL.specs({"mtfl-imbalanced": 3000, "mtfl-balanced": 2600, "radcom": 7200})
    rounds = {s.experiment: s.rounds for s in specs}
    assert (rounds["mtfl-imbalanced"], rounds["radcom"], rounds["mtfl-balanced"]) == (469, 1125, 407)
    assert rounds["dial-x1000"] == rounds["sweep-a0.04-g1.5"] == 94
    assert len({s.key for s in specs}) == len(specs)
    assert {s.seed for s in specs if s.experiment == "mtfl-imbalanced"} == {0, 1, 2}
    # the first seed of every experiment starts before any second seed
    first_seed_one = next(i for i, s in enumerate(specs) if s.seed == 1)
    assert all(s.seed == 0 for s in specs[:first_seed_one])
    assert {s.experiment for s in specs[:first_seed_one]} == {s.experiment for s in specs}


def test_make_run_is_a_cell_of_the_dial() -> None:
    """`make run`'s default setting is the dial's cell at seed 0 (docs/results.md), run through the services."""
    demo = DemoConfig()
    (task, scale), *more = demo.loss_scales.items()
    assert task == DIAL_TASK and not more
    cell = next(
        s
        for s in FULL.specs({"mtfl-imbalanced": 3000, "mtfl-balanced": 2600, "radcom": 7200})
        if s.experiment == dial_name(scale) and s.seed == demo.seed
    )
    assert (demo.federation, demo.allocation, demo.synthetic_size, demo.rounds) == (
        cell.dataset,
        cell.allocation,
        cell.synthetic_size,
        cell.rounds,
    )
    assert cell.data_seed == demo.seed  # the nodes draw the synthetic set from the demo's seed
