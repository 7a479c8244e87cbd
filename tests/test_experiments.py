"""The experiment code paths at tiny scale (the full `make reproduce` is not run by the tests)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from experiments import analysis as an
from experiments.document import render
from experiments.reproduce import SMOKE, Plan, main
from fedgradnorm.machine import torch_threads

FIXTURES = Path(__file__).parent / "fixtures" / "reproduce"


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


def test_smoke_reproduce_writes_the_document(tmp_path: Path) -> None:
    doc = tmp_path / "docs" / "results.md"
    out = tmp_path / "runs"
    with torch_threads(3):  # one worker: the runs take one torch thread in this process and give it back
        assert main(["--scale", "smoke", "--out", str(out), "--doc", str(doc), "--workers", "1"]) == 0
        assert torch.get_num_threads() == 3
    text = doc.read_text()
    for needle in ("Table II", "Fig. 2", "Fig. 3", "FedGradNorm", "FedRep", "Accuracy against SNR", "paper, FedRep"):
        assert needle in text
    for name in ("mtfl-imbalanced", "mtfl-balanced", "radcom", "radcom-snr"):
        png = doc.parent / "img" / f"results-{name}.png"
        assert png.exists() and png.stat().st_size > 1000, png
        assert f"img/results-{name}.png" in text
    # every planned run left its metrics and a result with the final evaluation on the whole test split
    specs = SMOKE.specs()
    for spec in specs:
        result = json.loads((out / spec.key / "result.json").read_text())
        assert result["spec"]["seed"] == spec.seed and result["torch_threads"] == 1
        assert set(result["final"]) == set(result["clients"])
        lines = (out / spec.key / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == spec.rounds * len(result["clients"])
    radcom = json.loads((out / "radcom/fedgradnorm/seed0/result.json").read_text())
    assert all("accuracy_by_snr" in f for f in radcom["final"].values())
    # a second invocation with --reuse trains nothing
    assert main(["--scale", "smoke", "--out", str(out), "--doc", str(doc), "--workers", "1", "--reuse"]) == 0
    assert f"reused runs: {len(specs)}" in doc.read_text()


def _render_inputs(variant: str) -> tuple[an.Grouped, Plan, dict[str, Any], dict[str, Any]]:
    """Fixed inputs of ``render``: the runs, machine info and timing of one smoke reproduction.

    ``smoke`` is that reproduction (with an earlier, noted invocation in its history);
    ``two-balanced-seeds`` adds a second balanced seed (the imbalanced seed-1 runs, relabelled) and has
    an idle machine and every run reused, so that the other branches of the text are rendered too.
    """
    data = json.loads((FIXTURES / "smoke-runs.json").read_text())
    runs = [(r["result"], r["records"]) for r in data["runs"]]
    plan, info, timing = SMOKE, data["info"], data["timing"]
    if variant == "two-balanced-seeds":
        runs += [
            ({**result, "spec": {**result["spec"], "experiment": "mtfl-balanced"}}, records)
            for result, records in runs
            if result["spec"]["experiment"] == "mtfl-imbalanced" and result["spec"]["seed"] == 1
        ]
        plan = replace(SMOKE, balanced_seeds=(0, 1))
        info = {**info, "loadavg_start": [0.5, 0.4, 0.3], "loadavg_end": [1.0, 0.8, 0.6]}
        timing = {**timing, "reused": len(timing["runs"]), "trained_by": []}
    return an.group(runs), plan, info, timing


@pytest.mark.parametrize("variant", ["smoke", "two-balanced-seeds"])
def test_render_writes_the_pinned_document(variant: str, tmp_path: Path) -> None:
    """``render`` gives, for fixed inputs, the text pinned in ``fixtures/reproduce/<variant>.md``.

    Those files were written by ``render`` as it was before the prose moved into a template, so this
    test shows that the template renders the very same document.
    """
    grouped, plan, info, timing = _render_inputs(variant)
    command = "python -m experiments.reproduce --scale smoke"
    text = render(grouped, plan, info, timing, tmp_path / "docs" / "img", "results-", command)
    assert text == (FIXTURES / f"{variant}.md").read_text()
    assert sorted(p.name for p in (tmp_path / "docs" / "img").iterdir()) == [
        "results-mtfl-balanced.png",
        "results-mtfl-imbalanced.png",
        "results-radcom-snr.png",
        "results-radcom.png",
    ]
