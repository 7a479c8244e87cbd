"""A relay outlives a restart of its aggregator: the aggregator comes back on its state, the relay
attaches again, and the site's node takes part in the rounds again (as `make test-deploy` checks
with the pods of deploy/k8s). Real processes on loopback: an aggregator, a relay for site site-a, one
edge node behind the relay and one that dials the aggregator."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc
from fedgradnorm.launch import ServiceProcess, start_aggregator, start_edge_node, start_relay
from tests.faults_helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.long]  # about 2 minutes: make test-faults

TOKEN = {"FEDGRADNORM_ENROLLMENT_TOKEN": "relay-restart-test-token"}
NODE_FLAGS = ["--federation", "radcom", "--synthetic-size", "4", "--seed", "0", "--torch-threads", "1"]


def get_state(address: str) -> pb.GetStateResponse | None:
    with grpc.insecure_channel(address) as channel:
        try:
            response: pb.GetStateResponse = pb_grpc.AggregatorStub(channel).GetState(pb.GetStateRequest(), timeout=5)
        except grpc.RpcError:
            return None
        return response


def wait_for(what: str, check: Callable[[], pb.GetStateResponse | None], timeout: float) -> pb.GetStateResponse:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = check()
        if found is not None:
            return found
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def test_the_relay_attaches_again_and_its_site_takes_part_after_the_aggregator_restarts(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    flags = [
        *("--federation", "radcom", "--min-nodes", "2", "--rounds", "0", "--seed", "0"),
        *("--tau-h", "1", "--tau-omega", "1", "--batch-size", "16", "--round-timeout", "60"),
        *("--state-dir", str(tmp_path / "state"), "--listen", address),  # the same port after the restart
    ]
    processes: list[ServiceProcess] = []
    try:
        aggregator, _ = start_aggregator(tmp_path, flags, env=TOKEN)
        processes.append(aggregator)
        relay, relay_ready = start_relay(tmp_path, address, "site-a", ["--federation", "radcom"], env=TOKEN)
        processes.append(relay)
        for task, port_ in (("modulation", port), ("signal", relay_ready["grpc_port"])):
            processes.append(start_edge_node(tmp_path, port_, task, NODE_FLAGS, env=TOKEN))

        def site_submitted(after: int) -> Callable[[], pb.GetStateResponse | None]:
            def check() -> pb.GetStateResponse | None:
                s = get_state(address)
                nodes = {n.node_name: n for n in s.nodes} if s else {}
                signal = nodes.get("signal")
                ok = s is not None and signal is not None and signal.relay == "site-a" and signal.last_round > after
                return s if ok else None

            return check

        before = wait_for("the relayed node's updates in two rounds", site_submitted(0), timeout=240)
        aggregator.stop()  # SIGTERM: it commits and exits; the relay and the nodes retry meanwhile
        aggregator, _ = start_aggregator(tmp_path, flags, env=TOKEN)
        processes[0] = aggregator
        resumed = wait_for("the restarted aggregator", lambda: get_state(address), timeout=60)
        assert resumed.round >= before.round, "the aggregator resumed from its state"
        # The openings of the new process's rounds are numbered above the old one's, which the relay
        # last saw: it fetches the reopened round at once instead of waiting for the count to catch up.
        after = wait_for("the relayed node's update after the restart", site_submitted(resumed.round), timeout=120)
        modulation = next(n for n in after.nodes if n.node_name == "modulation")
        assert modulation.relay == "" and modulation.active
    finally:
        for p in reversed(processes):
            p.stop()
