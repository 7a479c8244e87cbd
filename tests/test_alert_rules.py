"""The Prometheus alerting rules (deploy/prometheus/fedgradnorm-rules.yml) and their shipped forms.

Offline: the rules parse (``promtool check rules``), their unit tests pass (``promtool test rules``
on deploy/prometheus/fedgradnorm-rules.test.yml, where every alert fires in one case and stays
silent in another), the ConfigMap and the PrometheusRule are the rules file, and the settings the
rules hold (minimum nodes, planned rounds) are the federations' ConfigMaps'. That the rules load
into a real Prometheus and stay quiet on a healthy run is tests/test_prometheus_integration.py's job.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "fedgradnorm-rules.yml"
RULES_TESTS = ROOT / "deploy" / "prometheus" / "fedgradnorm-rules.test.yml"
K8S = ROOT / "deploy" / "k8s"
SEVERITIES = {"critical", "warning"}

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is missing: apt-get install -y --no-install-recommends prometheus",
)


def load_script():
    spec = importlib.util.spec_from_file_location("alert_rules_script", ROOT / "scripts" / "alert_rules.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in rules() if "alert" in r}


def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def find(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


# --- one source, three forms ----------------------------------------------------------------------


def test_configmap_and_prometheusrule_are_the_rules_file() -> None:
    """`make alerts` is up to date, and both forms hold exactly the rules of the source."""
    script = load_script()
    assert script.main(["--check"]) == 0, "run `make alerts`"
    source = RULES.read_text()
    configmap = yaml.safe_load(script.CONFIGMAP_PATH.read_text())
    assert configmap["kind"] == "ConfigMap" and configmap["metadata"]["name"] == script.CONFIGMAP_NAME
    assert configmap["data"] == {script.CONFIGMAP_KEY: source}
    rule = yaml.safe_load(script.PROMETHEUSRULE_PATH.read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["namespace"] == "fedgradnorm"
    assert rule["spec"] == yaml.safe_load(source)


def test_the_check_notices_a_stale_form(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script()
    for name in ("CONFIGMAP_PATH", "PROMETHEUSRULE_PATH"):
        copy = tmp_path / getattr(script, name).name
        copy.write_text(getattr(script, name).read_text())
        monkeypatch.setattr(script, name, copy)
    monkeypatch.setattr(script, "ROOT", tmp_path)
    assert script.main(["--check"]) == 0
    script.PROMETHEUSRULE_PATH.write_text(script.PROMETHEUSRULE_PATH.read_text().replace("for: 1m", "for: 2m", 1))
    assert script.main(["--check"]) == 1


def test_shipped_prometheus_loads_the_rules_configmap() -> None:
    script = load_script()
    config = yaml.safe_load(find("ConfigMap", "prometheus-config")["data"]["prometheus.yml"])
    assert config["rule_files"] == [f"{script.MOUNT_PATH}/*.yml"]
    assert script.CONFIGMAP_KEY.endswith(".yml")
    spec = find("Deployment", "prometheus")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    (container,) = spec["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts[script.MOUNT_PATH]]["configMap"]["name"] == script.CONFIGMAP_NAME


# --- what the rules say ---------------------------------------------------------------------------


def test_every_alert_has_severity_summary_and_runbook() -> None:
    found = alerts()
    assert set(found) == {
        "FedGradNormRoundStalled",
        "FedGradNormNodesBelowMinimum",
        "FedGradNormAggregatorHalted",
        "FedGradNormRoundsRefused",
        "FedGradNormEdgeNodeGone",
        "FedGradNormUpdatesRefusedBurst",
        "FedGradNormTaskWeightAtFloor",
        "FedGradNormTargetDown",
    }
    for name, rule in found.items():
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert rule["annotations"]["summary"].strip(), name
        assert len(rule["annotations"]["description"].split()) >= 25, f"{name}: a runbook, not a word"
        assert set(rule["annotations"]) == {"summary", "description"}, name
    for rule in rules():
        assert "fedgradnorm" in rule["expr"] or rule.get("record", "").startswith("fedgradnorm:"), rule


def aggregator_settings() -> dict[str, dict[str, str]]:
    """federation -> the FEDGRADNORM_* settings of its aggregator's ConfigMap, from the manifests."""
    out = {}
    for doc in k8s_docs():
        if doc["kind"] != "StatefulSet":
            continue
        template = doc["spec"]["template"]
        if template["metadata"]["labels"].get("app.kubernetes.io/component") != "aggregator":
            continue
        federation = template["metadata"]["labels"]["fedgradnorm.io/federation"]
        settings: dict[str, str] = {}
        for c in template["spec"]["containers"]:
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    settings |= find("ConfigMap", source["configMapRef"]["name"])["data"]
        out[federation] = settings
    return out


def recorded_settings(record: str) -> dict[str, int]:
    values = {}
    for rule in rules():
        if rule.get("record") == record:
            federation = rule["labels"]["federation"]
            assert federation not in values, f"{record} twice for {federation}"
            assert rule["expr"].startswith("vector(") and rule["expr"].endswith(")")
            values[federation] = int(rule["expr"][len("vector(") : -1])
    return values


def test_settings_are_the_federations_configmaps() -> None:
    """The rules cannot read FEDGRADNORM_MIN_NODES or FEDGRADNORM_ROUNDS from the aggregators (they do
    not export them): the rules hold copies, which must be what the manifests configure."""
    settings = aggregator_settings()
    assert set(settings) == {"radcom", "mtfl"}
    assert recorded_settings("fedgradnorm:min_nodes") == {
        f: int(s["FEDGRADNORM_MIN_NODES"]) for f, s in settings.items()
    }
    assert recorded_settings("fedgradnorm:rounds_planned") == {
        f: int(s.get("FEDGRADNORM_ROUNDS", "0")) for f, s in settings.items()
    }


def test_every_alert_fires_and_stays_silent_in_the_unit_tests() -> None:
    doc = yaml.safe_load(RULES_TESTS.read_text())
    assert doc["rule_files"] == [RULES.name]
    fired: set[str] = set()
    silent: set[str] = set()
    for group in doc["tests"]:
        for case in group.get("alert_rule_test", []):
            (fired if case["exp_alerts"] else silent).add(case["alertname"])
            for alert in case["exp_alerts"]:
                assert alert["exp_annotations"]["description"], case  # annotations are compared too
    assert fired == set(alerts()), f"never fires: {set(alerts()) - fired}"
    assert silent == set(alerts()), f"never checked silent: {set(alerts()) - silent}"


# --- promtool ---------------------------------------------------------------------------------------


@needs_promtool
def test_promtool_checks_the_rules(tmp_path: Path) -> None:
    res = promtool("check", "rules", str(RULES))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(rules())} rules found" in res.stdout
    broken = tmp_path / RULES.name
    broken.write_text(RULES.read_text().replace("== 1", "== = 1", 1))
    assert promtool("check", "rules", str(broken)).returncode != 0, "promtool must reject a broken rule"


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    res = promtool("test", "rules", str(RULES_TESTS))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout + res.stderr


@needs_promtool
@pytest.mark.parametrize(
    ("old", "new"),
    [
        (
            "clamp_min(5 * fedgradnorm:round_duration_seconds:mean, 300)",
            "clamp_min(50 * fedgradnorm:round_duration_seconds:mean, 3000)",
        ),
        ('{outcome!="accepted"}[10m])) > 10', '{outcome!="accepted"}[10m])) > 50'),
        ("(fedgradnorm_task_weight) < 2e-3", "(fedgradnorm_task_weight) < 1e-3"),
        (
            'up{job=~".*fedgradnorm.*", component!="edge-node"} == 0',
            'up{job=~".*fedgradnorm.*", component!="edge-node"} == 2',
        ),
    ],
    ids=["stall-threshold", "burst-threshold", "floor-threshold", "target-down"],
)
def test_promtool_unit_tests_catch_a_changed_rule(tmp_path: Path, old: str, new: str) -> None:
    """The unit tests are worth something: a rule whose threshold moved fails them."""
    text = RULES.read_text()
    assert text.count(old) == 1, old
    (tmp_path / RULES.name).write_text(text.replace(old, new))
    shutil.copy(RULES_TESTS, tmp_path / RULES_TESTS.name)
    res = promtool("test", "rules", str(tmp_path / RULES_TESTS.name))
    assert res.returncode != 0, f"the unit tests did not notice {old!r} -> {new!r}"
