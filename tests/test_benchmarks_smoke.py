"""The benchmark code at tiny scale: it runs end to end and reports sane shapes. No timing assertions."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from benchmarks import aggregator_step, load, relay_scale, simulator, transport
from benchmarks.common import Table, fmt_s, loopback_copy, pct
from benchmarks.deploy import fresh
from benchmarks.round_overhead import commit_seconds, server_step_seconds, simulator_round
from benchmarks.run import (
    PEERS_BEGIN,
    PEERS_END,
    RELAY_BEGIN,
    RELAY_END,
    SCALES,
    headline,
    render,
    write_doc,
    write_section,
)
from fedgradnorm.machine import machine_info, torch_threads
from fedgradnorm.simulation_config import SimulationConfig


def test_helpers_and_rendering() -> None:
    t = Table("title", ["a", "b"])
    t.add(1, "x")
    t.notes.append("note")
    assert "| 1 | x |" in t.markdown() and "title" in t.text()
    assert pct([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert fmt_s(-0.5) == "-500.0 ms" and fmt_s(2.0) == "2.00 s" and fmt_s(2e-5) == "20 µs"
    assert loopback_copy(1 << 20, repeats=1) > 0
    info = {
        "date": "today",
        "nproc": 2,
        "cpu": "cpu",
        "mem_gib": 1.0,
        "kernel": "k",
        "python": "3",
        "torch": "2",
        "torch_threads": 2,
        "niceness": 0,
        "loadavg": (0.1, 0.2, 0.3),
    }
    doc = render([("other", [t], 1.0)], info, "python -m benchmarks.run", 60.0, (0.1, 0.2, 0.3))
    assert "## Other" in doc and "`nproc` = 2" in doc
    real = machine_info()  # the report's machine line reads every one of these keys
    assert set(info) - {"date"} <= set(real) and real["nproc"] >= 1 and real["mem_gib"] > 0


def test_kept_blocks_survive_make_bench(tmp_path: Path) -> None:
    """`make bench` rewrites the document but keeps the peers and relay-scale blocks, in that order."""
    doc = tmp_path / "b.md"
    generated = "# B\n\n## Headline\n\n- x\n\n## Round overhead\n\nt\n"
    relay = f"{RELAY_BEGIN}\n## Relays at scale\n{RELAY_END}"
    peers = f"{PEERS_BEGIN}\n## Side by side\n{PEERS_END}"
    doc.write_text(write_section(generated, relay, RELAY_BEGIN, RELAY_END))
    assert doc.read_text().index(relay) < doc.read_text().index("## Round overhead")
    doc.write_text(write_section(doc.read_text(), peers, PEERS_BEGIN, PEERS_END))
    write_doc(doc, generated.replace("t\n", "new t\n"))
    text = doc.read_text()
    assert text.index("## Headline") < text.index(peers) < text.index(relay) < text.index("new t")
    kept = relay.replace("Relays", f"Relays\n{relay_scale.BY_HAND_BEGIN}\nby hand\n{relay_scale.BY_HAND_END}")
    assert relay_scale.by_hand(kept).endswith(relay_scale.BY_HAND_END) and "by hand" in relay_scale.by_hand(kept)


def test_fresh_removes_an_earlier_federation(tmp_path: Path) -> None:
    for d in ("aggregator-state", "node-anomaly", "keep"):
        (tmp_path / d).mkdir()
    for f in ("metrics.jsonl", "aggregator.log", "aggregator.ready.json", "keep.txt"):
        (tmp_path / f).write_text("x")
    fresh(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "keep.txt"]


def test_headline_reads_every_table() -> None:
    def table(data: dict) -> Table:
        t = Table("t", ["x"])
        t.data = data
        return t

    idle = {"round": 0.15, "mean": 0.15, "max": 0.2, "n": 3, "steps": {}}
    busy = {"round": 2.0, "mean": 2.0, "max": 2.1, "n": 3, "steps": {"a": 1.8, "b": 1.85}}
    sim = {"round": 3.0, "clients_sum": 2.9, "client_max": 1.0, "server_step": 0.05}
    rows = [
        {"model": "network2", "direction": "fetch", "dtype": "float32", "seconds": 0.1, "bare": 0.04, "socket": 0.02}
    ]
    step_rows = [{"nodes": 3, "threads": 2, "seconds": 0.1, "input_bytes": 47e6, "peak_bytes": 1e6, "exact_peak": 1.0}]
    latency = {p: {"GetState": [0.001, 0.002], "Health": [0.001]} for p in ("idle", "load")}
    relay_runs = [
        {"nodes": 100, "relays": r, "rounds_closed": 4, "bytes_per_round": b, "rounds_per_min": 60.0, "agg_rss": 300.0}
        for r, b in ((0, 41.2e6), (4, 1.6e6))
    ]
    sim_runs = [
        {
            "federation": "radcom",
            "sequential": 1.0,
            "parallel": 0.5,
            "critical_alone": 0.5,
            "critical_together": 0.4,
            "identical": True,
        }
    ]
    done = [
        (
            "round overhead",
            [table({"idle": idle, "busy": busy, "sim": sim, "step3": 0.05, "commit": 0.04, "floor": 0.03})],
            1,
        ),
        ("transport", [table({"rows": rows}), table({"float32": 94.5e6, "float16": 47.25e6})], 1),
        ("aggregator", [table({"bandwidth": {2: 5e9}, "rows": step_rows})], 1),
        ("edge node", [table({"outside": 1.0, "inside": 1.1, "samples": 640})], 1),
        ("load", [table({"probe": {"latency": latency}})], 1),
        ("relay scale", [table({"runs": relay_runs})], 1),
        ("simulator", [table({"runs": sim_runs, "workers": 2})], 1),
    ]
    text = "\n".join(headline(done))
    assert "**meets** the 0.2 s target" in text and "**meets** the 5 % target" in text
    assert "50.0%" in text and "3 nodes" in text and "samples/s" in text and "GetState p50/p99" in text
    assert "fetch float32: 20% of the socket (gRPC alone, nothing decoded: 50%)" in text
    assert "the 50 % target is **missed**" in text and "**misses** the ≤ 2× target" in text
    assert "**100 light nodes**, flat against behind 4 relays: 41.2 MB against 1.6 MB" in text
    assert "radcom 2.00 against 1.00 (2.00×; at best 2.00×, +25.0% above the critical path" in text
    assert "bit-identical: yes." in text
    assert set(SCALES) == {"full", "smoke"}


def test_in_process_parts(tmp_path: Path) -> None:
    with torch_threads(1):  # the smoke test checks code paths, not the default thread count
        _in_process_parts(tmp_path)


def _in_process_parts(tmp_path: Path) -> None:
    config = SimulationConfig(federation="radcom", synthetic_size=2, tau_h=1, tau_omega=1, batch_size=8)
    assert server_step_seconds(2, 1, config) > 0
    assert commit_seconds(tmp_path, 1) > 0
    sim = simulator_round(config, rounds=1, skip=0)
    assert set(sim) == {"round", "clients_sum", "client_max", "server_step"}
    step = aggregator_step.run((2,), repeats=1, bandwidth_bytes=8 << 20)
    assert len(step.rows) == len(step.data["bandwidth"]) and step.data["rows"][0]["input_bytes"] > 0
    f16 = transport.float16_learning(synthetic_size=2, rounds=1)
    assert [r[0] for r in f16.rows] == ["modulation", "signal", "anomaly"]


def test_transport_and_wire_bytes(tmp_path: Path) -> None:
    stream = transport.throughput(repeats=1, sizes=("network2",))
    assert len(stream.rows) == 3  # fetch and submit in float32, fetch in float16
    wire = transport.wire_bytes(tmp_path, synthetic_size=2, rounds=2, dtypes=("float16",), nodes=("anomaly",))
    # one node: a fetch and a submit of 15.7 MB of float32 per round, half of that in float16, plus framing
    # and registration (exact: counted from the first byte to the node's exit)
    assert 0.5 <= wire.data["float16"] / (2 * 15_746_048) < 0.55


def test_load_harness_is_bounded(tmp_path: Path) -> None:
    t = load.run(tmp_path, nodes=4, rounds=1, time_limit=60, baseline=0.3, max_workers=(8,))
    assert t.data["load"]["failed"] == 0
    assert t.data["load"]["rounds_done"] == [1, 1, 1, 1]
    assert t.data["probe"]["latency"]["load"]["GetState"]


def test_relay_scale_harness(tmp_path: Path) -> None:
    """20 light nodes flat, then behind 2 relays, 2 rounds each: every round uses every node, and the
    aggregator moves the model per relay instead of per node."""
    t = relay_scale.run(tmp_path, node_counts=(20,), relays=2, rounds=2, time_limit=60, round_timeout=30)
    flat, relayed = t.data["runs"]
    model = t.data["model_bytes"]
    for s in (flat, relayed):
        assert s["nodes_per_round"] == [20, 20] and s["rounds_full"] == 2
        assert s["failed"] == 0 and not s["stalled"] and s["registered"] == 20
        assert s["agg_rss"] > 0 and s["agg_threads"] > 0
    assert flat["bytes_per_round"] == 2 * 20 * model  # omega down and a gradient up, per node
    assert relayed["bytes_per_round"] == 2 * 2 * model  # per relay
    assert len(relayed["relay_rss"]) == 2 and all(x > 0 for x in relayed["relay_rss"])
    assert len(t.rows) == 2


def test_simulator_benchmark() -> None:
    """One round of each simulator on RadCom and MTFL: both give the same numbers, every row is filled."""
    t = simulator.run(rounds=1, radcom_size=2, mtfl_size=20, skip=0)
    runs = t.data["runs"]
    assert [r["federation"] for r in runs] == ["radcom", "mtfl"] and all(r["identical"] for r in runs)
    for r in runs:
        assert r["critical_alone"] <= r["bare"] and r["sequential"] > 0 and r["parallel"] > 0
    assert len(t.rows) == 10 and t.data["transfer"]["bytes"] == 15_746_048
    assert multiprocessing.active_children() == []
