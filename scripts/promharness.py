"""A real Prometheus scraping a real loopback federation, configured from the shipped manifests.

Used by tests/test_prometheus_integration.py and scripts/render_dashboard.py. Prometheus's scrape
configuration is the one in deploy/k8s/30-prometheus.yaml with one substitution: the pod discovery
(kubernetes_sd_configs) becomes static targets on 127.0.0.1 that carry the same ``__meta_kubernetes_*``
labels the discovery would give the pods of deploy/k8s (their labels, annotations, port names), so
the shipped relabelling rules produce the ``federation``, ``component``, ``pod`` and ``task``
labels the dashboard filters on. The rules of the ConfigMap prometheus-rules are written under the
Prometheus's folder as the Deployment mounts them, and loaded through the shipped ``rule_files``
(rewritten to that folder). Everything listens on 127.0.0.1 on free ports.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "fedgradnorm.json"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedgradnorm.launch import ServiceProcess, start_aggregator, start_edge_node, start_relay  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def find(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name)


def shipped_prometheus_config() -> str:
    return find("ConfigMap", "prometheus-config")["data"]["prometheus.yml"]


def shipped_rule_files() -> dict[str, str]:
    """The files the shipped Prometheus loads through rule_files, relative to its folder (``rules/...``):
    the ConfigMap prometheus-rules as the Deployment mounts it."""
    return {f"rules/{key}": text for key, text in find("ConfigMap", "prometheus-rules")["data"].items()}


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def discovery_labels(workload: str, pod: str) -> dict[str, str]:
    """The ``__meta_kubernetes_*`` labels kubernetes_sd_configs (role pod) gives a pod of ``workload``
    on its container port named metrics, taken from the manifest's pod template."""
    doc = next(
        d for d in manifests() if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == workload
    )
    meta = doc["spec"]["template"]["metadata"]
    labels = {
        "__meta_kubernetes_namespace": doc["metadata"]["namespace"],
        "__meta_kubernetes_pod_name": pod,
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_container_port_name": "metrics",
    }
    for key, value in meta.get("labels", {}).items():
        labels[f"__meta_kubernetes_pod_label_{_sanitize(key)}"] = value
    for key, value in meta.get("annotations", {}).items():
        labels[f"__meta_kubernetes_pod_annotation_{_sanitize(key)}"] = value
    return labels


def loopback_config(targets: dict[str, tuple[str, str]], interval: str = "1s") -> dict[str, Any]:
    """The shipped configuration with discovery replaced by ``targets``: pod -> (workload, host:port)."""
    config = yaml.safe_load(shipped_prometheus_config())
    config["global"].update(scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval)
    jobs = []
    for job in config["scrape_configs"]:
        if "kubernetes_sd_configs" not in job:
            continue  # the self-scrape of localhost:9090 is not this Prometheus
        job = dict(job)
        del job["kubernetes_sd_configs"]
        job["static_configs"] = [
            {"targets": [address], "labels": discovery_labels(workload, pod)}
            for pod, (workload, address) in sorted(targets.items())
        ]
        jobs.append(job)
    config["scrape_configs"] = jobs
    # The mount point of the rules ConfigMap becomes rules/ beside prometheus.yml (shipped_rule_files()).
    config["rule_files"] = [f"rules/{Path(pattern).name}" for pattern in config.get("rule_files", [])]
    return config


@dataclass
class Prometheus:
    """``prometheus`` on 127.0.0.1:<free port> with its own data folder; always stop() it."""

    workdir: Path
    config: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)  # more files for its folder: relative path -> text
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    _log: Any = None

    @staticmethod
    def binary() -> str | None:
        return shutil.which("prometheus")

    def start(self, timeout: float = 30.0) -> Prometheus:
        binary = self.binary()
        if binary is None:
            raise FileNotFoundError("prometheus is not installed (apt-get install prometheus)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name, text in self.files.items():
            (self.workdir / name).parent.mkdir(parents=True, exist_ok=True)
            (self.workdir / name).write_text(text)
        conf = self.workdir / "prometheus.yml"
        conf.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.port = free_port()
        self._log = (self.workdir / "prometheus.log").open("ab")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={conf}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1d",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready after {timeout} s:\n{self.log_text()[-3000:]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body}")
        return body["data"]

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts of the loaded rules, pending or firing (/api/v1/alerts)."""
        return self.api("alerts")["alerts"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def wait_for(self, expr: str, timeout: float, what: str = "") -> list[dict[str, Any]]:
        """Poll until ``expr`` returns a non-empty result."""
        end = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > end:
                targets = self.api("targets")["activeTargets"]
                health = [(t["labels"].get("pod"), t["health"], t["lastError"]) for t in targets]
                raise TimeoutError(f"no data for {what or expr} after {timeout} s; targets: {health}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


# Site site-a of deploy/k8s (13-radcom-site-a.yaml): its relay's Deployment, and a name for its pod.
RELAY_NAME = "site-a"
RELAY_WORKLOAD = "radcom-relay-site-a"
RELAY_POD = "radcom-relay-site-a-5f7b9c8d6-q2x7k"


@dataclass
class Federation:
    """A RadCom aggregator and its edge nodes as real processes on loopback (fedgradnorm.launch); with
    ``relayed`` tasks, a relay for site site-a as well, which those tasks' nodes dial instead of the
    aggregator (as the site's pods of deploy/k8s do)."""

    workdir: Path
    aggregator_flags: Sequence[str]
    node_flags: Sequence[str]
    tasks: Sequence[str] = ("modulation", "signal", "anomaly")
    relayed: Sequence[str] = ()
    ready: dict[str, Any] = field(default_factory=dict)
    relay_ready: dict[str, Any] = field(default_factory=dict)
    processes: list[ServiceProcess] = field(default_factory=list)
    relays: list[ServiceProcess] = field(default_factory=list)
    metrics_targets: dict[str, tuple[str, str]] = field(default_factory=dict)  # pod -> (workload, address)

    def start(self) -> Federation:
        agg, self.ready = start_aggregator(
            self.workdir,
            [
                "--federation",
                "radcom",
                "--min-nodes",
                str(len(self.tasks)),
                "--state-dir",
                str(self.workdir / "state"),
                *self.aggregator_flags,
            ],
        )
        self.processes.append(agg)
        self.metrics_targets["radcom-aggregator-0"] = ("radcom-aggregator", f"127.0.0.1:{self.ready['metrics_port']}")
        if self.relayed:
            relay, self.relay_ready = start_relay(
                self.workdir,
                self.grpc_address,
                RELAY_NAME,
                ["--federation", "radcom", "--torch-threads", "1"],
            )
            self.relays.append(relay)
            self.metrics_targets[RELAY_POD] = (RELAY_WORKLOAD, f"127.0.0.1:{self.relay_ready['metrics_port']}")
        for task in self.tasks:
            self.add_node(task)
        return self

    @property
    def relay_pods(self) -> list[str]:
        return [pod for pod, (workload, _) in self.metrics_targets.items() if workload == RELAY_WORKLOAD]

    def add_node(self, task: str, name: str | None = None) -> ServiceProcess:
        """An edge node for ``task``; it dials the relay when ``task`` is one of ``relayed``."""
        name = name or f"radcom-{task}-0"
        port = free_port()
        node = start_edge_node(
            self.workdir,
            self.relay_ready["grpc_port"] if task in self.relayed else self.ready["grpc_port"],
            task,
            ["--federation", "radcom", "--metrics-listen", f"127.0.0.1:{port}", *self.node_flags],
            name=name,
            env={"FEDGRADNORM_CACHE_DIR": str(self.workdir / f"cache-{name}")},
        )
        self.processes.append(node)
        self.metrics_targets[name] = (f"radcom-{task}", f"127.0.0.1:{port}")
        return node

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.ready['grpc_port']}"

    def check_alive(self) -> None:
        for p in [*self.processes, *self.relays]:
            if not p.alive():
                raise RuntimeError(
                    f"{p.name} exited with {p.proc.returncode if p.proc else '?'}:\n{p.log_text()[-3000:]}"
                )

    def stop(self) -> None:
        """Edge nodes first (all signalled at once; they deregister), then the relay, then the aggregator;
        all reaped."""
        nodes, aggregator = self.processes[1:], self.processes[:1]
        for p in nodes:
            if p.alive() and p.proc is not None:
                p.proc.send_signal(signal.SIGTERM)
        for p in [*nodes, *self.relays, *aggregator]:
            p.stop(timeout=15)


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets(board: dict[str, Any] | None = None) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every query of every panel."""
    for panel in (board or dashboard())["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace $name and ${name} as Grafana does before it sends a query."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise KeyError(f"dashboard variable ${name} has no value")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)
