"""The gRPC face of the aggregator: unpack, call the coordinator, map domain errors to status codes.

No FedGradNorm logic lives here; every decision is the coordinator's, every number the library's.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn, Protocol

import grpc
import structlog
import torch

from fedgradnorm import wire
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc
from fedgradnorm._proto.fedgradnorm.v1.tensor_pb2 import DType, TensorChunk
from fedgradnorm.algorithm import ServerConfig
from fedgradnorm.models import Architecture
from fedgradnorm.reasons import Reason
from fedgradnorm.services import serde
from fedgradnorm.services.aggregator.config import NAME_RE, CoordinatorConfig
from fedgradnorm.services.aggregator.errors import (
    AlreadyExists,
    CoordinatorError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from fedgradnorm.services.aggregator.metrics import NodeTrafficMetrics
from fedgradnorm.services.aggregator.streams import StreamBusy, StreamGuard
from fedgradnorm.services.domain import Registration, RoundTicket, StateView, Submission
from fedgradnorm.services.refusals import refuse, wire_status

log = structlog.get_logger("fedgradnorm.aggregator")

STATUS: dict[type[CoordinatorError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


STREAM_GRACE = 5.0  # seconds a stream may run past its round's deadline before it is cancelled
FINAL_MODEL_SECONDS = 120.0  # how long a FINISHED stream (the final model) may take to be read


def _abort(context: grpc.ServicerContext, error: CoordinatorError | wire.WireError) -> NoReturn:
    if isinstance(error, CoordinatorError):
        refuse(context, STATUS[type(error)], error.reason, str(error))
    refuse(context, wire_status(error), error.code, str(error))


def _peer_host(context: grpc.ServicerContext) -> str:
    """'ipv4:10.0.0.7:51234' -> '10.0.0.7' (the port changes per connection)."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return rest.rpartition(":")[0] if kind == "ipv4" else peer


CHUNK_FIELD = pb.FetchRoundResponse.DESCRIPTOR.fields_by_name["chunk"].number


class EncodedRounds:
    """The FetchRound chunk messages of the open round, serialized once per wire dtype and shared by
    every node's stream (one copy of omega per dtype, dropped when the next round opens)."""

    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self._lock = threading.Lock()
        self._omega: Mapping[str, torch.Tensor] | None = None  # the open round's own omega
        self._round = -1
        self._by_dtype: dict[DType, list[bytes]] = {}

    def chunks(self, round_: int, omega: Mapping[str, torch.Tensor], dtype: DType) -> list[bytes]:
        with self._lock:
            if omega is not self._omega or round_ != self._round:
                self._omega, self._round, self._by_dtype = omega, round_, {}
            if dtype not in self._by_dtype:
                self._by_dtype[dtype] = list(wire.iter_chunk_messages(omega, dtype, self.chunk_bytes, CHUNK_FIELD))
            return self._by_dtype[dtype]


class ServingSettings(Protocol):
    """The transport settings the servicer reads (the aggregator's ServiceConfig, a relay's RelayConfig)."""

    @property
    def chunk_bytes(self) -> int: ...
    @property
    def wire_dtype(self) -> str: ...
    @property
    def max_fetch_wait(self) -> float: ...


class NodeCoordinator(Protocol):
    """What the servicer calls: the aggregator's RoundCoordinator, or a relay's RelayCoordinator
    (which answers a site's nodes exactly as the aggregator would)."""

    @property
    def loaded(self) -> bool: ...
    @property
    def config(self) -> CoordinatorConfig: ...
    @property
    def server_config(self) -> ServerConfig: ...
    @property
    def round(self) -> int: ...

    def register(
        self,
        *,
        name: str,
        federation: str,
        network: Architecture,
        task: str,
        num_samples: int,
        enrollment_token: str = "",
        node_id: str = "",
        session_token: str = "",
        peer: str = "",
        relay: str = "",
    ) -> Registration: ...
    def registered_count(self) -> int: ...
    def authenticate(self, node_id: str, token: str) -> None: ...
    def fetch_round(
        self, node_id: str, token: str, wait_seconds: float, alive: Callable[[], bool] = ...
    ) -> RoundTicket | None: ...
    def check_submit(self, node_id: str, token: str, round_: int) -> float: ...
    def expected_shapes(self) -> dict[str, tuple[int, ...]]: ...
    def model_bytes(self) -> int: ...
    def submit(self, token: str, sub: Submission) -> None: ...
    def deregister(self, node_id: str, token: str) -> None: ...
    def heartbeat(self, node_id: str, token: str) -> int: ...


class StateSource(Protocol):
    """What answers GetState: the aggregator's own state, or (at a relay) the aggregator's, asked."""

    def __call__(self, request: pb.GetStateRequest) -> pb.GetStateResponse: ...


class ViewsState(Protocol):
    @property
    def config(self) -> CoordinatorConfig: ...

    def view(self, page_size: int = ..., after: str = "") -> StateView: ...


def own_state(coord: ViewsState) -> StateSource:
    """GetState from a coordinator that holds the state (the aggregator's)."""

    def answer(request: pb.GetStateRequest) -> pb.GetStateResponse:
        return serde.state_response(coord.view(request.page_size, request.page_token), coord.config)

    return answer


class _Streamed(Protocol):
    """A message of a client-streamed payload: a header first, then TensorChunk messages."""

    def WhichOneof(self, name: str) -> str | None: ...
    @property
    def header(self) -> Any: ...
    @property
    def chunk(self) -> TensorChunk: ...


def payload_header(messages: Iterator[_Streamed], method: str, header: str) -> Any:
    """The header that must open a client-streamed payload (SubmitUpdate, SubmitPartialSum)."""
    first = next(messages, None)
    if first is None or first.WhichOneof("payload") != "header":
        raise InvalidArgument(f"the first message of {method} must be a {header}", reason=Reason.BAD_STREAM)
    return first.header


def feed_chunks(asm: wire.TensorAssembler, messages: Iterator[_Streamed], chunk_bytes: int) -> None:
    """Feed the chunks that follow a header into ``asm`` (``asm.received`` counts their bytes)."""
    for msg in messages:
        if msg.WhichOneof("payload") != "chunk":
            raise InvalidArgument("only TensorChunk messages may follow the header", reason=Reason.BAD_STREAM)
        if len(msg.chunk.data) > chunk_bytes:
            raise InvalidArgument(
                f"a chunk of {len(msg.chunk.data)} bytes is above max_chunk_bytes {chunk_bytes}",
                reason=Reason.CHUNK_TOO_LARGE,
            )
        asm.feed(msg.chunk.data)


def _require_loaded(coord: NodeCoordinator, context: grpc.ServicerContext) -> None:
    if not coord.loaded:
        refuse(
            context, grpc.StatusCode.UNAVAILABLE, Reason.LOADING, "the aggregator is loading its state; retry shortly"
        )


class AggregatorServicer(pb_grpc.AggregatorServicer):  # type: ignore[misc]  # the generated base is untyped
    def __init__(
        self, coordinator: NodeCoordinator, config: ServingSettings, metrics: NodeTrafficMetrics, state: StateSource
    ) -> None:
        self.coord = coordinator
        self.state = state
        self.config = config
        self.metrics = metrics
        self.wire_dtype = wire.DTYPE_BY_NAME[config.wire_dtype]
        self.accepted = tuple(wire.DTYPE_BY_NAME.values())
        self._encoded = EncodedRounds(config.chunk_bytes)
        self.streams = StreamGuard()

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterResponse:
        _require_loaded(self.coord, context)
        return self.register(request, context, peer=_peer_host(context))

    def register(
        self, request: pb.RegisterRequest, context: grpc.ServicerContext, *, peer: str, relay: str = ""
    ) -> pb.RegisterResponse:
        """Enrol or resume a node that dialled the aggregator, or (``relay``) one a relay enrols."""
        try:
            reg = self.coord.register(
                name=request.node_name,
                federation=request.federation,
                network=serde.architecture(request.network),
                task=request.task,
                num_samples=request.num_samples,
                enrollment_token=request.enrollment_token,
                node_id=request.node_id,
                session_token=request.session_token,
                peer=peer,
                relay=relay,
            )
        except CoordinatorError as e:
            self.metrics.registrations.labels(e.reason).inc()
            _abort(context, e)
        self.metrics.registrations.labels("resumed" if reg.resumed else "registered").inc()
        self.metrics.registered.set(self.coord.registered_count())
        return self.register_response(reg)

    def register_response(self, reg: Registration) -> pb.RegisterResponse:
        """The reply to a registration: the node's identity and the federation's settings."""
        return serde.register_response(
            reg,
            self.coord.config,
            omega_tilde=self.coord.server_config.omega_tilde,
            wire_dtype=self.wire_dtype,
            accepted_dtypes=self.accepted,
            max_chunk_bytes=self.config.chunk_bytes,
            max_update_bytes=self.coord.model_bytes(),
        )

    def FetchRound(
        self, request: pb.FetchRoundRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.FetchRoundResponse | bytes]:  # chunk messages go out serialized (codec.WireCodec)
        _require_loaded(self.coord, context)
        dtype = request.dtype or self.wire_dtype
        if dtype not in self.accepted:
            refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                Reason.BAD_DTYPE,
                f"bad_dtype: dtype {dtype} is not among {self.accepted}",
            )
        wait = min(max(request.wait_seconds, 0.0), self.config.max_fetch_wait)
        try:
            self.coord.authenticate(request.node_id, request.session_token)
        except CoordinatorError as e:
            _abort(context, e)
        with self.streams.fetch(request.node_id, context) as stream:  # replaces the node's older one
            try:
                ticket = self.coord.fetch_round(
                    request.node_id,
                    request.session_token,
                    wait,
                    alive=lambda: context.is_active() and not stream.cancelled,
                )
            except CoordinatorError as e:
                _abort(context, e)
            if stream.cancelled:  # replaced by a newer FetchRound of the node (or past its deadline)
                refuse(context, grpc.StatusCode.CANCELLED, Reason.REPLACED, f"stream {stream.cancelled}")
            if ticket is None:
                yield pb.FetchRoundResponse(
                    header=pb.RoundHeader(status=pb.ROUND_STATUS_NOT_YET, round=self.coord.round)
                )
                return
            if ticket.final and request.without_final_model:
                yield pb.FetchRoundResponse(
                    header=pb.RoundHeader(
                        status=pb.ROUND_STATUS_FINISHED, round=ticket.round, last_used_round=ticket.last_used
                    )
                )
                return
            if ticket.final:  # the trained model, exact (float32), to a reader that keeps up
                dtype = DType.DTYPE_FLOAT32
                stream.expire_at_unix(time.time() + FINAL_MODEL_SECONDS, STREAM_GRACE)
            else:  # a reader that stalls is cut off at the round's deadline
                stream.expire_at_unix(ticket.deadline_unix, STREAM_GRACE)
            specs = wire.tensor_specs(ticket.omega, dtype)
            total = wire.payload_nbytes(specs)
            yield pb.FetchRoundResponse(
                header=pb.RoundHeader(
                    status=pb.ROUND_STATUS_FINISHED if ticket.final else pb.ROUND_STATUS_OPEN,
                    round=ticket.round,
                    deadline_unix_seconds=ticket.deadline_unix,
                    tensors=specs,
                    total_bytes=total,
                    last_used_round=ticket.last_used,
                )
            )
            yield from self.encoded_chunks(ticket.round, ticket.omega, dtype)
            self.metrics.bytes.labels("sent").inc(total)

    def encoded_chunks(self, round_: int, omega: Mapping[str, torch.Tensor], dtype: DType) -> list[bytes]:
        """The round's chunk messages in ``dtype``, serialized once (sent as is: codec.WireCodec)."""
        return self._encoded.chunks(round_, omega, dtype)

    def SubmitUpdate(
        self, request_iterator: Iterator[pb.SubmitUpdateRequest], context: grpc.ServicerContext
    ) -> pb.SubmitUpdateResponse:
        _require_loaded(self.coord, context)
        asm: wire.TensorAssembler | None = None
        try:
            h = payload_header(request_iterator, "SubmitUpdate", "SubmitHeader")
            deadline = self.coord.check_submit(h.node_id, h.session_token, h.round)  # before any payload
            with self.streams.submit(h.node_id, context, deadline, STREAM_GRACE) as stream:
                asm = wire.TensorAssembler.from_header(
                    h, self.coord.expected_shapes(), max_bytes=self.coord.model_bytes(), allowed_dtypes=self.accepted
                )
                with contextlib.suppress(grpc.RpcError):  # the stream was cancelled (see below)
                    feed_chunks(asm, request_iterator, self.config.chunk_bytes)
                if stream.cancelled or not context.is_active():  # cut off at its deadline, or the client left
                    why = Reason.DEADLINE if stream.cancelled == "deadline" else Reason.CANCELLED
                    self.metrics.updates.labels(why).inc()
                    refuse(
                        context, grpc.StatusCode.CANCELLED, why, f"upload cut off ({stream.cancelled or 'client gone'})"
                    )
                gradient = asm.finish()
            self.coord.submit(h.session_token, serde.submission(h, gradient))
        except StreamBusy as e:
            self.metrics.updates.labels(Reason.BUSY).inc()
            refuse(context, grpc.StatusCode.ALREADY_EXISTS, Reason.BUSY, f"busy: {e}")
        except CoordinatorError as e:
            self.metrics.updates.labels(e.reason).inc()
            _abort(context, e)
        except wire.WireError as e:
            self.metrics.updates.labels(e.code).inc()
            _abort(context, e)
        finally:
            self.metrics.bytes.labels("received").inc(asm.received if asm else 0)
        self.metrics.updates.labels("accepted").inc()
        return pb.SubmitUpdateResponse(accepted=True, round=h.round)

    def Deregister(self, request: pb.DeregisterRequest, context: grpc.ServicerContext) -> pb.DeregisterResponse:
        _require_loaded(self.coord, context)
        try:
            self.coord.deregister(request.node_id, request.session_token)
        except CoordinatorError as e:
            _abort(context, e)
        self.metrics.registered.set(self.coord.registered_count())
        self.metrics.forget(request.node_id)
        return pb.DeregisterResponse()

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        _require_loaded(self.coord, context)
        try:
            round_ = self.coord.heartbeat(request.node_id, request.session_token)
        except (NotFound, FailedPrecondition):
            return pb.HeartbeatResponse(round=self.coord.round, registered=False)
        except CoordinatorError as e:
            _abort(context, e)
        return pb.HeartbeatResponse(round=round_, registered=True)

    def GetState(self, request: pb.GetStateRequest, context: grpc.ServicerContext) -> pb.GetStateResponse:
        _require_loaded(self.coord, context)
        after = request.page_token
        if len(after) > 64 or (after and not NAME_RE.match(after)):
            refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                Reason.BAD_VALUE,
                "bad_page_token: not a token of a GetState reply",
            )
        try:
            return self.state(request)
        except CoordinatorError as e:
            _abort(context, e)
