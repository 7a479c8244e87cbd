"""`make run` (fedgradnorm demo) end to end, shortened: its default setting (MTFL, imbalanced, the landmark
loss x100) on a small synthetic set, an aggregator and five edge nodes as real processes over mutual TLS
on loopback, FedGradNorm then FedRep, the comparison plot at the end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedgradnorm.demo import DemoConfig, reference_levels

TASKS = ("landmarks", "gender", "smile", "glasses", "pose")


def test_the_demo_runs_both_algorithms_over_mutual_tls(tmp_path: Path) -> None:
    out = tmp_path / "main"
    # what an earlier demo (another setting) left: the next run starts afresh, it neither resumes nor refuses it
    stale = out / "fedgradnorm" / "aggregator-state" / "aggregator-state.pt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an earlier federation's state")
    (out / "fedrep" / "node-gender").mkdir(parents=True)
    (out / "fedrep" / "node-gender" / "identity.json").write_text('{"task": "modulation"}')
    argv = [sys.executable, "-m", "fedgradnorm.cli", "demo", "--out", str(out), "--rounds", "2"]
    argv += ["--synthetic-size", "40"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (out / "comparison.png").stat().st_size > 10_000
    assert (out / "certs" / "ca.pem").is_file()
    for algorithm in ("fedgradnorm", "fedrep"):
        records = [json.loads(x) for x in (out / algorithm / "metrics.jsonl").read_text().splitlines()]
        assert sorted({r["round"] for r in records}) == [0, 1]
        assert {r["task"] for r in records} == set(TASKS)
        for k in (0, 1):
            weights = [r["weight"] for r in records if r["round"] == k]
            assert abs(sum(weights) - 5) < 1e-9  # sum p = N
            if algorithm == "fedrep":
                assert weights == [1.0] * 5
    assert "plot:" in res.stdout and "landmarks" in res.stdout and "landmarks loss x100" in res.stdout
    # the plot's reference levels are those each node computes on its own data (its log says so)
    assert "reference levels (the best constant prediction" in res.stdout
    levels = reference_levels(DemoConfig(synthetic_size=40))
    unscaled = reference_levels(DemoConfig(synthetic_size=40, loss_scale=""))
    # the landmark node learns with its loss x100 (--loss-scale), and its reference level says so
    assert levels["landmarks"]["test_loss"] == pytest.approx(100 * unscaled["landmarks"]["test_loss"], rel=1e-6)
    assert levels["landmarks"]["metric"] == unscaled["landmarks"]["metric"]  # the error stays in pixels
    assert levels["gender"] == unscaled["gender"]
    for task in TASKS:
        logged = [
            json.loads(x) for x in (out / "fedrep" / f"node-{task}.log").read_text().splitlines() if x.startswith("{")
        ]
        event = next(e for e in logged if e.get("event") == "node.reference_level")
        assert event["test_loss"] == round(levels[task]["test_loss"], 6)
        assert event["value"] == round(levels[task]["metric"], 6)
    # Progress: what it waits for before round 0, then round i/N with an ETA, for each algorithm.
    for algorithm in ("fedgradnorm", "fedrep"):
        assert f"== {algorithm}: starting the aggregator" in res.stdout
    assert res.stdout.count("  waiting for ") >= 2, res.stdout
    assert res.stdout.count("round   1/2 | ") == 2 and res.stdout.count("round   2/2 | ") == 2, res.stdout
    assert res.stdout.count("| ETA 0 s") == 2, res.stdout


def _demo(out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "fedgradnorm.cli", "demo", "--out", str(out), "--rounds", "2"]
    argv += ["--synthetic-size", "40", "--algorithms", "fedgradnorm", *flags]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)


def test_the_demo_says_which_node_the_aggregator_left_out_and_stops_on_a_failed_node(tmp_path: Path) -> None:
    """Extreme but valid loss scales. x1e12: the landmark node's updates are accepted and left out of
    every step (norm far above the others'); the demo finishes, each round printed once without that
    task, and says which node was left out how often. x1e308: the node's loss overflows, the node
    stops, and the demo exits with status 2 and one line naming the node, its error and its log."""
    res = _demo(tmp_path / "big", "--loss-scale", "landmarks=1e12")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "landmarks: the aggregator left out 2 of its updates" in res.stdout, res.stdout
    rounds = [line for line in res.stdout.splitlines() if line.startswith("round ")]
    assert [line[:13] for line in rounds] == ["round   1/2 |", "round   2/2 |"], res.stdout
    assert all("landmarks:" not in line and line.count("gender:") == 1 for line in rounds), res.stdout

    res = _demo(tmp_path / "overflow", "--loss-scale", "landmarks=1e308")
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("fedgradnorm demo: error: landmarks exited with status 2"), lines[0]
    assert "local loss is not finite" in lines[0] and "loss x1e+308" in lines[0], lines[0]
    assert str(tmp_path / "overflow" / "fedgradnorm" / "node-landmarks.log") in lines[0]
