"""The aggregator's Uplink service against hostile or mistaken relays: every refusal has its
status and reason, and nothing a relay sends can poison the round or the state."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from fedgradnorm import wire
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm._proto.fedgradnorm.v1 import relay_pb2 as rpb
from fedgradnorm._proto.fedgradnorm.v1 import relay_pb2_grpc as rpb_grpc
from fedgradnorm._proto.fedgradnorm.v1 import tensor_pb2
from fedgradnorm.certs import issue_relay, make_certificates
from fedgradnorm.reasons import Reason
from fedgradnorm.services import serde
from fedgradnorm.services.aggregator.config import CoordinatorConfig, ServiceConfig
from fedgradnorm.services.aggregator.server import RunningAggregator, start_aggregator
from fedgradnorm.services.refusals import reason_of
from fedgradnorm.services.tls import ClientTLS

FED = "mtfl"
TOKEN = "enrol-secret-for-tests"


@pytest.fixture
def agg(tmp_path: Path) -> Iterator[RunningAggregator]:
    service = ServiceConfig(listen="127.0.0.1:0", metrics_listen="", state_dir=str(tmp_path / "s"), insecure=True)
    rounds = CoordinatorConfig(
        federation=FED, min_nodes=3, enrollment_token=TOKEN, heartbeat_interval=0.5, relay_timeout=5.0
    )
    running = start_aggregator(service, rounds)
    try:
        yield running
    finally:
        running.stop(grace=0.2)


def refused(call: object) -> tuple[grpc.StatusCode, Reason | None]:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code(), reason_of(info.value)


def attach(up: rpb_grpc.UplinkStub, name: str = "site-1") -> rpb.RelaySession:
    resp = up.AttachRelay(
        rpb.AttachRelayRequest(
            enrollment_token=TOKEN, relay_name=name, federation=FED, network=serde.federation_network(FED)
        ),
        timeout=10,
    )
    assert resp.settings.algorithm == "fedgradnorm" and list(resp.settings.omega_tilde)
    return resp.session


def test_attach_refuses_wrong_token_name_federation_and_network(agg: RunningAggregator) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{agg.grpc_port}") as ch:
        up = rpb_grpc.UplinkStub(ch)
        good = serde.federation_network(FED)
        cases = {
            "token": (
                rpb.AttachRelayRequest(enrollment_token="wrong", relay_name="r", federation=FED, network=good),
                grpc.StatusCode.UNAUTHENTICATED,
                Reason.BAD_ENROLLMENT,
            ),
            "name": (
                rpb.AttachRelayRequest(enrollment_token=TOKEN, relay_name="../x" * 500, federation=FED, network=good),
                grpc.StatusCode.INVALID_ARGUMENT,
                Reason.BAD_NAME,
            ),
            "federation": (
                rpb.AttachRelayRequest(
                    enrollment_token=TOKEN,
                    relay_name="r",
                    federation="radcom",
                    network=serde.federation_network("radcom"),
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                Reason.BAD_TASK,
            ),
            "network": (
                rpb.AttachRelayRequest(
                    enrollment_token=TOKEN, relay_name="r", federation=FED, network=serde.federation_network("radcom")
                ),
                grpc.StatusCode.FAILED_PRECONDITION,
                Reason.NETWORK_MISMATCH,
            ),
        }
        for case, (request, code, reason) in cases.items():
            assert refused(lambda r=request: up.AttachRelay(r, timeout=10)) == (code, reason), case
        session = attach(up)
        forged = rpb.RelaySession(relay_id=session.relay_id, session_token="forged")
        unknown = rpb.RelaySession(relay_id="nobody", session_token=session.session_token)
        beat = rpb.RelayHeartbeatRequest
        assert refused(lambda: up.RelayHeartbeat(beat(session=forged), timeout=10)) == (
            grpc.StatusCode.UNAUTHENTICATED,
            Reason.BAD_TOKEN,
        )
        assert refused(lambda: up.RelayHeartbeat(beat(session=unknown), timeout=10)) == (
            grpc.StatusCode.NOT_FOUND,
            Reason.UNKNOWN_RELAY,
        )
        assert refused(lambda: up.RelayHeartbeat(beat(session=session, seen=["x"] * 100_001), timeout=10)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.BAD_VALUE,
        )
        assert agg.coordinator.relays.sessions.keys() == {"site-1"}


def register_via(up: rpb_grpc.UplinkStub, session: rpb.RelaySession, name: str, task: str) -> pb.RegisterResponse:
    return up.RegisterNode(
        rpb.RegisterNodeRequest(
            session=session,
            peer="10.0.0.9",
            request=pb.RegisterRequest(
                enrollment_token=TOKEN,
                node_name=name,
                federation=FED,
                task=task,
                num_samples=5,
                network=serde.federation_network(FED),
            ),
        ),
        timeout=10,
    )


def update(node: str, **kw: float) -> rpb.RelayedUpdate:
    fields = dict(node_id=node, loss=1.0, initial_loss=1.0, loss_ratio=1.0, num_samples=5, norm=2.0, tilde_norm=1.0)
    fields.update(kw)
    return rpb.RelayedUpdate(**fields)  # type: ignore[arg-type]


def partial_sum(
    session: rpb.RelaySession, opening: int, attempt: int, tensors: dict[str, torch.Tensor]
) -> Iterator[rpb.SubmitPartialSumRequest]:
    specs = wire.tensor_specs(tensors, tensor_pb2.DTYPE_FLOAT32)
    yield rpb.SubmitPartialSumRequest(
        header=rpb.PartialSumHeader(
            session=session, opening=opening, attempt=attempt, tensors=specs, total_bytes=wire.payload_nbytes(specs)
        )
    )
    for data in wire.iter_chunks(tensors, tensor_pb2.DTYPE_FLOAT32, 1 << 20):
        yield rpb.SubmitPartialSumRequest(chunk=tensor_pb2.TensorChunk(data=data))


def test_hostile_reports_and_partial_sums_are_refused_and_the_round_steps(agg: RunningAggregator) -> None:
    """Absurd norms (1e308, above any float32 gradient's), a tilde norm above the whole norm, a
    node not behind the relay, a NaN loss, too many entries, a NaN or stale partial sum, too many
    concurrent long-polls: each refused with its reason; the honest reports and sum then step omega."""
    coord = agg.coordinator
    omega0 = {k: v.clone() for k, v in coord._state.omega.items()}  # type: ignore[union-attr]
    with grpc.insecure_channel(f"127.0.0.1:{agg.grpc_port}") as ch:
        up = rpb_grpc.UplinkStub(ch)
        session, other = attach(up, "site-1"), attach(up, "site-2")
        a = register_via(up, session, "a", "gender").node_id
        b = register_via(up, session, "b", "smile").node_id
        c = register_via(up, other, "c", "pose").node_id
        up.RelayHeartbeat(rpb.RelayHeartbeatRequest(session=session, seen=[a, b, c]), timeout=10)  # c: not its node
        up.RelayHeartbeat(rpb.RelayHeartbeatRequest(session=other, seen=[c]), timeout=10)
        stream = up.FetchRelayRound(rpb.FetchRelayRoundRequest(session=session, wait_seconds=10), timeout=30)
        header = next(stream).header
        stream.cancel()
        assert header.status == pb.ROUND_STATUS_OPEN and [p.node_id for p in header.participants] == [a, b]  # not c
        report = rpb.ReportUpdatesRequest
        resp = up.ReportUpdates(
            report(
                session=session,
                round=header.round,
                updates=[
                    update(a, norm=1e308, tilde_norm=1.0),
                    update(a, norm=1.0, tilde_norm=2.0),
                    update(c),
                    update("ghost"),
                    update(b, loss=math.nan),
                ],
            ),
            timeout=10,
        )
        assert resp.accepted == 0
        assert [(r.node_id, r.reason) for r in resp.refused] == [
            (a, "bad_value"),
            (a, "bad_value"),
            (c, "not_participant"),
            ("ghost", "not_participant"),
            (b, "bad_value"),
        ]
        assert refused(
            lambda: up.ReportUpdates(
                report(session=session, round=header.round, updates=[update(a)] * 10_001), timeout=10
            )
        ) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.BAD_VALUE)
        assert refused(
            lambda: up.ReportUpdates(report(session=session, round=header.round + 1, updates=[update(a)]), timeout=10)
        ) == (grpc.StatusCode.FAILED_PRECONDITION, Reason.WRONG_ROUND)
        # Concurrent long-polls of one relay are bounded (each would hold a server thread).
        polls = [
            up.FetchWeights.future(
                rpb.FetchWeightsRequest(session=session, opening=header.opening, wait_seconds=3), timeout=10
            )
            for _ in range(6)
        ]
        codes = sorted(str(p.exception().code() if p.exception() else "ok") for p in polls)
        assert codes.count("StatusCode.RESOURCE_EXHAUSTED") == 2 and codes.count("ok") == 4, codes
        # The honest reports: the round closes, the weights are offered.
        resp = up.ReportUpdates(
            report(session=session, round=header.round, updates=[update(a), update(b, norm=3.0, tilde_norm=2.0)]),
            timeout=10,
        )
        assert resp.accepted == 2 and not resp.refused
        resp = up.ReportUpdates(report(session=session, round=header.round, updates=[update(a)]), timeout=10)
        assert [(r.node_id, r.reason) for r in resp.refused] == [(a, "duplicate")]
        offer = up.FetchWeights(
            rpb.FetchWeightsRequest(session=session, opening=header.opening, wait_seconds=0.5), timeout=20
        )
        assert offer.status == rpb.WEIGHTS_STATUS_NOT_YET  # c (site-2) has not reported: the round is open
        up.ReportUpdates(report(session=other, round=header.round, updates=[update(c)]), timeout=10)
        offer = up.FetchWeights(
            rpb.FetchWeightsRequest(session=session, opening=header.opening, wait_seconds=10), timeout=20
        )
        assert offer.status == rpb.WEIGHTS_STATUS_READY and [s.node_id for s in offer.scales] == [a, b]
        assert math.isclose(sum(s.weight for s in offer.scales), 2.0, rel_tol=0.05)
        shapes = coord.expected_shapes()
        nan = {k: torch.full(s, math.nan) for k, s in shapes.items()}
        good = {k: torch.full(s, 0.01) for k, s in shapes.items()}
        assert refused(
            lambda: up.SubmitPartialSum(partial_sum(session, header.opening, offer.attempt, nan), timeout=10)
        ) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.NOT_FINITE)
        assert refused(
            lambda: up.SubmitPartialSum(partial_sum(session, header.opening, offer.attempt + 1, good), timeout=10)
        ) == (grpc.StatusCode.FAILED_PRECONDITION, Reason.WRONG_ATTEMPT)
        assert up.SubmitPartialSum(partial_sum(session, header.opening, offer.attempt, good), timeout=10).accepted
        other_offer = up.FetchWeights(
            rpb.FetchWeightsRequest(session=other, opening=header.opening, wait_seconds=10), timeout=20
        )
        assert up.SubmitPartialSum(partial_sum(other, header.opening, other_offer.attempt, good), timeout=10).accepted
        closed = up.FetchWeights(
            rpb.FetchWeightsRequest(
                session=session, opening=header.opening, after_attempt=offer.attempt, wait_seconds=10
            ),
            timeout=20,
        )
        assert closed.status == rpb.WEIGHTS_STATUS_CLOSED
    assert coord.round == header.round + 1
    state = coord._state
    assert state is not None and all(torch.isfinite(v).all() for v in state.omega.values())
    assert any(not torch.equal(state.omega[k], omega0[k]) for k in omega0)
    assert {k: m.relay for k, m in coord.members.records.items()} == {a: "site-1", b: "site-1", c: "site-2"}


def test_with_mutual_tls_only_a_relay_certificate_may_use_the_uplink(tmp_path: Path) -> None:
    make_certificates(tmp_path)
    issue_relay(tmp_path, "site-1", ["localhost"])
    service = ServiceConfig(
        listen="127.0.0.1:0",
        metrics_listen="",
        state_dir=str(tmp_path / "s"),
        tls_cert=str(tmp_path / "server.pem"),
        tls_key=str(tmp_path / "server.key"),
        tls_client_ca=str(tmp_path / "ca.pem"),
    )
    running = start_aggregator(service, CoordinatorConfig(federation=FED, min_nodes=2, enrollment_token=TOKEN))
    try:
        address = f"127.0.0.1:{running.grpc_port}"
        node = ClientTLS(
            ca=str(tmp_path / "ca.pem"),
            cert=str(tmp_path / "client.pem"),
            key=str(tmp_path / "client.key"),
            server_name="localhost",
        )
        with node.channel(address, []) as ch:
            assert refused(lambda: attach(rpb_grpc.UplinkStub(ch))) == (
                grpc.StatusCode.PERMISSION_DENIED,
                Reason.NOT_RELAY,
            )
        relay = ClientTLS(
            ca=str(tmp_path / "ca.pem"),
            cert=str(tmp_path / "site-1.pem"),
            key=str(tmp_path / "site-1.key"),
            server_name="localhost",
        )
        with relay.channel(address, []) as ch:
            assert attach(rpb_grpc.UplinkStub(ch)).relay_id == "site-1"
    finally:
        running.stop(grace=0.2)
