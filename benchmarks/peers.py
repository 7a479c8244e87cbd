"""Side by side with Flower: the round-overhead workload on fedgradnorm and on Flower 1.42, in one run.

    python -m benchmarks.peers --doc docs/benchmarks.md [--rounds 5] [--warmup 1]   # make bench-peers

Both cases of the round-overhead table (no training: every node returns zeros of the model's shapes;
training: tau_h + tau_omega = 10 steps of batch 64), each for the same number of rounds, on:

* fedgradnorm: the aggregator and 3 RadCom edge nodes on Network 2 (15.7 MB), plaintext gRPC on
  127.0.0.1, started by benchmarks.deploy.Deployment with the flags of benchmarks.round_overhead;
* Flower 1.42's deployment runtime: a SuperLink, 3 SuperNodes and ``flwr run`` of
  benchmarks/flower_app (FedAvg over the same Network 2 parameters; the ClientApp echoes zeros or
  runs the same client step on the same node's data), all plaintext on 127.0.0.1, every Flower
  process from the .venv-peers venv.

Measured the same way for both: the round time (close-to-close intervals between round closes),
the bytes through a counting TCP proxy that the nodes reach the server through, and the peak
resident memory of each process tree (every descendant of the process this benchmark started,
summed, polled from /proc). The result replaces the "Side by side with Flower" block of the
document, between ``<!-- peers:begin -->`` and ``<!-- peers:end -->`` (``make bench`` keeps it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from benchmarks.common import MB, Table, fmt_s, free_port, median
from benchmarks.deploy import CountingProxy, Deployment, intervals
from benchmarks.round_overhead import deployment_flags, workload
from benchmarks.run import PEERS_BEGIN, PEERS_END, with_block
from fedgradnorm.federation import load_federation
from fedgradnorm.machine import machine_info
from fedgradnorm.simulation_config import SimulationConfig

APP_DIR = Path(__file__).resolve().parent / "flower_app"
NODES = 3
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
PEERS_PACKAGES = ("flwr", "torch", "grpcio", "protobuf", "numpy", "uvicorn", "httpx")


# --------------------------------------------------------------------------------------------------------
# Process trees: peak resident memory, and stopping what is left
# --------------------------------------------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks) of every process now in /proc."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2 :].split()
        out[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return out


def _rss(pid: int, page: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * page
    except (OSError, IndexError, ValueError):
        return 0


class TreeMemory(threading.Thread):
    """Polls /proc every ``interval`` s: for every direct child of this process, the resident set of
    its whole tree (the child and all its descendants, summed), keeping each tree's peak, the most
    processes it held at once, and every descendant seen (pid, start time) so that they can be stopped."""

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(name="tree-memory", daemon=True)
        self.interval = interval
        self.root = os.getpid()
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak: dict[int, int] = {}
        self.most: dict[int, int] = {}
        self.seen: dict[int, set[tuple[int, int]]] = {}
        self.ticks = 0
        self._lock = threading.Lock()
        self._stop_event = threading.Event()

    def tick(self) -> None:
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        with self._lock:
            for top in children.get(self.root, []):
                tree, todo = [], [top]
                while todo:
                    pid = todo.pop()
                    tree.append(pid)
                    todo += children.get(pid, [])
                total = sum(_rss(pid, self.page) for pid in tree)
                self.peak[top] = max(self.peak.get(top, 0), total)
                self.most[top] = max(self.most.get(top, 0), len(tree))
                self.seen.setdefault(top, set()).update((pid, table[pid][1]) for pid in tree if pid != top)
            self.ticks += 1

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.tick()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()

    def of(self, pid: int) -> tuple[int, int]:
        """(peak resident bytes, most processes at once) of the tree under ``pid``."""
        self.tick()
        with self._lock:
            return self.peak.get(pid, 0), self.most.get(pid, 0)

    def descendants(self, pid: int) -> set[tuple[int, int]]:
        with self._lock:
            return set(self.seen.get(pid, set()))


def stop_descendants(found: set[tuple[int, int]], grace: float = 5.0) -> int:
    """SIGTERM, then SIGKILL after ``grace``, every process of ``found`` still running (same pid and
    start time, so a reused pid is left alone); the number that were still running."""

    def running() -> list[int]:
        table = _proc_table()
        return [pid for pid, start in found if pid in table and table[pid][1] == start]

    left = running()
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + grace
    while running() and time.monotonic() < end:
        time.sleep(0.1)
    for pid in running():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(left)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------------------
# Rounds: close times and bytes through the proxy at each close
# --------------------------------------------------------------------------------------------------------


def sample_rounds(
    count: Callable[[], int],
    counter: Callable[[], int],
    total: int,
    timeout: float,
    problem: Callable[[], str | None],
) -> list[int]:
    """Wait for ``total`` round closes (``count()`` of them so far); return ``counter()`` (the proxy's
    byte count) at the moment each close was first seen (polled every 2 ms)."""
    at: list[int] = []
    end = time.monotonic() + timeout
    while len(at) < total:
        n = count()
        while len(at) < min(n, total):
            at.append(counter())
        if len(at) >= total:
            break
        trouble = problem()
        if trouble:
            raise RuntimeError(trouble)
        if time.monotonic() > end:
            raise TimeoutError(f"only {len(at)} of {total} rounds after {timeout:.0f} s")
        time.sleep(0.002)
    return at


def summarize(closes: Sequence[float], bytes_at: Sequence[int], warmup: int, rounds: int) -> dict[str, Any]:
    """The ``rounds`` rounds after the first ``warmup`` ones: round k's time is close(k) - close(k-1);
    the bytes per round are the proxy's count from the close of the last warm-up round to the last
    close, over ``rounds`` (a round's transfers may straddle a close; the window holds whole rounds)."""
    skip, total = warmup - 1, warmup + rounds
    times = intervals(list(closes[:total]), skip)
    if len(times) != rounds or len(bytes_at) < total:
        raise RuntimeError(f"{len(closes)} round closes and {len(bytes_at)} byte counts for {total} rounds")
    return {"round": median(times), "times": times, "bytes": (bytes_at[total - 1] - bytes_at[skip]) / rounds}


# --------------------------------------------------------------------------------------------------------
# fedgradnorm
# --------------------------------------------------------------------------------------------------------


def ours(
    workdir: Path,
    config: SimulationConfig,
    train: bool,
    warmup: int,
    rounds: int,
    mem: TreeMemory,
) -> dict[str, Any]:
    agg_flags, node_flags = deployment_flags(config, train)
    with Deployment(workdir, "radcom", (), agg_flags, node_flags, via_proxy=True) as dep:
        assert dep.watcher is not None and dep.proxy is not None
        watcher, proxy = dep.watcher, dep.proxy

        def dead() -> str | None:
            gone = [p for p in dep.procs if not p.alive()]
            return f"{gone[0].name} exited:\n{gone[0].log_text()[-3000:]}" if gone else None

        bytes_at = sample_rounds(lambda: len(watcher.stamps), proxy.total, warmup + rounds, 600, dead)
        closes = list(watcher.stamps)
        server = mem.of(dep.procs[0].pid)
        nodes = {p.name: mem.of(p.pid) for p in dep.procs[1:]}
    out = summarize(closes, bytes_at, warmup, rounds)
    out |= {"server_rss": server[0], "server_procs": server[1], "nodes": nodes}
    return out


# --------------------------------------------------------------------------------------------------------
# Flower 1.42's deployment runtime
# --------------------------------------------------------------------------------------------------------


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the SuperLink exited with {proc.returncode}:\n{_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise TimeoutError(f"the SuperLink did not listen on 127.0.0.1:{port} within {timeout:.0f} s:\n{_tail(log)}")


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


class FlowerDeployment:
    """A SuperLink and ``len(data)`` SuperNodes from ``bin`` (a venv's bin folder), plaintext on
    127.0.0.1; the SuperNodes reach the SuperLink through a CountingProxy (``self.proxy``). Each
    process has its own FLWR_HOME under ``workdir``; everything started is stopped on close."""

    def __init__(self, workdir: Path, bin_dir: Path, data: Sequence[Path], mem: TreeMemory) -> None:
        self.workdir = workdir
        self.bin = bin_dir
        self.data = list(data)
        self.mem = mem
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: list[IO[bytes]] = []
        self.proxy: CountingProxy | None = None
        self.port = 0

    def env(self, home: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env |= FLOWER_ENV | {"FLWR_HOME": str(home), "PATH": f"{self.bin}{os.pathsep}{env.get('PATH', '')}"}
        return env

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        home = self.workdir / f"home-{name}"
        home.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / f"{name}.log").open("ab")
        self.logs.append(log)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(home), cwd=self.workdir)
        self.procs[name] = proc
        return proc

    def __enter__(self) -> FlowerDeployment:
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True)
        try:
            self.port = free_port()
            link = self.start(
                "superlink",
                [
                    str(self.bin / "flower-superlink"),
                    "--insecure",
                    "--disable-runtime-dependency-installation",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
            )
            _wait_port(self.port, link, self.workdir / "superlink.log")
            self.proxy = CountingProxy(self.port)
            self.proxy.start()
            for i, path in enumerate(self.data):
                self.start(
                    f"supernode-{i}",
                    [
                        str(self.bin / "flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{self.proxy.port}",
                        "--port",
                        str(free_port()),
                        "--node-config",
                        f'partition-id={i} num-partitions={len(self.data)} data-path="{path}"',
                    ],
                )
            cli_home = self.workdir / "home-cli"
            cli_home.mkdir()
            (cli_home / "config.toml").write_text(
                f'[superlink.local-deployment]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
            )
        except BaseException:
            self.close()
            raise
        return self

    def run(self, run_config: dict[str, Any]) -> subprocess.Popen[bytes]:
        """Start ``flwr run`` of the app (it returns when the run ends: ``--stream``)."""
        text = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        return self.start(
            "cli", [str(self.bin / "flwr"), "run", str(APP_DIR), "local-deployment", "--stream", "--run-config", text]
        )

    def problem(self) -> str | None:
        for name, proc in self.procs.items():
            if proc.poll() is not None and (name != "cli" or proc.returncode != 0):
                return f"{name} exited with {proc.returncode}:\n{_tail(self.workdir / f'{name}.log')}"
        return None

    def close(self) -> None:
        self.mem.tick()  # the latest descendants, to stop any that outlive their parents
        order = ["cli", *(n for n in self.procs if n.startswith("supernode")), "superlink"]
        found: set[tuple[int, int]] = set()
        for name in order:
            proc = self.procs.get(name)
            if proc is not None:
                found |= self.mem.descendants(proc.pid)
                stop_process(proc)
        left = stop_descendants(found)
        if left:
            print(f"  stopped {left} Flower process(es) left behind by their parents", flush=True)
        if self.proxy is not None:
            self.proxy.close()
        for log in self.logs:
            log.close()

    def __exit__(self, *exc: object) -> None:
        self.close()


def flower(
    workdir: Path,
    bin_dir: Path,
    model: Path,
    data: Sequence[Path],
    config: SimulationConfig,
    train: bool,
    warmup: int,
    rounds: int,
    mem: TreeMemory,
) -> dict[str, Any]:
    total = warmup + rounds
    with FlowerDeployment(workdir, bin_dir, data, mem) as dep:
        assert dep.proxy is not None
        stamps = workdir / "round-closes.txt"
        dep.run(
            {
                "num-server-rounds": total,
                "num-nodes": len(data),
                "train": int(train),
                "model-path": str(model),
                "stamps-path": str(stamps),
                "tau-h": config.tau_h,
                "tau-omega": config.tau_omega,
                "batch-size": config.batch_size,
                "lr": config.beta,
            }
        )

        def closed() -> int:
            return stamps.read_text().count("\n") if stamps.exists() else 0

        cli = dep.procs["cli"]

        def problem() -> str | None:
            if dep.problem():
                return dep.problem()
            if cli.poll() is not None and closed() < total:  # the last close is written before the run ends
                return f"flwr run ended after {closed()} of {total} rounds:\n{_tail(workdir / 'cli.log')}"
            return None

        bytes_at = sample_rounds(closed, dep.proxy.total, total, 300 + 180 * total, problem)
        closes = [float(line.split()[1]) for line in stamps.read_text().splitlines()]
        try:
            cli.wait(120)  # the ServerApp ends after the last round; the CLI with it
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"flwr run did not end after the last round:\n{_tail(workdir / 'cli.log')}") from err
        if cli.returncode != 0:
            raise RuntimeError(f"flwr run exited with {cli.returncode}:\n{_tail(workdir / 'cli.log')}")
        server = mem.of(dep.procs["superlink"].pid)
        nodes = {f"supernode-{i}": mem.of(dep.procs[f"supernode-{i}"].pid) for i in range(len(data))}
        cli_rss = mem.of(cli.pid)
    out = summarize(closes, bytes_at, warmup, rounds)
    out |= {"server_rss": server[0], "server_procs": server[1], "nodes": nodes, "cli_rss": cli_rss[0]}
    return out


# --------------------------------------------------------------------------------------------------------
# Inputs for the Flower apps, versions
# --------------------------------------------------------------------------------------------------------


def write_inputs(workdir: Path, config: SimulationConfig) -> tuple[Path, list[Path], dict[str, Any]]:
    """Network 2's parameters as fedgradnorm builds them, and each node's arrays (train and test
    split, number of classes) as the in-process simulator builds them for this configuration: the
    model the ServerApp starts from and the data the ClientApps train on. Returns (model, data,
    a description: model bytes, and per node its task, sizes and classes)."""
    from fedgradnorm.simulator import Simulation

    workdir.mkdir(parents=True, exist_ok=True)
    shared = load_federation("radcom").build_shared(config.seed)
    params = {k: v.detach().numpy() for k, v in shared.named_parameters()}
    model = workdir / "network2.npz"
    np.savez(model, **params)
    sim = Simulation.build(config)
    data, nodes = [], []
    for i, client in enumerate(sim.clients.values()):
        path = workdir / f"node-{i}.npz"
        np.savez(
            path,
            x=client.x.numpy(),
            y=client.y.numpy(),
            x_test=client.x_test.numpy(),
            y_test=client.y_test.numpy(),
            outputs=np.array(int(client.head.out_features)),
        )
        data.append(path)
        nodes.append(
            {
                "task": client.task.name,
                "train": len(client.x),
                "test": len(client.x_test),
                "classes": int(client.head.out_features),
            }
        )
    if len(data) != NODES:
        raise RuntimeError(f"the RadCom federation has {len(data)} nodes, not {NODES}")
    return model, data, {"model_bytes": sum(int(v.nbytes) for v in params.values()), "nodes": nodes}


def peers_versions(python: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, platform\n"
        f"out = {{p: m.version(p) for p in {PEERS_PACKAGES!r}}}\n"
        "out['python'] = platform.python_version()\n"
        "print(json.dumps(out))"
    )
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120, check=True)
    versions: dict[str, str] = json.loads(result.stdout)
    return versions


def our_versions() -> dict[str, str]:
    import importlib.metadata as m
    import platform

    return {
        "python": platform.python_version(),
        **{p: m.version(p) for p in ("torch", "grpcio", "protobuf")},
    }


# --------------------------------------------------------------------------------------------------------
# The table and the document
# --------------------------------------------------------------------------------------------------------


def _mb(n: float) -> str:
    return f"{n / MB:,.1f} MB"


MIB = 1 << 20
# VmHWM, not getrusage's ru_maxrss: Linux carries the high-water mark across fork and exec, so a
# child's ru_maxrss is at least the RSS its (large) parent had when it forked.
_IMPORT_PROBE = (
    "import importlib, sys; importlib.import_module(sys.argv[1]); "
    "print(next(int(x.split()[1]) * 1024 for x in open('/proc/self/status') if x.startswith('VmHWM:')))"
)


def import_baselines() -> dict[str, int]:
    """Peak RSS (bytes) of a process of this venv that only imports each service's module: the
    floor under the service's own memory (torch, gRPC, protobuf and the project's modules)."""
    modules = {
        "aggregator": "fedgradnorm.services.aggregator.server",
        "edge node": "fedgradnorm.services.edge_node.node",
    }
    return {
        what: int(
            subprocess.run(
                [sys.executable, "-c", _IMPORT_PROBE, module], capture_output=True, text=True, timeout=300, check=True
            ).stdout
        )
        for what, module in modules.items()
    }


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def targets(res: dict[str, dict[str, dict[str, Any]]], model_bytes: int, baselines: dict[str, int]) -> str:
    """The issue-14 targets this run measures, each with its verdict and the import floor beside it."""
    ratios = {case: res[case]["flower"]["round"] / res[case]["ours"]["round"] for case in ("idle", "train")}
    agg = max(res[case]["ours"]["server_rss"] for case in res)
    node = max(rss for case in res for rss, _ in res[case]["ours"]["nodes"].values())
    state = 3 * model_bytes  # omega and its two Adam moments
    return (
        f"Targets: Flower's no-training round ≥ 100× fedgradnorm's: {ratios['idle']:,.0f}×, "
        f"{_verdict(ratios['idle'] >= 100)}; training round ≥ 40×: {ratios['train']:,.0f}×, "
        f"{_verdict(ratios['train'] >= 40)}; aggregator peak RSS ≤ 200 MiB beyond ω and its two Adam moments "
        f"({state / MIB:.0f} MiB): {(agg - state) / MIB:.0f} MiB beyond, {_verdict(agg - state <= 200 * MIB)}; "
        f"edge node peak RSS ≤ 300 MiB: {node / MIB:.0f} MiB, {_verdict(node <= 300 * MIB)}. "
        f"A process that only imports the aggregator's modules peaks at {baselines['aggregator'] / MIB:.0f} MiB, "
        f"one that imports the edge node's at {baselines['edge node'] / MIB:.0f} MiB (same venv, this run): torch's "
        "import is most of either, so the aggregator's resident set above that floor is "
        f"{(agg - baselines['aggregator']) / MIB:.0f} MiB and the edge node's {(node - baselines['edge node']) / MIB:.0f} MiB."
    )


def _ratio(a: float, b: float) -> str:
    if not b or a != a or b != b:
        return "-"
    r = a / b
    return f"{r:,.0f}×" if r >= 100 else f"{r:,.1f}×" if r >= 10 else f"{r:.2f}×"


def table(
    results: dict[str, dict[str, dict[str, Any]]], rounds: int, warmup: int, inputs: dict[str, Any], flwr: str
) -> Table:
    n = len(inputs["nodes"])
    t = Table(
        f"fedgradnorm vs Flower {flwr}, the round-overhead workload ({n} RadCom nodes, Network 2, "
        f"{inputs['model_bytes'] / MB:.1f} MB), same run",
        ["case", "measure", "fedgradnorm", f"Flower {flwr}", "Flower / fedgradnorm"],
    )
    for case, label in (("idle", "no training (zeros back)"), ("train", "training, τ_h + τ_ω = 10 steps of batch 64")):
        if case not in results:
            continue
        a, b = results[case]["ours"], results[case]["flower"]
        node_a = max(rss for rss, _ in a["nodes"].values())
        node_b = max(rss for rss, _ in b["nodes"].values())
        t.add(
            label,
            f"round time (median of {rounds})",
            fmt_s(a["round"]),
            fmt_s(b["round"]),
            _ratio(b["round"], a["round"]),
        )
        t.add(label, "bytes on the wire per round", _mb(a["bytes"]), _mb(b["bytes"]), _ratio(b["bytes"], a["bytes"]))
        t.add(
            label,
            "peak RSS, server process tree",
            _mb(a["server_rss"]),
            _mb(b["server_rss"]),
            _ratio(b["server_rss"], a["server_rss"]),
        )
        t.add(label, f"peak RSS, node process tree (largest of {n})", _mb(node_a), _mb(node_b), _ratio(node_b, node_a))
    t.data = {"results": results, "rounds": rounds, "warmup": warmup}
    return t


def _times(r: dict[str, Any]) -> str:
    return ", ".join(fmt_s(x) for x in r["times"])


def section(
    t: Table,
    info: dict[str, Any],
    versions: dict[str, dict[str, str]],
    command: str,
    minutes: float,
    inputs: dict[str, Any],
    synthetic_size: int,
    load_end: tuple[float, float, float],
) -> str:
    res = t.data["results"]
    rounds, warmup = t.data["rounds"], t.data["warmup"]
    ours_v, flwr_v = versions["ours"], versions["flower"]
    load0 = info["loadavg"]
    model_bytes = inputs["model_bytes"]
    node_data = "; ".join(
        f"{n['task']}: {n['train']} training and {n['test']} test vectors, {n['classes']} classes"
        for n in inputs["nodes"]
    )
    tasks = ", ".join(n["task"] for n in inputs["nodes"])
    summary = (
        f"Flower {flwr_v['flwr']}'s round takes "
        + " and ".join(
            f"{res[case]['flower']['round'] / res[case]['ours']['round']:,.0f}× fedgradnorm's {what} "
            f"({fmt_s(res[case]['flower']['round'])} against {fmt_s(res[case]['ours']['round'])})"
            for case, what in (("idle", "without training"), ("train", "with training"))
        )
        + "."
    )
    lines = [
        PEERS_BEGIN,
        "## Side by side with Flower",
        "",
        f"Generated by `{command}` (`make bench-peers`) on {info['date']}, in {minutes:.1f} min: both systems in this "
        "one run, nothing typed by hand.",
        "",
        f"Machine: `nproc` = {info['nproc']} ({info['cpu']}), {info['mem_gib']} GiB memory, Linux {info['kernel']}, "
        f"niceness {info['niceness']}. Load average (1/5/15 min): {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f} at the "
        f"start, {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f} at the end"
        + (" - other work was running on the machine." if max(load0[0], load_end[0]) > 1.0 else "."),
        "",
        f"Versions: fedgradnorm in the project venv: Python {ours_v['python']}, torch {ours_v['torch']}, "
        f"grpcio {ours_v['grpcio']}, protobuf {ours_v['protobuf']}. Flower in `.venv-peers`: flwr {flwr_v['flwr']}, "
        f"Python {flwr_v['python']}, torch {flwr_v['torch']}, grpcio {flwr_v['grpcio']}, protobuf {flwr_v['protobuf']}, "
        f"numpy {flwr_v['numpy']}; its Fleet, Control and Runtime APIs are protobuf over HTTP (uvicorn "
        f"{flwr_v['uvicorn']} serving, httpx {flwr_v['httpx']} calling).",
        "",
        f"Workload (the round-overhead table's): RadCom, {len(inputs['nodes'])} nodes ({tasks}), Network 2 "
        f"({model_bytes / MB:.1f} MB of float32 parameters) sent to every node and returned by it each round, "
        "plaintext on 127.0.0.1. No training: each node returns zeros of the model's shapes (fedgradnorm's "
        "`--no-train true` edge nodes; a Flower ClientApp that echoes numpy zeros and never imports torch). "
        "Training: τ_h = 5 Adam steps of the node's head with the shared network frozen, an evaluation on the "
        "node's test split, τ_ω = 5 Adam steps of the shared network, batch 64, one torch thread per node, "
        f"on the same arrays of 256 values (fedgradnorm's synthetic RadCom, {synthetic_size} samples per key; "
        f"{node_data}); fedgradnorm's aggregator runs its FedGradNorm server step and commits its "
        "state to disk (fsync) every round, Flower's ServerApp runs FedAvg (`fraction_train=1.0`, every node, "
        "no evaluation round) and its SuperLink keeps its state in memory (no `--database`). "
        f"Each case runs {warmup + rounds} rounds on a freshly started deployment of each system and measures the "
        f"last {rounds}.",
        "",
        summary,
        "",
        targets(res, model_bytes, inputs["baselines"]),
        "",
        t.markdown(),
        "",
        "How each number was measured:",
        "",
        f"- **Round time**: the median of {rounds} close-to-close intervals after {warmup} warm-up "
        f"round{'s' if warmup > 1 else ''}. "
        "fedgradnorm: the moment a round's records appear in the aggregator's metrics.jsonl (after the server "
        "step; benchmarks.deploy.RoundWatcher). Flower: the moment the ServerApp's strategy returns from "
        "`aggregate_train` (a FedAvg subclass appends a timestamp to a file), the same point of the round. "
        f"All rounds: fedgradnorm {_times(res['idle']['ours'])} (no training), "
        f"{_times(res['train']['ours'])} (training); Flower {_times(res['idle']['flower'])} (no training), "
        f"{_times(res['train']['flower'])} (training).",
        "- **Bytes on the wire**: a counting TCP proxy on 127.0.0.1 (benchmarks.deploy.CountingProxy, a relay "
        "thread in the benchmark process) in front of the port the nodes connect to: fedgradnorm's aggregator "
        "gRPC port; the SuperLink's HTTP port, which the SuperNodes reach through the proxy. It counts TCP "
        "payload both ways, everything the nodes and the server exchange (gRPC's HTTP/2 frames for "
        "fedgradnorm; Flower's HTTP requests and responses, its polling and heartbeats included); bytes per "
        "round = the count from the close of the last warm-up round to the last close, over the measured "
        "rounds. Not counted: Flower's local links that fedgradnorm does not have (the ServerApp process to "
        "the SuperLink, each ClientApp process to its SuperNode), which carry the model again; the `flwr run` "
        "CLI reaches the SuperLink directly. "
        f"Raw tensor bytes per round: {2 * len(inputs['nodes']) * model_bytes / MB:.1f} MB "
        f"({len(inputs['nodes'])} models out, {len(inputs['nodes'])} back). Flower 1.42 sends arrays as "
        "content-addressed objects (SHA-256 of each chunk of at most 5 MiB) and asks a sender only for the "
        "objects its store does not hold yet, so identical chunks, such as the zeros every node returns without "
        "training, may cross the wire fewer times than they are sent.",
        "- **Peak RSS per process tree**: every 50 ms the benchmark reads /proc, finds every descendant of each "
        "process it started and sums their resident set sizes (VmRSS from /proc/PID/statm; pages shared between "
        "the processes of a tree, such as the Python and torch libraries, count once per process); the peak "
        "over the whole case, start-up included. Server: fedgradnorm's aggregator process; Flower's SuperLink "
        "with its SuperExec and the ServerApp process it starts for the run. Node: each edge node process; "
        "each SuperNode with its SuperExec and the ClientApp process it starts for every message. "
        + "; ".join(
            f"{'no training' if case == 'idle' else 'training'}: edge nodes "
            + ", ".join(_mb(v[0]) for v in res[case]["ours"]["nodes"].values())
            + ", SuperNode trees "
            + ", ".join(f"{_mb(v[0])} (up to {v[1]} processes)" for v in res[case]["flower"]["nodes"].values())
            + f", SuperLink tree up to {res[case]['flower']['server_procs']} processes"
            for case in ("idle", "train")
        )
        + ". The `flwr run` CLI (a client, like the benchmark itself on fedgradnorm's side) is not counted: "
        + f"peak {_mb(res['idle']['flower']['cli_rss'])} without training, {_mb(res['train']['flower']['cli_rss'])} "
        "with.",
        "- The ratio is Flower's figure over fedgradnorm's. Both systems' round times include the relay through "
        "the proxy (a Python thread in the benchmark process), which costs the short fedgradnorm rounds more "
        "than the Flower rounds; the Round overhead section measures fedgradnorm without it.",
        PEERS_END,
    ]
    return "\n".join(lines)


def write_section(doc: Path, block: str) -> None:
    text = doc.read_text() if doc.exists() else ""
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(with_block(text, block))


# --------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--doc", default="docs/benchmarks.md", help="markdown to update (default docs/benchmarks.md)")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per case and system (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds before them, not measured (default 1)")
    parser.add_argument("--workdir", default="runs/peers", help="logs, state and the Flower homes (default runs/peers)")
    parser.add_argument("--peers-venv", default=".venv-peers", help="the venv with flwr (default .venv-peers)")
    parser.add_argument("--synthetic-size", type=int, default=20, help="RadCom samples per key (default 20)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 1:
        parser.error("--rounds and --warmup must be at least 1")
    bin_dir = Path(args.peers_venv).resolve() / "bin"
    missing = [n for n in ("flower-superlink", "flower-supernode", "flwr", "python") if not (bin_dir / n).exists()]
    if missing:
        print(f"no Flower venv at {args.peers_venv} ({', '.join(missing)} missing): `make bench-peers` makes one")
        return 2
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    info = machine_info()
    info["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    versions = {"ours": our_versions(), "flower": peers_versions(bin_dir / "python")}
    config = workload(args.synthetic_size)
    t0 = time.perf_counter()
    model, data, inputs = write_inputs(workdir / "inputs", config)
    inputs["baselines"] = import_baselines()
    mem = TreeMemory()
    mem.start()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        for case, train in (("idle", False), ("train", True)):
            results[case] = {}
            print(f"== fedgradnorm, {case}", flush=True)
            results[case]["ours"] = ours(workdir / f"ours-{case}", config, train, args.warmup, args.rounds, mem)
            print(f"   round {fmt_s(results[case]['ours']['round'])}", flush=True)
            print(f"== Flower, {case}", flush=True)
            results[case]["flower"] = flower(
                workdir / f"flower-{case}", bin_dir, model, data, config, train, args.warmup, args.rounds, mem
            )
            print(f"   round {fmt_s(results[case]['flower']['round'])}", flush=True)
    finally:
        mem.stop()
    minutes = (time.perf_counter() - t0) / 60
    t = table(results, args.rounds, args.warmup, inputs, versions["flower"]["flwr"])
    print(t.text(), flush=True)
    command = ("python -m benchmarks.peers " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    block = section(t, info, versions, command, minutes, inputs, args.synthetic_size, os.getloadavg())
    write_section(Path(args.doc), block)
    (workdir / "results.json").write_text(
        json.dumps({"info": info, "versions": versions, "inputs": inputs, "results": results}, indent=1, default=str)
    )
    print(f"wrote the Flower section of {args.doc} ({minutes:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
