"""Bring your own federation: examples/sensors, defined outside the library, trains through real
aggregator and edge-node processes from its own spec, each node on its own data file; the models the
nodes write reload in plain torch and reproduce the metrics they logged; a node whose shared network
differs is refused at Register with what differs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fedgradnorm.cli.app import main
from fedgradnorm.data.partition import node_data
from fedgradnorm.federation import load_federation
from fedgradnorm.launch import ServiceProcess, start_aggregator, start_edge_node
from fedgradnorm.machine import torch_threads
from fedgradnorm.services.aggregator.store import FileStateStore
from fedgradnorm.simulation_config import SimulationConfig
from fedgradnorm.simulator import Simulation

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "sensors"
SPEC = str(EXAMPLE / "federation.toml")
HYPER = ["--tau-h", "2", "--tau-omega", "2", "--batch-size", "16", "--seed", "0"]
ROUNDS = 3


def state_flags(tmp_path: Path) -> list[str]:
    return ["--state-dir", str(tmp_path / "state"), "--torch-threads", "1"]


def partition(out: Path) -> dict[str, Path]:
    assert main(["partition", "--federation", SPEC, "--out", str(out), "--synthetic-size", "8", "--seed", "0"]) == 0
    return {t: out / f"{t}.npz" for t in ("activity", "fall", "cadence")}


def plain_torch_model(model_dir: Path) -> tuple[dict[str, object], nn.Module, nn.Module]:
    """The exported model as a user rebuilds it with torch alone: the network class, a linear head,
    the tensors from the safetensors file (no fedgradnorm code)."""
    manifest = json.loads((model_dir / "manifest.json").read_text())
    tensors = load_file(str(model_dir / "model.safetensors"))
    sys.path.insert(0, str(EXAMPLE))
    try:
        from sensors_fed import SensorNet
    finally:
        sys.path.remove(str(EXAMPLE))
    shared = SensorNet(**manifest["federation"]["network"]["kwargs"])
    shared.load_state_dict({k.removeprefix("shared."): v for k, v in tensors.items() if k.startswith("shared.")})
    head = nn.Linear(manifest["representation_dim"], manifest["task"]["outputs"])
    head.load_state_dict({k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")})
    return manifest, shared.eval(), head.eval()


def test_example_federation_trains_through_the_services_from_its_own_spec(tmp_path: Path) -> None:
    files = partition(tmp_path / "data")
    fed = load_federation(SPEC)
    other = tmp_path / "narrow" / "federation.toml"  # the same federation with a narrower network
    other.parent.mkdir()
    other.write_text((EXAMPLE / "federation.toml").read_text().replace("width = 32", "width = 16"))
    (other.parent / "sensors_fed.py").write_text((EXAMPLE / "sensors_fed.py").read_text())

    procs: list[ServiceProcess] = []
    try:
        agg, ready = start_aggregator(
            tmp_path,
            [*("--federation", SPEC, "--rounds", str(ROUNDS), "--min-nodes", "3"), *HYPER, *state_flags(tmp_path)],
        )
        procs.append(agg)
        port = ready["grpc_port"]
        narrow = start_edge_node(
            tmp_path, port, "activity", ["--federation", str(other), "--data", str(files["activity"])], name="narrow"
        )
        procs.append(narrow)
        assert narrow.wait(120) == 2, narrow.log_text()[-3000:]
        log = narrow.log_text()
        assert "FAILED_PRECONDITION" in log and "is not this federation's" in log, log[-3000:]
        assert "conv.0.weight is [16, 3, 5] float32 here, [8, 3, 5] float32 there" in log, log[-3000:]

        flags = ["--federation", SPEC, "--torch-threads", "1", "--seed", "0"]
        nodes = [start_edge_node(tmp_path, port, t, [*flags, "--data", str(f)]) for t, f in files.items()]
        procs += nodes
        for n in nodes:
            assert n.wait(240) == 0, f"{n.name}:\n{n.log_text()[-3000:]}"
    finally:
        for p in reversed(procs):
            p.stop()

    snap = FileStateStore(tmp_path / "state").load()
    assert snap is not None and snap.server.round == ROUNDS
    assert snap.identity["federation"] == "sensors" and snap.identity["network"] == fed.architecture.fingerprint

    # The simulator on the same per-node files computes the same omega, bit for bit.
    data = ",".join(f"{t}={f}" for t, f in files.items())
    with torch_threads(1):
        sim = Simulation.build(
            SimulationConfig(federation=SPEC, data=data, rounds=ROUNDS, seed=0, tau_h=2, tau_omega=2, batch_size=16)
        )
        for _ in sim.rounds():
            pass
    for name, ref in sim.state.omega.items():
        assert torch.equal(snap.server.omega[name], ref), name

    for task, file in files.items():
        model_dir = tmp_path / f"node-{task}" / "model"
        manifest, shared, head = plain_torch_model(model_dir)
        assert manifest["round"] == ROUNDS and manifest["task"]["name"] == task
        assert manifest["fingerprint"] == fed.architecture.fingerprint
        for name, value in shared.state_dict().items():  # the final omega, exactly
            assert torch.equal(value, snap.server.omega[name]), name
        spec = fed.task(task)
        test = node_data(fed, spec, file, 0.2, 0).test  # the node's own test split
        x = torch.as_tensor(test.x)
        y = spec.targets(test.targets[task])
        with torch.no_grad():
            pred = head(shared(x))
        logged = manifest["metrics"]
        assert float(spec.loss_value(pred, y)) == pytest.approx(logged["test_loss"], abs=1e-6)
        assert spec.metric_value(pred, y) == pytest.approx(logged[spec.metric], abs=1e-6)
