"""A short FedGradNorm simulation on synthetic RadCom: losses fall, weights move as the rule says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedgradnorm.cli import main
from fedgradnorm.plotting import load_metrics

ROUNDS = 10


@pytest.fixture(scope="module")
def radcom_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("sim")
    runs = {}
    for algorithm in ("fedgradnorm", "fedrep"):
        rc = main(
            [
                "simulate",
                "--federation",
                "radcom",
                "--algorithm",
                algorithm,
                "--rounds",
                str(ROUNDS),
                "--synthetic-size",
                "8",
                "--tau-h",
                "2",
                "--tau-omega",
                "2",
                "--beta",
                "0.0005",
                "--alpha",
                "0.02",
                "--quiet",
                "--out",
                str(out / algorithm),
            ]
        )
        assert rc == 0
        runs[algorithm] = out / algorithm / "metrics.jsonl"
    return runs


def by_task(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["task"], []).append(r)
    return out


def test_metrics_file_has_every_field_per_round_and_client(radcom_runs: dict[str, Path]) -> None:
    records = load_metrics(radcom_runs["fedgradnorm"])
    assert len(records) == ROUNDS * 3
    for r in records:
        for key in (
            "round",
            "client",
            "task",
            "weight",
            "train_loss",
            "loss_ratio",
            "grad_norm",
            "test_loss",
            "accuracy",
        ):
            assert key in r, key
    assert (radcom_runs["fedgradnorm"].parent / "training.png").stat().st_size > 10_000


def test_losses_fall_and_weights_follow_the_rule(radcom_runs: dict[str, Path]) -> None:
    tasks = by_task(load_metrics(radcom_runs["fedgradnorm"]))
    for task, rs in tasks.items():
        assert rs[0]["loss_ratio"] == 1.0, task  # F~ = 1 in the first round
        assert rs[-1]["train_loss"] < rs[0]["train_loss"], task
    # Replay eq. 6-7 from the logged norms and ratios with the test's own Adam: the weights the
    # simulator reports must be exactly what GradNorm's rule gives (alpha 0.02, gamma 0.9).
    names = sorted(tasks)
    p = {n: 1.0 for n in names}
    m = {n: 0.0 for n in names}
    v = {n: 0.0 for n in names}
    for k in range(ROUNDS):
        rs = {n: tasks[n][k] for n in names}
        g = {n: p[n] * rs[n]["grad_norm"] for n in names}
        gbar = sum(g.values()) / 3
        mean_ratio = sum(rs[n]["loss_ratio"] for n in names) / 3
        for n in names:
            target = gbar * (rs[n]["loss_ratio"] / mean_ratio) ** 0.9
            assert rs[n]["target_grad_norm"] == pytest.approx(target, rel=1e-9)
            d = rs[n]["grad_norm"] * (1 if g[n] > target else -1)
            m[n] = 0.9 * m[n] + 0.1 * d
            v[n] = 0.999 * v[n] + 0.001 * d * d
            p[n] -= 0.02 / (1 - 0.9 ** (k + 1)) * m[n] / ((v[n] / (1 - 0.999 ** (k + 1))) ** 0.5 + 1e-8)
        total = sum(p.values())
        p = {n: 3 * p[n] / total for n in names}
        for n in names:
            assert rs[n]["weight"] == pytest.approx(p[n], abs=1e-9)
    assert max(abs(rs[-1]["weight"] - 1.0) for rs in tasks.values()) > 0.01


def test_fedrep_keeps_weights_at_one(radcom_runs: dict[str, Path]) -> None:
    assert {r["weight"] for r in load_metrics(radcom_runs["fedrep"])} == {1.0}


def test_same_seed_gives_the_same_metrics_file(radcom_runs: dict[str, Path], tmp_path: Path) -> None:
    rc = main(
        [
            "simulate",
            "--federation",
            "radcom",
            "--algorithm",
            "fedgradnorm",
            "--rounds",
            str(ROUNDS),
            "--synthetic-size",
            "8",
            "--tau-h",
            "2",
            "--tau-omega",
            "2",
            "--beta",
            "0.0005",
            "--alpha",
            "0.02",
            "--quiet",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    assert (tmp_path / "metrics.jsonl").read_bytes() == radcom_runs["fedgradnorm"].read_bytes()


def test_plot_command_draws_both_runs(radcom_runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp.png"
    rc = main(
        ["plot", f"FedGradNorm={radcom_runs['fedgradnorm']}", f"FedRep={radcom_runs['fedrep']}", "--out", str(out)]
    )
    assert rc == 0 and out.stat().st_size > 10_000


def test_short_mtfl_simulation_runs(tmp_path: Path) -> None:
    rc = main(
        [
            "simulate",
            "--federation",
            "mtfl",
            "--rounds",
            "3",
            "--synthetic-size",
            "60",
            "--tau-h",
            "2",
            "--tau-omega",
            "2",
            "--batch-size",
            "8",
            "--quiet",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    records = load_metrics(tmp_path / "metrics.jsonl")
    assert {r["task"] for r in records} == {"landmarks", "gender", "smile", "glasses", "pose"}
    assert all("landmark_error_px" in r for r in records if r["task"] == "landmarks")
    json.loads((tmp_path / "summary.json").read_text())


def test_bad_arguments_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["simulate", "--data", str(tmp_path / "missing.hdf5"), "--rounds", "1", "--quiet", "--out", str(tmp_path)])
        == 2
    )
    assert "missing.hdf5" in capsys.readouterr().err
    assert main(["simulate", "--allocation", "gender=x", "--rounds", "1", "--quiet", "--out", str(tmp_path)]) == 2
    assert "allocation" in capsys.readouterr().err
