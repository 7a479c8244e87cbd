"""The gRPC face of the aggregator towards its relays (proto/fedgradnorm/v1/relay.proto): unpack,
check the caller's relay role, call the coordinator, map domain errors to status codes."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

import grpc
import structlog
from cryptography import x509
from cryptography.x509.oid import NameOID

from fedgradnorm import wire
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm._proto.fedgradnorm.v1 import relay_pb2 as rpb
from fedgradnorm._proto.fedgradnorm.v1 import relay_pb2_grpc as rpb_grpc
from fedgradnorm._proto.fedgradnorm.v1.tensor_pb2 import DType
from fedgradnorm.certs import RELAY_ROLE
from fedgradnorm.reasons import Reason
from fedgradnorm.services import serde
from fedgradnorm.services.aggregator.coordinator import RoundCoordinator
from fedgradnorm.services.aggregator.errors import CoordinatorError, InvalidArgument
from fedgradnorm.services.aggregator.servicer import (
    AggregatorServicer,
    _abort,
    _require_loaded,
    feed_chunks,
    payload_header,
)
from fedgradnorm.services.domain import Registration
from fedgradnorm.services.refusals import refuse

log = structlog.get_logger("fedgradnorm.aggregator")

MAX_SEEN = 100_000
MAX_REPORTS = 10_000
MAX_CALLS = 4  # calls of one kind a relay session may have in flight (each holds a worker thread)
# The chunk messages of FetchRelayRound are byte for byte those of FetchRound (same field number),
# so the relays and the nodes share one serialization of each round's omega.
assert (
    rpb.FetchRelayRoundResponse.DESCRIPTOR.fields_by_name["chunk"].number
    == pb.FetchRoundResponse.DESCRIPTOR.fields_by_name["chunk"].number
)


@functools.lru_cache(maxsize=256)
def _carries_relay_role(pem: bytes) -> bool:
    """Whether a PEM certificate's subject has OU ``relay`` (parsed once per certificate)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return False
    return any(a.value == RELAY_ROLE for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME))


def relay_role(context: grpc.ServicerContext) -> bool:
    """Whether the caller's client certificate carries the relay role (OU ``relay``)."""
    return any(_carries_relay_role(pem) for pem in context.auth_context().get("x509_pem_cert") or [])


class UplinkServicer(rpb_grpc.UplinkServicer):  # type: ignore[misc]  # the generated base is untyped
    def __init__(self, coordinator: RoundCoordinator, nodes: AggregatorServicer, mutual_tls: bool) -> None:
        self.nodes = nodes  # the node-facing servicer: its settings, metrics and encoded rounds
        self.coord = coordinator
        self.metrics = nodes.metrics
        self.mutual_tls = mutual_tls
        self._lock = threading.Lock()
        self._in_flight: dict[tuple[str, str], int] = {}

    @contextlib.contextmanager
    def _bounded(self, relay_id: str, kind: str, context: grpc.ServicerContext) -> Iterator[None]:
        """At most MAX_CALLS calls of ``kind`` in flight per relay: one relay cannot hold the
        server's worker threads however many streams it opens."""
        key = (relay_id[:64], kind)
        with self._lock:
            if self._in_flight.get(key, 0) >= MAX_CALLS:
                busy = True
            else:
                busy = False
                self._in_flight[key] = self._in_flight.get(key, 0) + 1
        if busy:
            refuse(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                Reason.BUSY,
                f"busy: relay {relay_id[:64]!r} has {MAX_CALLS} {kind} calls in flight",
            )
        try:
            yield
        finally:
            with self._lock:
                self._in_flight[key] -= 1
                if not self._in_flight[key]:
                    del self._in_flight[key]

    def _enter(self, context: grpc.ServicerContext) -> None:
        _require_loaded(self.coord, context)
        if self.mutual_tls and not relay_role(context):
            refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                Reason.NOT_RELAY,
                f"the Uplink service is for relays: the client certificate has no OU {RELAY_ROLE!r} "
                "(issue one with `fedgradnorm certs --relay NAME`)",
            )

    def _session(self, s: rpb.RelaySession, context: grpc.ServicerContext) -> None:
        try:
            self.coord.relay_session(s.relay_id, s.session_token)
        except CoordinatorError as e:
            _abort(context, e)

    def AttachRelay(self, request: rpb.AttachRelayRequest, context: grpc.ServicerContext) -> rpb.AttachRelayResponse:
        self._enter(context)
        try:
            token = self.coord.attach_relay(
                name=request.relay_name,
                federation=request.federation,
                network=serde.architecture(request.network),
                enrollment_token=request.enrollment_token,
            )
            members, version = self.coord.relay_members(request.relay_name, token)
        except CoordinatorError as e:
            _abort(context, e)
        cfg = self.coord.config
        return rpb.AttachRelayResponse(
            session=rpb.RelaySession(relay_id=request.relay_name, session_token=token),
            settings=self.nodes.register_response(Registration("", "", False, None, 1.0)),
            hyperparameters=serde.hyperparameters(cfg),
            members=serde.relay_members(members),
            members_version=version,
            relay_timeout_seconds=cfg.relay_timeout,
        )

    def RegisterNode(self, request: rpb.RegisterNodeRequest, context: grpc.ServicerContext) -> pb.RegisterResponse:
        self._enter(context)
        self._session(request.session, context)
        return self.nodes.register(request.request, context, peer=request.peer[:256], relay=request.session.relay_id)

    def RelayHeartbeat(
        self, request: rpb.RelayHeartbeatRequest, context: grpc.ServicerContext
    ) -> rpb.RelayHeartbeatResponse:
        self._enter(context)
        if len(request.seen) > MAX_SEEN:
            _abort(context, InvalidArgument(f"at most {MAX_SEEN} seen nodes per heartbeat", Reason.BAD_VALUE))
        try:
            round_, members, version = self.coord.relay_heartbeat(
                request.session.relay_id, request.session.session_token, list(request.seen), request.members_version
            )
        except CoordinatorError as e:
            _abort(context, e)
        resp = rpb.RelayHeartbeatResponse(round=round_, members_version=version, members_changed=members is not None)
        if members is not None:
            resp.members.extend(serde.relay_members(members))
        return resp

    def FetchRelayRound(
        self, request: rpb.FetchRelayRoundRequest, context: grpc.ServicerContext
    ) -> Iterator[rpb.FetchRelayRoundResponse | bytes]:
        self._enter(context)
        s = request.session
        wait = min(max(request.wait_seconds, 0.0), self.nodes.config.max_fetch_wait)
        with self._bounded(s.relay_id, "FetchRelayRound", context):
            try:
                ticket = self.coord.fetch_relay_round(
                    s.relay_id, s.session_token, request.after_opening, wait, alive=context.is_active
                )
            except CoordinatorError as e:
                _abort(context, e)
        if ticket is None:
            yield rpb.FetchRelayRoundResponse(
                header=rpb.RelayRoundHeader(status=pb.ROUND_STATUS_NOT_YET, round=self.coord.round)
            )
            return
        dtype = DType.DTYPE_FLOAT32  # the relay re-encodes for its nodes: it gets omega exact
        specs = wire.tensor_specs(ticket.omega, dtype)
        total = wire.payload_nbytes(specs)
        yield rpb.FetchRelayRoundResponse(
            header=rpb.RelayRoundHeader(
                status=pb.ROUND_STATUS_FINISHED if ticket.final else pb.ROUND_STATUS_OPEN,
                round=ticket.round,
                opening=ticket.opening,
                deadline_unix_seconds=ticket.deadline_unix,
                participants=serde.relay_participants(ticket.participants),
                tensors=specs,
                total_bytes=total,
            )
        )
        yield from self.nodes.encoded_chunks(ticket.round, ticket.omega, dtype)
        self.metrics.bytes.labels("sent").inc(total)

    def ReportUpdates(
        self, request: rpb.ReportUpdatesRequest, context: grpc.ServicerContext
    ) -> rpb.ReportUpdatesResponse:
        self._enter(context)
        if len(request.updates) > MAX_REPORTS:
            _abort(context, InvalidArgument(f"at most {MAX_REPORTS} updates per report", Reason.BAD_VALUE))
        s = request.session
        try:
            refused = self.coord.report_updates(
                s.relay_id,
                s.session_token,
                request.round,
                [serde.relayed_submission(u, request.round) for u in request.updates],
            )
        except CoordinatorError as e:
            _abort(context, e)
        for _, refusal in refused:
            self.metrics.updates.labels(refusal.reason).inc()
        self.metrics.updates.labels("accepted").inc(len(request.updates) - len(refused))
        return rpb.ReportUpdatesResponse(
            accepted=len(request.updates) - len(refused),
            refused=[
                rpb.RefusedUpdate(node_id=n[:64], reason=e.reason.value, message=str(e)[:256]) for n, e in refused
            ],
        )

    def FetchWeights(self, request: rpb.FetchWeightsRequest, context: grpc.ServicerContext) -> rpb.FetchWeightsResponse:
        self._enter(context)
        s = request.session
        wait = min(max(request.wait_seconds, 0.0), self.nodes.config.max_fetch_wait)
        with self._bounded(s.relay_id, "FetchWeights", context):
            try:
                offer = self.coord.fetch_weights(
                    s.relay_id, s.session_token, request.opening, request.after_attempt, wait, alive=context.is_active
                )
            except CoordinatorError as e:
                _abort(context, e)
        return serde.weights_response(offer)

    def SubmitPartialSum(
        self, request_iterator: Iterator[rpb.SubmitPartialSumRequest], context: grpc.ServicerContext
    ) -> rpb.SubmitPartialSumResponse:
        self._enter(context)
        asm: wire.TensorAssembler | None = None
        try:
            h = payload_header(request_iterator, "SubmitPartialSum", "PartialSumHeader")
            s = h.session
            with self._bounded(s.relay_id, "SubmitPartialSum", context):
                self.coord.check_partial_sum(s.relay_id, s.session_token, h.opening, h.attempt)  # before any payload
                asm = wire.TensorAssembler.from_header(
                    h,
                    self.coord.expected_shapes(),
                    max_bytes=self.coord.model_bytes(),
                    allowed_dtypes=(DType.DTYPE_FLOAT32,),
                )
                feed_chunks(asm, request_iterator, self.nodes.config.chunk_bytes)
                self.coord.submit_partial_sum(s.relay_id, s.session_token, h.opening, h.attempt, asm.finish())
        except CoordinatorError as e:
            _abort(context, e)
        except wire.WireError as e:
            _abort(context, e)
        finally:
            self.metrics.bytes.labels("received").inc(asm.received if asm else 0)
        log.debug("relay.partial_sum", relay=s.relay_id, opening=h.opening, attempt=h.attempt)
        return rpb.SubmitPartialSumResponse(accepted=True)
