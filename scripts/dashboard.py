"""Generate the FedGradNorm Grafana dashboard and the ConfigMap that provisions it.

    python scripts/dashboard.py            # write both files (``make dashboard``)
    python scripts/dashboard.py --check    # exit 1 if either file is not what this script writes

The dashboard is built with Grafana's typed builders (PyPI ``grafana-foundation-sdk``, generated
from Grafana's own schema) and written twice:

* ``deploy/grafana/fedgradnorm.json`` for import by hand (Dashboards > New > Import);
* ``deploy/k8s/40-grafana-dashboard.yaml``, a ConfigMap holding the same JSON, which Grafana's
  file provider loads at its first start (``deploy/k8s/41-grafana.yaml``).

Every query filters on the ``federation`` label that Prometheus's scrape configuration copies
from the pods' ``fedgradnorm.io/federation`` label (``deploy/k8s/30-prometheus.yaml``), with
``federation=~"$federation|"``: series without the label match as well, so the dashboard works on a
Prometheus that scrapes a local run (``make prometheus``), which adds no such label.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    DynamicConfigValue,
    Threshold,
    ThresholdsMode,
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
FED = 'federation=~"$federation|"'  # the chosen federation, or no federation label at all (a local run)
TASKS = f'{FED}, task=~"$task"'


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    """One panel of the table below: what it shows; ``kind`` says how (stat, series or bars)."""

    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    width: int = 12
    height: int = 8
    kind: str = "series"  # "stat": one number; "series": lines; "bars": a counter's increases
    decimals: int = 0  # stat only
    no_value: str = ""  # stat only: what to show without data
    thresholds: tuple[tuple[float | None, str], ...] = ((None, "green"),)  # (from value, colour); stat only
    soft_min: float | None = None
    repeat: str = ""  # a variable: one copy of the panel per value
    units: tuple[tuple[str, str, float | None, float | None], ...] = ()  # (series name regexp, unit, min, max)


def q(expr: str, legend: str) -> tuple[Query]:
    return (Query(expr, legend),)


RED_AT_ZERO = ((None, "red"), (1, "green"))  # no node at all: nothing trains


def stat_panel(title: str, description: str, expr: str, legend: str, **kw: Any) -> Panel:
    return Panel(title, description, q(expr, legend), kind="stat", width=4, height=4, **kw)


def mean_of(histogram: str, by: str = "") -> str:
    """Mean of a histogram's observations per $__rate_interval (``by``: its grouping)."""
    group = f" by ({by}) " if by else ""
    return (
        f"sum{group}(rate({histogram}_sum{{{FED}}}[$__rate_interval]))"
        f" / sum{group}(rate({histogram}_count{{{FED}}}[$__rate_interval]))"
    )


def quantile(phi: str, histogram: str) -> str:
    return f"histogram_quantile({phi}, sum by (le) (rate({histogram}_bucket{{{FED}}}[$__rate_interval])))"


def per_task(metric: str) -> tuple[Query]:
    return q(f"avg by (task) ({metric}{{{TASKS}}})", "{{task}}")


# The dashboard, row by row: (row title, its panels), laid out left to right in this order.
ROWS: list[tuple[str, list[Panel]]] = [
    (
        "Federation",
        [
            stat_panel(
                "Round",
                "The aggregator's current round.",
                f"max(fedgradnorm_round{{{FED}}})",
                "round",
                thresholds=((None, "blue"),),
            ),
            stat_panel(
                "Registered nodes",
                "Edge nodes registered with the aggregator (a node added with kubectl scale shows here first).",
                f"sum(fedgradnorm_registered_nodes{{{FED}}})",
                "registered",
                thresholds=RED_AT_ZERO,
            ),
            stat_panel(
                "Participants (last round)",
                "Nodes whose update the last round used.",
                f"sum(fedgradnorm_round_participants{{{FED}}})",
                "participants",
                thresholds=RED_AT_ZERO,
            ),
            stat_panel(
                "Σ p",
                "Sum of the task weights: FedGradNorm renormalises p to the number of participating nodes.",
                f"sum(fedgradnorm_task_weight{{{FED}}})",
                "sum p",
                decimals=3,
            ),
            stat_panel(
                "F_grad",
                "GradNorm auxiliary loss of the last round (how far the gradient norms are from their targets).",
                f"max(fedgradnorm_f_grad{{{FED}}})",
                "F_grad",
                decimals=4,
            ),
            stat_panel(
                "Updates refused (1h)",
                "Submitted updates the aggregator refused in the last hour, all reasons.",
                f'sum(increase(fedgradnorm_updates_total{{{FED}, outcome!="accepted"}}[1h]))',
                "refused",
                no_value="0",
                thresholds=((None, "green"), (1, "orange"), (10, "red")),
            ),
        ],
    ),
    (
        "Task weighting",
        [
            Panel(
                "Task weight p",
                "The loss weight of each task, one line per task (averaged over the task's nodes): the paper's "
                "Fig. 2f/3d, live. Tasks that train slower than the others get more weight.",
                per_task("fedgradnorm_task_weight"),
                width=16,
                height=10,
            ),
            Panel(
                "Task weight p per node",
                "One line per edge node, when a task has several.",
                q(f"fedgradnorm_task_weight{{{TASKS}}}", "{{task}} {{node}}"),
                width=8,
                height=10,
            ),
            Panel(
                "Loss ratio F~ = F_k / F_0",
                "Inverse training rate of each task: the loss of the round over the node's initial loss.",
                per_task("fedgradnorm_task_loss_ratio"),
            ),
            Panel(
                "Training loss F_k",
                "Each task's local training loss in the last round.",
                per_task("fedgradnorm_task_train_loss"),
            ),
            Panel(
                "Test metric: $metric",
                "What each node reports on its test split, one panel per metric so that each has its own axis: "
                "accuracy (higher is better; RadCom, MTFL's attributes) or landmark_error_px, the landmark error "
                "in pixels (lower is better; MTFL's landmarks).",
                q(
                    f'avg by (task, metric) (fedgradnorm_task_test_metric{{{TASKS}, metric=~"$metric"}})',
                    "{{task}} {{metric}}",
                ),
                repeat="metric",
                units=((".* accuracy$", "percentunit", 0, 1), (".* landmark_error_px$", "suffix: px", 0, None)),
            ),
            Panel("Test loss", "Each task's loss on its test split.", per_task("fedgradnorm_task_test_loss")),
            Panel(
                "Gradient norm on the shared layer",
                "Norm of each task's weighted gradient on the last shared layer, which GradNorm balances.",
                per_task("fedgradnorm_task_grad_norm"),
            ),
            Panel(
                "GradNorm loss F_grad",
                "The auxiliary loss whose gradient moves p.",
                q(f"max(fedgradnorm_f_grad{{{FED}}})", "F_grad"),
            ),
        ],
    ),
    (
        "Rounds",
        [
            Panel(
                "Round duration",
                "Wall time from a round's opening to the end of its server step (the slowest participant, or the "
                "round timeout, plus the step); the state commit runs beside the next round.",
                (
                    Query(quantile("0.5", "fedgradnorm_round_duration_seconds"), "p50"),
                    Query(quantile("0.95", "fedgradnorm_round_duration_seconds"), "p95"),
                    Query(mean_of("fedgradnorm_round_duration_seconds"), "mean"),
                ),
                unit="s",
                width=8,
            ),
            Panel(
                "Round phases",
                "Mean wall time of each phase of a round: collect (opening until the last update arrived: fetches, "
                "the nodes' training, submits), step (the FedGradNorm server step) and commit (the state file, "
                "written while the next round runs; the next step waits for it).",
                q(mean_of("fedgradnorm_round_phase_seconds", "phase"), "{{phase}}"),
                unit="s",
                width=8,
            ),
            Panel(
                "Participants per round",
                "Nodes whose update each round used, against the nodes registered: a new node is registered at "
                "once and participates from the next round on.",
                (
                    Query(f"sum(fedgradnorm_round_participants{{{FED}}})", "participants"),
                    Query(f"sum(fedgradnorm_registered_nodes{{{FED}}})", "registered"),
                ),
                width=8,
                soft_min=0,
            ),
            Panel(
                "Refused updates by reason",
                "Updates the aggregator did not use, by outcome: wrong_round (late), unknown_node, bad_token, "
                "bad_stream, payload checks, ...",
                q(
                    f'sum by (outcome) (increase(fedgradnorm_updates_total{{{FED}, outcome!="accepted"}}'
                    "[$__rate_interval]))",
                    "{{outcome}}",
                ),
                width=8,
                kind="bars",
            ),
            Panel(
                "Updates per second",
                "Submitted updates by outcome.",
                q(f"sum by (outcome) (rate(fedgradnorm_updates_total{{{FED}}}[$__rate_interval]))", "{{outcome}}"),
                unit="ops",
                width=8,
            ),
            Panel(
                "Wire traffic",
                "Payload bytes per second between the aggregator and its nodes (omega sent, gradients received).",
                q(f"sum by (direction) (rate(fedgradnorm_bytes_total{{{FED}}}[$__rate_interval]))", "{{direction}}"),
                unit="Bps",
                width=8,
            ),
            Panel(
                "Registrations by outcome",
                "Register calls: registered, resumed, and refusals (bad_enrollment, rate_limited, name_taken, ...).",
                q(
                    f"sum by (outcome) (increase(fedgradnorm_registrations_total{{{FED}}}[$__rate_interval]))",
                    "{{outcome}}",
                ),
                kind="bars",
            ),
            Panel(
                "Aggregator halted",
                "1 while rounds do not advance: the state cannot be committed (disk full, read-only), or the round "
                "driver failed (restart the aggregator; the cause is GetState's halted_reason).",
                q(f"max(fedgradnorm_halted{{{FED}}})", "halted"),
                soft_min=0,
            ),
            Panel(
                "Refused rounds",
                "Rounds whose server step would have made omega or its Adam moments non-finite: refused, the state "
                "kept, the round reopened (a node sending absurd but finite numbers).",
                q(f"sum(increase(fedgradnorm_rounds_refused_total{{{FED}}}[$__rate_interval]))", "refused"),
                kind="bars",
            ),
            Panel(
                "Streams cut off",
                "FetchRound/SubmitUpdate streams the aggregator cancelled: replaced by the node's newer one, or still "
                "running past the round's deadline (a reader that stalls, a trickling upload).",
                q(
                    f"sum by (reason) (increase(fedgradnorm_streams_cancelled_total{{{FED}}}[$__rate_interval]))",
                    "{{reason}}",
                ),
                kind="bars",
            ),
        ],
    ),
    (
        "Edge nodes",
        [
            Panel(
                "Local step time",
                "Mean wall time of a node's local client step (tau_h head and tau_omega shared updates).",
                q(mean_of("fedgradnorm_edge_step_seconds", "pod"), "{{pod}}"),
                unit="s",
                width=8,
            ),
            Panel(
                "Training throughput",
                "Samples per second of each node's last step.",
                q(f"fedgradnorm_edge_samples_per_second{{{FED}}}", "{{pod}}"),
                width=8,
            ),
            Panel(
                "Edge training loss",
                "F_k as each node sees it.",
                q(f"fedgradnorm_edge_train_loss{{{FED}}}", "{{pod}}"),
                width=8,
            ),
            Panel(
                "Connected",
                "1 while the node's calls to the aggregator succeed.",
                q(f"fedgradnorm_edge_connected{{{FED}}}", "{{pod}}"),
                width=8,
                soft_min=0,
            ),
            Panel(
                "Reconnects",
                "Retries after the aggregator was away.",
                q(f"sum by (pod) (increase(fedgradnorm_edge_reconnects_total{{{FED}}}[$__rate_interval]))", "{{pod}}"),
                width=8,
                kind="bars",
            ),
            Panel(
                "Last round submitted",
                "The last round each node submitted to.",
                q(f"fedgradnorm_edge_round{{{FED}}}", "{{pod}}"),
                width=8,
            ),
        ],
    ),
    (
        # A site's relay serves the aggregator's service to the site's nodes and sends one partial sum per
        # round upstream. The aggregator's series carry the relay's name as the label relay; the relays'
        # own (fedgradnorm_relay_* of their pods) carry pod and site. The aggregator and the relays both
        # export fedgradnorm_relay_partial_sums_total: relay!="" picks the aggregator's.
        "Relays",
        [
            Panel(
                "Relays attached",
                "Relays attached to the aggregator (each serves one site's edge nodes); 0 where every node "
                "dials the aggregator.",
                q(f"sum(fedgradnorm_relays{{{FED}}})", "relays"),
                kind="stat",
                width=4,
                thresholds=((None, "blue"),),
            ),
            Panel(
                "Nodes per relay",
                "Registered edge nodes behind each relay, as the aggregator counts them (nodes that dial the "
                "aggregator are on no line).",
                q(f"sum by (relay) (fedgradnorm_relay_nodes{{{FED}}})", "{{relay}}"),
                width=10,
                soft_min=0,
            ),
            Panel(
                "Partial sums per relay",
                "Partial sums the aggregator accepted from each relay: one per round in which the site had "
                "participants (the site's weighted gradients, summed at the relay).",
                q(
                    f'sum by (relay) (increase(fedgradnorm_relay_partial_sums_total{{{FED}, relay!=""}}'
                    "[$__rate_interval]))",
                    "{{relay}}",
                ),
                width=10,
                kind="bars",
            ),
            Panel(
                "Rounds lost per relay",
                "Rounds whose partial sum from the relay did not arrive within the aggregator's relay timeout "
                "(FEDGRADNORM_RELAY_TIMEOUT, 10 s): the round closed without the site's updates (relay_lost in "
                "Refused updates by reason).",
                q(
                    f"sum by (relay) (increase(fedgradnorm_relay_lost_rounds_total{{{FED}}}[$__rate_interval]))",
                    "{{relay}}",
                ),
                width=8,
                kind="bars",
            ),
            Panel(
                "Relay connected to the aggregator",
                "1 while the aggregator answers the relay; its site's nodes keep their connection to the relay "
                "meanwhile.",
                q(f"fedgradnorm_relay_upstream_connected{{{FED}}}", "{{pod}}"),
                width=8,
                soft_min=0,
            ),
            Panel(
                "Relay traffic: site and uplink",
                "Payload bytes per second of each relay with its site's nodes (omega to each node, gradients from "
                "each) and with the aggregator (omega once, one partial sum): the fan-in the relay saves the "
                "aggregator.",
                (
                    Query(
                        f"sum by (pod, direction) (rate(fedgradnorm_relay_bytes_total{{{FED}}}[$__rate_interval]))",
                        "{{pod}} site {{direction}}",
                    ),
                    Query(
                        "sum by (pod, direction) "
                        f"(rate(fedgradnorm_relay_uplink_bytes_total{{{FED}}}[$__rate_interval]))",
                        "{{pod}} uplink {{direction}}",
                    ),
                ),
                unit="Bps",
                width=8,
            ),
        ],
    ),
]


def _target(query: Query, ref: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(query.expr).legend_format(query.legend).ref_id(ref).datasource(DS).range()


def _legend() -> cb.VizLegendOptions:
    return (
        cb.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.TABLE)
        .placement(common.LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(["lastNotNull"])
    )


def render(p: Panel) -> stat.Panel | timeseries.Panel:
    """The typed Grafana panel of one entry of ROWS."""
    if p.kind == "stat":
        panel = (
            stat.Panel()
            .title(p.title)
            .description(p.description)
            .datasource(DS)
            .unit(p.unit)
            .decimals(p.decimals)
            .span(p.width)
            .height(p.height)
            .graph_mode(common.BigValueGraphMode.AREA)
            .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        )
        if p.no_value:
            panel = panel.no_value(p.no_value)
        steps = [Threshold(value=value, color=color) for value, color in p.thresholds]
        panel = panel.color_mode(common.BigValueColorMode.VALUE).thresholds(
            dash.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(steps)
        )
    elif p.kind in ("series", "bars"):
        panel = (
            timeseries.Panel()
            .title(p.title)
            .description(p.description)
            .datasource(DS)
            .unit(p.unit)
            .span(p.width)
            .height(p.height)
            .line_width(2)
            .fill_opacity(60 if p.kind == "bars" else 10)
            .show_points(common.VisibilityMode.NEVER)
            .legend(_legend())
            .tooltip(cb.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING))
        )
        if p.kind == "bars":
            panel = panel.draw_style(common.GraphDrawStyle.BARS)
        if p.soft_min is not None:
            panel = panel.axis_soft_min(p.soft_min)
        for regexp, unit, low, high in p.units:
            properties = [DynamicConfigValue(id_val="unit", value=unit)]
            properties += [
                DynamicConfigValue(id_val=k, value=v) for k, v in (("min", low), ("max", high)) if v is not None
            ]
            panel = panel.override_by_regexp(regexp, properties)
    else:
        raise ValueError(f"{p.title}: unknown kind {p.kind!r}")
    if p.repeat:
        panel = panel.repeat(p.repeat).repeat_direction("h")
    for i, query in enumerate(p.queries):
        panel = panel.with_target(_target(query, chr(ord("A") + i)))
    return panel


def build() -> dict:
    """The dashboard as the JSON object Grafana stores."""
    d = (
        dash.Dashboard("FedGradNorm")
        .uid("fedgradnorm")
        .description(
            "Personalized federated multi-task learning with dynamic loss weighting: the per-task weights p "
            "the aggregator learns (paper Fig. 2f/3d, live), the losses behind them, rounds, edge nodes and relays."
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
            .include_all(True)
            .all_value(".*")
            .current(VariableOption(selected=True, text="radcom", value="radcom"))
        )
        .with_variable(
            dash.QueryVariable("task")
            .label("Task")
            .datasource(DS)
            .query(f"label_values(fedgradnorm_task_weight{{{FED}}}, task)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(VariableOption(selected=True, text="All", value="$__all"))
        )
        .with_variable(
            dash.QueryVariable("metric")
            .label("Test metric")
            .datasource(DS)
            .query(f"label_values(fedgradnorm_task_test_metric{{{FED}}}, metric)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(VariableOption(selected=True, text="All", value="$__all"))
        )
    )

    for row, panels in ROWS:
        d = d.with_row(dash.Row(row))
        for panel in panels:
            d = d.with_panel(render(panel))
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
