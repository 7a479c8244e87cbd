"""A real Prometheus (Debian package ``prometheus``) scrapes a real loopback RadCom federation, with
a relay (site site-a of deploy/k8s) between the aggregator and two of its three edge nodes.

The scrape configuration is the one shipped in deploy/k8s/30-prometheus.yaml, with the pod
discovery replaced by static targets that carry the discovery labels of the manifests' pods
(scripts/promharness.py), and its rules are the shipped ConfigMap prometheus-rules. Through
Prometheus's HTTP API: the task weights exist for each task and sum to the number of nodes, every
PromQL expression of the Grafana dashboard returns data, the rules evaluate without error and no
alert is pending or firing.

A second Prometheus scrapes the same run as `make prometheus` would (scripts/local_prometheus.py:
static targets, no federation label) plus one target where nothing listens: every dashboard query
returns data there too, and the down target, and only it, fires an alert.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import grpc
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import local_prometheus  # noqa: E402
import promharness  # noqa: E402

from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb  # noqa: E402
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc  # noqa: E402

TASKS = ("modulation", "signal", "anomaly")
RELAYED = ("signal", "anomaly")  # behind the relay of site site-a, as in deploy/k8s/13-radcom-site-a.yaml
VARIABLES = {"federation": "radcom", "task": ".*", "metric": "accuracy", "__rate_interval": "30s"}
# A local Prometheus has no federation label: Grafana's "All" (.*), or any federation chosen, must show it.
LOCAL_VARIABLES = {"All": {**VARIABLES, "federation": ".*"}, "radcom": VARIABLES}
MIN_ROUNDS = 3
ALERTS = 'ALERTS{alertname=~"FedGradNorm.*"}'

needs_prometheus = pytest.mark.skipif(
    promharness.Prometheus.binary() is None,
    reason="the prometheus binary is missing: apt-get install -y --no-install-recommends prometheus",
)


class Scraped(NamedTuple):
    prom: promharness.Prometheus  # the shipped configuration and rules
    fed: promharness.Federation
    local: promharness.Prometheus  # make prometheus's configuration, plus a target that is down
    down: str  # that target's address


def start_local_prometheus(work: Path, fed: promharness.Federation) -> tuple[promharness.Prometheus, str]:
    down = f"127.0.0.1:{promharness.free_port()}"  # nothing listens here
    aggregator = fed.metrics_targets["radcom-aggregator-0"][1]
    relays = [f"{pod}={fed.metrics_targets[pod][1]}" for pod in fed.relay_pods]
    nodes = [
        f"{pod}={address}"
        for pod, (workload, address) in fed.metrics_targets.items()
        if address != aggregator and pod not in fed.relay_pods
    ]
    settings = local_prometheus.settings_rules(min_nodes=len(TASKS), rounds=0)
    config = local_prometheus.config(
        [f"aggregator={aggregator}", f"gone={down}"],
        nodes,
        [str(local_prometheus.RULES), "local-settings.yml"],
        interval="1s",
        relays=relays,
    )
    files = {"local-settings.yml": promharness.yaml.safe_dump(settings)}
    return promharness.Prometheus(work / "local-prometheus", config, files=files).start(), down


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    """Three RadCom edge nodes training against an aggregator, two of them through a relay, scraped
    every second twice."""
    work = tmp_path_factory.mktemp("prometheus-federation")
    fed = promharness.Federation(
        work,
        aggregator_flags=["--tau-h", "1", "--tau-omega", "1", "--batch-size", "16", "--rounds", "0", "--seed", "0"],
        node_flags=["--synthetic-size", "4", "--seed", "0", "--torch-threads", "1", "--fetch-wait", "2"],
        tasks=TASKS,
        relayed=RELAYED,
    )
    prom: promharness.Prometheus | None = None
    local: promharness.Prometheus | None = None
    try:
        fed.start()
        rules = promharness.shipped_rule_files()
        assert rules, "the ConfigMap prometheus-rules holds no rules"
        config = promharness.loopback_config(fed.metrics_targets)
        prom = promharness.Prometheus(work / "prometheus", config, files=rules).start()
        local, down = start_local_prometheus(work, fed)
        prom.wait_for(
            f'fedgradnorm_round{{federation="radcom"}} >= {MIN_ROUNDS}', timeout=150, what=f"round {MIN_ROUNDS}"
        )
        fed.check_alive()
        # Two refused updates with a scrape between them: a counter series that appears already at 1
        # shows no increase until it grows again (the service does not pre-create its outcome labels).
        refuse_one_update(fed.grpc_address)
        prom.wait_for('fedgradnorm_updates_total{outcome="unknown_node"}', timeout=15, what="the refused update")
        refuse_one_update(fed.grpc_address)
        prom.wait_for(
            'increase(fedgradnorm_updates_total{outcome="unknown_node"}[30s]) > 0', timeout=15, what="the second one"
        )
        yield Scraped(prom, fed, local, down)
    finally:
        for p in (prom, local):
            if p is not None:
                p.stop()
        fed.stop()


def refuse_one_update(address: str) -> None:
    """A real update from a node the aggregator does not know: counted under outcome="unknown_node"."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.AggregatorStub(channel)
        state = stub.GetState(pb.GetStateRequest(), timeout=10)
        header = pb.SubmitHeader(node_id="not-a-member", session_token="x", round=state.round)
        with pytest.raises(grpc.RpcError) as refused:
            stub.SubmitUpdate(iter([pb.SubmitUpdateRequest(header=header)]), timeout=10)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND


@needs_prometheus
def test_task_weights_exist_per_task_and_sum_to_the_active_nodes(scraped) -> None:
    prom = scraped.prom
    weights = prom.query('fedgradnorm_task_weight{federation="radcom"}')
    by_task = {s["metric"]["task"]: float(s["value"][1]) for s in weights}
    assert set(by_task) == set(TASKS), weights
    assert all(w > 0 for w in by_task.values())
    (total,) = prom.query('sum(fedgradnorm_task_weight{federation="radcom"})')
    assert float(total["value"][1]) == pytest.approx(len(TASKS), abs=1e-3)
    # The relabelling of the shipped scrape configuration gave every series its pod's labels.
    (registered,) = prom.query("fedgradnorm_registered_nodes")
    assert registered["metric"]["component"] == "aggregator" and registered["metric"]["pod"] == "radcom-aggregator-0"
    assert float(registered["value"][1]) == len(TASKS)
    edge = prom.query("fedgradnorm_edge_connected")
    assert {s["metric"]["task"] for s in edge} == set(TASKS)
    assert all(s["metric"]["component"] == "edge-node" and float(s["value"][1]) == 1 for s in edge)
    assert {s["metric"]["outcome"] for s in prom.query("fedgradnorm_updates_total")} >= {"accepted", "unknown_node"}
    up = prom.query("up")
    assert len(up) == 1 + 1 + len(TASKS) and all(s["value"][1] == "1" for s in up)


@needs_prometheus
def test_the_relay_and_the_aggregator_report_the_site(scraped) -> None:
    """The relay's pod is scraped with the labels of its Deployment's pods (component relay, site
    site-a); the aggregator counts the site's nodes and the partial sums under relay="site-a"."""
    prom = scraped.prom
    (attached,) = prom.query('fedgradnorm_relays{federation="radcom"}')
    assert float(attached["value"][1]) == 1
    (nodes,) = prom.query('fedgradnorm_relay_nodes{federation="radcom"}')
    assert nodes["metric"]["relay"] == promharness.RELAY_NAME and float(nodes["value"][1]) == len(RELAYED)
    (sums,) = prom.query('fedgradnorm_relay_partial_sums_total{component="aggregator"}')
    assert sums["metric"]["relay"] == promharness.RELAY_NAME and float(sums["value"][1]) >= 1
    (connected,) = prom.query("fedgradnorm_relay_upstream_connected")
    labels = connected["metric"]
    assert (labels["component"], labels["site"], labels["pod"]) == ("relay", "site-a", promharness.RELAY_POD)
    assert float(connected["value"][1]) == 1
    (registered,) = prom.query("fedgradnorm_relay_registered_nodes")
    assert float(registered["value"][1]) == len(RELAYED)
    edge = {s["metric"]["task"]: s["metric"].get("site") for s in prom.query("fedgradnorm_edge_connected")}
    assert edge == {task: "site-a" if task in RELAYED else None for task in TASKS}


def assert_every_dashboard_query_returns_data(prom: promharness.Prometheus, variables: dict[str, dict[str, str]]):
    """Rate windows need two scrapes of a series inside them: a query may still be empty just after
    start-up, so each is retried for up to a minute before it counts as empty."""
    pending = {
        f"{panel['title']} [{target['refId']}] ({name})": promharness.substitute(target["expr"], values)
        for panel, target in promharness.dashboard_targets()
        for name, values in variables.items()
    }
    assert len(pending) >= 20 * len(variables)
    empty: dict[str, str] = {}
    end = time.monotonic() + 60
    while pending:
        empty = {}
        for name, expr in pending.items():
            result = prom.query(expr)
            if not result:
                empty[name] = expr
            elif not any(math.isfinite(float(s["value"][1])) for s in result):
                empty[name] = f"only NaN: {expr}"
        pending = {name: pending[name] for name in empty}
        if not pending or time.monotonic() > end:
            break
        time.sleep(2)
    assert not empty, "dashboard queries without data:\n" + "\n".join(f"{k}: {v}" for k, v in empty.items())


@needs_prometheus
def test_every_dashboard_query_returns_data(scraped) -> None:
    assert_every_dashboard_query_returns_data(scraped.prom, {"radcom": VARIABLES})


@needs_prometheus
def test_every_dashboard_query_returns_data_without_a_federation_label(scraped) -> None:
    """make prometheus's Prometheus: static targets, no federation label on any series."""
    local = scraped.local
    assert local.query("fedgradnorm_round") and not local.query('{__name__=~"fedgradnorm_.+", federation!=""}')
    assert_every_dashboard_query_returns_data(local, LOCAL_VARIABLES)
    # The filter is what lets them through: the strict form of the same query finds nothing here.
    assert not local.query('fedgradnorm_round{federation="radcom"}')


@needs_prometheus
def test_shipped_rules_load_evaluate_and_stay_quiet_on_a_healthy_run(scraped) -> None:
    prom = scraped.prom
    groups = prom.api("rules")["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert {n for n, r in loaded.items() if r["type"] == "alerting"} == set(alert_names())
    errors = {n: r.get("lastError") for n, r in loaded.items() if r["health"] != "ok"}
    assert not errors, f"rules that fail to evaluate: {errors}"
    # The recording rules see the run: a mean round duration and a young round.
    (age,) = prom.wait_for('fedgradnorm:round_age_seconds{federation="radcom"}', timeout=30)
    (after,) = prom.query('fedgradnorm:round_stall_after_seconds{federation="radcom"}')
    assert 0 <= float(age["value"][1]) < float(after["value"][1]) == 300
    assert prom.query('fedgradnorm:round_duration_seconds:mean{federation="radcom"} > 0')
    assert prom.query('fedgradnorm:min_nodes{federation="radcom"}')[0]["value"][1] == str(len(TASKS))
    assert prom.alerts() == [], "alerts on a healthy run"
    assert prom.query(ALERTS) == []


@needs_prometheus
@pytest.mark.long  # a second Prometheus and a dead target (about 40 s): make test-faults, run by CI
def test_a_target_that_is_down_fires_an_alert_locally_and_nothing_else_does(scraped) -> None:
    """The local Prometheus scrapes one more aggregator address, where nothing listens: after the
    rule's `for`, FedGradNormTargetDown fires for it, and the rest of the run raises nothing."""
    local, down = scraped.local, scraped.down
    end = time.monotonic() + 120
    while True:
        alerts = local.alerts()
        firing = [a for a in alerts if a["state"] == "firing"]
        if firing or time.monotonic() > end:
            break
        time.sleep(1)
    assert [(a["labels"]["alertname"], a["labels"]["instance"], a["labels"]["pod"]) for a in alerts] == [
        ("FedGradNormTargetDown", down, "gone")
    ], alerts
    assert firing and firing[0]["labels"]["severity"] == "critical"
    assert "is down" in firing[0]["annotations"]["summary"] and firing[0]["annotations"]["description"]
    (series,) = local.query(ALERTS)
    assert series["metric"]["alertstate"] == "firing"


def alert_names() -> list[str]:
    rules = promharness.yaml.safe_load(next(iter(promharness.shipped_rule_files().values())))
    return [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]


@needs_prometheus
def test_dashboard_variables_offer_the_federation_and_its_tasks(scraped) -> None:
    prom = scraped.prom
    board = promharness.dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["federation"]["query"] == "label_values(fedgradnorm_round, federation)"
    federations = prom.api("label/federation/values", **{"match[]": "fedgradnorm_round"})
    assert "radcom" in federations
    assert variables["task"]["query"] == 'label_values(fedgradnorm_task_weight{federation=~"$federation|"}, task)'
    for name, prometheus in (("radcom", prom), ("All", scraped.local)):
        match = promharness.substitute('fedgradnorm_task_weight{federation=~"$federation|"}', LOCAL_VARIABLES[name])
        assert set(prometheus.api("label/task/values", **{"match[]": match})) == set(TASKS), name
    assert (
        variables["metric"]["query"] == 'label_values(fedgradnorm_task_test_metric{federation=~"$federation|"}, metric)'
    )
    assert prom.api("label/metric/values", **{"match[]": "fedgradnorm_task_test_metric"}) == ["accuracy"]


@needs_prometheus
def test_a_weight_series_over_time_has_one_line_per_task(scraped) -> None:
    """The dashboard's main panel as a range query: the weights p over the rounds so far."""
    prom = scraped.prom
    board = promharness.dashboard()
    panel = next(p for p in board["panels"] if p["title"] == "Task weight p")
    expr = promharness.substitute(panel["targets"][0]["expr"], VARIABLES)
    now = time.time()
    lines = prom.query_range(expr, now - 120, now, 1)
    assert {s["metric"]["task"] for s in lines} == set(TASKS)
    assert all(len(s["values"]) >= 2 for s in lines)


def promtool_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=60)


def promtool_knows_kubernetes_sd(tmp_path: Path) -> bool:
    """Debian's build leaves out Kubernetes discovery (``field kubernetes_sd_configs not found``)."""
    probe = tmp_path / "k8s-sd.yml"
    probe.write_text("scrape_configs:\n  - job_name: x\n    kubernetes_sd_configs:\n      - role: pod\n")
    return promtool_check(probe).returncode == 0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is missing: apt-get install prometheus")
def test_promtool_accepts_the_shipped_scrape_configuration(tmp_path: Path) -> None:
    """The shipped prometheus.yml as it is where promtool has Kubernetes discovery; otherwise (Debian)
    with discovery swapped for static targets, everything else (globals, relabelling) unchanged."""
    shipped = promharness.shipped_prometheus_config()
    if promtool_knows_kubernetes_sd(tmp_path):
        text = shipped
    else:
        targets = {"radcom-aggregator-0": ("radcom-aggregator", "127.0.0.1:9464")}
        config = promharness.loopback_config(targets, interval="15s")
        assert (
            config["scrape_configs"][0]["relabel_configs"]
            == promharness.yaml.safe_load(shipped)["scrape_configs"][0]["relabel_configs"]
        )
        text = promharness.yaml.safe_dump(config)
    conf = tmp_path / "prometheus.yml"
    conf.write_text(text)
    res = promtool_check(conf)
    assert res.returncode == 0, res.stdout + res.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(text.replace("action: keep", "action: kept", 1))
    assert promtool_check(broken).returncode != 0, "promtool must reject a broken configuration"
