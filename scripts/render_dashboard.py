"""Draw the Grafana dashboard's panels from a real Prometheus scraping a real loopback run.

    python scripts/render_dashboard.py --out docs/img/dashboard.png     # make dashboard-png

No Grafana server is installable here, so this is the dashboard's stand-in for the docs: it runs a
RadCom aggregator, the relay of site site-a and three edge nodes on loopback, two of them behind the
relay as in deploy/k8s (scripts/promharness.py), adds a fourth node to the site part-way through (as
`kubectl scale statefulset/radcom-signal` would), has one update refused, then runs every query of
deploy/grafana/fedgradnorm.json over the run with Prometheus's query_range API and lays the panels
out as their gridPos says.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.gridspec import GridSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
import promharness

BG, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
COLORS = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0"]


def refuse_one_update(address: str) -> None:
    import grpc

    from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
    from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.AggregatorStub(channel)
        round_ = stub.GetState(pb.GetStateRequest(), timeout=10).round
        header = pb.SubmitHeader(node_id="not-a-member", session_token="x", round=round_)
        with contextlib.suppress(grpc.RpcError):  # refused: that is the point
            stub.SubmitUpdate(iter([pb.SubmitUpdateRequest(header=header)]), timeout=10)


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip() or "value"


def draw(prom: promharness.Prometheus, start: float, end: float, out: Path, variables: dict[str, str]) -> None:
    board = promharness.dashboard()
    panels = board["panels"]
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(24, height * 0.42), facecolor=BG)
    grid = GridSpec(height, 24, figure=fig, hspace=2.2, wspace=1.6, left=0.03, right=0.99, top=0.975, bottom=0.01)
    step = max(1.0, (end - start) / 300)
    fig.suptitle(
        f"{board['title']}  ·  federation = {variables['federation']}  ·  task = All  "
        f"(drawn from Prometheus by scripts/render_dashboard.py)",
        color=TEXT,
        fontsize=15,
        x=0.01,
        y=0.997,
        ha="left",
    )
    minutes = (end - start) / 60
    for p in panels:
        g = p["gridPos"]
        if p["type"] == "row":
            ax = fig.add_subplot(grid[g["y"], :])
            ax.set_axis_off()
            ax.text(0, 0.5, p["title"], color=TEXT, fontsize=14, fontweight="bold", va="center")
            continue
        ax = fig.add_subplot(grid[g["y"] : g["y"] + g["h"], g["x"] : g["x"] + g["w"]])
        ax.set_facecolor(PANEL)
        for side in ax.spines.values():
            side.set_color(GRID)
        ax.tick_params(colors=TEXT, labelsize=8)
        ax.set_title(p["title"], color=TEXT, fontsize=11, loc="left")
        ax.grid(color=GRID, linewidth=0.6)
        lines = []
        for t in p["targets"]:
            expr = promharness.substitute(t["expr"], variables)
            for s in prom.query_range(expr, start, end, step):
                xs = [(float(ts) - start) / 60 for ts, _ in s["values"]]
                ys = [float(v) for _, v in s["values"]]
                lines.append((legend(t["legendFormat"], s["metric"]), xs, ys))
        if p["type"] == "stat":
            ax.set_xticks([])
            ax.set_yticks([])
            if lines:
                _, xs, ys = lines[0]
                ax.fill_between(xs, ys, color=COLORS[0], alpha=0.15)
                value = ys[-1]
                decimals = p["fieldConfig"]["defaults"].get("decimals", 0)
                text = f"{value:.{int(decimals)}f}" if math.isfinite(value) else "NaN"
            else:
                text = p["fieldConfig"]["defaults"].get("noValue", "No data")
            ax.text(
                0.5,
                0.45,
                text,
                color=COLORS[0],
                fontsize=26,
                fontweight="bold",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
            continue
        for i, (name, xs, ys) in enumerate(sorted(lines)):
            color = COLORS[i % len(COLORS)]
            if p["fieldConfig"]["defaults"].get("custom", {}).get("drawStyle") == "bars":
                ax.bar(xs, ys, width=step / 60, color=color, label=name, alpha=0.8)
            else:
                ax.plot(xs, ys, color=color, linewidth=1.6, label=name)
        ax.set_xlim(0, minutes)
        if not lines:
            ax.text(0.5, 0.5, "No data", color=TEXT, ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(loc="upper left", fontsize=7, facecolor=PANEL, edgecolor=GRID, labelcolor=TEXT, ncol=2)
        ax.set_xlabel("minutes", color=TEXT, fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=60, facecolor=BG)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/img/dashboard.png")
    parser.add_argument("--minutes", type=float, default=4.0, help="length of the run (default 4)")
    parser.add_argument("--join-after", type=float, default=0.5, help="fraction of the run before a 4th node joins")
    args = parser.parse_args(argv)
    if promharness.Prometheus.binary() is None:
        print("prometheus is not installed: apt-get install -y --no-install-recommends prometheus", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="render-dashboard-"))
    fed = promharness.Federation(
        work,
        aggregator_flags=["--tau-h", "2", "--tau-omega", "2", "--batch-size", "32", "--seed", "0"],
        node_flags=["--synthetic-size", "10", "--seed", "0", "--torch-threads", "1", "--fetch-wait", "2"],
        relayed=("signal", "anomaly"),
    )
    prom = None
    try:
        fed.start()
        # The 4th node's metrics port is known in advance, so Prometheus scrapes it from its start.
        joiner = "radcom-signal-1"
        port = promharness.free_port()
        fed.metrics_targets[joiner] = ("radcom-signal", f"127.0.0.1:{port}")
        prom = promharness.Prometheus(work / "prometheus", promharness.loopback_config(fed.metrics_targets, "2s"))
        prom.start()
        prom.wait_for('fedgradnorm_round{federation="radcom"} >= 1', timeout=180, what="the first round")
        start = time.time() - 30
        end = start + args.minutes * 60
        time.sleep(max(0.0, start + args.join_after * (end - start) - time.time()))
        node = promharness.start_edge_node(
            work,
            fed.relay_ready["grpc_port"],  # radcom-signal's pods belong to site site-a: they dial its relay
            "signal",
            ["--federation", "radcom", "--metrics-listen", f"127.0.0.1:{port}", *fed.node_flags],
            name=joiner,
            env={"FEDGRADNORM_CACHE_DIR": str(work / f"cache-{joiner}")},
        )
        fed.processes.append(node)
        time.sleep(max(0.0, end - 20 - time.time()))
        refuse_one_update(fed.grpc_address)
        time.sleep(5)
        refuse_one_update(fed.grpc_address)
        time.sleep(max(0.0, end - time.time()))
        fed.check_alive()
        draw(
            prom,
            start,
            time.time(),
            Path(args.out),
            {"federation": "radcom", "task": ".*", "metric": "accuracy", "__rate_interval": "30s"},
        )
        print(f"wrote {args.out}")
    finally:
        if prom is not None:
            prom.stop()
        fed.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
