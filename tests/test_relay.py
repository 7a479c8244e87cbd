"""The relay tier over real processes: a federation run flat and through relays computes the same
algorithm, a relay that dies mid-round costs only its nodes, and the Uplink refuses what it must.

The nodes here are light protocol clients (tests/grpc_client.py) whose gradients and losses are a
fixed function of (node, round), not of omega: the scalars the weight rule sees are then the same
in every topology, so the weights p must agree bit for bit, and omega may differ only by the
order in which the weighted gradients are summed (per relay, then across relays).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm.federation import load_federation
from fedgradnorm.launch import start_relay
from fedgradnorm.services.refusals import reason_of
from tests.faults_helpers import Processes, aggregator_process
from tests.grpc_client import RawNode, connect, register

FEDERATION = "mtfl"
NODES = {"n-a": "landmarks", "n-b": "gender", "n-c": "smile", "n-d": "glasses"}
SCALE = {"n-a": 8.0, "n-b": 1.0, "n-c": 2.0, "n-d": 0.5}  # unequal norms: p moves
SHAPES = {k: tuple(v.shape) for k, v in load_federation(FEDERATION).build_shared(0).named_parameters()}


def gradient(node: str, round_: int) -> dict[str, torch.Tensor]:
    """The node's update in ``round_``: seeded noise, the same in every run."""
    g = torch.Generator().manual_seed(1000 * round_ + sorted(NODES).index(node))
    return {k: torch.randn(s, generator=g) * SCALE[node] for k, s in SHAPES.items()}


def losses(node: str, round_: int) -> dict[str, float]:
    """F_0, F_k and F~: each node's loss falls at its own rate (F~ = 1 in its first round)."""
    f0 = 1.0 + sorted(NODES).index(node)
    ratio = 1.0 if round_ == 0 else 1.0 / (1.0 + 0.1 * round_ * (1 + sorted(NODES).index(node)))
    return {"initial_loss": f0, "loss": f0 * ratio, "loss_ratio": ratio}


def drive(node: RawNode, done: dict[str, Any], stop: threading.Event) -> None:
    """Fetch, submit the fixed update, until FINISHED: then keep the final omega."""
    while not stop.is_set():
        header, omega = node.fetch(wait=5)
        if header.status == pb.ROUND_STATUS_FINISHED:
            done[node.node_id] = omega
            return
        if header.status != pb.ROUND_STATUS_OPEN:
            continue
        resp = node.submit(header.round, gradient(node.node_id, header.round), **losses(node.node_id, header.round))
        assert resp.accepted


def weights_by_round(state_dir: Path) -> dict[int, dict[str, float]]:
    """p of every node in every closed round (metrics.jsonl; empty before the first)."""
    out: dict[int, dict[str, float]] = {}
    path = state_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        out.setdefault(row["round"], {})[row["client"]] = row["weight"]
    return out


def aggregator(procs: Processes, workdir: Path, *flags: str) -> dict[str, Any]:
    _, ready = aggregator_process(
        procs,
        workdir,
        [
            "--federation",
            FEDERATION,
            "--min-nodes",
            str(len(NODES)),
            "--state-dir",
            str(workdir / "state"),
            "--torch-threads",
            "1",
            "--heartbeat-interval",
            "1",
            "--heartbeat-timeout",
            "30",
            *flags,
        ],
    )
    return ready


def relay(procs: Processes, workdir: Path, port: int, name: str, *flags: str) -> int:
    proc, ready = start_relay(
        workdir, f"127.0.0.1:{port}", name, ["--federation", FEDERATION, "--torch-threads", "1", *flags]
    )
    procs.add(proc)
    return int(ready["grpc_port"])


def run(workdir: Path, via: Callable[[Processes, int], dict[str, int]], rounds: int) -> tuple[dict[int, Any], Any]:
    """One federation of the four light nodes; ``via`` starts the relays and says which port each
    node dials. Returns the weights of every round and the final omega."""
    procs = Processes()
    stop = threading.Event()
    threads: list[threading.Thread] = []
    channels: list[grpc.Channel] = []
    try:
        ready = aggregator(procs, workdir, "--rounds", str(rounds), "--round-timeout", "60")
        ports = via(procs, int(ready["grpc_port"]))
        done: dict[str, Any] = {}
        for name, task in NODES.items():
            channel, stub = connect(ports[name])
            channels.append(channel)
            node = register(stub, name, task, FEDERATION)
            t = threading.Thread(target=drive, args=(node, done, stop), daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join(timeout=180)
        assert sorted(done) == sorted(NODES), "every node got the final model"
        finals = list(done.values())
        assert all(all(torch.equal(f[k], finals[0][k]) for k in f) for f in finals), "one final omega"
        return weights_by_round(workdir / "state"), finals[0]
    finally:
        stop.set()
        for c in channels:
            c.close()
        procs.stop_all()


def test_flat_and_relayed_runs_compute_the_same_weights(tmp_path: Path) -> None:
    """The same four nodes, flat and behind two relays: p identical bit for bit in every round;
    omega within float32 summation-order rounding (the bound measured is in docs/design.md)."""
    rounds = 6
    flat_p, flat_omega = run(tmp_path / "flat", lambda procs, port: dict.fromkeys(NODES, port), rounds)

    def two_relays(procs: Processes, port: int) -> dict[str, int]:
        north = relay(procs, tmp_path / "relayed", port, "north")
        south = relay(procs, tmp_path / "relayed", port, "south")
        return {"n-a": north, "n-b": north, "n-c": south, "n-d": south}

    relayed_p, relayed_omega = run(tmp_path / "relayed", two_relays, rounds)

    assert sorted(flat_p) == list(range(rounds))
    assert flat_p == relayed_p  # float == float: the same bits, every round, every node
    moved = {n: p for n, p in flat_p[rounds - 1].items() if p != 1.0}
    assert len(moved) == len(NODES), f"the weights moved away from 1 (the test can tell): {flat_p[rounds - 1]}"
    diff = max(float((flat_omega[k] - relayed_omega[k]).abs().max()) for k in flat_omega)
    scale = max(float(v.abs().max()) for v in flat_omega.values())
    # Summation order only: a few float32 ulps of omega's magnitude per round, far below one Adam
    # step (beta = 2e-4 per element per round).
    assert diff <= rounds * 8 * torch.finfo(torch.float32).eps * scale, (diff, scale)
    print(f"omega flat vs relayed: max |diff| = {diff:.3e} (max |omega| = {scale:.3e}, {rounds} rounds)")


def metric(metrics_port: int, name: str, labels: str = "") -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    prefix = f"{name}{{{labels}}}" if labels else name
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix + " "))


def wait_metric(metrics_port: int, name: str, labels: str, timeout: float = 10.0) -> float:
    """The metric once it is no longer 0 (or 0 after ``timeout``)."""
    end = time.monotonic() + timeout
    while (value := metric(metrics_port, name, labels)) == 0 and time.monotonic() < end:
        time.sleep(0.2)
    return value


@pytest.mark.long  # about 40 s of real rounds and timeouts: `make test-faults`
def test_a_relay_that_dies_mid_round_costs_only_its_nodes(tmp_path: Path) -> None:
    """Relay 'south' is frozen after its node's update reached the aggregator but before its
    partial sum: after --relay-timeout the round closes with the other nodes' updates (the weights
    computed again without south's node), and the next round closes by its deadline."""
    procs = Processes()
    channels: list[grpc.Channel] = []
    try:
        ready = aggregator(procs, tmp_path, "--round-timeout", "8", "--relay-timeout", "2")
        port, metrics_port = int(ready["grpc_port"]), int(ready["metrics_port"])
        north = relay(procs, tmp_path, port, "north")
        south_proc, south_ready = start_relay(
            tmp_path, f"127.0.0.1:{port}", "south", ["--federation", FEDERATION, "--torch-threads", "1"]
        )
        procs.add(south_proc)
        dial = {"n-a": port, "n-b": north, "n-c": north, "n-d": int(south_ready["grpc_port"])}
        nodes = {}
        for name, task in NODES.items():
            channel, stub = connect(dial[name])
            channels.append(channel)
            nodes[name] = register(stub, name, task, FEDERATION)
        fetched = {n: node.fetch(wait=20) for n, node in nodes.items()}
        round_ = fetched["n-a"][0].round
        assert all(h.status == pb.ROUND_STATUS_OPEN and h.round == round_ for h, _ in fetched.values())
        accepted = metric(metrics_port, "fedgradnorm_updates_total", 'outcome="accepted"')
        assert nodes["n-d"].submit(round_, gradient("n-d", round_), **losses("n-d", round_)).accepted
        deadline = time.monotonic() + 20
        while metric(metrics_port, "fedgradnorm_updates_total", 'outcome="accepted"') < accepted + 1:
            assert time.monotonic() < deadline, "south's report never reached the aggregator"
            time.sleep(0.05)
        os.kill(south_proc.pid, signal.SIGSTOP)  # south holds n-d's gradient and will not send it
        t0 = time.monotonic()
        for name in ("n-a", "n-b", "n-c"):
            assert nodes[name].submit(round_, gradient(name, round_), **losses(name, round_)).accepted
        rows: dict[int, dict[str, float]] = {}
        while round_ not in rows:
            assert time.monotonic() - t0 < 30, "the round did not close"
            time.sleep(0.1)
            rows = weights_by_round(tmp_path / "state")
        closed_after = time.monotonic() - t0
        assert sorted(rows[round_]) == ["n-a", "n-b", "n-c"], rows[round_]
        assert abs(sum(rows[round_].values()) - 3.0) < 1e-9, "p renormalised over the three that counted"
        assert 2.0 <= closed_after < 15, closed_after  # waited relay_timeout, not the round's deadline
        # The counters are synced once a second.
        assert wait_metric(metrics_port, "fedgradnorm_updates_total", 'outcome="relay_lost"') == 1
        assert wait_metric(metrics_port, "fedgradnorm_relay_lost_rounds_total", 'relay="south"') == 1
        # The next round includes n-d (still live: south's last heartbeat is recent) and closes by its deadline.
        t1 = time.monotonic()
        for name in ("n-a", "n-b", "n-c"):
            header, _ = nodes[name].fetch(wait=20)
            assert header.status == pb.ROUND_STATUS_OPEN and header.round == round_ + 1
            assert nodes[name].submit(header.round, gradient(name, header.round), **losses(name, header.round)).accepted
        while round_ + 1 not in rows:
            assert time.monotonic() - t1 < 40, "the next round did not close by its deadline"
            time.sleep(0.2)
            rows = weights_by_round(tmp_path / "state")
        assert sorted(rows[round_ + 1]) == ["n-a", "n-b", "n-c"]
    finally:
        for c in channels:
            c.close()
        procs.stop_all()


def test_a_relay_refuses_what_the_aggregator_refuses(tmp_path: Path) -> None:
    """Towards its nodes a relay is the aggregator: the same statuses and reasons for bad sessions
    and bad updates, and GetState is the aggregator's (with each node's relay)."""

    procs = Processes()
    channels: list[grpc.Channel] = []
    try:
        ready = aggregator(procs, tmp_path, "--round-timeout", "30")
        port = int(ready["grpc_port"])
        site = relay(procs, tmp_path, port, "north", "--max-nodes", "8")
        via_ch, via = connect(site)
        direct_ch, direct = connect(port)
        channels += [via_ch, direct_ch]
        nodes = {
            name: register(via if name in ("n-a", "n-b") else direct, name, task, FEDERATION)
            for name, task in NODES.items()
        }
        a = nodes["n-a"]

        def code(call: Callable[[], object]) -> tuple[str, str | None]:
            with pytest.raises(grpc.RpcError) as info:
                call()
            reason = reason_of(info.value)
            return info.value.code().name, reason.value if reason else None

        forged = RawNode(via, a.node_id, "forged", a.task)
        ghost = RawNode(via, "ghost", a.token, a.task)
        assert code(lambda: forged.fetch(wait=0)) == ("UNAUTHENTICATED", "bad_token")
        assert code(lambda: ghost.fetch(wait=0)) == ("NOT_FOUND", "unknown_node")
        headers = {n: node.fetch(wait=20)[0] for n, node in nodes.items()}
        r = headers["n-a"].round
        assert all(h.status == pb.ROUND_STATUS_OPEN and h.round == r for h in headers.values())
        good = gradient("n-a", r)
        nan = {k: torch.full_like(v, float("nan")) for k, v in good.items()}
        assert code(lambda: a.submit(r, nan, **losses("n-a", r)))[0] == "INVALID_ARGUMENT"
        assert code(lambda: a.submit(r + 1, good, **losses("n-a", r))) == ("FAILED_PRECONDITION", "wrong_round")
        assert code(lambda: a.submit(r, good, loss=2.0, initial_loss=1.0, loss_ratio=2.0)) == (
            "INVALID_ARGUMENT",
            "bad_value",
        )
        assert a.submit(r, good, **losses("n-a", r)).accepted
        assert code(lambda: a.submit(r, good, **losses("n-a", r))) == ("ALREADY_EXISTS", "duplicate")
        seen = {n.node_id: n.relay for n in via.GetState(pb.GetStateRequest(), timeout=10).nodes}
        assert seen == {"n-a": "north", "n-b": "north", "n-c": "", "n-d": ""}
        assert a.heartbeat().registered
    finally:
        for c in channels:
            c.close()
        procs.stop_all()


def patient(node: RawNode, rounds_done: dict[str, set[int]], stop: threading.Event) -> None:
    """A node that rides out an aggregator restart: retries while its relay or aggregator is away."""
    while not stop.is_set():
        try:
            header, _ = node.fetch(wait=2)
            if header.status == pb.ROUND_STATUS_FINISHED:
                return
            if header.status == pb.ROUND_STATUS_OPEN:
                r = header.round
                if node.submit(r, gradient(node.node_id, r), **losses(node.node_id, r)).accepted:
                    rounds_done.setdefault(node.node_id, set()).add(r)
        except grpc.RpcError:
            stop.wait(0.3)


@pytest.mark.long  # an aggregator killed and restarted under a relay: `make test-faults`
def test_a_relay_reattaches_after_the_aggregator_restarts(tmp_path: Path) -> None:
    """SIGKILL the aggregator mid-run and start it again on the same port and state: the relay
    attaches again (its session was in the old process's memory), its nodes keep their sessions
    (those are in the committed state) and take part in the rounds after the restart."""
    from tests.faults_helpers import free_port

    port = free_port()
    flags = ("--listen", f"127.0.0.1:{port}", "--round-timeout", "10", "--relay-timeout", "3")
    procs = Processes()
    stop = threading.Event()
    channels: list[grpc.Channel] = []
    threads: list[threading.Thread] = []
    try:
        aggregator(procs, tmp_path, *flags)
        site = relay(procs, tmp_path, port, "north", "--max-backoff", "0.5")
        done: dict[str, set[int]] = {}
        for name, task in NODES.items():
            channel, stub = connect(site if name != "n-a" else port)
            channels.append(channel)
            node = register(stub, name, task, FEDERATION)
            threads.append(threading.Thread(target=patient, args=(node, done, stop), daemon=True))
            threads[-1].start()
        deadline = time.monotonic() + 60
        while len(weights_by_round(tmp_path / "state")) < 2:
            assert time.monotonic() < deadline, "two rounds before the restart"
            time.sleep(0.2)
        first = procs.procs[0]
        os.kill(first.pid, signal.SIGKILL)
        first.proc.wait(10)  # type: ignore[union-attr]
        before = max(weights_by_round(tmp_path / "state"))
        aggregator(procs, tmp_path, *flags)
        deadline = time.monotonic() + 90
        while True:
            rows = weights_by_round(tmp_path / "state")
            after = [r for r in rows if r > before + 1 and sorted(rows[r]) == sorted(NODES)]
            if after:
                break
            assert time.monotonic() < deadline, f"no full round after the restart: {sorted(rows)}"
            time.sleep(0.3)
        log = (tmp_path / "relay-north.log").read_text()
        assert log.count('"relay.attached"') >= 2, "the relay attached again"
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        for c in channels:
            c.close()
        procs.stop_all()
