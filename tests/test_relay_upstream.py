"""The relay's client of the Uplink service (fedgradnorm.services.relay.upstream) against a fake
aggregator: how it re-attaches when the aggregator no longer knows its session, and what its
nodes are told meanwhile."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm._proto.fedgradnorm.v1 import relay_pb2 as rpb
from fedgradnorm.reasons import REASON_KEY, Reason
from fedgradnorm.services.aggregator.errors import NotFound, Unavailable
from fedgradnorm.services.relay.config import RelayConfig
from fedgradnorm.services.relay.coordinator import upstream_error
from fedgradnorm.services.relay.upstream import Upstream


class Refusal(grpc.RpcError, grpc.Call):  # type: ignore[misc]  # grpc's classes are untyped
    """A refused call as the stubs raise it: a status, details and the reason in trailing metadata."""

    def __init__(self, code: grpc.StatusCode, reason: Reason, details: str) -> None:
        self._code, self._reason, self._details = code, reason, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((REASON_KEY, self._reason.value),)

    def initial_metadata(self) -> tuple[()]:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


class FakeUplink:
    """The aggregator's relay sessions, as far as re-attaching goes: one valid token at a time
    (a new attach voids the previous one, as RelaySessions.attach does), and a switch that forgets
    the session (an aggregator restart, or the relay silent beyond heartbeat_timeout)."""

    def __init__(self, callers: int) -> None:
        self.lock = threading.Lock()
        self.token = ""
        self.attaches = 0
        self.bad_tokens = 0
        self.forgotten = threading.Event()
        self.all_refused = threading.Barrier(callers)  # every caller holds the lost session

    def AttachRelay(self, request: rpb.AttachRelayRequest, timeout: float) -> rpb.AttachRelayResponse:
        with self.lock:
            self.attaches += 1
            self.token = f"token-{self.attaches}"
            self.forgotten.clear()
            return rpb.AttachRelayResponse(
                session=rpb.RelaySession(relay_id=request.relay_name, session_token=self.token)
            )

    def RelayHeartbeat(self, request: rpb.RelayHeartbeatRequest, timeout: float) -> rpb.RelayHeartbeatResponse:
        if self.forgotten.is_set():
            self.all_refused.wait(timeout=10)  # the callers' calls all fail before any re-attaches
            raise Refusal(grpc.StatusCode.NOT_FOUND, Reason.UNKNOWN_RELAY, "unknown relay; attach first")
        with self.lock:
            if request.session.session_token != self.token:
                self.bad_tokens += 1
                raise Refusal(grpc.StatusCode.UNAUTHENTICATED, Reason.BAD_TOKEN, "token does not belong to relay")
        return rpb.RelayHeartbeatResponse(round=7)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    config = RelayConfig(name="site-x", upstream="127.0.0.1:9", insecure=True, metrics_listen="", listen="127.0.0.1:0")
    up = Upstream(config, threading.Event(), on_attach=lambda attachment: None)
    try:
        yield up
    finally:
        up.stop.set()
        up.close()


def test_loops_that_lose_the_session_together_attach_once(upstream: Upstream) -> None:
    """The round loop, the reporter and the heartbeat lose the session at the same moment: one of
    them attaches again and the others go on with that session (before the fix each attached,
    and each new session voided the tokens of the others' calls in flight)."""
    callers = 3
    fake = FakeUplink(callers)
    upstream.uplink = fake
    upstream.attach()
    assert fake.attaches == 1
    fake.forgotten.set()
    results: list[int] = []
    errors: list[BaseException] = []

    def beat() -> None:
        try:
            results.append(upstream.heartbeat([], 0).round)
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=beat) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and results == [7] * callers
    assert fake.attaches == 2, f"{fake.attaches - 1} re-attaches for one lost session"
    assert fake.bad_tokens == 0
    assert upstream.generation == 2


class FakeRegistrar(FakeUplink):
    """RegisterNode checks the relay's token; ``replace_once`` makes another loop attach again
    while the first call is on its way (its token is void when it arrives)."""

    def __init__(self, upstream: Upstream, replace_once: bool) -> None:
        super().__init__(callers=1)
        self.upstream = upstream
        self.replace_once = replace_once
        self.calls = 0

    def RegisterNode(self, request: rpb.RegisterNodeRequest, timeout: float) -> pb.RegisterResponse:
        self.calls += 1
        if self.replace_once:
            self.replace_once = False
            self.upstream.attach()
        with self.lock:
            if request.session.session_token != self.token:
                raise Refusal(grpc.StatusCode.UNAUTHENTICATED, Reason.BAD_TOKEN, "token does not belong to relay")
        if request.request.session_token == "stolen":
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, Reason.BAD_TOKEN, "token does not belong to node")
        return pb.RegisterResponse(node_id=request.request.node_name, session_token="s")


def test_a_node_registering_while_the_relay_attaches_again_is_registered(upstream: Upstream) -> None:
    fake = FakeRegistrar(upstream, replace_once=True)
    upstream.uplink = fake
    upstream.attach()
    resp = upstream.register_node(pb.RegisterRequest(node_name="n1"), peer="")
    assert resp.node_id == "n1" and fake.calls == 2 and fake.attaches == 2


def test_a_node_presenting_a_wrong_token_is_refused_once(upstream: Upstream) -> None:
    fake = FakeRegistrar(upstream, replace_once=False)
    upstream.uplink = fake
    upstream.attach()
    with pytest.raises(grpc.RpcError) as refused:
        upstream.register_node(pb.RegisterRequest(node_name="n1", node_id="n1", session_token="stolen"), peer="")
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED and fake.calls == 1


def test_a_lost_relay_session_is_unavailable_to_the_node_not_an_unknown_identity() -> None:
    """Passed on as NOT_FOUND, the aggregator's 'unknown relay' made a registering node drop its
    identity and enrol afresh (a second member, its F_0 lost); UNAVAILABLE makes it retry."""
    lost = upstream_error(Refusal(grpc.StatusCode.NOT_FOUND, Reason.UNKNOWN_RELAY, "unknown relay 'x'"))
    assert isinstance(lost, Unavailable) and lost.reason is Reason.UPSTREAM
    unknown = upstream_error(Refusal(grpc.StatusCode.NOT_FOUND, Reason.UNKNOWN_NODE, "unknown node id 'n1'"))
    assert isinstance(unknown, NotFound) and unknown.reason is Reason.UNKNOWN_NODE
