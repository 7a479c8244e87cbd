"""Load: GetState and health-check latency while hundreds of light nodes run rounds.

A bounded load test on 127.0.0.1 only. The aggregator runs as a process (MTFL federation, so the
model is Network 1, 0.2 MB). A load process drives ``nodes`` light nodes over grpc.aio: each
registers, heartbeats, and for ``rounds`` rounds fetches omega and submits a zero gradient. A
probe process meanwhile calls ``GetState`` and ``grpc.health.v1.Health/Check`` in turn, first on
the idle aggregator (baseline), then under load, and reports their latency percentiles. Both
child processes stop by themselves after ``time_limit`` seconds at the latest.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Table, fmt_s, pct
from benchmarks.deploy import RoundWatcher, fresh
from fedgradnorm.launch import start_aggregator

TASKS = ("landmarks", "gender", "smile", "glasses", "pose")


def _probe(port: int, phase: Any, stop: Any, ready: Any, out: Any, interval: float, time_limit: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
    from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc

    lat: dict[str, dict[str, list[float]]] = {
        "idle": {"GetState": [], "Health": []},
        "load": {"GetState": [], "Health": []},
    }
    errors = 0
    end = time.monotonic() + time_limit
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.AggregatorStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        ready.set()
        while not stop.is_set() and time.monotonic() < end:
            which = "load" if phase.is_set() else "idle"
            for name, call in (
                ("GetState", lambda: stub.GetState(pb.GetStateRequest(), timeout=30)),
                ("Health", lambda: health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)),
            ):
                t0 = time.perf_counter()
                try:
                    call()
                    lat[which][name].append(time.perf_counter() - t0)
                except grpc.RpcError:
                    errors += 1
            time.sleep(interval)
    out.put({"latency": lat, "errors": errors})


def _load(port: int, nodes: int, rounds: int, out: Any, time_limit: float) -> None:
    out.put(asyncio.run(_drive(port, nodes, rounds, time_limit)))


async def _drive(port: int, nodes: int, rounds: int, time_limit: float) -> dict[str, Any]:
    import grpc
    import torch

    from fedgradnorm import wire
    from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
    from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc
    from fedgradnorm._proto.fedgradnorm.v1 import tensor_pb2
    from fedgradnorm.federation import load_federation
    from fedgradnorm.services import serde

    zeros = {k: torch.zeros_like(v) for k, v in load_federation("mtfl").build_shared(0).named_parameters()}
    specs = wire.tensor_specs(zeros, tensor_pb2.DTYPE_FLOAT32)
    chunks = list(wire.iter_chunks(zeros, tensor_pb2.DTYPE_FLOAT32, wire.DEFAULT_CHUNK_BYTES))
    shapes = {k: tuple(v.shape) for k, v in zeros.items()}
    stats: dict[str, list[float]] = {"Register": [], "FetchRound (model part)": [], "SubmitUpdate": [], "Heartbeat": []}
    failures: list[str] = []
    deadline = time.monotonic() + time_limit
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(max(1, nodes // 25))]

    async def node(i: int) -> int:
        stub = pb_grpc.AggregatorStub(channels[i % len(channels)])
        task = TASKS[i % len(TASKS)]
        t0 = time.perf_counter()
        reg = await stub.Register(
            pb.RegisterRequest(
                node_name=f"load-{i:04d}",
                federation="mtfl",
                network=serde.federation_network("mtfl"),
                task=task,
                num_samples=100,
            ),
            timeout=60,
        )
        stats["Register"].append(time.perf_counter() - t0)
        ident = {"node_id": reg.node_id, "session_token": reg.session_token}
        done = 0
        last_beat = time.monotonic()
        while done < rounds and time.monotonic() < deadline:
            if time.monotonic() - last_beat > reg.heartbeat_interval_seconds:
                t0 = time.perf_counter()
                await stub.Heartbeat(pb.HeartbeatRequest(**ident), timeout=30)
                stats["Heartbeat"].append(time.perf_counter() - t0)
                last_beat = time.monotonic()
            stream = stub.FetchRound(pb.FetchRoundRequest(**ident, wait_seconds=5), timeout=60)
            header = None
            asm = None
            t_header = 0.0
            async for msg in stream:
                if header is None:
                    header = msg.header
                    t_header = time.perf_counter()
                    if header.status != pb.ROUND_STATUS_OPEN:
                        break
                    asm = wire.TensorAssembler.from_header(header, shapes)
                else:
                    assert asm is not None
                    asm.feed(msg.chunk.data)
            if header is None or header.status == pb.ROUND_STATUS_FINISHED:
                break
            if header.status != pb.ROUND_STATUS_OPEN:
                continue
            assert asm is not None
            asm.finish()
            stats["FetchRound (model part)"].append(time.perf_counter() - t_header)

            async def messages(round_: int = header.round) -> Any:
                yield pb.SubmitUpdateRequest(
                    header=pb.SubmitHeader(
                        **ident,
                        round=round_,
                        tensors=specs,
                        total_bytes=wire.payload_nbytes(specs),
                        loss=1.0,
                        initial_loss=1.0,
                        loss_ratio=1.0,
                        num_samples=100,
                    )
                )
                for data in chunks:
                    yield pb.SubmitUpdateRequest(chunk=tensor_pb2.TensorChunk(data=data))

            t0 = time.perf_counter()
            await stub.SubmitUpdate(messages(), timeout=60)
            stats["SubmitUpdate"].append(time.perf_counter() - t0)
            done += 1
        await stub.Deregister(pb.DeregisterRequest(**ident), timeout=30)
        return done

    async def guarded(i: int) -> int:
        try:
            return await node(i)
        except grpc.RpcError as e:
            failures.append(f"{e.code().name}: {e.details()}")
            return 0

    t0 = time.perf_counter()
    done = await asyncio.gather(*(guarded(i) for i in range(nodes)))
    wall = time.perf_counter() - t0
    for ch in channels:
        await ch.close()
    return {"stats": stats, "rounds_done": list(done), "failures": failures[:5], "failed": len(failures), "wall": wall}


def measure(
    workdir: Path, nodes: int, rounds: int, time_limit: float, baseline: float, max_workers: int | None
) -> dict[str, Any]:
    """One aggregator (``max_workers`` gRPC threads; None: its default), the probe, then the load."""
    fresh(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    metrics = workdir / "metrics.jsonl"
    ctx = multiprocessing.get_context("spawn")
    flags = [
        "--federation",
        "mtfl",
        "--min-nodes",
        str(nodes),
        "--max-nodes",
        str(max(1024, nodes)),
        "--rounds",
        str(rounds),
        "--round-timeout",
        "60",
        "--new-node-burst",  # every simulated node enrols from 127.0.0.1
        str(nodes),
        "--state-dir",
        str(workdir / "aggregator-state"),
        "--metrics-log",
        str(metrics),
    ]
    if max_workers:
        flags += ["--max-workers", str(max_workers)]
    agg, ready = start_aggregator(workdir, flags)
    port = int(ready["grpc_port"])
    phase, stop, probe_ready = ctx.Event(), ctx.Event(), ctx.Event()
    probe_q, load_q = ctx.Queue(), ctx.Queue()
    probe = ctx.Process(
        target=_probe, args=(port, phase, stop, probe_ready, probe_q, 0.02, time_limit + baseline + 30), daemon=True
    )
    loader = ctx.Process(target=_load, args=(port, nodes, rounds, load_q, time_limit), daemon=True)
    watcher = RoundWatcher(metrics, nodes)
    try:
        watcher.start()
        probe.start()
        if not probe_ready.wait(120):
            raise RuntimeError("the probe process did not start")
        time.sleep(baseline)
        phase.set()
        loader.start()
        load = load_q.get(timeout=time_limit + 60)
        with contextlib.suppress(TimeoutError):
            watcher.wait_rounds(rounds, 30)  # the last round closes just after the last submit returns
        stop.set()
        probed = probe_q.get(timeout=60)
    finally:
        stop.set()
        watcher.stop()
        for p in (loader, probe):
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        agg.stop()
    stamps = list(watcher.stamps)
    if load["failed"] == nodes:
        raise RuntimeError(f"every light node failed, e.g. {load['failures'][:1]}: the load test measured nothing")
    return {
        "probe": probed,
        "load": load,
        "round_times": [b - a for a, b in itertools.pairwise(stamps)],
        "rounds_closed": len(stamps),
        "max_workers": max_workers,
    }


def run(
    workdir: Path,
    nodes: int = 200,
    rounds: int = 5,
    time_limit: float = 180.0,
    baseline: float = 3.0,
    max_workers: tuple[int | None, ...] = (None, 512),
) -> Table:
    """The load test once per aggregator thread-pool size (None: the aggregator's default)."""
    from fedgradnorm.services.aggregator.config import ServiceConfig

    default_workers = ServiceConfig.max_workers
    t = Table(
        f"Load: {nodes} light nodes (MTFL, Network 1) against one aggregator; latency per call",
        ["aggregator gRPC threads", "call", "phase", "calls", "p50", "p99", "max"],
    )
    results = []
    for workers in max_workers:
        r = measure(workdir / f"workers-{workers or 'default'}", nodes, rounds, time_limit, baseline, workers)
        results.append(r)
        label = f"{workers or default_workers}" + (" (default)" if workers is None else "")
        rows = [
            (call, "idle aggregator" if ph == "idle" else f"{nodes} nodes running rounds", values)
            for ph in ("idle", "load")
            for call, values in r["probe"]["latency"][ph].items()
        ]
        rows += [(call, "the nodes' own calls", values) for call, values in r["load"]["stats"].items()]
        for call, phase_name, values in rows:
            t.add(
                label,
                call,
                phase_name,
                len(values),
                fmt_s(pct(values, 50)),
                fmt_s(pct(values, 99)),
                fmt_s(max(values, default=float("nan"))),
            )
        load = r["load"]
        completed = sum(1 for d in load["rounds_done"] if d >= rounds)
        failures = "; ".join(load["failures"])
        t.notes.append(
            f"{label} threads: {completed} of {nodes} nodes completed {rounds} rounds in {load['wall']:.1f} s "
            f"({r['rounds_closed']} rounds closed; close-to-close "
            + (f"median {fmt_s(pct(r['round_times'], 50))}" if r["round_times"] else "n/a")
            + f"); {load['failed']} node failures{': ' + failures if failures else ''}; "
            f"{r['probe']['errors']} probe errors."
        )
    t.notes.append(
        "Probe: one GetState then one Health/Check every 20 ms from a separate process; 'idle' is the "
        f"{baseline:.0f} s before the nodes start. Nodes: grpc.aio in one process, {max(1, nodes // 25)} channels, "
        "each registers, heartbeats at the announced interval, and per round long-polls FetchRound (up to 5 s; "
        "its latency here is from the header to the reassembled model) and submits a zero gradient. "
        "The nodes' own latencies include their event loop's queueing (hundreds of nodes in one Python process)."
    )
    first = results[0]
    t.data = {
        "probe": first["probe"],
        "load": {k: v for k, v in first["load"].items() if k != "stats"},
        "round_times": first["round_times"],
        "runs": [{"max_workers": r["max_workers"], "probe": r["probe"], "stats": r["load"]["stats"]} for r in results],
    }
    return t
