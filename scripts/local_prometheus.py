"""A local Prometheus for the by-hand path: scrapes the services on this machine, with the shipped rules.

    python3 scripts/local_prometheus.py                      # make prometheus
    python3 scripts/local_prometheus.py --edge-node modulation=127.0.0.1:9465 \\
        --edge-node signal=127.0.0.1:9466 --edge-node anomaly=127.0.0.1:9467
    python3 scripts/local_prometheus.py --relay site-a=127.0.0.1:9470 --edge-node ...   # and a relay

Runs Debian's ``prometheus`` (``apt-get install prometheus``) in the foreground on 127.0.0.1:9090
(Ctrl-C stops it), with its configuration and data under ``runs/prometheus``. It scrapes the
aggregator's metrics port (``--aggregator``, default 127.0.0.1:9464, the aggregator's default
``--metrics-listen``), each ``--relay [NAME=]HOST:PORT`` (a relay's ``--metrics-listen``, default
127.0.0.1:9466) and each ``--edge-node [NAME=]HOST:PORT`` (edge nodes export metrics only when
started with ``--metrics-listen``), and loads deploy/prometheus/fedgradnorm-rules.yml plus a
small settings file of its own: the ``--min-nodes`` and ``--rounds`` the aggregator was started
with, which the alerts compare against. Alerts show at http://127.0.0.1:9090/alerts.

The targets get the labels job="fedgradnorm", component (aggregator, relay or edge-node) and pod (the
NAME, else the address), but no federation or namespace label: the Grafana dashboard and the rules
accept series without them. Needs only Python's standard library (the configuration is written as
JSON, which Prometheus reads as YAML).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "fedgradnorm-rules.yml"
JOB = "fedgradnorm"


def target(spec: str, component: str) -> dict[str, Any]:
    """``[NAME=]HOST:PORT`` as a static target with its labels."""
    name, _, address = spec.rpartition("=")
    if not address.rpartition(":")[2].isdigit():
        raise ValueError(f"{spec!r}: want [NAME=]HOST:PORT")
    return {"targets": [address], "labels": {"component": component, "pod": name or address}}


def settings_rules(min_nodes: int, rounds: int) -> dict[str, Any]:
    """The settings group of the shipped rules for series without a federation label (a local run)."""
    return {
        "groups": [
            {
                "name": "fedgradnorm-local-settings",
                "rules": [
                    {"record": "fedgradnorm:min_nodes", "expr": f"vector({min_nodes})"},
                    {"record": "fedgradnorm:rounds_planned", "expr": f"vector({rounds})"},
                ],
            }
        ]
    }


def config(
    aggregators: list[str],
    edge_nodes: list[str],
    rule_files: list[str],
    interval: str = "5s",
    relays: list[str] | None = None,
) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "rule_files": rule_files,
        "scrape_configs": [
            {
                "job_name": JOB,
                "static_configs": [target(a, "aggregator") for a in aggregators]
                + [target(r, "relay") for r in relays or []]
                + [target(e, "edge-node") for e in edge_nodes],
            }
        ],
    }


def write(workdir: Path, args: argparse.Namespace) -> Path:
    """prometheus.yml and local-settings.yml in ``workdir``; the path of prometheus.yml."""
    workdir.mkdir(parents=True, exist_ok=True)
    settings = workdir / "local-settings.yml"
    settings.write_text(json.dumps(settings_rules(args.min_nodes, args.rounds), indent=2) + "\n")
    conf = workdir / "prometheus.yml"
    body = config(
        args.aggregator or ["127.0.0.1:9464"], args.edge_node, [str(RULES), str(settings)], args.interval, args.relay
    )
    conf.write_text(json.dumps(body, indent=2) + "\n")
    return conf


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--aggregator",
        action="append",
        default=[],
        metavar="[NAME=]HOST:PORT",
        help="an aggregator's metrics address (default 127.0.0.1:9464); repeatable",
    )
    p.add_argument(
        "--relay",
        action="append",
        default=[],
        metavar="[NAME=]HOST:PORT",
        help="a relay's --metrics-listen address (its default: 127.0.0.1:9466); repeatable",
    )
    p.add_argument(
        "--edge-node",
        action="append",
        default=[],
        metavar="[NAME=]HOST:PORT",
        help="an edge node's --metrics-listen address; repeatable",
    )
    p.add_argument("--min-nodes", type=int, default=3, help="the aggregator's --min-nodes (default 3)")
    p.add_argument("--rounds", type=int, default=0, help="the aggregator's --rounds (default 0: until stopped)")
    p.add_argument("--listen", default="127.0.0.1:9090", help="Prometheus's web address (default 127.0.0.1:9090)")
    p.add_argument("--dir", type=Path, default=ROOT / "runs" / "prometheus", help="configuration and data")
    p.add_argument("--interval", default="5s", help="scrape and rule evaluation interval (default 5s)")
    p.add_argument("--dry-run", action="store_true", help="write the configuration, print the command, exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        conf = write(args.dir, args)
    except ValueError as e:
        print(f"local_prometheus: {e}", file=sys.stderr)
        return 2
    binary = shutil.which("prometheus")
    command = [
        binary or "prometheus",
        f"--config.file={conf}",
        f"--storage.tsdb.path={args.dir / 'data'}",
        f"--web.listen-address={args.listen}",
        "--storage.tsdb.retention.time=2d",
    ]
    print(" ".join(command), flush=True)
    if args.dry_run:
        return 0
    if binary is None:
        print(
            "local_prometheus: prometheus is missing: apt-get install -y --no-install-recommends prometheus",
            file=sys.stderr,
        )
        return 1
    print(f"Prometheus on http://{args.listen} (alerts: /alerts); Ctrl-C stops it", flush=True)
    os.execv(binary, command)


if __name__ == "__main__":
    sys.exit(main())
