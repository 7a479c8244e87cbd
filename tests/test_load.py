"""Load: hundreds of light simulated edge nodes against one aggregator process.

Each simulated node is a real gRPC client (its own channel, its own TCP connection) in a thread of
this process, speaking the protocol of the MTFL federation (Network 1, 51,536 parameters, so every
update is 206 KB): register, then fetch and submit every round until the aggregator says FINISHED.
Meanwhile a probe keeps calling GetState and the health check. The test checks that no update is
lost or counted twice (client-side acceptances, the aggregator's fedgradnorm_updates_total and its
metrics.jsonl must all equal rounds x nodes) and that the probes keep being answered; the latencies
are printed, not asserted (they depend on the machine).
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc
from fedgradnorm.federation import load_federation
from fedgradnorm.services import serde
from tests.faults_helpers import SERVICE, Processes, aggregator_process, gradient_like, metric, metrics_records, scrape
from tests.grpc_client import OPTIONS, RawNode

TASKS = load_federation("mtfl").task_names


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


@dataclass
class Timings:
    samples: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def timed(self, what: str, call: Callable[[], object]) -> object:
        t0 = time.perf_counter()
        try:
            result = call()
        except grpc.RpcError as e:
            with self.lock:
                self.errors.setdefault(what, []).append(f"{e.code().name}: {e.details()}")
            raise
        with self.lock:
            self.samples.setdefault(what, []).append(time.perf_counter() - t0)
        return result

    def table(self) -> str:
        lines = [f"{'call':<14} {'n':>6} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}"]
        for what, xs in sorted(self.samples.items()):
            ms = [1000 * x for x in xs]
            lines.append(
                f"{what:<14} {len(ms):>6} {statistics.median(ms):>9.1f} {percentile(ms, 99):>9.1f} {max(ms):>9.1f}"
            )
        return "\n".join(lines)


@dataclass
class SimNode:
    port: int
    index: int
    timings: Timings
    deadline: float
    accepted: list[int] = field(default_factory=list)
    failure: str = ""

    def run(self, start: threading.Barrier) -> None:
        name = f"n{self.index:04d}"
        task = TASKS[self.index % len(TASKS)]
        try:
            with grpc.insecure_channel(f"127.0.0.1:{self.port}", options=OPTIONS) as channel:
                stub = pb_grpc.AggregatorStub(channel)
                start.wait()
                req = pb.RegisterRequest(
                    node_name=name,
                    federation="mtfl",
                    network=serde.federation_network("mtfl"),
                    task=task,
                    num_samples=10,
                )
                resp = self.timings.timed("Register", lambda: stub.Register(req, timeout=60))
                assert isinstance(resp, pb.RegisterResponse)
                node = RawNode(stub, resp.node_id, resp.session_token, task)
                while time.monotonic() < self.deadline:
                    header, omega = node.fetch(wait=5.0)
                    if header.status == pb.ROUND_STATUS_FINISHED:
                        return
                    if omega is None:
                        continue
                    grad = gradient_like(omega)
                    result = self.timings.timed(
                        "SubmitUpdate",
                        lambda k=header.round, g=grad: node.submit(k, g),  # type: ignore[misc]
                    )
                    assert isinstance(result, pb.SubmitUpdateResponse) and result.accepted
                    self.accepted.append(header.round)
                self.failure = "out of time"
        except Exception as e:  # reported by the test, with the node's name
            self.failure = f"{type(e).__name__}: {e}"


def probe(port: int, timings: Timings, stop: threading.Event) -> None:
    """GetState and the readiness check, back to back every 50 ms, on a channel of their own."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as channel:
        stub = pb_grpc.AggregatorStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set():
            try:
                timings.timed("GetState", lambda: stub.GetState(pb.GetStateRequest(), timeout=30))
                status = timings.timed(
                    "Health.Check", lambda: health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=30)
                )
                assert isinstance(status, health_pb2.HealthCheckResponse)
            except grpc.RpcError:
                pass  # counted in timings.errors
            stop.wait(0.05)


def run_load(tmp_path: Path, procs: Processes, nodes: int, rounds: int, max_workers: int, budget: float) -> Timings:
    state_dir = tmp_path / "state"
    flags = ["--federation", "mtfl", "--min-nodes", str(nodes), "--max-nodes", str(nodes), "--rounds", str(rounds)]
    flags += ["--round-timeout", "120", "--heartbeat-interval", "1", "--heartbeat-timeout", "600"]
    flags += ["--new-node-burst", str(nodes)]  # every simulated node enrols from 127.0.0.1
    flags += ["--max-workers", str(max_workers), "--max-fetch-wait", "5", "--state-dir", str(state_dir)]
    _agg, ready = aggregator_process(procs, tmp_path, flags)
    port, mport = ready["grpc_port"], ready["metrics_port"]

    timings = Timings()
    t0 = time.monotonic()
    sims = [SimNode(port, i, timings, deadline=t0 + budget) for i in range(nodes)]
    barrier = threading.Barrier(nodes)
    threads = [threading.Thread(target=s.run, args=(barrier,), name=f"sim-{s.index}", daemon=True) for s in sims]
    stop = threading.Event()
    prober = threading.Thread(target=probe, args=(port, timings, stop), name="probe", daemon=True)
    prober.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, t0 + budget + 30 - time.monotonic()))
    elapsed = time.monotonic() - t0
    stop.set()
    prober.join(30)

    failures = {s.index: s.failure for s in sims if s.failure}
    assert not failures, f"{len(failures)} nodes failed, e.g. {list(failures.items())[:3]}"
    assert not any(t.is_alive() for t in threads)
    # Every node's update counted once in every round: none lost, none duplicated.
    for s in sims:
        assert s.accepted == list(range(rounds)), (s.index, s.accepted)
    samples = scrape(mport)
    assert metric(samples, "fedgradnorm_updates_total", outcome="accepted") == nodes * rounds
    assert metric(samples, "fedgradnorm_round") == rounds
    records = metrics_records(state_dir)
    assert len(records) == nodes * rounds
    assert len({(r["round"], r["client"]) for r in records}) == nodes * rounds
    # The probes kept being answered throughout.
    assert not timings.errors.get("GetState") and not timings.errors.get("Health.Check"), timings.errors
    assert len(timings.samples["GetState"]) >= 3
    duration = metric(samples, "fedgradnorm_round_duration_seconds_sum") / rounds
    print(
        f"\nload: {nodes} nodes x {rounds} rounds, max_workers={max_workers}: {elapsed:.1f} s, "
        f"mean round {duration:.2f} s (open to close)\n{timings.table()}"
    )
    return timings


def test_hundreds_of_nodes_lose_no_update(tmp_path: Path, procs: Processes) -> None:
    run_load(tmp_path, procs, nodes=200, rounds=3, max_workers=232, budget=50.0)


@pytest.mark.long
@pytest.mark.timeout(480)  # its own budget (400 s, checked with a message) decides, not the suite's 300 s default
def test_heavier_load_loses_no_update(tmp_path: Path, procs: Processes) -> None:
    run_load(tmp_path, procs, nodes=500, rounds=8, max_workers=532, budget=400.0)


@pytest.mark.long
def test_state_and_health_answer_while_nodes_outnumber_workers(tmp_path: Path) -> None:
    from fedgradnorm.services.aggregator.config import CoordinatorConfig, ServiceConfig
    from fedgradnorm.services.aggregator.server import start_aggregator
    from tests.faults_helpers import safe_structlog
    from tests.grpc_client import connect, register

    with safe_structlog():
        agg = start_aggregator(
            ServiceConfig(
                listen="127.0.0.1:0", metrics_listen="", state_dir=str(tmp_path), insecure=True, max_workers=8
            ),
            CoordinatorConfig(federation="mtfl", min_nodes=100, heartbeat_timeout=600.0),  # no round ever opens
        )
        channel, stub = connect(agg.grpc_port)
        try:
            nodes = [register(stub, f"n{i}", TASKS[i % len(TASKS)]) for i in range(16)]

            def poll(node: RawNode) -> None:
                with contextlib.suppress(grpc.RpcError):  # cancelled when the aggregator stops
                    node.fetch(wait=30.0)

            pollers = [threading.Thread(target=poll, args=(n,), daemon=True) for n in nodes]
            for t in pollers:
                t.start()
            time.sleep(1.0)  # every worker is now waiting in a FetchRound
            stub.GetState(pb.GetStateRequest(), timeout=10)
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
        finally:
            channel.close()
            agg.stop(grace=0)
