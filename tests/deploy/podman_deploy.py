"""`make test-deploy`: the RadCom federation's manifests from deploy/k8s, run with `podman kube play`.

1. builds the image from the Dockerfile (scripts/build-image.sh: local debootstrap base image, cached,
   torch and the dependencies from build/wheels: --build-arg WHEELS=local);
2. derives podman manifests from deploy/k8s (see ``derive``; only what podman cannot express changes);
3. plays the aggregator, then the three edge nodes, and waits for rounds to advance, asking the
   aggregator from the host with `fedgradnorm state` (mutual TLS, with the edge nodes' development
   certificates from deploy/k8s/01-tls-secrets.yaml) and the standard gRPC health service (on the
   plaintext health port the kubelet probes); checks that the gRPC port refuses plaintext and that
   the aggregator warns about the development PKI;
4. plays one more edge-node manifest (deploy/examples/edge-node.yaml) and waits until the new node
   has taken part in a round; recreates an edge-node pod on its claim and checks that it resumes as
   the same node (its identity and personal model are on the claim, not on an emptyDir);
5. copies the state file out of the aggregator (as `kubectl cp` does for a backup), recreates the
   aggregator pod on its claim and checks that it resumes where it was and rounds go on;
6. always tears everything down (`podman kube down`, pods, volumes, the secrets), even on failure.

Exit status 0 on success, 1 on failure. Needs root, podman, runc, catatonit and debootstrap
(`apt-get install -y --no-install-recommends podman buildah runc catatonit debootstrap`).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
EXAMPLE = ROOT / "deploy" / "examples" / "edge-node.yaml"
CACHE = Path(os.environ.get("DEPLOY_CACHE", "/var/tmp/fedgradnorm-deploy"))
BIN = Path(sys.executable).parent
FEDERATION = "radcom"
EDGE_WORKLOADS = ("radcom-modulation", "radcom-signal", "radcom-anomaly")
ROUNDS_BEFORE_JOIN = 2
# Created by the operator (docs/operations.md, "Deploy"), not shipped: a fresh random token, as the docs do it.
ENROLLMENT_SECRET = "fedgradnorm-enrollment"
ENROLLMENT_KEY = "FEDGRADNORM_ENROLLMENT_TOKEN"
# The manifests name the published image (ghcr.io/...); the pods here run the one scripts/build-image.sh built.
VERSION = "0.1.0"
LOCAL_IMAGE = os.environ.get("IMAGE", f"localhost/fedgradnorm:{VERSION}")
TIMEOUT = float(os.environ.get("TEST_DEPLOY_TIMEOUT", "420"))  # seconds for everything after the build


def log(message: str) -> None:
    print(f"[test-deploy {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(*argv: str, check: bool = True, timeout: float = 600, quiet: bool = False) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    if not quiet and res.stdout.strip():
        print(res.stdout.rstrip(), flush=True)
    return res


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def shipped() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(load(path))
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return copy.deepcopy(next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name))


# --- deriving podman manifests ---------------------------------------------------------------------

SUBSTITUTIONS = """podman-specific changes to the manifests of deploy/k8s (everything else is as shipped):
  - hostNetwork: true on every pod; podman provides no Service DNS, so FEDGRADNORM_AGGREGATOR is
    127.0.0.1:<port> instead of the Service radcom-aggregator:50051;
  - on the shared host network every listener gets a free port on 127.0.0.1 instead of 0.0.0.0:50051,
    :50052, :9464 and :9465 (FEDGRADNORM_LISTEN, FEDGRADNORM_HEALTH_LISTEN, FEDGRADNORM_METRICS_LISTEN;
    for the edge nodes an env entry per node replaces the shared ConfigMap's entry, because podman 4.3
    lets envFrom win over env); the containers' ports lists are dropped (podman 4.3 refuses port
    mappings with host networking); the edge nodes still check the name FEDGRADNORM_TLS_SERVER_NAME
    in the aggregator's certificate, as they do behind the Service;
  - the fedgradnorm image is the one just built (IMAGE, default localhost/fedgradnorm:<version>) with
    imagePullPolicy Never, as a kustomize `images:` entry would set it (no registry here);
  - each StatefulSet (the aggregator and every edge node) becomes a Pod named <statefulset>-0 with its
    volumeClaimTemplate as a PersistentVolumeClaim state-<statefulset>-0 (podman 4.3 plays no StatefulSet);
  - each Secret becomes a podman secret of the same name and keys (podman 4.3 reads Secrets that way):
    the enrollment token (an env secretKeyRef; the operator creates it: here a fresh random token)
    as a JSON map of base64 values, each TLS Secret (a
    secret volume) as a JSON Secret whose data holds the PEM text as is (podman 4.3 writes a secret
    volume's data values verbatim and ignores stringData); secret volumes get `optional: false`
    (podman 4.3 crashes when it is unset); podman ignores defaultMode and fsGroup (files 0644);
  - emptyDir volumes are renamed <workload>-<volume> (podman 4.3 makes named volumes of them, which
    pods would otherwise share);
  - probes are left out (podman runs no gRPC probes and would need curl in the image for httpGet);
    this script checks the same gRPC health service on the same plaintext health port from the host;
  - Services and NetworkPolicies are not played (podman has no equivalent)."""


LISTENERS = ("FEDGRADNORM_LISTEN", "FEDGRADNORM_HEALTH_LISTEN", "FEDGRADNORM_METRICS_LISTEN")


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def env_set(container: dict[str, Any], name: str, value: str) -> None:
    env = container.setdefault("env", [])
    for item in env:
        if item["name"] == name:
            item.clear()
            item.update(name=name, value=value)
            return
    env.append({"name": name, "value": value})


def podman_pod_spec(doc: dict[str, Any], shipped_ports: set[int], env: dict[str, str]) -> None:
    """Adapt one workload's pod template in place (see SUBSTITUTIONS)."""
    workload = doc["metadata"]["name"]
    spec = doc["spec"]["template"]["spec"]
    spec["hostNetwork"] = True
    for c in spec["containers"]:
        if c["image"].rpartition(":")[0].endswith("/fedgradnorm"):
            c["image"], c["imagePullPolicy"] = LOCAL_IMAGE, "Never"
    renamed = {}
    for vol in spec.get("volumes", []):
        if "emptyDir" in vol:
            renamed[vol["name"]] = vol["name"] = f"{workload}-{vol['name']}"
        if "secret" in vol:
            vol["secret"]["optional"] = False
    for c in spec["containers"]:
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            c.pop(probe, None)
        for mount in c.get("volumeMounts", []):
            mount["name"] = renamed.get(mount["name"], mount["name"])
        for port in c.pop("ports", []):
            assert port["containerPort"] in shipped_ports, f"{workload}: {port} vs {shipped_ports}"
        for name, value in env.items():
            env_set(c, name, value)


def secret_values(secret: dict[str, Any]) -> dict[str, bytes]:
    values = {k: base64.b64decode(v) for k, v in secret.get("data", {}).items()}
    values.update({k: v.encode() for k, v in secret.get("stringData", {}).items()})
    return values


def statefulset_as_pod(sts: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Pod <name>-0 on PersistentVolumeClaims <template>-<name>-0: what the StatefulSet controller makes."""
    pod_name = f"{sts['metadata']['name']}-0"
    spec = copy.deepcopy(sts["spec"]["template"]["spec"])
    pvcs = []
    for template in sts["spec"].get("volumeClaimTemplates", []):
        claim = f"{template['metadata']['name']}-{pod_name}"
        pvcs.append(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {**template["metadata"], "name": claim, "namespace": sts["metadata"]["namespace"]},
                "spec": template["spec"],
            }
        )
        spec.setdefault("volumes", []).append(
            {"name": template["metadata"]["name"], "persistentVolumeClaim": {"claimName": claim}}
        )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name,
            "namespace": sts["metadata"]["namespace"],
            "labels": sts["spec"]["template"]["metadata"]["labels"],
            "annotations": sts["spec"]["template"]["metadata"].get("annotations", {}),
        },
        "spec": spec,
    }
    return pod, pvcs


def podman_secret(work: Path, secret: dict[str, Any], for_volume: bool) -> Path:
    """The file of `podman secret create` for a Secret (see SUBSTITUTIONS), readable by root only."""
    values = secret_values(secret)
    if for_volume:
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": secret["metadata"]["name"]},
            "type": secret.get("type", "Opaque"),
            "data": {k: v.decode() for k, v in values.items()},
        }
    else:
        body = {k: base64.b64encode(v).decode() for k, v in values.items()}
    path = work / f"secret-{secret['metadata']['name']}.json"
    path.touch(mode=0o600)
    path.write_text(json.dumps(body))
    return path


def client_tls(work: Path, docs: list[dict[str, Any]], edge_cm: dict[str, Any]) -> list[str]:
    """`fedgradnorm state` flags for mutual TLS with the edge nodes' certificate, as an edge node uses it."""
    volume = next(
        v for v in find(docs, "StatefulSet", EDGE_WORKLOADS[0])["spec"]["template"]["spec"]["volumes"] if "secret" in v
    )
    values = secret_values(find(docs, "Secret", volume["secret"]["secretName"]))
    folder = work / "client-tls"
    folder.mkdir(mode=0o700)
    flags = []
    for flag, env in (
        ("--tls-ca", "FEDGRADNORM_TLS_CA"),
        ("--tls-cert", "FEDGRADNORM_TLS_CERT"),
        ("--tls-key", "FEDGRADNORM_TLS_KEY"),
    ):
        key = edge_cm["data"][env].rpartition("/")[2]  # a file of the mounted Secret
        (folder / key).write_bytes(values[key])
        flags += [flag, str(folder / key)]
    return [*flags, "--tls-server-name", edge_cm["data"]["FEDGRADNORM_TLS_SERVER_NAME"]]


def derive(work: Path) -> dict[str, Any]:
    """Write the podman manifests into ``work``; return what the test needs to know about them."""
    docs = shipped()
    grpc_port, health_port, metrics_port = free_port(), free_port(), free_port()
    agg_cm = find(docs, "ConfigMap", f"{FEDERATION}-aggregator")
    agg_cm["data"]["FEDGRADNORM_LISTEN"] = f"127.0.0.1:{grpc_port}"
    agg_cm["data"]["FEDGRADNORM_HEALTH_LISTEN"] = f"127.0.0.1:{health_port}"
    agg_cm["data"]["FEDGRADNORM_METRICS_LISTEN"] = f"127.0.0.1:{metrics_port}"
    edge_cm = find(docs, "ConfigMap", f"{FEDERATION}-edge-node")
    edge_cm["data"]["FEDGRADNORM_AGGREGATOR"] = f"127.0.0.1:{grpc_port}"
    edge_port = port_of(edge_cm["data"].pop("FEDGRADNORM_METRICS_LISTEN"))  # set per node below

    sts = find(docs, "StatefulSet", f"{FEDERATION}-aggregator")
    podman_pod_spec(
        sts, {port_of(find(docs, "ConfigMap", f"{FEDERATION}-aggregator")["data"][k]) for k in LISTENERS}, {}
    )
    pod, pvcs = statefulset_as_pod(sts)
    pod_name = pod["metadata"]["name"]
    claims = [c["metadata"]["name"] for c in pvcs]
    aggregator_file = work / "aggregator.yaml"
    aggregator_file.write_text(yaml.safe_dump_all([agg_cm, *pvcs, pod], sort_keys=False))
    # The same pod again on the existing claim: what the StatefulSet does when its pod is recreated.
    (work / "aggregator-again.yaml").write_text(yaml.safe_dump_all([agg_cm, pod], sort_keys=False))

    edge_metrics: dict[str, int] = {}
    edges, edge_pvcs = [], []
    for name in EDGE_WORKLOADS:
        sts = find(docs, "StatefulSet", name)
        edge_metrics[name] = port = free_port()
        podman_pod_spec(sts, {edge_port}, {"FEDGRADNORM_METRICS_LISTEN": f"127.0.0.1:{port}"})
        edge_pod, pvcs = statefulset_as_pod(sts)
        edges.append(edge_pod)
        edge_pvcs += pvcs
        # One node alone again on its claim: what the StatefulSet does when the pod is deleted.
        if name == EDGE_WORKLOADS[0]:
            (work / "edge-again.yaml").write_text(yaml.safe_dump_all([edge_cm, edge_pod], sort_keys=False))
    edge_file = work / "edge-nodes.yaml"
    edge_file.write_text(yaml.safe_dump_all([edge_cm, *edge_pvcs, *edges], sort_keys=False))

    (extra_sts,) = [d for d in load(EXAMPLE) if d["kind"] == "StatefulSet"]
    edge_metrics[extra_sts["metadata"]["name"]] = port = free_port()
    podman_pod_spec(extra_sts, {edge_port}, {"FEDGRADNORM_METRICS_LISTEN": f"127.0.0.1:{port}"})
    extra, extra_pvcs = statefulset_as_pod(extra_sts)
    extra_file = work / "extra-edge-node.yaml"
    extra_file.write_text(yaml.safe_dump_all([edge_cm, *extra_pvcs, extra], sort_keys=False))
    claims += [c["metadata"]["name"] for c in (*edge_pvcs, *extra_pvcs)]

    token = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": ENROLLMENT_SECRET},
        "stringData": {ENROLLMENT_KEY: secrets.token_hex(32)},
    }
    podman_secrets = {ENROLLMENT_SECRET: podman_secret(work, token, for_volume=False)}
    specs = [pod["spec"]] + [d["spec"] for d in (*edges, extra)]
    tls_secrets = sorted(
        {v["secret"]["secretName"] for spec in specs for v in spec.get("volumes", []) if "secret" in v}
    )
    assert tls_secrets, "no Secret volume: the TLS material should come from one"
    for name in tls_secrets:
        podman_secrets[name] = podman_secret(work, find(docs, "Secret", name), for_volume=True)
    volumes = [v["name"] for spec in specs for v in spec.get("volumes", []) if "emptyDir" in v]
    return {
        "grpc_port": grpc_port,
        "health_port": health_port,
        "metrics_port": metrics_port,
        "edge_metrics": edge_metrics,
        "files": [aggregator_file, work / "aggregator-again.yaml", edge_file, work / "edge-again.yaml", extra_file],
        "extra_file": extra_file,
        "extra_pod": extra["metadata"]["name"],
        "edge_again": work / "edge-again.yaml",
        "edge_pods": [e["metadata"]["name"] for e in edges],
        "aggregator_container": f"{pod_name}-{pod['spec']['containers'][0]['name']}",
        "state_file": find(docs, "ConfigMap", f"{FEDERATION}-aggregator")["data"]["FEDGRADNORM_STATE_DIR"]
        + "/aggregator-state.pt",
        "secrets": podman_secrets,
        "client_tls": client_tls(work, docs, edge_cm),
        # podman 4.3 makes a named volume of each secret volume, named after its Secret.
        "volumes": volumes + claims + tls_secrets,
    }


# --- talking to the running federation -------------------------------------------------------------


def state(grpc_port: int, tls: list[str]) -> dict[str, Any] | None:
    """`fedgradnorm state` from the host, as a user would run it (mutual TLS); None while unreachable."""
    res = subprocess.run(
        [str(BIN / "fedgradnorm"), "state", "--aggregator", f"127.0.0.1:{grpc_port}", *tls, "--timeout", "5"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if res.returncode != 0:
        return None
    return json.loads(res.stdout)  # every field, numbers as numbers (fedgradnorm.cli.services.plain)


def health(port: int, service: str) -> str:
    """The standard gRPC health check in plaintext, as the kubelet's probe does it (on the health port)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def check_transport(grpc_port: int, tls: list[str], aggregator_container: str) -> None:
    """The gRPC port speaks mutual TLS only, and the aggregator warns that it runs on the development PKI."""
    plaintext = health(grpc_port, "")
    assert plaintext == "UNAVAILABLE", f"a plaintext health check on the TLS port got {plaintext}"
    assert state(grpc_port, tls) is not None, "fedgradnorm state with the edge nodes' certificate failed"
    ca_only = [tls[i + k] for i, flag in enumerate(tls) if flag in ("--tls-ca", "--tls-server-name") for k in (0, 1)]
    assert state(grpc_port, ca_only) is None, "a client without a certificate was served"
    logs = run("podman", "logs", aggregator_container, quiet=True)
    assert "tls.development_pki" in logs.stdout + logs.stderr, "the aggregator does not warn about the development PKI"
    log("gRPC port: plaintext and clients without a certificate refused, mutual TLS served; tls.development_pki logged")


def metric(port: int, name: str) -> float | None:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
            text = r.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def wait(what: str, check, deadline: float, interval: float = 2.0):
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def active_nodes(s: dict[str, Any]) -> list[dict[str, Any]]:
    return [n for n in s.get("nodes", []) if n["active"]]


def pods_running() -> str:
    return run("podman", "ps", "-a", "--format", "{{.Names}}\t{{.Status}}", quiet=True).stdout


def check_backup(path: Path) -> int:
    """The copied state file loads (the aggregator replaces it atomically, so any copy is whole)."""
    import torch

    payload = torch.load(path, weights_only=True)
    assert payload["omega"] and payload["members"], "backup without model or members"
    return int(payload["round"])


def check_containers_hardened() -> None:
    """The manifests' security context reached the containers: uid 10001, read-only root, no capabilities."""
    names = [n for n in pods_running().split() if n.startswith(f"{FEDERATION}-") and not n.endswith("-infra")]
    names = [n for n in names if n.endswith(("-aggregator", "-edge-node"))]
    assert names, "no containers found"
    for name in names:
        (info,) = json.loads(run("podman", "inspect", name, quiet=True).stdout)
        user = info["Config"]["User"]
        assert user.split(":")[0] == "10001", f"{name} runs as {user!r}"
        assert info["HostConfig"]["ReadonlyRootfs"] is True, f"{name}: writable root filesystem"
        assert not info["EffectiveCaps"], f"{name}: capabilities {info['EffectiveCaps']}"
    log(f"{len(names)} containers run as uid 10001 with a read-only root filesystem and no capabilities")


def dump_logs() -> None:
    for line in pods_running().splitlines():
        name = line.split("\t")[0]
        if name.endswith("-infra"):
            continue
        print(f"----- podman logs {name} (last 40 lines) -----", flush=True)
        res = run("podman", "logs", "--tail", "40", name, check=False, quiet=True)
        print((res.stdout + res.stderr).rstrip(), flush=True)


def cleanup(info: dict[str, Any] | None) -> None:
    if info:
        for path in reversed(info["files"]):
            run("podman", "kube", "down", str(path), check=False, quiet=True, timeout=120)
    pods = run("podman", "pod", "ps", "--format", "{{.Name}}", quiet=True, check=False).stdout.split()
    for pod in pods:
        if pod.startswith(f"{FEDERATION}-"):
            run("podman", "pod", "rm", "-f", "-t", "10", pod, check=False, quiet=True, timeout=120)
    if info:
        for volume in info["volumes"]:
            run("podman", "volume", "rm", "-f", volume, check=False, quiet=True)
    for secret in info["secrets"] if info else [ENROLLMENT_SECRET]:
        run("podman", "secret", "rm", secret, check=False, quiet=True)


def main() -> int:
    started = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    CACHE.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("CONTAINERS_CONF"):
        conf = CACHE / "containers.conf"
        conf.write_text(
            '[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n[engine]\nruntime = "runc"\n'
        )
        os.environ["CONTAINERS_CONF"] = str(conf)

    log("building the image (scripts/build-image.sh)")
    t0 = time.monotonic()
    subprocess.run([str(ROOT / "scripts" / "build-image.sh")], check=True, timeout=1800)
    log(f"image ready in {time.monotonic() - t0:.0f} s")

    work = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE))
    info: dict[str, Any] | None = None
    ok = False
    try:
        info = derive(work)
        print(SUBSTITUTIONS, flush=True)
        log(f"derived manifests in {work}")
        cleanup(info)  # leftovers of an interrupted run
        for name, path in info["secrets"].items():
            run("podman", "secret", "create", name, str(path), quiet=True)
        deadline = time.monotonic() + TIMEOUT
        port, hport, tls = info["grpc_port"], info["health_port"], info["client_tls"]

        log("podman kube play aggregator.yaml")
        run("podman", "kube", "play", str(work / "aggregator.yaml"))
        wait("aggregator health SERVING", lambda: health(hport, "") == "SERVING", deadline, 1)
        log(f"health: ''={health(hport, '')} fedgradnorm.v1.Aggregator={health(hport, 'fedgradnorm.v1.Aggregator')}")
        check_transport(port, tls, info["aggregator_container"])

        log("podman kube play edge-nodes.yaml")
        run("podman", "kube", "play", str(work / "edge-nodes.yaml"))
        s = wait(
            f"round {ROUNDS_BEFORE_JOIN} with 3 nodes",
            lambda: (x := state(port, tls)) and x["round"] >= ROUNDS_BEFORE_JOIN and len(active_nodes(x)) == 3 and x,
            deadline,
        )
        names = sorted(n["node_name"] for n in active_nodes(s))
        log(f"rounds advance: round {s['round']}, nodes {names}")
        weights = {n["node_name"]: n["weight"] for n in active_nodes(s)}
        assert abs(sum(weights.values()) - 3) < 1e-3, weights
        assert names == sorted(info["edge_pods"]), f"node names should be the pod names {info['edge_pods']}: {names}"
        rounds_metric = metric(info["metrics_port"], "fedgradnorm_round")
        assert rounds_metric is not None and rounds_metric >= ROUNDS_BEFORE_JOIN, rounds_metric
        for name, mport in info["edge_metrics"].items():
            if name in EDGE_WORKLOADS:
                assert metric(mport, "fedgradnorm_edge_connected") == 1.0, f"{name}: not connected"

        check_containers_hardened()
        joined_at = s["round"]
        log(f"podman kube play extra-edge-node.yaml (a node added at runtime, round {joined_at})")
        run("podman", "kube", "play", str(info["extra_file"]))
        extra = info["extra_pod"]

        def extra_took_part():
            x = state(port, tls)
            if not x:
                return None
            node = next((n for n in active_nodes(x) if n["node_name"] == extra), None)
            return node and node["last_round"] >= joined_at and len(active_nodes(x)) == 4 and x

        s = wait(f"{extra} to take part in a round", extra_took_part, deadline)
        node = next(n for n in active_nodes(s) if n["node_name"] == extra)
        weights = {n["node_name"]: round(n["weight"], 4) for n in active_nodes(s)}
        log(f"{extra} joined: registered, submitted to round {node['last_round']}; round now {s['round']}")
        log(f"weights p: {weights}")
        assert abs(sum(n["weight"] for n in active_nodes(s)) - 4) < 1e-3, weights
        print(pods_running(), flush=True)

        # Backup (what `kubectl cp` does) and a recreated aggregator pod on the same claim.
        backup = work / "aggregator-state.pt"
        run("podman", "cp", f"{info['aggregator_container']}:{info['state_file']}", str(backup))
        saved = check_backup(backup)
        log(f"backup of {info['state_file']}: {backup.stat().st_size} bytes, round {saved}")
        before = s["round"]
        log("recreating the aggregator pod on its PersistentVolumeClaim (podman kube down / play)")
        run("podman", "kube", "down", str(work / "aggregator.yaml"), quiet=True, timeout=120)
        run("podman", "kube", "play", str(work / "aggregator-again.yaml"), quiet=True)
        wait("aggregator health SERVING again", lambda: health(hport, "") == "SERVING", deadline, 1)
        resumed = state(port, tls)
        assert resumed and resumed["round"] >= before, f"state lost: round {resumed and resumed['round']} < {before}"
        s = wait(
            "a round after the restart with all 4 nodes",
            lambda: (x := state(port, tls)) and x["round"] > resumed["round"] and len(active_nodes(x)) == 4 and x,
            deadline,
        )
        log(f"aggregator resumed at round {resumed['round']} (was {before}); now round {s['round']} with 4 nodes")
        log(f"health: fedgradnorm.v1.Aggregator={health(hport, 'fedgradnorm.v1.Aggregator')}")

        # An edge-node pod deleted and made again by its StatefulSet: same name, same claim, same node.
        edge = info["edge_pods"][0]
        (before_node,) = [n for n in active_nodes(s) if n["node_name"] == edge]
        recreated_at = s["round"]
        log(f"recreating the edge-node pod {edge} on its claim (node {before_node['node_id']})")
        run("podman", "kube", "down", str(info["edge_again"]), quiet=True, timeout=120)
        run("podman", "kube", "play", str(info["edge_again"]), quiet=True)

        def edge_resumed():
            x = state(port, tls)
            if not x:
                return None
            mine = [n for n in x.get("nodes", []) if n["node_name"] == edge]
            return (
                len(mine) == 1
                and mine[0]["active"]
                and mine[0]["last_round"] > recreated_at
                and len(active_nodes(x)) == 4
                and (x, mine[0])
            )

        s, after_node = wait(f"{edge} to resume and submit again", edge_resumed, deadline)
        # Node ids are the names, so the id alone proves little; what proves the resume is that the node
        # takes part again at all: the aggregator refuses a fresh enrolment under a name it still knows
        # (name_taken, for departed_retention), so only the identity on the claim lets it back in.
        assert after_node["node_id"] == before_node["node_id"], f"{edge} came back as a new node: {after_node}"
        log(
            f"{edge} resumed as node {after_node['node_id']} (identity on its claim), submitted to round {after_node['last_round']}"
        )
        ok = True
    except Exception as e:
        log(f"FAILED: {type(e).__name__}: {e}")
        dump_logs()
    finally:
        log("cleaning up: podman kube down, pods, volumes, secrets")
        cleanup(info)
        left = [line for line in pods_running().splitlines() if line.startswith(f"{FEDERATION}-")]
        if left:
            log(f"containers left behind: {left}")
            ok = False
    log(f"{'PASSED' if ok else 'FAILED'} in {time.monotonic() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
