"""What each abuse of docs/security.md's "Limits" costs: the aggregator's memory and threads, and how
many rounds the honest nodes close while it goes on.

    python -m benchmarks.abuse            # prints the table (part of `make bench`)

For every attack a fresh aggregator (RadCom, Network 2: 15.7 MB) trains two honest no-train edge
node processes; an attacker thread then speaks the wire protocol for a fixed time. Measured, side by
side in one run: honest rounds per minute before and during the attack, and the aggregator's
resident memory and thread count before, at the peak, and after it (the attack stopped, a few
seconds to settle).
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from benchmarks.common import Table, read_metrics_lines
from benchmarks.deploy import fresh
from fedgradnorm import wire
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc
from fedgradnorm._proto.fedgradnorm.v1 import tensor_pb2
from fedgradnorm.launch import ServiceProcess, start_aggregator, start_edge_node
from fedgradnorm.services import serde
from fedgradnorm.services.domain import Submission

F32 = tensor_pb2.DTYPE_FLOAT32


def _status(pid: int) -> tuple[float, int]:
    """(resident MiB, threads) of a process."""
    rss, threads = 0.0, 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss, threads


@dataclass
class Attacker:
    """A client of the wire protocol: enrols as a node and misbehaves within the rules."""

    stub: pb_grpc.AggregatorStub
    stop: threading.Event
    enrollment_token: str
    node_id: str = ""
    token: str = ""

    def enrol(self, name: str) -> None:
        resp = self.stub.Register(
            pb.RegisterRequest(
                node_name=name,
                federation="radcom",
                network=serde.federation_network("radcom"),
                task="anomaly",
                num_samples=10,
                enrollment_token=self.enrollment_token,
            ),
            timeout=30,
        )
        self.node_id, self.token = resp.node_id, resp.session_token
        self.stub.Heartbeat(pb.HeartbeatRequest(node_id=self.node_id, session_token=self.token), timeout=30)

    def fetch_omega(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        stream = self.stub.FetchRound(
            pb.FetchRoundRequest(node_id=self.node_id, session_token=self.token, wait_seconds=5), timeout=60
        )
        header = next(stream).header
        if header.status != pb.ROUND_STATUS_OPEN:
            return None
        asm = wire.TensorAssembler.from_header(header, {s.name: tuple(s.shape) for s in header.tensors})
        for msg in stream:
            asm.feed(msg.chunk.data)
        return header.round, asm.finish()


def _header(a: Attacker, round_: int, gradient: dict[str, torch.Tensor]) -> pb.SubmitHeader:
    """A well-formed header for ``gradient`` (first round: loss = F_0, F~ = 1)."""
    return serde.submit_header(Submission(a.node_id, round_, gradient, 1.0, 1.0, 1.0, 10), a.token, F32)


def huge_names(a: Attacker) -> None:
    i = 0
    while not a.stop.is_set():
        req = pb.RegisterRequest(
            node_name=f"{i}" + "x" * (1 << 20),
            federation="radcom",
            network=serde.federation_network("radcom"),
            task="anomaly",
            num_samples=1,
        )
        i += 1
        with contextlib.suppress(grpc.RpcError):
            a.stub.Register(req, timeout=30)


def unread_fetches(a: Attacker) -> None:
    a.enrol("greedy")
    req = pb.FetchRoundRequest(node_id=a.node_id, session_token=a.token, wait_seconds=20)
    streams = []
    while not a.stop.is_set() and len(streams) < 200:
        streams.append(a.stub.FetchRound(req, timeout=120))  # never read
        time.sleep(0.02)
    a.stop.wait()
    for s in streams:
        s.cancel()


def stalled_submits(a: Attacker) -> None:
    a.enrol("trickle")
    got = None
    while got is None and not a.stop.is_set():
        got = a.fetch_omega()
    if got is None:
        return
    round_, omega = got
    header = _header(a, round_, omega)

    def stalled() -> Iterator[pb.SubmitUpdateRequest]:
        yield pb.SubmitUpdateRequest(header=header)
        a.stop.wait()

    calls = [a.stub.SubmitUpdate.future(stalled(), timeout=120) for _ in range(40)]
    a.stop.wait()
    for c in calls:
        c.cancel()


def churn(a: Attacker) -> None:
    i = 0
    while not a.stop.is_set():
        try:
            a.enrol(f"churn-{i}")
            a.stub.Deregister(pb.DeregisterRequest(node_id=a.node_id, session_token=a.token), timeout=10)
        except grpc.RpcError:
            a.stop.wait(0.05)  # rate limited
        i += 1


def sybils(a: Attacker) -> None:
    for i in range(1000):
        if a.stop.is_set():
            return
        try:
            a.stub.Register(
                pb.RegisterRequest(
                    node_name=f"sybil-{i}",
                    federation="radcom",
                    network=serde.federation_network("radcom"),
                    task="anomaly",
                    num_samples=1,
                ),
                timeout=30,
            )
        except grpc.RpcError:
            a.stop.wait(0.05)


def huge_gradient(a: Attacker) -> None:
    a.enrol("poison")
    while not a.stop.is_set():
        try:
            got = a.fetch_omega()
            if got is None:
                continue
            round_, omega = got
            grad = {k: torch.full_like(v, 1e30) for k, v in omega.items()}
            header = _header(a, round_, grad)

            def messages(header: pb.SubmitHeader = header, grad: dict[str, torch.Tensor] = grad) -> Iterator[Any]:
                yield pb.SubmitUpdateRequest(header=header)
                for data in wire.iter_chunks(grad, F32, 1 << 20):
                    yield pb.SubmitUpdateRequest(chunk=tensor_pb2.TensorChunk(data=data))

            a.stub.SubmitUpdate(messages(), timeout=60)
        except grpc.RpcError:
            a.stop.wait(0.1)


ATTACKS: dict[str, tuple[str, Callable[[Attacker], None]]] = {
    "names": ("Register with 1 MiB names and a wrong token, in a loop", huge_names),
    "fetch": ("one node opens 200 FetchRound streams and reads none", unread_fetches),
    "submit": ("one node opens 40 SubmitUpdate streams that stall after the header", stalled_submits),
    "churn": ("register + deregister new names in a loop", churn),
    "sybils": ("1,000 registrations that never fetch or heartbeat", sybils),
    "gradient": ("a third node submits 1e30 per element every round", huge_gradient),
}


def measure(workdir: Path, attack: str, warm: float, window: float, settle: float) -> dict[str, float]:
    fresh(workdir)
    flags = [
        "--federation",
        "radcom",
        "--min-nodes",
        "2",
        "--round-timeout",
        "10",
        "--state-dir",
        str(workdir / "aggregator-state"),
        "--enrollment-token",
        "bench-token",
    ]
    procs: list[ServiceProcess] = []
    try:
        agg, ready = start_aggregator(workdir, flags)
        procs.append(agg)
        env = {"FEDGRADNORM_ENROLLMENT_TOKEN": "bench-token"}
        for task in ("modulation", "signal"):
            node_flags = [
                "--federation",
                "radcom",
                "--synthetic-size",
                "2",
                "--no-train",
                "true",
                "--torch-threads",
                "1",
            ]
            procs.append(start_edge_node(workdir, ready["grpc_port"], task, node_flags, env=env))
        log = workdir / "aggregator-state" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while read_metrics_lines(log) < 4 and time.monotonic() < deadline:  # two rounds: warm
            time.sleep(0.1)

        def rounds() -> int:
            return read_metrics_lines(log) // 2  # two honest rows per round (the attacker's are dropped)

        time.sleep(warm)
        r0, t0 = rounds(), time.monotonic()
        time.sleep(window)
        before_rate = (rounds() - r0) / (time.monotonic() - t0) * 60
        rss0, thr0 = _status(agg.pid)
        stop = threading.Event()
        channel = grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}")
        attacker = Attacker(pb_grpc.AggregatorStub(channel), stop, "bench-token")  # an enrolled node
        thread = threading.Thread(target=ATTACKS[attack][1], args=(attacker,), daemon=True)
        r1, t1 = rounds(), time.monotonic()
        thread.start()
        peak_rss, peak_thr = rss0, thr0
        end = time.monotonic() + window
        while time.monotonic() < end:
            rss, thr = _status(agg.pid)
            peak_rss, peak_thr = max(peak_rss, rss), max(peak_thr, thr)
            time.sleep(0.2)
        during_rate = (rounds() - r1) / (time.monotonic() - t1) * 60
        stop.set()
        thread.join(30)
        channel.close()
        time.sleep(settle)
        rss2, thr2 = _status(agg.pid)
        return {
            "rounds_before": before_rate,
            "rounds_during": during_rate,
            "rss_before": rss0,
            "rss_peak": peak_rss,
            "rss_after": rss2,
            "threads_before": thr0,
            "threads_peak": peak_thr,
            "threads_after": thr2,
        }
    finally:
        for p in reversed(procs):
            p.stop()


def run(workdir: Path, attacks: tuple[str, ...] = tuple(ATTACKS), window: float = 20.0) -> Table:
    workdir.mkdir(parents=True, exist_ok=True)
    table = Table(
        "Abuse: honest rounds and the aggregator's memory while one client misbehaves (RadCom, Network 2)",
        [
            "attack",
            "honest rounds/min before → during",
            "RSS MiB before → peak → after",
            "threads before → peak → after",
        ],
    )
    for name in attacks:
        m = measure(workdir / name, name, warm=2.0, window=window, settle=5.0)
        table.data[name] = m
        table.add(
            ATTACKS[name][0],
            f"{m['rounds_before']:.0f} → {m['rounds_during']:.0f}",
            f"{m['rss_before']:.0f} → {m['rss_peak']:.0f} → {m['rss_after']:.0f}",
            f"{m['threads_before']:.0f} → {m['threads_peak']:.0f} → {m['threads_after']:.0f}",
        )
    table.notes.append(
        f"Each attack runs {window:.0f} s against a fresh aggregator (round timeout 10 s) and two honest no-train "
        f"edge node processes; 'before' is the {window:.0f} s before it, 'after' 5 s after it stopped."
    )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/bench-abuse")
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("attacks", nargs="*", default=list(ATTACKS))
    args = parser.parse_args(argv)
    print(run(Path(args.workdir), tuple(args.attacks), args.window).text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
