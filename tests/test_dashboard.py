"""The Grafana dashboard (deploy/grafana/fedgradnorm.json): generated, well-formed, about real metrics.

No Grafana server can be installed here, so the dashboard is checked by its structure (it parses
into the typed model of Grafana's foundation SDK, its layout, its variables), by promtool parsing
every PromQL expression, and against the metric names the services register. That the queries
return data is tests/test_prometheus_integration.py's job.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "fedgradnorm.json"
VARIABLES = {"federation": "radcom", "task": ".*", "metric": "accuracy", "__rate_interval": "1m"}
BUILTIN = {"__rate_interval", "__interval", "__range"}


def load_script():
    pytest.importorskip("grafana_foundation_sdk", reason="pip install -e '.[dev]'")
    spec = importlib.util.spec_from_file_location("dashboard_script", ROOT / "scripts" / "dashboard.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def board() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def targets(board: dict[str, Any]):
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


def test_files_are_what_the_generator_writes() -> None:
    """`make dashboard` is up to date: the JSON and its ConfigMap are the script's output."""
    script = load_script()
    text = script.dashboard_json()
    assert DASHBOARD.read_text() == text, "run `make dashboard`"
    assert script.CONFIGMAP_PATH.read_text() == script.configmap_yaml(text), "run `make dashboard`"
    assert script.main(["--check"]) == 0
    configmap = yaml.safe_load(script.CONFIGMAP_PATH.read_text())
    assert configmap["data"]["fedgradnorm.json"] == text


def test_parses_into_grafanas_typed_model(board: dict[str, Any]) -> None:
    pytest.importorskip("grafana_foundation_sdk", reason="pip install -e '.[dev]'")
    from grafana_foundation_sdk.models.dashboard import Dashboard

    model = Dashboard.from_json(board)
    assert model.title == "FedGradNorm" and model.uid == "fedgradnorm"
    assert len(model.panels) == len(board["panels"])


def test_layout(board: dict[str, Any]) -> None:
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for p in board["panels"]:
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
    assert {p["type"] for p in board["panels"]} <= {"row", "stat", "timeseries"}


def test_every_panel_queries_prometheus_through_the_variable(board: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), f"{panel['title']}: no query"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for t in panel["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert t["expr"].strip() and t["legendFormat"], panel["title"]
            for name in re.findall(r"\$\{?(\w+)", t["expr"]):
                assert name in variables or name in BUILTIN, f"{panel['title']}: undefined ${name}"
            # The chosen federation, or none: a local Prometheus (make prometheus) adds no federation label.
            assert 'federation=~"$federation|"' in t["expr"], f"{panel['title']}: not filtered by federation"
            assert 'federation="' not in t["expr"], f"{panel['title']}: a filter that hides local series"
    for name in ("federation", "task", "metric"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*", name
        if name != "federation":
            assert 'federation=~"$federation|"' in variables[name]["query"], name


def test_the_panels_the_operators_need_are_there(board: dict[str, Any]) -> None:
    exprs = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in board["panels"]}
    wanted = {
        "Task weight p": "fedgradnorm_task_weight",
        "Loss ratio F~ = F_k / F_0": "fedgradnorm_task_loss_ratio",
        "Training loss F_k": "fedgradnorm_task_train_loss",
        "Test metric: $metric": "fedgradnorm_task_test_metric",
        "Round duration": "fedgradnorm_round_duration_seconds_bucket",
        "Participants per round": "fedgradnorm_round_participants",
        "Registered nodes": "fedgradnorm_registered_nodes",
        "Refused updates by reason": "fedgradnorm_updates_total",
    }
    relays = {
        "Relays attached": "fedgradnorm_relays",
        "Nodes per relay": "fedgradnorm_relay_nodes",
        "Partial sums per relay": "fedgradnorm_relay_partial_sums_total",
        "Rounds lost per relay": "fedgradnorm_relay_lost_rounds_total",
        "Relay connected to the aggregator": "fedgradnorm_relay_upstream_connected",
        "Relay traffic: site and uplink": "fedgradnorm_relay_uplink_bytes_total",
    }
    for title, metric in {**wanted, **relays}.items():
        assert metric in exprs.get(title, ""), f"panel {title!r} should chart {metric}"
    assert "avg by (task)" in exprs["Task weight p"], "one line per task"
    # The Relays row, last (panel ids stay stable): one line per relay, from the aggregator's series.
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows[-1] == "Relays"
    for title in ("Nodes per relay", "Partial sums per relay", "Rounds lost per relay"):
        assert "by (relay)" in exprs[title], title
    # A relay exports fedgradnorm_relay_partial_sums_total too (without the label relay): left out.
    assert 'relay!=""' in exprs["Partial sums per relay"]
    assert (
        'outcome!="accepted"' in exprs["Refused updates by reason"]
        and "by (outcome)" in exprs["Refused updates by reason"]
    )


def test_test_metrics_get_a_panel_each(board: dict[str, Any]) -> None:
    """Accuracy (0..1, higher is better) and landmark error (pixels, lower is better) never share an
    axis: the panel repeats per metric, and each metric's series get their own unit."""
    (panel,) = [p for p in board["panels"] if any("_test_metric" in t["expr"] for t in p.get("targets", []))]
    assert panel["repeat"] == "metric" and "$metric" in panel["title"]
    assert all('metric=~"$metric"' in t["expr"] for t in panel["targets"])
    units = {
        o["matcher"]["options"]: {prop["id"]: prop["value"] for prop in o["properties"]}
        for o in panel["fieldConfig"]["overrides"]
    }
    assert units == {
        ".* accuracy$": {"unit": "percentunit", "min": 0, "max": 1},
        ".* landmark_error_px$": {"unit": "suffix: px", "min": 0},
    }


def test_stat_panels_have_thresholds(board: dict[str, Any]) -> None:
    stats = {p["title"]: p for p in board["panels"] if p["type"] == "stat"}
    assert len(stats) == 7
    for title, panel in stats.items():
        steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert steps and steps[0]["value"] is None, title  # the base colour
        values = [s["value"] for s in steps[1:]]
        assert values == sorted(values), title
        assert panel["options"]["colorMode"] == "value", title
    assert [s["color"] for s in stats["Registered nodes"]["fieldConfig"]["defaults"]["thresholds"]["steps"]] == [
        "red",
        "green",
    ]
    refused = stats["Updates refused (1h)"]["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [(s["value"], s["color"]) for s in refused] == [(None, "green"), (1, "orange"), (10, "red")]


def test_the_table_is_the_dashboard() -> None:
    """Every entry of the script's ROWS is one panel, in order, under its row."""
    script = load_script()
    board = script.build()
    expected = []
    for row, panels in script.ROWS:
        expected.append((row, "row"))
        expected += [(p.title, "stat" if p.kind == "stat" else "timeseries") for p in panels]
    assert [(p["title"], p["type"]) for p in board["panels"]] == expected
    titles = [t for t, kind in expected if kind != "row"]
    assert len(titles) == len(set(titles)) >= 30


def registered_metric_names() -> set[str]:
    """The names the aggregator, the relay and the edge node really register (with _bucket/_sum/_count, _total)."""
    from fedgradnorm.services.aggregator.metrics import AggregatorMetrics
    from fedgradnorm.services.edge_node.node import NodeMetrics
    from fedgradnorm.services.relay.server import RelayMetrics

    names = set()
    for registry in (AggregatorMetrics().registry, NodeMetrics().registry, RelayMetrics().registry):
        for family in registry.collect():
            names.add(family.name)
            for sample in family.samples:
                names.add(sample.name)
        for family in registry.collect():
            if family.type == "histogram":
                names |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
            if family.type == "counter":  # labelled counters have no sample before their first use
                names.add(f"{family.name}_total")
    return names


def test_queries_use_metrics_the_services_export(board: dict[str, Any]) -> None:
    known = registered_metric_names()
    used = set()
    for panel, t in targets(board):
        for name in re.findall(r"\b(fedgradnorm_[a-z0-9_]+)", t["expr"]):
            assert name in known, f"{panel['title']}: {name} is not a metric of the services"
            used.add(name)
    from fedgradnorm.services.aggregator.metrics import AggregatorMetrics

    aggregator = {f.name for f in AggregatorMetrics().registry.collect()}
    missing = {n for n in aggregator if not any(u == n or u.startswith(n + "_") for u in used)}
    assert not missing, f"aggregator metrics on no panel: {missing}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is missing: apt-get install prometheus")
def test_promtool_parses_every_expression(board: dict[str, Any], tmp_path: Path) -> None:
    """Each expression (variables substituted) as a recording rule: promtool rejects bad PromQL."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from promharness import substitute

    rules = [
        {"record": f"dashboard:panel{panel['id']}:{t['refId'].lower()}", "expr": substitute(t["expr"], VARIABLES)}
        for panel, t in targets(board)
    ]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(rules)} rules found" in res.stdout
    rules[0]["expr"] = "sum by (task (fedgradnorm_task_weight)"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0, "promtool must reject a broken expression"
