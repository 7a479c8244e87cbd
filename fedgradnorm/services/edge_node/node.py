"""The edge node: a long-lived gRPC client loop around the library's client step.

register (or resume) -> loop { FetchRound -> LocalClient.run_round -> SubmitUpdate -> save state }
with a heartbeat thread beside it. Torch, the data and the model are loaded once; nothing is
rebuilt per round. The aggregator being away is retried with capped exponential backoff; SIGTERM
stops the loop between steps, then the node deregisters.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc
import structlog
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fedgradnorm import wire
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc
from fedgradnorm._proto.fedgradnorm.v1.tensor_pb2 import DType
from fedgradnorm.algorithm import AlgorithmError, ClientConfig
from fedgradnorm.client import LocalClient, load_omega_
from fedgradnorm.data.partition import Allocation, ClientData, DataSource, load_clients, node_data
from fedgradnorm.errors import FatalError
from fedgradnorm.machine import resolve_device
from fedgradnorm.reasons import Reason
from fedgradnorm.services import netcheck, serde
from fedgradnorm.services.domain import Submission
from fedgradnorm.services.edge_node.config import EdgeConfig
from fedgradnorm.services.edge_node.store import Identity, NodeStateError, NodeStore
from fedgradnorm.services.refusals import reason_of
from fedgradnorm.wire_format import MESSAGE_LIMITS

log = structlog.get_logger("fedgradnorm.edge_node")
T = TypeVar("T")

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
TLS_FAILURES_FATAL = 5  # consecutive TLS failures before the node gives up (see _retry)
REJOIN = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED}
CHANNEL_OPTIONS: list[tuple[str, object]] = [
    *MESSAGE_LIMITS,
    # Ping the aggregator on idle links so that a stalled wireless link is noticed within ~10 s.
    # gRPC Python 1.85 waits for a ping's ack for grpc.http2.ping_timeout_ms (default 60 s), not
    # keepalive_timeout_ms: without it a dead link surfaced only after about 65 s, after the
    # FetchRound deadline on a loaded machine (tests/test_faults.py, dead-link test).
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def channel_options(max_backoff: float) -> list[tuple[str, object]]:
    """CHANNEL_OPTIONS with gRPC's reconnect backoff capped at ``max_backoff`` seconds (the edge
    node's and the relay's channels). gRPC waits 1 s, then 1.6 times longer after every failed
    connect, up to 120 s, and fails calls at once meanwhile: the caller's own retries cannot shorten
    it, so after a partition or an aggregator restart of a few minutes the client stayed away for up
    to two more minutes once the far end was back (a relay in a network namespace: 47 s after a
    150 s partition)."""
    cap = max(100, int(max_backoff * 1000))
    return [
        *CHANNEL_OPTIONS,
        ("grpc.initial_reconnect_backoff_ms", min(1000, cap)),
        ("grpc.max_reconnect_backoff_ms", cap),
    ]


SUBMIT_METHOD = f"/{pb.DESCRIPTOR.services_by_name['Aggregator'].full_name}/SubmitUpdate"
CHUNK_FIELD = pb.SubmitUpdateRequest.DESCRIPTOR.fields_by_name["chunk"].number


class EdgeNodeError(FatalError):
    """A condition the node cannot train through (bad global model, refused registration...)."""


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.step_seconds = Histogram(
            "fedgradnorm_edge_step_seconds",
            "Local client step wall time",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30),
            registry=r,
        )
        self.samples_per_second = Gauge(
            "fedgradnorm_edge_samples_per_second", "Training throughput of the last step", registry=r
        )
        self.train_loss = Gauge("fedgradnorm_edge_train_loss", "F_k of the last step", registry=r)
        self.loss_ratio = Gauge("fedgradnorm_edge_loss_ratio", "F~ of the last step", registry=r)
        self.test_loss = Gauge("fedgradnorm_edge_test_loss", "Test loss of the last evaluation", registry=r)
        self.test_metric = Gauge(
            "fedgradnorm_edge_test_metric", "Test metric of the last evaluation", ("metric",), registry=r
        )
        self.connected = Gauge("fedgradnorm_edge_connected", "1 while the aggregator answers, 0 otherwise", registry=r)
        self.round = Gauge("fedgradnorm_edge_round", "Last round this node submitted to", registry=r)
        self.reconnects = Counter(
            "fedgradnorm_edge_reconnects_total", "Retries after the aggregator was away", registry=r
        )
        self.left_out = Counter(
            "fedgradnorm_edge_updates_left_out_total",
            "Updates the aggregator accepted but its step did not use (norm far above the round's median)",
            registry=r,
        )


@dataclass
class Session:
    identity: Identity
    config: ClientConfig
    seed: int
    dtype: DType
    chunk_bytes: int
    heartbeat_interval: float
    initial_loss: float | None


class EdgeNode:
    def __init__(self, config: EdgeConfig, *, data: ClientData | None = None) -> None:
        self.config = config
        self.fed = config.spec
        self.task = self.fed.task(config.task)
        self.device = resolve_device(config.device)
        self.store = NodeStore(config.state_dir)
        self.metrics = NodeMetrics()
        self.stop_event = threading.Event()
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.identity = self.store.load_identity()  # fail fast on a corrupt state folder
        if self.identity is not None and (self.identity.task, self.identity.federation) != (config.task, self.fed.name):
            raise NodeStateError(
                f"{self.store.identity_path}: identity is for {self.identity.federation}/{self.identity.task}, "
                f"not {self.fed.name}/{config.task}"
            )
        if data is None:
            if config.data:  # the node's own data, all of it
                data = node_data(self.fed, self.task, config.data, config.test_fraction, config.seed)
            else:  # its share of the federation's synthetic set (a simulated deployment)
                source = DataSource(self.fed, None, config.seed, config.synthetic_size)
                alloc = Allocation.parse(config.allocation, config.test_fraction)
                data = load_clients(source, self.fed.task_names, alloc, config.seed)[config.task]
        self.data = data
        self.shared = self.fed.build_shared(0).to(self.device)  # weights come from the aggregator every round
        self.architecture = self.fed.architecture
        self.expected = {k: tuple(v.shape) for k, v in self.shared.named_parameters()}
        self.model_written: str | None = None  # the personalized model's file, once training has ended
        self.client: LocalClient | None = None
        self.channel = config.tls().channel(config.aggregator, channel_options(config.max_backoff))
        self.stub = pb_grpc.AggregatorStub(self.channel)
        # SubmitUpdate with requests that are already serialized (see _submit_stream).
        self._submit_update = self.channel.stream_unary(
            SUBMIT_METHOD, request_serializer=bytes, response_deserializer=pb.SubmitUpdateResponse.FromString
        )
        self.session: Session | None = None
        self.rounds_done = 0
        self.updates_left_out = 0  # accepted updates that the aggregator's step did not use
        self._unconfirmed: int | None = None  # the round of the last accepted update, until a later header
        self._zero_gradient: dict[str, torch.Tensor] | None = None
        self._needs_register = threading.Event()
        self._waiting: grpc.Call | None = None  # the FetchRound waiting for its header

    # -- connection ---------------------------------------------------------------------------

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        """Call until it succeeds or the node is stopped; back off while the aggregator is away.

        A TLS misconfiguration (wrong server name or CA, plaintext against TLS, a refused client
        certificate) looks like an aggregator that is away, but no retry fixes it: after
        TLS_FAILURES_FATAL such failures in a row the node stops with what to check."""
        delay = 0.2
        tls_failures = 0
        while True:
            try:
                result = call()
                self.metrics.connected.set(1)
                return result
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or self.stop_event.is_set():
                    raise
                details = e.details() or ""
                hint = self._tls_problem(details) if e.code() == grpc.StatusCode.UNAVAILABLE else None
                tls_failures = tls_failures + 1 if hint else 0
                self.metrics.connected.set(0)
                self.metrics.reconnects.inc()
                log.warning(
                    "aggregator.unreachable",
                    call=what,
                    target=self.config.aggregator,
                    code=e.code().name,
                    details=details,
                    retry_in=round(delay, 2),
                    **({"tls_problem": hint} if hint else {}),
                )
                if hint and tls_failures >= TLS_FAILURES_FATAL:
                    raise EdgeNodeError(
                        f"cannot connect to the aggregator at {self.config.aggregator}, TLS does not match "
                        f"({tls_failures} attempts): {hint}; gRPC: {details}"
                    ) from None
                if self.stop_event.wait(delay * (0.5 + random.random() / 2)):
                    raise
                delay = min(delay * 2, self.config.max_backoff)

    def _tls_problem(self, details: str) -> str | None:
        """What to check if ``details`` shows a TLS misconfiguration, else None."""
        if netcheck.tls_failure(details):
            return netcheck.tls_hint(details)
        if netcheck.closed_on_connect(details):
            cfg = self.config
            return netcheck.probe_tls(
                cfg.aggregator, insecure=cfg.insecure, ca=cfg.tls_ca, cert=cfg.tls_cert, key=cfg.tls_key
            )
        return None

    def register(self) -> Session:
        cfg = self.config
        ident = self.identity

        def call() -> pb.RegisterResponse:
            resp: pb.RegisterResponse = self.stub.Register(
                pb.RegisterRequest(
                    enrollment_token=cfg.enrollment_token,
                    node_name=cfg.node_name,
                    federation=self.fed.name,
                    network=serde.network_architecture(self.architecture),
                    task=cfg.task,
                    num_samples=len(self.data.train),
                    node_id=ident.node_id if ident else "",
                    session_token=ident.session_token if ident else "",
                ),
                timeout=30,
            )
            return resp

        try:
            resp = self._retry("Register", call)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND or ident is None:
                raise EdgeNodeError(f"registration refused: {e.code().name}: {e.details()}") from e
            # The aggregator does not know the stored identity (it lost the enrolment, e.g. a crash
            # before its next commit): enrol afresh; the personal head and F_0 stay with the node.
            log.warning("identity.unknown", node=ident.node_id, why=e.details())
            self.identity = None
            return self.register()
        assert isinstance(resp, pb.RegisterResponse)
        if resp.network_fingerprint != self.architecture.fingerprint:
            raise EdgeNodeError(
                f"the aggregator trains another shared network ({resp.network}, {resp.network_fingerprint}) than "
                f"this node's federation ({self.fed.network.ref}, {self.architecture.fingerprint})"
            )
        identity = Identity(resp.node_id, resp.session_token, cfg.aggregator, self.fed.name, cfg.task)
        self.store.save_identity(identity)
        self.identity = identity
        session = Session(
            identity=identity,
            config=serde.round_config(resp.round_config),
            seed=resp.seed,
            dtype=wire.DTYPE_BY_NAME[cfg.wire_dtype] if cfg.wire_dtype else resp.wire_dtype,
            chunk_bytes=resp.max_chunk_bytes,
            heartbeat_interval=resp.heartbeat_interval_seconds,
            initial_loss=resp.initial_loss if resp.HasField("initial_loss") else None,
        )
        self._build_client(session)
        assert self.client is not None
        # F_0 is the aggregator's: a node it has no F_0 for starts afresh (its next update has F~ = 1).
        self.client.initial_loss = session.initial_loss
        log.info("node.registered", node=identity.node_id, task=cfg.task, resumed=resp.resumed, weight=resp.weight)
        self.session = session
        return session

    def _build_client(self, session: Session) -> None:
        if self.client is not None and self.client.config == session.config and self.client.seed == session.seed:
            return
        client = LocalClient(
            session.identity.node_id, self.fed, self.data, session.config, session.seed, device=self.device
        )
        blob = self.store.load_client()
        if blob is not None:
            try:
                client.load_state_bytes(blob)
            except Exception as e:
                raise NodeStateError(
                    f"{self.store.client_path}: corrupt personal model ({type(e).__name__}: {e})"
                ) from e
        self.client = client
        reference = client.reference()
        if reference is not None:  # the level its test loss and metric must beat to have learnt anything
            log.info(
                "node.reference_level",
                test_loss=round(reference.test_loss, 6),
                metric=reference.metric,
                value=round(reference.value, 6),
            )

    # -- the round loop -------------------------------------------------------------------------

    def fetch(self) -> tuple[pb.RoundHeader, dict[str, torch.Tensor] | None]:
        s = self.session
        assert s is not None
        stream = self.stub.FetchRound(
            pb.FetchRoundRequest(
                node_id=s.identity.node_id,
                session_token=s.identity.session_token,
                wait_seconds=self.config.fetch_wait,
                dtype=s.dtype,
                without_final_model=not self.config.write_model,
            ),
            timeout=self.config.fetch_wait + 60,
        )
        self._waiting = stream  # stop() cancels a long-poll, rather than waiting fetch_wait out
        try:
            first = next(stream)
        finally:
            self._waiting = None
        if first.WhichOneof("payload") != "header":
            raise EdgeNodeError("aggregator sent a chunk before the round header")
        header = first.header
        if header.status not in (pb.ROUND_STATUS_OPEN, pb.ROUND_STATUS_FINISHED) or not header.tensors:
            stream.cancel()
            return header, None
        try:
            asm = wire.TensorAssembler.from_header(
                header,
                self.expected,
                max_bytes=4 * sum(v.numel() for v in self.shared.parameters()),
                check_finite=True,
            )
            for msg in stream:
                asm.feed(msg.chunk.data)
            omega = asm.finish()
        except wire.WireError as e:
            stream.cancel()
            what = (
                "final model" if header.status == pb.ROUND_STATUS_FINISHED else f"global model of round {header.round}"
            )
            raise EdgeNodeError(f"{what} refused: {e}") from e
        return header, omega

    def train(self, round_: int, omega: dict[str, torch.Tensor]) -> Submission:
        """The library's client step on omega_k: the round's update, built once and sent as is."""
        assert self.client is not None and self.session is not None
        node_id = self.session.identity.node_id
        if self.config.no_train:
            if self._zero_gradient is None:
                self._zero_gradient = {k: torch.zeros_like(v) for k, v in omega.items()}
            return Submission(node_id, round_, self._zero_gradient, 1.0, 1.0, 1.0, self.client.num_samples)
        load_omega_(self.shared, omega)
        t0 = time.perf_counter()
        try:
            result, evaluation = self.client.run_round(self.shared, round_)
        except AlgorithmError as e:  # a loss that overflowed: nothing this node could send would help
            scale = f", its loss x{self.task.loss_scale:g}" if self.task.loss_scale != 1.0 else ""
            raise EdgeNodeError(f"round {round_}: {e} (task {self.task.name}{scale}); the node stops") from e
        dt = time.perf_counter() - t0
        self.metrics.step_seconds.observe(dt)
        steps = self.session.config.tau_h + self.session.config.tau_omega
        self.metrics.samples_per_second.set(steps * min(self.session.config.batch_size, self.client.num_samples) / dt)
        self.metrics.train_loss.set(result.loss)
        self.metrics.loss_ratio.set(result.loss_ratio)
        self.metrics.test_loss.set(evaluation.test_loss)
        self.metrics.test_metric.labels(evaluation.metric).set(evaluation.value)
        return Submission(
            node_id=node_id,
            round=round_,
            gradient=result.gradient,
            loss=result.loss,
            initial_loss=result.initial_loss,
            loss_ratio=result.loss_ratio,
            num_samples=self.client.num_samples,
            test_loss=evaluation.test_loss,
            test_metrics={evaluation.metric: evaluation.value},
        )

    def _submit_stream(self, update: Submission) -> Iterator[bytes]:
        """Serialized SubmitUpdateRequest messages: the header, then the chunks of the gradient
        (encoded by wire.iter_chunk_messages with one copy of the payload, not protobuf's three)."""
        s = self.session
        assert s is not None
        header = serde.submit_header(update, s.identity.session_token, s.dtype)
        yield pb.SubmitUpdateRequest(header=header).SerializeToString()
        yield from wire.iter_chunk_messages(update.gradient, s.dtype, s.chunk_bytes, CHUNK_FIELD)

    def submit(self, update: Submission) -> bool:
        try:
            self._submit_update(self._submit_stream(update), timeout=120)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS):
                log.warning("update.not_used", round=update.round, code=e.code().name, why=e.details())
                return False
            raise
        return True

    def run_once(self) -> bool:
        """Fetch one round (waiting up to fetch_wait), train, submit. False when training is over."""
        header, omega = self._retry("FetchRound", self.fetch)
        self._check_used(header)
        if header.status == pb.ROUND_STATUS_FINISHED:
            if omega is not None:
                self.write_model(header.round, omega)
            return False
        if omega is None:
            return True
        structlog.contextvars.bind_contextvars(round=header.round, node=self.config.node_name)
        try:
            update = self.train(header.round, omega)
            if self.stop_event.is_set():
                log.info("round.abandoned", why="stopping")
                return False
            accepted = self._retry("SubmitUpdate", lambda: self.submit(update))
            if accepted:
                assert self.client is not None
                if not self.config.no_train:
                    self.store.save_client(self.client.state_bytes())
                self.rounds_done += 1
                self._unconfirmed = header.round
                self.metrics.round.set(header.round)
                log.info("round.submitted", loss=round(update.loss, 5), ratio=round(update.loss_ratio, 5))
        finally:
            structlog.contextvars.unbind_contextvars("round", "node")
        return True

    def _check_used(self, header: pb.RoundHeader) -> None:
        """Once a header of a later round arrives, learn whether the step of the round this node last
        submitted to used its update (the aggregator leaves out one whose norm is far above the
        others'; a relay does not say)."""
        r = self._unconfirmed
        if r is None or header.round <= r or not header.HasField("last_used_round"):
            return
        self._unconfirmed = None
        if header.last_used_round < r:
            self.updates_left_out += 1
            self.metrics.left_out.inc()
            log.warning(
                "update.left_out",
                round=r,
                left_out=self.updates_left_out,
                why="the aggregator's step did not use it: its norm was far above the round's median "
                "(the aggregator logs update.dropped); check this node's loss scale and data",
            )

    def write_model(self, rounds: int, omega: dict[str, torch.Tensor]) -> str:
        """The personalized model: the final omega and this node's head, evaluated on its test split
        and written to model_dir (fedgradnorm.export); returns the model file."""
        from fedgradnorm.export import save_model

        if self.client is None:
            raise EdgeNodeError("training ended before this node trained a head: no model to write")
        load_omega_(self.shared, omega)
        evaluation = self.client.evaluate(self.shared)
        metrics = {"test_loss": evaluation.test_loss, evaluation.metric: evaluation.value}
        path = save_model(
            self.config.model_path,
            federation=self.fed,
            task=self.task,
            shared=self.shared,
            head=self.client.head,
            round_=rounds,
            metrics=metrics,
            node=self.config.node_name,
        )
        self.model_written = str(path)
        log.info("model.written", path=str(path), rounds=rounds, **{k: round(v, 6) for k, v in metrics.items()})
        return str(path)

    def _heartbeat_loop(self) -> None:
        while not self.stop_event.is_set():
            s = self.session
            interval = s.heartbeat_interval if s else 5.0
            if self.stop_event.wait(interval):
                return
            if s is None:
                continue
            try:
                resp = self.stub.Heartbeat(
                    pb.HeartbeatRequest(node_id=s.identity.node_id, session_token=s.identity.session_token),
                    timeout=interval,
                )
                self.metrics.connected.set(1)
                if not resp.registered:
                    self._needs_register.set()
            except grpc.RpcError as e:
                self.metrics.connected.set(0)
                log.debug("heartbeat.failed", code=e.code().name)

    def run(self, max_rounds: int = 0) -> int:
        """Register and train until the aggregator finishes, ``max_rounds`` rounds, or stop()."""
        self.register()
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        beat.start()
        try:
            while not self.stop_event.is_set():
                if self._needs_register.is_set():
                    self._needs_register.clear()
                    self.register()
                try:
                    if not self.run_once():
                        break
                except grpc.RpcError as e:
                    if e.code() in REJOIN or reason_of(e) is Reason.DEREGISTERED:
                        log.warning("node.rejoining", code=e.code().name, why=e.details())
                        self.register()
                        continue
                    if self.stop_event.is_set():
                        break
                    raise
                if max_rounds and self.rounds_done >= max_rounds:
                    break
        finally:
            self.stop_event.set()
            beat.join(timeout=5)
            self.deregister()
            self.channel.close()
        return self.rounds_done

    def deregister(self) -> None:
        s = self.session
        if s is None:
            return
        try:
            self.stub.Deregister(
                pb.DeregisterRequest(node_id=s.identity.node_id, session_token=s.identity.session_token), timeout=5
            )
            log.info("node.deregistered", node=s.identity.node_id)
        except grpc.RpcError as e:
            log.warning("deregister.failed", code=e.code().name)

    def stop(self) -> None:
        """Stop between steps; a FetchRound long-poll in flight is cancelled at once. Safe from a
        signal handler: the cancel runs on a thread of its own (the handler may interrupt the very
        thread that holds the call's lock)."""
        self.stop_event.set()
        waiting = self._waiting
        if waiting is not None:
            threading.Thread(target=waiting.cancel, name="cancel-fetch", daemon=True).start()
