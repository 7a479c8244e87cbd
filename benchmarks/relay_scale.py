"""Relays at scale: thousands of light nodes against one aggregator, flat and behind relays.

    python -m benchmarks.relay_scale --nodes 100,1000,5000 --relays 4
    python -m benchmarks.relay_scale --nodes 100,1000,5000 --relays 4 --doc docs/benchmarks.md

For every node count N and topology (flat: every node dials the aggregator; relayed: node i dials
relay i % R), a fresh aggregator process (MTFL federation, Network 1: 0.2 MB of float32) and R
relay processes serve N light nodes driven by a few load processes (grpc.aio, as benchmarks/load.py
drives them). Each light node registers, then for every round long-polls FetchRound, drains omega
and submits a small synthetic gradient (one of eight fixed random tensors of omega's shapes, scaled
by 1e-3, with a loss that falls by 1 % a round), until the aggregator's last round is over.

Measured per run: registration (time until all N are enrolled, per-call latency, retries), rounds
closed and how many nodes each one used (metrics.jsonl), rounds per minute after the first
(warm-up) round, payload bytes through the aggregator per round (its fedgradnorm_bytes_total),
peak RSS (VmHWM) and peak thread count of the aggregator and of each relay, CPU seconds of each
kind of process, and the load processes' own peak RSS. Every process is stopped when a run ends,
even when it fails, and every run has a time limit.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import itertools
import json
import math
import multiprocessing
import os
import queue
import resource
import signal
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.common import MB, Table, fmt_s, median, pct
from benchmarks.deploy import fresh
from benchmarks.run import RELAY_BEGIN as BEGIN
from benchmarks.run import RELAY_END as END
from fedgradnorm.launch import ServiceProcess, start_aggregator, start_relay

TASKS = ("landmarks", "gender", "smile", "glasses", "pose")
VARIANTS = 8  # distinct synthetic gradients (node i sends variant i % VARIANTS)
FETCH_WAIT = 10.0  # the light nodes' FetchRound long-poll, seconds (the edge node's default --fetch-wait)
REGISTER_IN_FLIGHT = 100  # Register calls in flight per load process (a fleet arriving, not all at once)
BY_HAND_BEGIN = "<!-- relay-scale:by-hand:begin -->"
BY_HAND_END = "<!-- relay-scale:by-hand:end -->"


# -- the load processes ------------------------------------------------------------------------


def _load(assignment: list[tuple[int, int]], ready: Any, go: Any, stop: Any, out: Any, time_limit: float) -> None:
    """One load process: the light nodes ``assignment`` [(node index, port it dials)]."""
    try:
        result = asyncio.run(_drive(assignment, ready, go, stop, time_limit))
    except BaseException as e:  # reported, so the parent does not wait for the time limit
        result = {"crashed": f"{type(e).__name__}: {e}"}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["peak_rss_mib"] = usage.ru_maxrss / 1024
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    out.put(result)


async def _drive(
    assignment: list[tuple[int, int]], ready: Any, go: Any, stop: Any, time_limit: float
) -> dict[str, Any]:
    import grpc
    import torch

    from fedgradnorm import wire
    from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
    from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc
    from fedgradnorm._proto.fedgradnorm.v1 import tensor_pb2
    from fedgradnorm.federation import load_federation
    from fedgradnorm.reasons import Reason
    from fedgradnorm.services import serde
    from fedgradnorm.services.refusals import reason_of

    torch.set_num_threads(1)
    shared = dict(load_federation("mtfl").build_shared(0).named_parameters())
    gen = torch.Generator().manual_seed(0)
    variants = []
    for v in range(VARIANTS):
        grad = {k: torch.randn(p.shape, generator=gen) * 1e-3 * (1 + v / VARIANTS) for k, p in shared.items()}
        specs = wire.tensor_specs(grad, tensor_pb2.DTYPE_FLOAT32)
        chunks = [
            pb.SubmitUpdateRequest(chunk=tensor_pb2.TensorChunk(data=data))
            for data in wire.iter_chunks(grad, tensor_pb2.DTYPE_FLOAT32, wire.DEFAULT_CHUNK_BYTES)
        ]
        variants.append((specs, wire.payload_nbytes(specs), chunks))
    network = serde.federation_network("mtfl")

    ports = sorted({p for _, p in assignment})
    by_port = Counter(p for _, p in assignment)
    # One HTTP/2 connection per 25 nodes (as benchmarks/load.py), per target.
    channels = {
        p: [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for _ in range(max(1, by_port[p] // 25))] for p in ports
    }
    stats: dict[str, list[float]] = {"Register": [], "FetchRound (model part)": [], "SubmitUpdate": []}
    errors: Counter[str] = Counter()  # "call: CODE" -> count
    examples: dict[str, str] = {}  # "call: CODE" -> the first error's details
    register_retries: Counter[str] = Counter()
    registered_at: list[float] = []
    rounds_of: dict[int, list[int]] = {}
    rejoined: list[int] = []
    register_gate = asyncio.Semaphore(REGISTER_IN_FLIGHT)
    ready.set()
    while not go.wait(0.05):
        await asyncio.sleep(0)
    t_go = time.monotonic()
    deadline = t_go + time_limit
    retryable = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}

    async def register(stub: Any, i: int, ident: dict[str, str]) -> Any:
        """Register (or, with ``ident``, resume) node i, retrying while the service pushes back."""
        delay = 0.2
        async with register_gate:
            while True:
                t0 = time.perf_counter()
                try:
                    reg = await stub.Register(
                        pb.RegisterRequest(
                            node_name=f"n{i:05d}",
                            federation="mtfl",
                            network=network,
                            task=TASKS[i % len(TASKS)],
                            num_samples=100,
                            **ident,
                        ),
                        timeout=60,
                    )
                    stats["Register"].append(time.perf_counter() - t0)
                    return reg
                except grpc.RpcError as e:
                    if e.code() not in retryable or time.monotonic() + delay > deadline or stop.is_set():
                        raise
                    register_retries[e.code().name] += 1
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, 5.0)

    def must_rejoin(e: grpc.RpcError) -> bool:
        return e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED) or (
            reason_of(e) is Reason.DEREGISTERED
        )

    async def heartbeats(stub: Any, ident: dict[str, str], interval: float, rejoin: asyncio.Event) -> None:
        """Beside the rounds, as the edge node's heartbeat thread."""
        while True:
            await asyncio.sleep(interval)
            try:
                resp = await stub.Heartbeat(pb.HeartbeatRequest(**ident), timeout=interval)
                if not resp.registered:
                    rejoin.set()
            except grpc.RpcError as e:
                errors[f"Heartbeat: {e.code().name}"] += 1
                examples.setdefault(f"Heartbeat: {e.code().name}", str(e.details())[:200])

    async def node(i: int, port: int, k: int) -> None:
        stub = pb_grpc.AggregatorStub(channels[port][k % len(channels[port])])
        specs, total, chunks = variants[i % VARIANTS]
        f0 = 1.0 + (i % 7) / 10
        accepted = 0
        reg = await register(stub, i, {})
        registered_at.append(time.monotonic() - t_go)
        ident = {"node_id": reg.node_id, "session_token": reg.session_token}
        done: list[int] = []
        rounds_of[i] = done
        rejoin = asyncio.Event()
        beat = asyncio.create_task(heartbeats(stub, ident, reg.heartbeat_interval_seconds, rejoin))
        try:
            while time.monotonic() < deadline and not stop.is_set():
                call = "Register (resume)"
                try:
                    if rejoin.is_set():
                        rejoin.clear()
                        try:
                            await register(stub, i, ident)
                        except grpc.RpcError as e:
                            if e.code() != grpc.StatusCode.NOT_FOUND:
                                raise
                            fresh_reg = await register(stub, i, {})  # forgotten meanwhile: enrol afresh
                            ident.update(node_id=fresh_reg.node_id, session_token=fresh_reg.session_token)
                            accepted = 0  # a new F_0
                        rejoined.append(i)
                    call = "FetchRound"
                    stream = stub.FetchRound(
                        pb.FetchRoundRequest(**ident, wait_seconds=FETCH_WAIT, without_final_model=True),
                        timeout=FETCH_WAIT + 60,
                    )
                    header = None
                    got = 0
                    t_header = 0.0
                    async for msg in stream:
                        if header is None:
                            header = msg.header
                            t_header = time.perf_counter()
                            if header.status != pb.ROUND_STATUS_OPEN:
                                break
                        else:
                            got += len(msg.chunk.data)
                    if header is None or header.status == pb.ROUND_STATUS_FINISHED:
                        return
                    if header.status != pb.ROUND_STATUS_OPEN:
                        continue
                    if got != header.total_bytes:
                        errors["FetchRound: short stream"] += 1
                        continue
                    stats["FetchRound (model part)"].append(time.perf_counter() - t_header)
                    ratio = 1.0 if accepted == 0 else 1.0 - 0.01 * accepted
                    first = pb.SubmitUpdateRequest(
                        header=pb.SubmitHeader(
                            **ident,
                            round=header.round,
                            tensors=specs,
                            total_bytes=total,
                            loss=f0 * ratio,
                            initial_loss=f0,
                            loss_ratio=ratio,
                            num_samples=100,
                        )
                    )

                    async def messages(first: Any = first) -> Any:
                        yield first
                        for c in chunks:
                            yield c

                    call = "SubmitUpdate"
                    t0 = time.perf_counter()
                    await stub.SubmitUpdate(messages(), timeout=60)
                    stats["SubmitUpdate"].append(time.perf_counter() - t0)
                    accepted += 1
                    done.append(header.round)
                except grpc.RpcError as e:
                    errors[f"{call}: {e.code().name}"] += 1
                    examples.setdefault(f"{call}: {e.code().name}", str(e.details())[:200])
                    if must_rejoin(e):
                        rejoin.set()  # dropped by the service (e.g. its heartbeat timed out): resume, as an edge node does
                    else:
                        await asyncio.sleep(0.5)
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat

    failures: list[str] = []

    async def guarded(i: int, port: int, k: int) -> None:
        try:
            await node(i, port, k)
        except grpc.RpcError as e:
            failures.append(f"n{i:05d}: {e.code().name}: {e.details()}")
        except Exception as e:
            failures.append(f"n{i:05d}: {type(e).__name__}: {e}")

    per_port: Counter[int] = Counter()
    tasks = []
    for i, port in assignment:
        tasks.append(guarded(i, port, per_port[port]))
        per_port[port] += 1
    await asyncio.gather(*tasks)
    wall = time.monotonic() - t_go
    for chs in channels.values():
        for ch in chs:
            await ch.close()
    return {
        "nodes": len(assignment),
        "stats": stats,
        "errors": dict(errors),
        "error_examples": examples,
        "register_retries": dict(register_retries),
        "registered": len(registered_at),
        "registration_wall": max(registered_at, default=float("nan")),
        "rounds_done": {i: r for i, r in rounds_of.items()},
        "failures": failures[:5],
        "failed": len(failures),
        "rejoined": len(rejoined),
        "rejoined_nodes": len(set(rejoined)),
        "wall": wall,
    }


# -- the parent: processes, sampling, scraping ---------------------------------------------------


def _proc_status(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM (MiB) and Threads of a process; {} once it is gone."""
    out: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
            elif key == "Threads":
                out[key] = int(value)
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return out


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except FileNotFoundError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class Sampler(threading.Thread):
    """Peak thread count and RSS of the service processes, every ``interval`` seconds."""

    def __init__(self, procs: dict[str, int], interval: float = 0.5) -> None:
        super().__init__(name="sampler", daemon=True)
        self.procs = procs
        self.interval = interval
        self.peak_threads: dict[str, int] = dict.fromkeys(procs, 0)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for name, pid in self.procs.items():
                threads = int(_proc_status(pid).get("Threads", 0))
                self.peak_threads[name] = max(self.peak_threads[name], threads)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def scrape(port: int) -> dict[str, float]:
    """The samples of a Prometheus endpoint, name{labels} -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def _rounds(metrics: Path) -> list[dict[str, Any]]:
    """Per closed round (from the aggregator's metrics.jsonl): nodes used, close time, phases."""
    by: dict[int, dict[str, Any]] = {}
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                r = json.loads(line)
                entry = by.setdefault(r["round"], {"round": r["round"], "nodes": 0, **_timing(r)})
                entry["nodes"] += 1
    return [by[k] for k in sorted(by)]


def _timing(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r.get(k) for k in ("closed_unix", "round_seconds", "collect_seconds", "step_seconds", "commit_seconds")}


def _log_events(path: Path, levels: tuple[str, ...] = ("warning", "error", "critical")) -> Counter[str]:
    """Warning and error events of a service's JSON log, by event name (and `why` where given)."""
    events: Counter[str] = Counter()
    if not path.exists():
        return events
    with path.open(errors="replace") as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                if "Traceback" in line or "Error" in line:
                    events["(non-JSON output)"] += 1
                continue
            if r.get("event") == "tls.disabled":  # plaintext on loopback, as asked
                continue
            if r.get("level") in levels or r.get("why") == "heartbeat timeout":
                why = r.get("why") or ""
                events[f"{r.get('event')}{': ' + why if why and len(why) < 40 else ''}"] += 1
    return events


def measure(
    workdir: Path,
    nodes: int,
    relays: int,
    rounds: int,
    time_limit: float,
    load_procs: int,
    round_timeout: float,
    stall_after: float = 0.0,
    heartbeat: tuple[float, float] | None = None,
    min_nodes: float = 1.0,
) -> dict[str, Any]:
    """One aggregator (and ``relays`` relays; 0: flat), ``nodes`` light nodes, ``rounds`` rounds."""
    fresh(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    metrics = workdir / "metrics.jsonl"
    stall_after = stall_after or round_timeout + 300  # a round closes by its timeout once it is open
    t_start = time.monotonic()
    agg_flags = [
        "--federation",
        "mtfl",
        "--min-nodes",
        str(max(1, math.floor(min_nodes * nodes))),
        "--max-nodes",
        str(nodes),
        "--rounds",
        str(rounds),
        "--round-timeout",
        str(round_timeout),
        "--new-node-burst",  # every light node enrols from 127.0.0.1 (relays forward the node's peer)
        str(nodes),
        "--state-dir",
        str(workdir / "aggregator-state"),
        "--metrics-log",
        str(metrics),
    ]
    if heartbeat:  # (interval, timeout); None: the aggregator's defaults
        agg_flags += ["--heartbeat-interval", str(heartbeat[0]), "--heartbeat-timeout", str(heartbeat[1])]
    procs: list[ServiceProcess] = []
    loaders: list[Any] = []
    sampler: Sampler | None = None
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    result: dict[str, Any] = {"nodes": nodes, "relays": relays, "rounds": rounds}
    try:
        agg, ready = start_aggregator(workdir, agg_flags)
        procs.append(agg)
        agg_port, agg_metrics = int(ready["grpc_port"]), int(ready["metrics_port"])
        relay_ports: list[int] = []
        relay_metrics: list[int] = []
        if relays:
            per_relay = math.ceil(nodes / relays)
            flags = ["--federation", "mtfl", "--max-nodes", str(per_relay), "--torch-threads", "1"]
            with concurrent.futures.ThreadPoolExecutor(relays) as pool:
                started = list(
                    pool.map(lambda r: start_relay(workdir, f"127.0.0.1:{agg_port}", f"site-{r}", flags), range(relays))
                )
            for p, r_ready in started:
                procs.append(p)
                relay_ports.append(int(r_ready["grpc_port"]))
                relay_metrics.append(int(r_ready["metrics_port"]))
        result["services_started"] = time.monotonic() - t_start
        targets = relay_ports or [agg_port]
        sampler = Sampler({p.name: p.pid for p in procs})
        sampler.start()
        assignment = [(i, targets[i % len(targets)]) for i in range(nodes)]
        readies, go, stop = [], ctx.Event(), ctx.Event()
        for k in range(load_procs):
            ready_k = ctx.Event()
            loader = ctx.Process(
                target=_load, args=(assignment[k::load_procs], ready_k, go, stop, out, time_limit), daemon=True
            )
            loader.start()
            loaders.append(loader)
            readies.append(ready_k)
        for r in readies:
            if not r.wait(180):
                raise RuntimeError("a load process did not start within 180 s")
        cpu0 = {p.name: _cpu_seconds(p.pid) for p in procs}
        t_go = time.monotonic()
        result["loads_started"] = t_go - t_start
        go.set()
        loads: list[dict[str, Any]] = []
        size, changed = 0, t_go
        while len(loads) < len(loaders):
            with contextlib.suppress(queue.Empty):
                loads.append(out.get(timeout=2))
                continue
            now = time.monotonic()
            if now - t_go > time_limit + 120:
                raise TimeoutError(f"the load processes did not report within {time_limit + 120:.0f} s")
            dead = [sp for sp in procs if not sp.alive()]
            if dead and not stop.is_set():
                result["died"] = f"{dead[0].name} exited: {dead[0].log_text()[-2000:]}"
                stop.set()
            new_size = metrics.stat().st_size if metrics.exists() else 0
            if new_size != size:
                size, changed = new_size, now
            elif now - changed > stall_after and not stop.is_set():
                result["stalled"] = f"no round closed for {stall_after:.0f} s; the nodes were stopped"
                stop.set()
        result["load_wall"] = time.monotonic() - t_go
        crashed = [r["crashed"] for r in loads if "crashed" in r]
        if crashed:
            raise RuntimeError(f"a load process failed: {crashed[0]}")
        if relays:  # each relay fetches the final model once (the light nodes do not): wait for it
            end = time.monotonic() + 30
            while time.monotonic() < end and not all(
                "relay.training_done" in p.log_text() for p in procs if p.name.startswith("relay-")
            ):
                time.sleep(0.2)
        result["finals"] = sum("relay.training_done" in p.log_text() for p in procs if p.name.startswith("relay-"))
        time.sleep(1.5)  # the services sync their counters into /metrics once a second
        result["agg_metrics"] = {k: v for k, v in scrape(agg_metrics).items() if _kept(k)}
        result["relay_metrics"] = [{k: v for k, v in scrape(port).items() if _kept(k)} for port in relay_metrics]
        result["status"] = {p.name: _proc_status(p.pid) for p in procs}
        result["cpu"] = {p.name: _cpu_seconds(p.pid) - cpu0[p.name] for p in procs}
        result["loads"] = loads
    finally:
        if sampler is not None:
            sampler.stop()
            result["peak_threads"] = dict(sampler.peak_threads)
        for p in loaders:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        t_stop = time.monotonic()
        for sp in reversed(procs):
            sp.stop(timeout=20)
        result["stop_seconds"] = time.monotonic() - t_stop
    result["rounds_log"] = _rounds(metrics)
    result["events"] = {p.name: dict(_log_events(p.log_path)) for p in procs}
    result["wall"] = time.monotonic() - t_start
    return result


def _kept(name: str) -> bool:
    return name.startswith(
        (
            "fedgradnorm_bytes_total",
            "fedgradnorm_updates_total",
            "fedgradnorm_registrations_total",
            "fedgradnorm_streams_cancelled_total",
            "fedgradnorm_relay_uplink_bytes_total",
            "fedgradnorm_relay_partial_sums_total",
            "fedgradnorm_relay_lost_rounds_total",
            "fedgradnorm_relay_bytes_total",
            "fedgradnorm_relay_updates_total",
            "fedgradnorm_rounds_refused_total",
        )
    ) and not name.endswith("_created")


# -- summary -------------------------------------------------------------------------------------


def model_bytes() -> int:
    from fedgradnorm.federation import load_federation

    return sum(p.numel() * 4 for p in load_federation("mtfl").build_shared(0).parameters())


def summarize(r: dict[str, Any], model: int) -> dict[str, Any]:
    """The figures of one run, from its raw measurements."""
    n, k, relays = r["nodes"], r["rounds"], r["relays"]
    loads = r.get("loads", [])
    log = r.get("rounds_log", [])
    closes = [x["closed_unix"] for x in log]
    full = [x for x in log if x["nodes"] == n]
    measured = [b - a for a, b in itertools.pairwise(closes)]  # after round 0 (the warm-up)
    am = r.get("agg_metrics", {})
    sent = am.get('fedgradnorm_bytes_total{direction="sent"}', float("nan"))
    received = am.get('fedgradnorm_bytes_total{direction="received"}', float("nan"))
    finals = r.get("finals", 0) * model  # each relay that saw training end fetched the final model once
    # per closed round; when not every round closed, the open one's transfers are in too (approximate)
    per_round = (sent - finals + received) / len(log) if log else float("nan")
    register = [x for ld in loads for x in ld["stats"]["Register"]]
    errors: Counter[str] = Counter()
    retries: Counter[str] = Counter()
    for ld in loads:
        errors.update(ld["errors"])
        retries.update(ld["register_retries"])
    status = r.get("status", {})
    relay_names = sorted(name for name in status if name.startswith("relay-"))
    peak_threads = r.get("peak_threads", {})
    cpu = r.get("cpu", {})
    return {
        "nodes": n,
        "relays": relays,
        "topology": f"{relays} relays" if relays else "flat",
        "rounds": k,
        "registered": sum(ld["registered"] for ld in loads),
        "registration_wall": max((ld["registration_wall"] for ld in loads), default=float("nan")),
        "register_p50": pct(register, 50),
        "register_p99": pct(register, 99),
        "register_retries": dict(retries),
        "rounds_closed": len(log),
        "rounds_full": len(full),
        "nodes_per_round": [x["nodes"] for x in log],
        "round_times": measured,
        "rounds_per_min": 60 * len(measured) / sum(measured) if measured else float("nan"),
        "round_median": median(measured),
        "collect_median": median([x["collect_seconds"] for x in log[1:] if x["collect_seconds"] is not None]),
        "step_median": median([x["step_seconds"] for x in log[1:] if x["step_seconds"] is not None]),
        "bytes_sent": sent,
        "bytes_received": received,
        "bytes_per_round": per_round,
        "bytes_per_round_expected": 2 * (relays or n) * model,
        "agg_rss": status.get("aggregator", {}).get("VmHWM", float("nan")),
        "relay_rss": [status.get(x, {}).get("VmHWM", float("nan")) for x in relay_names],
        "agg_threads": peak_threads.get("aggregator", 0),
        "relay_threads": [peak_threads.get(x, 0) for x in relay_names],
        "load_rss": [ld.get("peak_rss_mib", float("nan")) for ld in loads],
        "cpu_agg": cpu.get("aggregator", float("nan")),
        "cpu_relays": sum(cpu.get(x, 0.0) for x in relay_names),
        "cpu_load": sum(ld.get("cpu_seconds", 0.0) for ld in loads),
        "node_errors": dict(errors),
        "failed": sum(ld["failed"] for ld in loads),
        "failures": [f for ld in loads for f in ld["failures"]][:3],
        "rejoined": sum(ld["rejoined"] for ld in loads),
        "rejoined_nodes": sum(ld["rejoined_nodes"] for ld in loads),
        "stalled": r.get("stalled", ""),
        "died": r.get("died", ""),
        "load_wall": r.get("load_wall", float("nan")),
        "wall": r.get("wall", float("nan")),
        "events": r.get("events", {}),
        "relay_lost": sum(v for key, v in am.items() if key.startswith("fedgradnorm_relay_lost_rounds_total")),
        "streams_cancelled": {
            key.partition('reason="')[2].rstrip('"}'): v
            for key, v in am.items()
            if key.startswith("fedgradnorm_streams_cancelled_total") and v
        },
        "error": r.get("error", ""),
    }


def _mib(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.0f} MiB"
    return f"{max(values):.0f} MiB (max of {len(values)})"


def _events_text(events: dict[str, dict[str, int]]) -> str:
    parts = []
    for proc, counts in events.items():
        if counts:
            top = sorted(counts.items(), key=lambda kv: -kv[1])[:4]
            parts.append(f"{proc}: " + ", ".join(f"{e} ×{c}" for e, c in top))
    return "; ".join(parts) or "none"


def table(results: list[dict[str, Any]], model: int, command: str) -> Table:
    t = Table(
        "Relays at scale: light nodes (MTFL, Network 1) against one aggregator, flat and behind relays",
        [
            "nodes",
            "topology",
            "all registered after",
            "rounds closed with every node",
            "rounds / min",
            "round (median)",
            "payload through the aggregator per round",
            "aggregator peak RSS",
            "relay peak RSS",
            "aggregator peak threads",
            "node-side errors",
        ],
    )
    for s in results:
        if s.get("error") and not s.get("rounds_closed"):
            t.add(s["nodes"], s["topology"], "-", "-", "-", "-", "-", "-", "-", "-", f"run failed: {s['error'][:120]}")
            continue
        errs = sum(s["node_errors"].values()) + s["failed"]
        t.add(
            f"{s['nodes']:,}",
            s["topology"],
            f"{fmt_s(s['registration_wall'])}"
            + ("" if s["registered"] == s["nodes"] else f" ({s['registered']} of them)"),
            f"{s['rounds_full']} of {s['rounds']}"
            + ("" if s["rounds_closed"] == s["rounds"] else f" ({s['rounds_closed']} closed)"),
            f"{s['rounds_per_min']:.1f}" if s["rounds_per_min"] == s["rounds_per_min"] else "-",
            fmt_s(s["round_median"]),
            "-"
            if not s["rounds_closed"]
            else f"{s['bytes_per_round'] / MB:.1f} MB" + ("" if s["rounds_closed"] == s["rounds"] else " (≈)"),
            _mib([s["agg_rss"]]),
            _mib(s["relay_rss"]),
            f"{s['agg_threads']:,}",
            f"{errs}",
        )
    t.notes.append(
        f"Command: `{command}`. Each row is a fresh aggregator (and fresh relays) with --max-nodes = "
        "--new-node-burst = the node count, --min-nodes as given (default: the node count), --rounds as given; the "
        "relays with --max-nodes = their share of the nodes; every light node sends the model "
        f"({model / MB:.2f} MB of float32, one chunk) up and gets it down once a round. Rounds per minute and the "
        "median round: close-to-close intervals after round 0 (the warm-up round, which also waits for the last "
        "registration), from the closed_unix of the aggregator's metrics.jsonl; 'rounds closed with every node' "
        "counts rounds whose rows list all N nodes (fewer: stragglers or dropped nodes)."
    )
    t.notes.append(
        "Payload through the aggregator per round: its fedgradnorm_bytes_total (omega sent + updates or partial sums "
        "received; tensor payload only, no gRPC framing or control calls) at the end of the run, less the final "
        "model each relay fetches once after the last round, divided by the rounds closed (≈: not every round "
        "closed, so a round still open adds its transfers); flat it is 2 × N × model, relayed 2 × R × model. Peak RSS: VmHWM of the process at the end of the run (start-up included); "
        "peak threads: /proc every 0.5 s."
    )
    for s in results:
        if s.get("error") and not s.get("rounds_closed"):
            continue
        retries = ", ".join(f"{k} ×{v}" for k, v in s["register_retries"].items()) or "none"
        errs = ", ".join(f"{k} ×{v}" for k, v in s["node_errors"].items()) or "none"
        t.notes.append(
            f"{s['nodes']:,} {s['topology']}: Register p50/p99 {fmt_s(s['register_p50'])}/{fmt_s(s['register_p99'])}, "
            f"retried: {retries}; nodes per round {s['nodes_per_round']}; round phases (median after round 0): "
            f"collect {fmt_s(s['collect_median'])}, step {fmt_s(s['step_median'])}; payload "
            f"{s['bytes_per_round'] / MB:.2f} MB per round (expected {s['bytes_per_round_expected'] / MB:.2f}); "
            f"CPU seconds over the run: aggregator {s['cpu_agg']:.0f}"
            + (f", relays {s['cpu_relays']:.0f}" if s["relays"] else "")
            + f", load processes {s['cpu_load']:.0f} (peak RSS {_mib(s['load_rss'])}); "
            f"threads: relays {s['relay_threads'] or '-'}; node errors: {errs}; failed nodes {s['failed']}"
            + (f" (e.g. {s['failures'][0]})" if s["failures"] else "")
            + f"; resumed after the service dropped them: {s['rejoined_nodes']} nodes ({s['rejoined']} times)"
            + (f"; STALLED: {s['stalled']}" if s["stalled"] else "")
            + (f"; DIED: {s['died'][:300]}" if s["died"] else "")
            + f"; relay rounds lost {s['relay_lost']:.0f}; streams cut "
            f"{s['streams_cancelled'] or 'none'}; services' warnings/errors: {_events_text(s['events'])}; "
            f"run {s['wall']:.0f} s."
        )
    t.data = {"runs": results, "model_bytes": model}
    return t


def run(
    workdir: Path,
    node_counts: tuple[int, ...] = (100, 1000, 5000),
    relays: int = 4,
    rounds: int = 4,
    time_limit: float = 900.0,
    load_procs: int = 0,
    round_timeout: float = 120.0,
    command: str = "python -m benchmarks.relay_scale",
    heartbeat: tuple[float, float] | None = None,
    topologies: tuple[str, ...] = ("flat", "relayed"),
    min_nodes: float = 1.0,
) -> Table:
    """Every node count, flat then relayed; ``load_procs`` 0: one load process per 1,250 nodes (at most 4)."""
    model = model_bytes()
    results = []
    for n in node_counts:
        for r in [0] * ("flat" in topologies) + [relays] * ("relayed" in topologies):
            procs = load_procs or max(1, min(4, math.ceil(n / 1250)))
            label = f"{n}-{'flat' if r == 0 else f'{r}-relays'}"
            print(f"-- {label}: {procs} load processes", flush=True)
            try:
                raw = measure(
                    workdir / label,
                    n,
                    r,
                    rounds,
                    time_limit,
                    procs,
                    round_timeout,
                    heartbeat=heartbeat,
                    min_nodes=min_nodes,
                )
            except Exception as e:  # a run that breaks is a result: say how
                raw = {"nodes": n, "relays": r, "rounds": rounds, "error": f"{type(e).__name__}: {e}"}
                print(f"   failed: {raw['error'][:2000]}", flush=True)
            s = summarize(raw, model) if "loads" in raw else _failed(raw)
            s["label"] = label
            results.append(s)
            (workdir / f"{label}.json").write_text(json.dumps({"raw": raw, "summary": s}, default=str, indent=1))
            print(
                f"   {s.get('rounds_full', 0)} of {rounds} rounds with every node, "
                f"{s.get('rounds_per_min', float('nan')):.1f} rounds/min, "
                f"{s.get('bytes_per_round', float('nan')) / MB:.2f} MB per round",
                flush=True,
            )
    return table(results, model, command)


def _failed(raw: dict[str, Any]) -> dict[str, Any]:
    n, r = raw["nodes"], raw["relays"]
    return {"nodes": n, "relays": r, "topology": f"{r} relays" if r else "flat", "error": raw.get("error", "")}


# -- the document --------------------------------------------------------------------------------


def block(t: Table, info: dict[str, Any], command: str, total: float, load_end: tuple[float, ...], kept: str) -> str:
    """The "Relays at scale" section of docs/benchmarks.md (between BEGIN and END), keeping the
    by-hand part of the previous one (``kept``)."""
    load0 = info["loadavg"]
    out = [
        BEGIN,
        "## Relays at scale",
        "",
        f"Generated by `{command}` on {info['date']}, in {total / 60:.1f} min (`make bench` runs a smaller size "
        "in its own section); nothing typed by hand outside the marked part.",
        "",
        f"Machine: `nproc` = {info['nproc']} ({info['cpu']}), {info['mem_gib']} GiB memory, Linux {info['kernel']}, "
        f"Python {info['python']}, torch {info['torch']}. Load average (1/5/15 min): "
        f"{load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f} at the start, "
        f"{load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f} at the end. The aggregator, the relays and the "
        "load processes share these cores.",
        "",
        f"**{t.title}**",
        "",
        t.markdown(),
        "",
        kept or f"{BY_HAND_BEGIN}\n{BY_HAND_END}",
        END,
    ]
    return "\n".join(out)


def by_hand(text: str) -> str:
    start = text.find(BY_HAND_BEGIN)
    end = text.find(BY_HAND_END, start + 1) if start != -1 else -1
    return text[start : end + len(BY_HAND_END)] if end != -1 else ""


def main(argv: list[str] | None = None) -> int:
    from fedgradnorm.machine import machine_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", default="100,1000,5000", help="comma-separated node counts (default 100,1000,5000)")
    parser.add_argument("--relays", type=int, default=4, help="relays in the relayed runs (default 4)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run, the first a warm-up (default 4)")
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds the nodes of one run may take")
    parser.add_argument("--round-timeout", type=float, default=120.0, help="the aggregator's --round-timeout")
    parser.add_argument("--load-procs", type=int, default=0, help="load processes (0: one per 1,250 nodes, up to 4)")
    parser.add_argument(
        "--heartbeat",
        default="",
        help="the aggregator's --heartbeat-interval,--heartbeat-timeout in seconds, e.g. 30,180 (default: its own, 5,30)",
    )
    parser.add_argument(
        "--min-nodes",
        type=float,
        default=1.0,
        help="the aggregator's --min-nodes as a fraction of the nodes (default 1)",
    )
    parser.add_argument("--only", choices=("flat", "relayed"), help="one topology only (default: both)")
    parser.add_argument("--workdir", default="runs/bench-relay-scale")
    parser.add_argument("--doc", default="", help="write the 'Relays at scale' section of this markdown file")
    parser.add_argument(
        "--render-only", action="store_true", help="write --doc again from the last run's measurements in --workdir"
    )
    args = parser.parse_args(argv)
    if args.render_only:
        return render_only(Path(args.workdir), Path(args.doc or "docs/benchmarks.md"))
    # SIGTERM (and SIGINT, which a shell's background job ignores) unwind through the finally
    # blocks, so that every process a run started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    counts = tuple(int(x) for x in args.nodes.split(",") if x.strip())
    beat = tuple(float(x) for x in args.heartbeat.split(",")) if args.heartbeat else None
    if beat is not None and len(beat) != 2:
        parser.error("--heartbeat takes INTERVAL,TIMEOUT")
    if args.rounds < 2 or args.relays < 1 or not counts or not 0 < args.min_nodes <= 1:
        parser.error("need --rounds >= 2, --relays >= 1, at least one node count and --min-nodes in (0, 1]")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    info["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = "python -m benchmarks.relay_scale " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    t = run(
        workdir,
        counts,
        args.relays,
        args.rounds,
        args.time_limit,
        args.load_procs,
        args.round_timeout,
        command.strip(),
        (beat[0], beat[1]) if beat else None,
        (args.only,) if args.only else ("flat", "relayed"),
        args.min_nodes,
    )
    print(t.text(), flush=True)
    total, load_end = time.perf_counter() - t0, os.getloadavg()
    meta = {"info": info, "command": command.strip(), "total": total, "load_end": load_end}
    meta["labels"] = [r["label"] for r in t.data["runs"]]
    (workdir / "run.json").write_text(json.dumps(meta, indent=1, default=str))
    if args.doc:
        write_block(Path(args.doc), t, info, command.strip(), total, load_end)
    return 0


def write_block(doc: Path, t: Table, info: dict[str, Any], command: str, total: float, load_end: Any) -> None:
    from benchmarks.run import write_section

    old = doc.read_text() if doc.exists() else ""
    doc.write_text(write_section(old, block(t, info, command, total, tuple(load_end), by_hand(old)), BEGIN, END))
    print(f"wrote the 'Relays at scale' section of {doc}")


def render_only(workdir: Path, doc: Path) -> int:
    """The section again from <workdir>/run.json and the runs' saved raw measurements."""
    meta = json.loads((workdir / "run.json").read_text())
    model = model_bytes()
    results = []
    for label in meta["labels"]:
        raw = json.loads((workdir / f"{label}.json").read_text())["raw"]
        s = summarize(raw, model) if "loads" in raw else _failed(raw)
        s["label"] = label
        results.append(s)
    t = table(results, model, meta["command"])
    print(t.text())
    write_block(doc, t, meta["info"], meta["command"], meta["total"], meta["load_end"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
