"""Generate the FedGradNorm Grafana dashboard and the ConfigMap that provisions it.

    python scripts/dashboard.py            # write both files (``make dashboard``)
    python scripts/dashboard.py --check    # exit 1 if either file is not what this script writes

The dashboard is built with Grafana's typed builders (PyPI ``grafana-foundation-sdk``, generated
from Grafana's own schema) and written twice:

* ``deploy/grafana/fedgradnorm.json`` for import by hand (Dashboards > New > Import);
* ``deploy/k8s/40-grafana-dashboard.yaml``, a ConfigMap holding the same JSON, which Grafana's
  file provider loads at its first start (``deploy/k8s/41-grafana.yaml``).

Every query filters on the ``federation`` label that Prometheus's scrape configuration copies
from the pods' ``fedgradnorm.io/federation`` label (``deploy/k8s/30-prometheus.yaml``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

ROOT = Path(__file__).resolve().parent.parent
JSON_PATH = ROOT / "deploy" / "grafana" / "fedgradnorm.json"
CONFIGMAP_PATH = ROOT / "deploy" / "k8s" / "40-grafana-dashboard.yaml"
CONFIGMAP_NAME = "grafana-dashboard-fedgradnorm"
CONFIGMAP_KEY = "fedgradnorm.json"
NAMESPACE = "fedgradnorm"

DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
FED = 'federation="$federation"'
TASKS = f'{FED}, task=~"$task"'


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


def _target(q: Query, ref: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(q.expr).legend_format(q.legend).ref_id(ref).datasource(DS).range()


def _legend() -> cb.VizLegendOptions:
    return (
        cb.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.TABLE)
        .placement(common.LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(["lastNotNull"])
    )


def series(
    title: str,
    description: str,
    queries: list[Query],
    *,
    unit: str = "short",
    width: int = 12,
    height: int = 8,
    bars: bool = False,
    soft_min: float | None = None,
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .span(width)
        .height(height)
        .line_width(2)
        .fill_opacity(10 if not bars else 60)
        .show_points(common.VisibilityMode.NEVER)
        .legend(_legend())
        .tooltip(cb.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING))
    )
    if bars:
        panel = panel.draw_style(common.GraphDrawStyle.BARS)
    if soft_min is not None:
        panel = panel.axis_soft_min(soft_min)
    for i, q in enumerate(queries):
        panel = panel.with_target(_target(q, chr(ord("A") + i)))
    return panel


def single(
    title: str, description: str, query: Query, *, unit: str = "short", decimals: int = 0, no_value: str = ""
) -> stat.Panel:
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .decimals(decimals)
        .span(4)
        .height(4)
        .graph_mode(common.BigValueGraphMode.AREA)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(_target(query, "A"))
    )
    return panel.no_value(no_value) if no_value else panel


def build() -> dict:
    """The dashboard as the JSON object Grafana stores."""
    d = (
        dash.Dashboard("FedGradNorm")
        .uid("fedgradnorm")
        .description(
            "Personalized federated multi-task learning with dynamic loss weighting: the per-task weights p "
            "the aggregator learns (paper Fig. 2f/3d, live), the losses behind them, rounds and edge nodes."
        )
        .tags(["fedgradnorm", "federated-learning"])
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .time("now-1h", "now")
        .refresh("10s")
        .timezone("browser")
        .with_variable(
            dash.DatasourceVariable("datasource")
            .label("Data source")
            .type("prometheus")
            .current(VariableOption(selected=True, text="Prometheus", value="prometheus"))
        )
        .with_variable(
            dash.QueryVariable("federation")
            .label("Federation")
            .datasource(DS)
            .query("label_values(fedgradnorm_round, federation)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .current(VariableOption(selected=True, text="radcom", value="radcom"))
        )
        .with_variable(
            dash.QueryVariable("task")
            .label("Task")
            .datasource(DS)
            .query('label_values(fedgradnorm_task_weight{federation="$federation"}, task)')
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(VariableOption(selected=True, text="All", value="$__all"))
        )
    )

    d = d.with_row(dash.Row("Federation"))
    d = d.with_panel(
        single("Round", "The aggregator's current round.", Query(f"max(fedgradnorm_round{{{FED}}})", "round"))
    )
    d = d.with_panel(
        single(
            "Registered nodes",
            "Edge nodes registered with the aggregator (a node added with kubectl scale shows here first).",
            Query(f"sum(fedgradnorm_registered_nodes{{{FED}}})", "registered"),
        )
    )
    d = d.with_panel(
        single(
            "Participants (last round)",
            "Nodes whose update the last round used.",
            Query(f"sum(fedgradnorm_round_participants{{{FED}}})", "participants"),
        )
    )
    d = d.with_panel(
        single(
            "Σ p",
            "Sum of the task weights: FedGradNorm renormalises p to the number of participating nodes.",
            Query(f"sum(fedgradnorm_task_weight{{{FED}}})", "sum p"),
            decimals=3,
        )
    )
    d = d.with_panel(
        single(
            "F_grad",
            "GradNorm auxiliary loss of the last round (how far the gradient norms are from their targets).",
            Query(f"max(fedgradnorm_f_grad{{{FED}}})", "F_grad"),
            decimals=4,
        )
    )
    d = d.with_panel(
        single(
            "Updates refused (1h)",
            "Submitted updates the aggregator refused in the last hour, all reasons.",
            Query(
                f'sum(increase(fedgradnorm_updates_total{{{FED}, outcome!="accepted"}}[1h]))',
                "refused",
            ),
            no_value="0",
        )
    )

    d = d.with_row(dash.Row("Task weighting"))
    d = d.with_panel(
        series(
            "Task weight p",
            "The loss weight of each task, one line per task (averaged over the task's nodes): the paper's "
            "Fig. 2f/3d, live. Tasks that train slower than the others get more weight.",
            [Query(f"avg by (task) (fedgradnorm_task_weight{{{TASKS}}})", "{{task}}")],
            width=16,
            height=10,
        )
    )
    d = d.with_panel(
        series(
            "Task weight p per node",
            "One line per edge node, when a task has several.",
            [Query(f"fedgradnorm_task_weight{{{TASKS}}}", "{{task}} {{node}}")],
            width=8,
            height=10,
        )
    )
    d = d.with_panel(
        series(
            "Loss ratio F~ = F_k / F_0",
            "Inverse training rate of each task: the loss of the round over the node's initial loss.",
            [Query(f"avg by (task) (fedgradnorm_task_loss_ratio{{{TASKS}}})", "{{task}}")],
        )
    )
    d = d.with_panel(
        series(
            "Training loss F_k",
            "Each task's local training loss in the last round.",
            [Query(f"avg by (task) (fedgradnorm_task_train_loss{{{TASKS}}})", "{{task}}")],
        )
    )
    d = d.with_panel(
        series(
            "Test metric",
            "What each node reports on its test split: accuracy (higher is better) or the landmark error "
            "in pixels (lower is better).",
            [Query(f"avg by (task, metric) (fedgradnorm_task_test_metric{{{TASKS}}})", "{{task}} {{metric}}")],
        )
    )
    d = d.with_panel(
        series(
            "Test loss",
            "Each task's loss on its test split.",
            [Query(f"avg by (task) (fedgradnorm_task_test_loss{{{TASKS}}})", "{{task}}")],
        )
    )
    d = d.with_panel(
        series(
            "Gradient norm on the shared layer",
            "Norm of each task's weighted gradient on the last shared layer, which GradNorm balances.",
            [Query(f"avg by (task) (fedgradnorm_task_grad_norm{{{TASKS}}})", "{{task}}")],
        )
    )
    d = d.with_panel(
        series(
            "GradNorm loss F_grad",
            "The auxiliary loss whose gradient moves p.",
            [Query(f"max(fedgradnorm_f_grad{{{FED}}})", "F_grad")],
        )
    )

    d = d.with_row(dash.Row("Rounds"))
    d = d.with_panel(
        series(
            "Round duration",
            "Wall time from a round's opening to the end of its server step (the slowest participant, or the "
            "round timeout, plus the step); the state commit runs beside the next round.",
            [
                Query(
                    f"histogram_quantile(0.5, sum by (le) (rate(fedgradnorm_round_duration_seconds_bucket{{{FED}}}"
                    "[$__rate_interval])))",
                    "p50",
                ),
                Query(
                    f"histogram_quantile(0.95, sum by (le) (rate(fedgradnorm_round_duration_seconds_bucket{{{FED}}}"
                    "[$__rate_interval])))",
                    "p95",
                ),
                Query(
                    f"sum(rate(fedgradnorm_round_duration_seconds_sum{{{FED}}}[$__rate_interval]))"
                    f" / sum(rate(fedgradnorm_round_duration_seconds_count{{{FED}}}[$__rate_interval]))",
                    "mean",
                ),
            ],
            unit="s",
            width=8,
        )
    )
    d = d.with_panel(
        series(
            "Round phases",
            "Mean wall time of each phase of a round: collect (opening until the last update arrived: fetches, "
            "the nodes' training, submits), step (the FedGradNorm server step) and commit (the state file, written while the next round runs; "
            "the next step waits for it).",
            [
                Query(
                    f"sum by (phase) (rate(fedgradnorm_round_phase_seconds_sum{{{FED}}}[$__rate_interval]))"
                    f" / sum by (phase) (rate(fedgradnorm_round_phase_seconds_count{{{FED}}}[$__rate_interval]))",
                    "{{phase}}",
                ),
            ],
            unit="s",
            width=8,
        )
    )
    d = d.with_panel(
        series(
            "Participants per round",
            "Nodes whose update each round used, against the nodes registered: a new node is registered at "
            "once and participates from the next round on.",
            [
                Query(f"sum(fedgradnorm_round_participants{{{FED}}})", "participants"),
                Query(f"sum(fedgradnorm_registered_nodes{{{FED}}})", "registered"),
            ],
            width=8,
            soft_min=0,
        )
    )
    d = d.with_panel(
        series(
            "Refused updates by reason",
            "Updates the aggregator did not use, by outcome: wrong_round (late), unknown_node, bad_token, "
            "bad_stream, payload checks, ...",
            [
                Query(
                    f'sum by (outcome) (increase(fedgradnorm_updates_total{{{FED}, outcome!="accepted"}}'
                    "[$__rate_interval]))",
                    "{{outcome}}",
                )
            ],
            width=8,
            bars=True,
        )
    )
    d = d.with_panel(
        series(
            "Updates per second",
            "Submitted updates by outcome.",
            [
                Query(
                    f"sum by (outcome) (rate(fedgradnorm_updates_total{{{FED}}}[$__rate_interval]))",
                    "{{outcome}}",
                )
            ],
            unit="ops",
            width=8,
        )
    )
    d = d.with_panel(
        series(
            "Wire traffic",
            "Payload bytes per second between the aggregator and its nodes (omega sent, gradients received).",
            [
                Query(
                    f"sum by (direction) (rate(fedgradnorm_bytes_total{{{FED}}}[$__rate_interval]))",
                    "{{direction}}",
                )
            ],
            unit="Bps",
            width=8,
        )
    )
    d = d.with_panel(
        series(
            "Registrations by outcome",
            "Register calls: registered, resumed, and refusals (bad_enrollment, rate_limited, name_taken, ...).",
            [
                Query(
                    f"sum by (outcome) (increase(fedgradnorm_registrations_total{{{FED}}}[$__rate_interval]))",
                    "{{outcome}}",
                )
            ],
            width=12,
            bars=True,
        )
    )
    d = d.with_panel(
        series(
            "Aggregator halted",
            "1 while rounds do not advance: the state cannot be committed (disk full, read-only), or the round "
            "driver failed (restart the aggregator; the cause is GetState's halted_reason).",
            [Query(f"max(fedgradnorm_halted{{{FED}}})", "halted")],
            width=12,
            soft_min=0,
        )
    )
    d = d.with_panel(
        series(
            "Refused rounds",
            "Rounds whose server step would have made omega or its Adam moments non-finite: refused, the state "
            "kept, the round reopened (a node sending absurd but finite numbers).",
            [Query(f"sum(increase(fedgradnorm_rounds_refused_total{{{FED}}}[$__rate_interval]))", "refused")],
            width=12,
            bars=True,
        )
    )
    d = d.with_panel(
        series(
            "Streams cut off",
            "FetchRound/SubmitUpdate streams the aggregator cancelled: replaced by the node's newer one, or still "
            "running past the round's deadline (a reader that stalls, a trickling upload).",
            [
                Query(
                    f"sum by (reason) (increase(fedgradnorm_streams_cancelled_total{{{FED}}}[$__rate_interval]))",
                    "{{reason}}",
                )
            ],
            width=12,
            bars=True,
        )
    )

    d = d.with_row(dash.Row("Edge nodes"))
    d = d.with_panel(
        series(
            "Local step time",
            "Mean wall time of a node's local client step (tau_h head and tau_omega shared updates).",
            [
                Query(
                    f"sum by (pod) (rate(fedgradnorm_edge_step_seconds_sum{{{FED}}}[$__rate_interval]))"
                    f" / sum by (pod) (rate(fedgradnorm_edge_step_seconds_count{{{FED}}}[$__rate_interval]))",
                    "{{pod}}",
                )
            ],
            unit="s",
            width=8,
        )
    )
    d = d.with_panel(
        series(
            "Training throughput",
            "Samples per second of each node's last step.",
            [Query(f"fedgradnorm_edge_samples_per_second{{{FED}}}", "{{pod}}")],
            width=8,
        )
    )
    d = d.with_panel(
        series(
            "Edge training loss",
            "F_k as each node sees it.",
            [Query(f"fedgradnorm_edge_train_loss{{{FED}}}", "{{pod}}")],
            width=8,
        )
    )
    d = d.with_panel(
        series(
            "Connected",
            "1 while the node's calls to the aggregator succeed.",
            [Query(f"fedgradnorm_edge_connected{{{FED}}}", "{{pod}}")],
            width=8,
            soft_min=0,
        )
    )
    d = d.with_panel(
        series(
            "Reconnects",
            "Retries after the aggregator was away.",
            [
                Query(
                    f"sum by (pod) (increase(fedgradnorm_edge_reconnects_total{{{FED}}}[$__rate_interval]))",
                    "{{pod}}",
                )
            ],
            width=8,
            bars=True,
        )
    )
    d = d.with_panel(
        series(
            "Last round submitted",
            "The last round each node submitted to.",
            [Query(f"fedgradnorm_edge_round{{{FED}}}", "{{pod}}")],
            width=8,
        )
    )
    board = json.loads(json.dumps(d.build(), cls=JSONEncoder))
    for number, panel in enumerate(board["panels"], start=1):
        panel["id"] = number  # stable panel ids (links like ?viewPanel=N keep working)
    return board


def dashboard_json() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def configmap_yaml(text: str) -> str:
    """The ConfigMap with the JSON as a literal block (written by hand: no YAML library needed)."""
    body = "".join(f"    {line}\n" if line else "\n" for line in text.splitlines())
    return (
        "# GENERATED by scripts/dashboard.py (`make dashboard`) from the same source as\n"
        "# deploy/grafana/fedgradnorm.json; do not edit by hand. Grafana's file provider loads it\n"
        "# (deploy/k8s/41-grafana.yaml).\n"
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        f"  name: {CONFIGMAP_NAME}\n"
        f"  namespace: {NAMESPACE}\n"
        "  labels:\n"
        "    app.kubernetes.io/part-of: fedgradnorm\n"
        "    app.kubernetes.io/component: grafana\n"
        '    grafana_dashboard: "1"\n'
        "data:\n"
        f"  {CONFIGMAP_KEY}: |\n"
        f"{body}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = parser.parse_args(argv)
    text = dashboard_json()
    wanted = {JSON_PATH: text, CONFIGMAP_PATH: configmap_yaml(text)}
    stale = [p for p, content in wanted.items() if not p.exists() or p.read_text() != content]
    if args.check:
        for p in stale:
            print(f"{p.relative_to(ROOT)} is out of date: run `make dashboard`", file=sys.stderr)
        return 1 if stale else 0
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(wanted[p])
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
