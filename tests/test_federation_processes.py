"""The deployed form as real processes on loopback: it matches the simulator, survives SIGKILL,
and lets a node join by hand while it trains."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fedgradnorm.federation import load_federation
from fedgradnorm.launch import ServiceProcess, start_aggregator, start_edge_node
from fedgradnorm.machine import torch_threads
from fedgradnorm.services.aggregator.store import STATE_FILE, FileStateStore, Snapshot, decode_snapshot
from fedgradnorm.simulation_config import SimulationConfig
from fedgradnorm.simulator import Simulation
from tests.faults_helpers import scrape, wait_until
from tests.grpc_client import connect, register, state

TASKS = load_federation("radcom").task_names
HYPER = ["--tau-h", "2", "--tau-omega", "2", "--batch-size", "16", "--seed", "0"]


def stop_all(procs: list[ServiceProcess]) -> None:
    for p in reversed(procs):
        p.stop()


def wait_exit(procs: list[ServiceProcess], timeout: float) -> None:
    end = time.monotonic() + timeout
    for p in procs:
        rc = p.wait(max(1.0, end - time.monotonic()))
        assert rc == 0, f"{p.name} exited with {rc}:\n{p.log_text()[-3000:]}"


def read_state(state_dir: Path) -> Snapshot | None:
    """The state file as a running aggregator left it. Not FileStateStore.load: that removes
    commit temporaries, and while the aggregator runs one of them is its writer's."""
    path = state_dir / STATE_FILE
    return decode_snapshot(path.read_bytes(), str(path)) if path.exists() else None


def test_services_match_the_simulator(tmp_path: Path) -> None:
    """Bit for bit: one torch thread on both sides, so no reduction is split differently."""
    rounds = 3
    with torch_threads(1):
        sim = Simulation.build(
            SimulationConfig(
                federation="radcom", rounds=rounds, seed=0, tau_h=2, tau_omega=2, batch_size=16, synthetic_size=4
            )
        )
        for _ in sim.rounds():
            pass

    procs: list[ServiceProcess] = []
    try:
        agg, ready = start_aggregator(
            tmp_path,
            [
                "--federation",
                "radcom",
                "--rounds",
                str(rounds),
                "--min-nodes",
                "3",
                *HYPER,
                "--state-dir",
                str(tmp_path / "state"),
                "--torch-threads",
                "1",
            ],
        )
        procs.append(agg)
        node_flags = ["--seed", "0", "--synthetic-size", "4", "--torch-threads", "1"]
        nodes = [start_edge_node(tmp_path, ready["grpc_port"], t, node_flags) for t in TASKS]
        procs += nodes
        wait_exit(nodes, timeout=240)
    finally:
        stop_all(procs)

    snap = FileStateStore(tmp_path / "state").load()
    assert snap is not None and snap.server.round == rounds
    assert set(snap.server.omega) == set(sim.state.omega)
    for name, ref in sim.state.omega.items():
        got = snap.server.omega[name]
        assert torch.equal(got, ref), f"{name}: max |diff| {(got - ref).abs().max():.3g}"
    assert set(snap.server.weights) == set(TASKS)
    for task in TASKS:
        assert snap.server.weights[task].p == sim.state.weights[task].p, task
    records = [json.loads(line) for line in (tmp_path / "state" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == rounds * len(TASKS)
    for r, s in zip(
        sorted(records, key=lambda r: (r["round"], r["client"])),
        sorted(sim.records, key=lambda r: (r["round"], r["client"])),
        strict=True,
    ):
        assert (r["round"], r["client"]) == (s["round"], s["client"])
        assert r["train_loss"] == s["train_loss"], (r["round"], r["client"])
        assert r["accuracy"] == s["accuracy"], (r["round"], r["client"])


def test_aggregator_sigkill_resumes_from_last_committed_round(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    flags = ["--federation", "mtfl", "--min-nodes", "2", *HYPER, "--state-dir", str(state_dir)]
    agg, ready = start_aggregator(tmp_path, flags)
    try:
        channel, stub = connect(ready["grpc_port"])
        nodes = [register(stub, "a", "gender"), register(stub, "b", "smile")]
        for _ in range(2):
            fetched = [n.fetch() for n in nodes]
            for n, (h, omega) in zip(nodes, fetched, strict=True):
                n.submit(
                    h.round,
                    {k: torch.full_like(v, 0.01 * (1 + h.round)) for k, v in omega.items()},
                    loss=0.9 if h.round else 1.0,  # a node's first update has F~ = 1
                    initial_loss=1.0,
                    loss_ratio=0.9 if h.round else 1.0,
                )
        header, _ = nodes[0].fetch()  # round 2 is open; round 1's state is written beside it...
        assert header.round == 2
        wait_until(lambda: state(stub).last_committed_round == 1, 60, "round 1 to be committed")  # ...now on disk
        committed = read_state(state_dir)
        assert committed is not None
        agg.kill()
        channel.close()
        assert (state_dir / STATE_FILE).exists()

        agg, ready = start_aggregator(tmp_path, flags, name="aggregator-2")
        channel, stub = connect(ready["grpc_port"])
        for n in nodes:
            n.stub = stub
        s = state(stub)
        assert s.round == committed.server.round == 2
        assert {n.node_id: n.weight for n in s.nodes} == {k: w.p for k, w in committed.server.weights.items()}
        header, omega = nodes[0].fetch()  # the sessions survived the crash
        assert header.round == 2
        for name, t in committed.server.omega.items():
            assert torch.equal(omega[name], t), name  # bit for bit
        for n in nodes:
            h, om = n.fetch() if n is not nodes[0] else (header, omega)
            n.submit(
                2, {k: torch.full_like(v, 0.01) for k, v in om.items()}, loss=0.8, initial_loss=1.0, loss_ratio=0.8
            )
        while state(stub).round < 3:
            time.sleep(0.02)
        channel.close()
    finally:
        agg.stop()


@pytest.mark.long  # about a minute of three training nodes: make test-faults, run by CI (the in-process
# join is test_grpc_aggregator.py::test_runtime_registration_joins_next_round_with_weight_one)
def test_fourth_node_started_by_hand_joins_the_next_round(tmp_path: Path) -> None:
    """Training runs on (no round limit) while a fourth node is started by hand; once it has taken
    part in two rounds every node is stopped and the round log is checked."""
    procs: list[ServiceProcess] = []
    try:
        agg, ready = start_aggregator(
            tmp_path,
            ["--federation", "radcom", "--min-nodes", "3", *HYPER, "--state-dir", str(tmp_path / "state")],
        )
        procs.append(agg)
        port = ready["grpc_port"]
        data = ["--seed", "0", "--synthetic-size", "4"]
        procs += [start_edge_node(tmp_path, port, t, data) for t in TASKS]
        channel, stub = connect(port)
        with channel:
            end = time.monotonic() + 180
            while state(stub).round < 2:
                assert time.monotonic() < end
                time.sleep(0.05)
            joined_at = state(stub).round
            extra = start_edge_node(
                tmp_path, port, "modulation", ["--seed", "1", "--synthetic-size", "4"], name="modulation-2"
            )
            procs.append(extra)

            def extra_rounds() -> int:
                nodes = {n.node_id: n for n in state(stub).nodes}
                return nodes["modulation-2"].last_round if "modulation-2" in nodes else -1

            first = None
            end = time.monotonic() + 180
            while first is None or extra_rounds() < first + 1:
                assert time.monotonic() < end and extra.alive(), extra.log_text()[-2000:]
                if first is None and extra_rounds() >= 0:
                    first = extra_rounds()
                time.sleep(0.05)
            for p in procs[1:]:
                assert p.stop(timeout=30) == 0, p.log_text()[-2000:]
        records = [json.loads(x) for x in (tmp_path / "state" / "metrics.jsonl").read_text().splitlines()]
        rounds_of_extra = sorted(r["round"] for r in records if r["client"] == "modulation-2")
        assert rounds_of_extra[0] >= joined_at  # it joined a round after the one open when it started
        assert rounds_of_extra[:2] == [rounds_of_extra[0], rounds_of_extra[0] + 1]
        both = [r for r in records if r["round"] == rounds_of_extra[1]]
        assert len(both) == 4 and sum(r["weight"] for r in both) == pytest.approx(4.0)
    finally:
        stop_all(procs)


def test_edge_node_sigterm_stops_cleanly_and_deregisters(tmp_path: Path) -> None:
    procs: list[ServiceProcess] = []
    try:
        agg, ready = start_aggregator(
            tmp_path, ["--federation", "radcom", "--min-nodes", "1", *HYPER, "--state-dir", str(tmp_path / "state")]
        )
        procs.append(agg)
        node = start_edge_node(tmp_path, ready["grpc_port"], "anomaly", ["--seed", "0", "--synthetic-size", "4"])
        procs.append(node)
        channel, stub = connect(ready["grpc_port"])
        with channel:
            end = time.monotonic() + 120
            while state(stub).round < 2:
                assert time.monotonic() < end and node.alive(), node.log_text()[-2000:]
                time.sleep(0.1)
            assert node.stop(timeout=30) == 0
            (anomaly,) = state(stub).nodes
            assert not anomaly.active and anomaly.last_round >= 1
        assert "node.deregistered" in node.log_text()
        identity = json.loads((tmp_path / "node-anomaly" / "identity.json").read_text())
        assert identity["node_id"] == "anomaly" and (tmp_path / "node-anomaly" / "client.pt").exists()
    finally:
        stop_all(procs)


def test_sigterm_cancels_a_waiting_fetch_at_once(tmp_path: Path) -> None:
    """A node long-polling for a round that is not coming (too few nodes) stops on SIGTERM without
    waiting its FetchRound out (60 s here), and deregisters."""
    procs: list[ServiceProcess] = []
    try:
        agg, ready = start_aggregator(
            tmp_path, ["--federation", "radcom", "--min-nodes", "2", *HYPER, "--state-dir", str(tmp_path / "state")]
        )
        procs.append(agg)
        flags = ["--seed", "0", "--synthetic-size", "4", "--fetch-wait", "60", "--torch-threads", "1"]
        node = start_edge_node(tmp_path, ready["grpc_port"], "anomaly", flags)
        procs.append(node)
        channel, stub = connect(ready["grpc_port"])
        with channel:
            wait_until(lambda: len(state(stub).nodes) == 1, 120, "the node registered")
            time.sleep(1.0)  # inside its FetchRound long-poll
            t0 = time.monotonic()
            assert node.stop(timeout=45) == 0, node.log_text()[-2000:]
            stopped_in = time.monotonic() - t0
            (member,) = state(stub).nodes
            assert not member.active
        assert stopped_in < 30, f"{stopped_in:.1f} s: the 60 s long-poll was waited out"
        assert "node.deregistered" in node.log_text()
    finally:
        stop_all(procs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SMALL_NODE = ["--seed", "0", "--synthetic-size", "4", "--torch-threads", "1"]  # a node's flags: a tiny data set


def two_rounds_of_radcom(tmp_path: Path, min_nodes: int) -> tuple[ServiceProcess, dict[str, Any]]:
    """A RadCom aggregator for two rounds of ``min_nodes`` nodes, state in tmp_path/s."""
    flags = ["--federation", "radcom", "--min-nodes", str(min_nodes), "--rounds", "2", *HYPER]
    return start_aggregator(tmp_path, [*flags, "--state-dir", str(tmp_path / "s")])


def test_a_node_told_to_stay_keeps_serving_after_training_until_sigterm(tmp_path: Path) -> None:
    """--after-training stay (the Kubernetes manifests' setting): once the federation has finished and
    the node has written its model, the process keeps serving its metrics instead of exiting (a
    StatefulSet would restart an exited pod, again and again); SIGTERM ends it with status 0."""
    procs: list[ServiceProcess] = []
    try:
        agg, ready = two_rounds_of_radcom(tmp_path, min_nodes=1)
        procs.append(agg)
        port = free_port()
        flags = [*SMALL_NODE, "--after-training", "stay"]
        node = start_edge_node(
            tmp_path, ready["grpc_port"], "anomaly", [*flags, "--metrics-listen", f"127.0.0.1:{port}"]
        )
        procs.append(node)
        wait_until(lambda: "node.staying" in node.log_text() or not node.alive(), 120, "training ended")
        assert node.alive(), node.log_text()[-2000:]
        assert (tmp_path / "node-anomaly" / "model").exists(), node.log_text()[-2000:]
        time.sleep(1.5)
        assert node.alive()
        assert scrape(port)[("fedgradnorm_edge_round", ())] == 1.0  # still serving: the last round it trained
        assert node.stop(timeout=30) == 0, node.log_text()[-2000:]
    finally:
        stop_all(procs)


def test_a_node_learns_that_the_aggregator_left_its_updates_out(tmp_path: Path) -> None:
    """A node whose loss is scaled x1e12 sends updates the aggregator accepts and then leaves out of
    its step (norm far above the round's median: update.dropped). The node learns it from the next
    round header's last_used_round: update.left_out per round, its counter, and node.done says how
    many; the nodes whose updates were used see none."""
    procs: list[ServiceProcess] = []
    try:
        agg, ready = two_rounds_of_radcom(tmp_path, min_nodes=3)
        procs.append(agg)
        port = free_port()
        scaled = start_edge_node(
            tmp_path,
            ready["grpc_port"],
            "anomaly",
            [*SMALL_NODE, "--loss-scale", "1e12", "--after-training", "stay", "--metrics-listen", f"127.0.0.1:{port}"],
        )
        others = [start_edge_node(tmp_path, ready["grpc_port"], t, SMALL_NODE) for t in TASKS if t != "anomaly"]
        procs += [scaled, *others]
        wait_exit(others, 180)
        wait_until(lambda: "node.staying" in scaled.log_text() or not scaled.alive(), 60, "training ended")
        assert scaled.alive(), scaled.log_text()[-2000:]
        assert scrape(port)[("fedgradnorm_edge_updates_left_out_total", ())] == 2.0
        assert [e["node"] for e in agg.events("update.dropped")] == ["anomaly", "anomaly"]
        assert [e["round"] for e in scaled.events("update.left_out")] == [0, 1]
        assert scaled.events("node.done")[-1]["left_out"] == 2
        for p in others:
            assert p.events("update.left_out") == [], p.name
            assert p.events("node.done")[-1]["left_out"] == 0, p.name
        assert scaled.stop(timeout=30) == 0, scaled.log_text()[-2000:]
    finally:
        stop_all(procs)
