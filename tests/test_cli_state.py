"""`fedgradnorm state`: the aggregator's GetState as plain JSON (numbers as numbers, every field)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm.cli.services import plain
from fedgradnorm.federation import load_federation
from fedgradnorm.services.aggregator.config import CoordinatorConfig, ServiceConfig
from fedgradnorm.services.aggregator.server import start_aggregator
from tests.faults_helpers import safe_structlog
from tests.grpc_client import connect, register


def test_plain_keeps_zero_values_numbers_and_unset_optionals() -> None:
    state = pb.GetStateResponse(
        round=0,
        phase=pb.PHASE_ROUND_OPEN,
        nodes=[pb.NodeState(node_id="a", weight=1.25, last_round=7, test_metrics={"accuracy": 0.5}, initial_loss=2.0)],
    )
    d = plain(state)
    assert d["round"] == 0 and d["phase"] == "PHASE_ROUND_OPEN" and d["halted_reason"] == ""
    node = d["nodes"][0]
    assert node["last_round"] == 7 and isinstance(node["last_round"], int)
    assert node["initial_loss"] == 2.0 and node["test_loss"] is None  # optional: set, unset
    assert node["test_metrics"] == {"accuracy": 0.5} and node["num_samples"] == 0
    assert d["hyperparameters"] is None


def test_state_command_prints_the_live_state(tmp_path: Path) -> None:
    with safe_structlog():
        agg = start_aggregator(
            ServiceConfig(listen="127.0.0.1:0", metrics_listen="", state_dir=str(tmp_path / "s"), insecure=True),
            CoordinatorConfig(federation="mtfl", min_nodes=2),
        )
        channel, stub = connect(agg.grpc_port)
        try:
            register(stub, "a", "gender")
            argv = [sys.executable, "-m", "fedgradnorm.cli", "state", "--aggregator", f"127.0.0.1:{agg.grpc_port}"]
            res = subprocess.run([*argv, "--insecure", "true"], capture_output=True, text=True, timeout=60)
        finally:
            channel.close()
            agg.stop()
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    assert s["round"] == 0 and s["phase"] == "PHASE_WAITING_FOR_NODES" and s["federation"] == "mtfl"
    assert s["last_committed_round"] == -1  # what is durable: nothing trained yet
    assert s["network"] == "fedgradnorm.models:Network1"
    assert s["network_fingerprint"] == load_federation("mtfl").architecture.fingerprint
    assert s["hyperparameters"]["gamma"] == 0.9 and s["hyperparameters"]["min_nodes"] == 2
    (node,) = s["nodes"]
    assert node["node_name"] == "a" and node["task"] == "gender" and node["weight"] == 1.0 and node["active"] is True
