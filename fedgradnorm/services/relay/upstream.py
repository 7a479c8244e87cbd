"""The relay's client of the aggregator's Uplink service: one channel, one relay session, retries.

Every call goes through :meth:`Upstream.call`: while the aggregator is away (UNAVAILABLE, a
deadline) it backs off and tries again until the relay stops; when the aggregator no longer knows
the relay's session (it restarted, or the relay was silent too long) it attaches again first.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import grpc
import structlog
import torch

from fedgradnorm import wire
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc
from fedgradnorm._proto.fedgradnorm.v1 import relay_pb2 as rpb
from fedgradnorm._proto.fedgradnorm.v1 import relay_pb2_grpc as rpb_grpc
from fedgradnorm._proto.fedgradnorm.v1.tensor_pb2 import DType
from fedgradnorm.errors import FatalError
from fedgradnorm.reasons import Reason
from fedgradnorm.services import serde
from fedgradnorm.services.domain import RelayTicket, Submission, WeightsOffer
from fedgradnorm.services.edge_node.node import channel_options
from fedgradnorm.services.refusals import reason_of
from fedgradnorm.services.relay.config import RelayConfig

log = structlog.get_logger("fedgradnorm.relay")
T = TypeVar("T")

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
REATTACH = {Reason.UNKNOWN_RELAY, Reason.BAD_TOKEN}
PARTIAL_METHOD = f"/{rpb.DESCRIPTOR.services_by_name['Uplink'].full_name}/SubmitPartialSum"
PARTIAL_CHUNK_FIELD = rpb.SubmitPartialSumRequest.DESCRIPTOR.fields_by_name["chunk"].number


class UpstreamRefused(FatalError):
    """The aggregator refused the relay for good (wrong token, federation or network, not a relay)."""


class Stopped(Exception):
    """The relay is stopping: the call was not made."""


@dataclass(frozen=True)
class Attachment:
    settings: pb.RegisterResponse
    hyperparameters: pb.Hyperparameters
    members: dict[str, str]
    members_version: int


class Upstream:
    def __init__(self, config: RelayConfig, stop: threading.Event, on_attach: Callable[[Attachment], None]) -> None:
        self.config = config
        self.stop = stop
        self.on_attach = on_attach
        self.channel = config.client_tls().channel(config.upstream, channel_options(config.max_backoff))
        self.uplink = rpb_grpc.UplinkStub(self.channel)
        self.aggregator = pb_grpc.AggregatorStub(self.channel)
        self._submit_partial = self.channel.stream_unary(
            PARTIAL_METHOD, request_serializer=bytes, response_deserializer=rpb.SubmitPartialSumResponse.FromString
        )
        self._lock = threading.Lock()
        self._attaching = threading.Lock()  # one re-attach at a time (see _reattach)
        self.session = rpb.RelaySession()
        self.generation = 0  # sessions attached so far
        self.connected = False
        self.bytes_received = 0
        self.bytes_sent = 0

    def close(self) -> None:
        self.channel.close()

    # -- the session --------------------------------------------------------------------------

    def attach(self) -> Attachment:
        cfg = self.config
        spec = cfg.spec
        resp = self._retrying(
            "AttachRelay",
            lambda: self.uplink.AttachRelay(
                rpb.AttachRelayRequest(
                    enrollment_token=cfg.enrollment_token,
                    relay_name=cfg.name,
                    federation=spec.name,
                    network=serde.network_architecture(spec.architecture),
                ),
                timeout=30,
            ),
            attach_on_loss=False,
        )
        with self._lock:
            self.session = resp.session
            self.generation += 1
        attachment = Attachment(
            settings=resp.settings,
            hyperparameters=resp.hyperparameters,
            members=serde.members_of(resp.members),
            members_version=resp.members_version,
        )
        log.info("relay.attached", upstream=cfg.upstream, members=len(attachment.members))
        self.on_attach(attachment)
        return attachment

    def _reattach(self, generation: int, what: str, details: str | None) -> None:
        """The aggregator no longer knows the session a call presented: attach again, unless another
        loop already did since that call began (``generation``). Without this, the round loop, the
        reporter and the heartbeat, which all lose the session at once, would each attach, and each
        new session would void the others' tokens (a cascade of attaches and BAD_TOKEN refusals)."""
        with self._attaching:
            with self._lock:
                if self.generation != generation:
                    return
            log.warning("relay.session_lost", call=what, details=details)
            self.attach()

    def _session(self) -> rpb.RelaySession:
        with self._lock:
            return rpb.RelaySession(relay_id=self.session.relay_id, session_token=self.session.session_token)

    def _retrying(self, what: str, call: Callable[[], T], attach_on_loss: bool = True) -> T:
        delay = 0.1
        while True:
            if self.stop.is_set():
                raise Stopped(what)
            with self._lock:
                generation = self.generation  # the session this call presents, or a later one
            try:
                result = call()
                self.connected = True
                return result
            except grpc.RpcError as e:
                code, reason = e.code(), reason_of(e)
                if attach_on_loss and reason in REATTACH:
                    self._reattach(generation, what, e.details())
                    continue
                if code == grpc.StatusCode.PERMISSION_DENIED or reason in {
                    Reason.BAD_ENROLLMENT,
                    Reason.NETWORK_MISMATCH,
                    Reason.BAD_TASK,
                    Reason.BAD_NAME,
                }:
                    raise UpstreamRefused(
                        f"the aggregator at {self.config.upstream} refused relay {self.config.name!r}: "
                        f"{code.name}: {e.details()}"
                    ) from None
                if code not in RETRYABLE and code != grpc.StatusCode.CANCELLED:
                    raise
                self.connected = False
                log.warning("upstream.unreachable", call=what, code=code.name, retry_in=round(delay, 2))
                if self.stop.wait(delay * (0.5 + random.random() / 2)):
                    raise Stopped(what) from None
                delay = min(delay * 2, self.config.max_backoff)

    # -- calls --------------------------------------------------------------------------------

    def register_node(self, request: pb.RegisterRequest, peer: str) -> pb.RegisterResponse:
        """One attempt (the node retries itself); the aggregator's refusal passes through. If the
        relay's token was replaced while the call was on its way (another loop attached again), the
        call is made once more with the new one: that refusal was the relay's, not the node's."""
        for last in (False, True):
            with self._lock:
                generation = self.generation
            try:
                resp: pb.RegisterResponse = self.uplink.RegisterNode(
                    rpb.RegisterNodeRequest(session=self._session(), request=request, peer=peer), timeout=30
                )
                return resp
            except grpc.RpcError as e:
                if last or reason_of(e) is not Reason.BAD_TOKEN:
                    raise
                with self._lock:
                    if self.generation == generation:
                        raise  # the node's token (its resume), or the relay's current one: passed on
        raise AssertionError("unreachable")

    def deregister_node(self, node_id: str, token: str) -> None:
        self.aggregator.Deregister(pb.DeregisterRequest(node_id=node_id, session_token=token), timeout=30)

    def get_state(self, request: pb.GetStateRequest) -> pb.GetStateResponse:
        resp: pb.GetStateResponse = self.aggregator.GetState(request, timeout=30)
        return resp

    def heartbeat(self, seen: list[str], version: int) -> rpb.RelayHeartbeatResponse:
        resp: rpb.RelayHeartbeatResponse = self._retrying(
            "RelayHeartbeat",
            lambda: self.uplink.RelayHeartbeat(
                rpb.RelayHeartbeatRequest(session=self._session(), seen=seen, members_version=version), timeout=30
            ),
        )
        return resp

    def fetch_round(
        self, after_opening: int, wait: float, expected: Mapping[str, tuple[int, ...]]
    ) -> RelayTicket | None:
        def call() -> RelayTicket | None:
            stream = self.uplink.FetchRelayRound(
                rpb.FetchRelayRoundRequest(session=self._session(), after_opening=after_opening, wait_seconds=wait),
                timeout=wait + 120,
            )
            first = next(stream)
            h = first.header
            if h.status not in (pb.ROUND_STATUS_OPEN, pb.ROUND_STATUS_FINISHED) or not h.tensors:
                stream.cancel()
                return None
            max_bytes = 4 * sum(int(torch.Size(s).numel()) for s in expected.values())
            asm = wire.TensorAssembler.from_header(h, expected, max_bytes=max_bytes, check_finite=True)
            for msg in stream:
                asm.feed(msg.chunk.data)
            omega = asm.finish()
            self.bytes_received += h.total_bytes
            return RelayTicket(
                opening=h.opening,
                round=h.round,
                deadline_unix=h.deadline_unix_seconds,
                participants=serde.participants_of(h.participants),
                omega=omega,
                final=h.status == pb.ROUND_STATUS_FINISHED,
            )

        return self._retrying("FetchRelayRound", call)

    def report(self, round_: int, subs: list[Submission]) -> rpb.ReportUpdatesResponse:
        resp: rpb.ReportUpdatesResponse = self._retrying(
            "ReportUpdates",
            lambda: self.uplink.ReportUpdates(
                rpb.ReportUpdatesRequest(
                    session=self._session(), round=round_, updates=[serde.relayed_update(s) for s in subs]
                ),
                timeout=30,
            ),
        )
        return resp

    def fetch_weights(self, opening: int, after_attempt: int, wait: float) -> WeightsOffer:
        resp: rpb.FetchWeightsResponse = self._retrying(
            "FetchWeights",
            lambda: self.uplink.FetchWeights(
                rpb.FetchWeightsRequest(
                    session=self._session(), opening=opening, after_attempt=after_attempt, wait_seconds=wait
                ),
                timeout=wait + 30,
            ),
        )
        return serde.weights_offer(resp)

    def submit_partial(self, opening: int, attempt: int, partial: Mapping[str, torch.Tensor]) -> None:
        """Send a partial sum (float32, exact); retried while the aggregator is away."""
        dtype = DType.DTYPE_FLOAT32
        specs = wire.tensor_specs(partial, dtype)
        total = wire.payload_nbytes(specs)

        def messages(session: rpb.RelaySession) -> Iterator[bytes]:
            header = rpb.PartialSumHeader(
                session=session, opening=opening, attempt=attempt, tensors=specs, total_bytes=total
            )
            yield rpb.SubmitPartialSumRequest(header=header).SerializeToString()
            yield from wire.iter_chunk_messages(partial, dtype, self.config.chunk_bytes, PARTIAL_CHUNK_FIELD)

        t0 = time.monotonic()
        self._retrying("SubmitPartialSum", lambda: self._submit_partial(messages(self._session()), timeout=120))
        self.bytes_sent += total
        log.info("relay.partial_sum_sent", opening=opening, attempt=attempt, seconds=round(time.monotonic() - t0, 3))
