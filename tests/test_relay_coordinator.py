"""The relay's round machine (fedgradnorm.services.relay.coordinator) without an aggregator: how its
view of the open round follows the member list the aggregator sends it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from fedgradnorm._proto.fedgradnorm.v1 import relay_pb2 as rpb
from fedgradnorm.services import serde
from fedgradnorm.services.aggregator.errors import NotFound
from fedgradnorm.services.aggregator.membership import hash_token
from fedgradnorm.services.domain import RelayTicket
from fedgradnorm.services.relay.config import RelayConfig
from fedgradnorm.services.relay.coordinator import RelayCoordinator, _Round


@pytest.fixture
def relay() -> Iterator[RelayCoordinator]:
    config = RelayConfig(name="site-x", upstream="127.0.0.1:9", insecure=True, metrics_listen="", listen="127.0.0.1:0")
    r = RelayCoordinator(config)
    try:
        yield r
    finally:
        r.stop()


def heartbeat_once(relay: RelayCoordinator, members: dict[str, str], version: int) -> None:
    """One turn of the relay's heartbeat loop, the aggregator answering with ``members``."""

    def heartbeat(seen: list[str], known: int) -> rpb.RelayHeartbeatResponse:
        relay._stop.set()  # the loop ends after this turn
        listed = serde.relay_members([(n, h, None) for n, h in members.items()])
        return rpb.RelayHeartbeatResponse(round=0, members_version=version, members_changed=True, members=listed)

    relay.upstream.heartbeat = heartbeat  # type: ignore[method-assign]
    relay._heartbeat_loop()
    relay._stop.clear()


def test_a_participant_the_aggregator_dropped_leaves_the_relays_round(relay: RelayCoordinator) -> None:
    """n1 is dropped at the aggregator mid-round (silent beyond heartbeat_timeout), which discards
    it from the round; it resumes through the relay before the round closes. The relay must not
    hand it that round's omega: its update could only be refused upstream (seen: a node whose
    update came too late kept the F_0 of that unused update, and was refused for good the next
    round), and a node takes the update it sent through the relay for its first accepted one."""
    tokens = {"n1": "t1", "n2": "t2"}
    heartbeat_once(relay, {n: hash_token(t) for n, t in tokens.items()}, 1)
    ticket = RelayTicket(1, 0, time.time() + 60, {"n1": None, "n2": None}, omega={})
    with relay._cond:
        relay._round = _Round(ticket)
    heartbeat_once(relay, {"n2": hash_token("t2")}, 2)  # n1 dropped
    with pytest.raises(NotFound):
        relay.fetch_round("n1", "t1", wait_seconds=0)  # the node learns it, and resumes:
    with relay._cond:
        relay._members["n1"] = hash_token("t1")
    assert relay.fetch_round("n1", "t1", wait_seconds=0) is None  # not in this round: the next one
    assert relay.fetch_round("n2", "t2", wait_seconds=0) is not None
