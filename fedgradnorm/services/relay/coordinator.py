"""The relay's round machine: the aggregator's round as the site's nodes see it, one level down.

Towards its nodes a relay answers exactly like the aggregator (the same servicer serves both, over
:class:`RelayCoordinator` here instead of the aggregator's RoundCoordinator): it authenticates the
nodes with the token hashes the aggregator gave it, hands out omega_k, and admits updates with the
aggregator's own checks (fedgradnorm.services.aggregator.admission). Towards the aggregator three
threads run:

* the round loop: FetchRelayRound (omega once per site) -> wait for the weights (FetchWeights) ->
  the partial sum sum_i (p_i / N) g_i over its nodes (fedgradnorm.algorithm.weighted_sum, in node
  id order) -> SubmitPartialSum; again for a new attempt, until the round is closed;
* the reporter: the scalars of accepted updates go up as they arrive (ReportUpdates), a batch at a
  time, so the aggregator sees the round complete as soon as the last node has sent;
* the heartbeat: which nodes called since the last one (they count as seen at the aggregator),
  and the member list when it changed.

The relay keeps nothing on disk: identities, p and F_0 live at the aggregator; after a restart the
relay attaches again and learns its members.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import structlog

from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm.algorithm import ServerConfig, TensorDict, weighted_sum
from fedgradnorm.models import Architecture
from fedgradnorm.reasons import Reason
from fedgradnorm.services import serde
from fedgradnorm.services.aggregator.admission import admit, check_entry, check_initial_loss
from fedgradnorm.services.aggregator.config import CoordinatorConfig
from fedgradnorm.services.aggregator.errors import (
    CoordinatorError,
    Unavailable,
)
from fedgradnorm.services.aggregator.membership import hash_token, verify_token
from fedgradnorm.services.aggregator.servicer import STATUS
from fedgradnorm.services.domain import Registration, RelayTicket, RoundTicket, Submission
from fedgradnorm.services.refusals import reason_of
from fedgradnorm.services.relay.config import RelayConfig
from fedgradnorm.services.relay.upstream import Attachment, Stopped, Upstream

log = structlog.get_logger("fedgradnorm.relay")

CODE_ERRORS = {code: kind for kind, code in STATUS.items()}


def upstream_error(e: grpc.RpcError) -> CoordinatorError:
    """The aggregator's refusal of a node's call, as the relay passes it on (same code and reason).
    A refusal of the relay's own session (UNKNOWN_RELAY: the aggregator restarted, or the relay was
    cut off beyond heartbeat_timeout) is not the node's: it is UNAVAILABLE (the node retries while the
    relay attaches again), never the NOT_FOUND on which a node drops its identity and enrols afresh."""
    code = e.code()
    if reason_of(e) is Reason.UNKNOWN_RELAY:
        return Unavailable(f"the relay is attaching to the aggregator again: {e.details()}", Reason.UPSTREAM)
    kind = CODE_ERRORS.get(code, Unavailable)
    reason = reason_of(e) or (Reason.UPSTREAM if kind is Unavailable else Reason.BAD_VALUE)
    details = e.details() or code.name
    return kind(details if kind is not Unavailable else f"the aggregator is unreachable: {details}", reason)


@dataclass
class _Round:
    ticket: RelayTicket
    submitted: dict[str, Submission] = field(default_factory=dict)  # accepted here, with the gradient
    pending: list[Submission] = field(default_factory=list)  # accepted, scalars not yet reported


class RelayCoordinator:
    def __init__(self, config: RelayConfig) -> None:
        self.relay = config
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.upstream = Upstream(config, self._stop, self._attached)
        spec = config.spec
        # omega's names and shapes, from the spec's architecture (the same network the aggregator builds)
        self._expected = {name: shape for name, shape, _ in spec.architecture.parameters}
        self._config: CoordinatorConfig | None = None
        self._server_config: ServerConfig | None = None
        self._members: dict[str, str] = {}  # node id -> sha256 of its session token
        self._members_version = -1
        self._seen: set[str] = set()  # nodes that called since the last heartbeat
        self._recent: dict[str, str] = {}  # registered while a heartbeat was on its way: kept over its list
        self._round: _Round | None = None
        self._final: RelayTicket | None = None
        self._upstream_round = 0
        self._threads: list[threading.Thread] = []
        self.stats = {"rounds": 0, "partial_sums": 0, "accepted": 0, "refused_upstream": 0}

    # -- life cycle -------------------------------------------------------------------------

    def _attached(self, a: Attachment) -> None:
        s, h = a.settings, a.hyperparameters
        config = CoordinatorConfig(
            federation=self.relay.federation,
            algorithm=s.algorithm,  # type: ignore[arg-type]
            gamma=h.gamma,
            alpha=h.alpha,
            beta=s.round_config.beta,
            tau_h=s.round_config.tau_h,
            tau_omega=s.round_config.tau_omega,
            batch_size=s.round_config.batch_size,
            seed=s.seed,
            heartbeat_interval=s.heartbeat_interval_seconds,
            heartbeat_timeout=6 * s.heartbeat_interval_seconds,
            min_nodes=max(1, h.min_nodes),
            max_nodes=max(self.relay.max_nodes, h.min_nodes, 1),
            round_timeout=h.round_timeout_seconds or 60.0,
        )
        with self._cond:
            self._config = config
            self._server_config = ServerConfig(
                algorithm=config.algorithm,
                gamma=h.gamma,
                alpha=h.alpha,
                beta=config.beta,
                omega_tilde=tuple(s.omega_tilde),
            )
            self._set_members_locked(dict(a.members), a.members_version)
            self._cond.notify_all()

    def _set_members_locked(self, members: dict[str, str], version: int) -> None:
        """The aggregator's list of this relay's registered nodes. A participant of the open round
        that is no longer on it (dropped: silent beyond heartbeat_timeout, or deregistered) is no
        longer a participant there either (the aggregator discards it from the round, and resuming
        does not put it back): it leaves this round here too, else after resuming it would fetch
        omega, train, and send an update the aggregator can only refuse (too late, or not a
        participant), while the node takes it for its first accepted update."""
        self._members = members
        self._members_version = version
        r = self._round
        if r is not None:
            for node_id in [n for n in r.ticket.participants if n not in members and n not in r.submitted]:
                del r.ticket.participants[node_id]

    def start(self) -> None:
        """Attach (retrying while the aggregator is away), then run the three loops."""
        self.upstream.attach()
        for target, name in (
            (self._round_loop, "relay-rounds"),
            (self._report_loop, "relay-reports"),
            (self._heartbeat_loop, "relay-heartbeat"),
        ):
            t = threading.Thread(target=self._guarded(target), name=name, daemon=True)
            t.start()
            self._threads.append(t)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self.upstream.close()  # cancels the long-polls in flight, so the loops see the stop at once
        for t in self._threads:
            t.join(timeout=10)

    def _guarded(self, loop: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            while not self._stop.is_set():
                try:
                    loop()
                    return
                except Stopped:
                    return
                except Exception as e:  # a refusal or a bug: logged, and the loop starts over
                    if self._stop.is_set():
                        return
                    log.exception("relay.loop_failed", loop=loop.__name__, error=f"{type(e).__name__}: {e}")
                    self._stop.wait(1.0)

        return run

    # -- what the servicer reads -------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._config is not None

    @property
    def config(self) -> CoordinatorConfig:
        assert self._config is not None
        return self._config

    @property
    def server_config(self) -> ServerConfig:
        assert self._server_config is not None
        return self._server_config

    @property
    def round(self) -> int:
        return self._upstream_round

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._expected)

    def model_bytes(self) -> int:
        return sum(4 * math.prod(s) for s in self._expected.values())

    def registered_count(self) -> int:
        with self._cond:
            return len(self._members)

    def get_state(self, request: pb.GetStateRequest) -> pb.GetStateResponse:
        """GetState at a relay: the aggregator's answer (the state lives there)."""
        try:
            return self.upstream.get_state(request)
        except grpc.RpcError as e:
            raise upstream_error(e) from None

    # -- node calls -------------------------------------------------------------------------

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
    ) -> Registration:
        """Enrol or resume the node at the aggregator, through this relay."""
        request = pb.RegisterRequest(
            enrollment_token=enrollment_token,
            node_name=name,
            federation=federation,
            task=task,
            num_samples=num_samples,
            node_id=node_id,
            session_token=session_token,
            network=serde.network_architecture(network),
        )
        try:
            resp = self.upstream.register_node(request, peer)
        except grpc.RpcError as e:
            raise upstream_error(e) from None
        with self._cond:
            self._members[resp.node_id] = self._recent[resp.node_id] = hash_token(resp.session_token)
            self._seen.add(resp.node_id)
        return Registration(
            resp.node_id,
            resp.session_token,
            resp.resumed,
            resp.initial_loss if resp.HasField("initial_loss") else None,
            resp.weight,
        )

    def _authenticate_locked(self, node_id: str, token: str) -> None:
        verify_token("node", node_id, token, self._members.get(node_id), "register first")
        self._seen.add(node_id)

    def authenticate(self, node_id: str, token: str) -> None:
        with self._cond:
            self._authenticate_locked(node_id, token)

    def heartbeat(self, node_id: str, token: str) -> int:
        with self._cond:
            self._authenticate_locked(node_id, token)
            return self._upstream_round

    def deregister(self, node_id: str, token: str) -> None:
        with self._cond:
            self._authenticate_locked(node_id, token)
        try:
            self.upstream.deregister_node(node_id, token)
        except grpc.RpcError as e:
            raise upstream_error(e) from None
        with self._cond:
            self._members.pop(node_id, None)
            self._seen.discard(node_id)

    def fetch_round(
        self, node_id: str, token: str, wait_seconds: float, alive: Callable[[], bool] = lambda: True
    ) -> RoundTicket | None:
        end = time.monotonic() + max(0.0, min(wait_seconds, 300.0))
        with self._cond:
            while True:
                self._authenticate_locked(node_id, token)
                r = self._round
                if (
                    r is not None
                    and node_id in r.ticket.participants
                    and node_id not in r.submitted
                    and time.time() < r.ticket.deadline_unix
                ):
                    return RoundTicket(r.ticket.round, r.ticket.deadline_unix, r.ticket.omega)
                if self._final is not None:
                    return RoundTicket(self._final.round, 0.0, self._final.omega, final=True)
                remaining = end - time.monotonic()
                if remaining <= 0 or self._stop.is_set() or not alive():
                    return None
                self._cond.wait(min(remaining, 1.0))

    def _round_for_locked(self, node_id: str, token: str, round_: int) -> _Round:
        self._authenticate_locked(node_id, token)
        r = self._round if self._round and time.time() <= self._round.ticket.deadline_unix else None
        check_entry(
            node_id, round_, r.ticket.round if r else None, r.submitted if r else (), r.ticket.participants if r else ()
        )
        assert r is not None
        return r

    def check_submit(self, node_id: str, token: str, round_: int) -> float:
        with self._cond:
            return self._round_for_locked(node_id, token, round_).ticket.deadline_unix

    def submit(self, token: str, sub: Submission) -> None:
        """Admit an update as the aggregator would; keep its gradient, queue its scalars."""
        with self._cond:
            r = self._round_for_locked(sub.node_id, token, sub.round)
            omega = r.ticket.omega
        sub = admit(sub, omega, self.server_config.omega_tilde)  # the expensive part, without the lock
        with self._cond:
            r = self._round_for_locked(sub.node_id, token, sub.round)
            check_initial_loss(r.ticket.participants[sub.node_id], sub)  # F_0 as the aggregator stored it
            if r.ticket.participants[sub.node_id] is None:
                r.ticket.participants[sub.node_id] = sub.initial_loss
            r.submitted[sub.node_id] = sub
            r.pending.append(replace(sub, gradient={}))
            self.stats["accepted"] += 1
            self._cond.notify_all()

    # -- towards the aggregator ---------------------------------------------------------------

    def _round_loop(self) -> None:
        after = 0
        while not self._stop.is_set():
            ticket = self.upstream.fetch_round(after, self.relay.max_fetch_wait, self._expected)
            if ticket is None:
                continue
            if ticket.final:
                with self._cond:
                    self._final, self._round, self._upstream_round = ticket, None, ticket.round
                    self._cond.notify_all()
                log.info("relay.training_done", rounds=ticket.round)
                self._stop.wait()  # the final model is served until the relay stops
                return
            after = ticket.opening
            with self._cond:
                self._round = _Round(ticket)
                self._upstream_round = ticket.round
                self._cond.notify_all()
            log.info("relay.round", round=ticket.round, participants=len(ticket.participants))
            try:
                self._close(ticket)
            finally:
                with self._cond:
                    if self._round is not None and self._round.ticket is ticket:
                        self._round = None  # the gradients go
                    self._cond.notify_all()
            self.stats["rounds"] += 1

    def _close(self, ticket: RelayTicket) -> None:
        """Answer each attempt's weights with the partial sum, until the round is closed."""
        attempt = 0
        while not self._stop.is_set():
            offer = self.upstream.fetch_weights(ticket.opening, attempt, self.relay.max_fetch_wait)
            if offer.closed:
                return
            if not offer.ready:
                continue
            attempt = offer.attempt
            with self._cond:
                r = self._round
                grads: dict[str, TensorDict] = {}
                if r is not None and r.ticket is ticket:
                    grads = {n: dict(r.submitted[n].gradient) for n, _, _ in offer.scales if n in r.submitted}
            missing = [n for n, _, _ in offer.scales if n not in grads]
            if missing:  # never: the aggregator offers only what this relay reported
                log.error("relay.offer_unknown_nodes", nodes=missing[:8], opening=ticket.opening)
                continue
            partial = weighted_sum(((scale, grads[n]) for n, scale, _ in offer.scales), ticket.omega)
            try:
                self.upstream.submit_partial(ticket.opening, attempt, partial)
                self.stats["partial_sums"] += 1
            except grpc.RpcError as e:  # e.g. the attempt was superseded meanwhile: ask again
                log.warning("relay.partial_sum_refused", code=e.code().name, details=e.details(), attempt=attempt)

    def _report_loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while not self._stop.is_set() and (self._round is None or not self._round.pending):
                    self._cond.wait(1.0)
                if self._stop.is_set():
                    return
            if self.relay.report_interval:
                self._stop.wait(self.relay.report_interval)  # let a batch gather
            with self._cond:
                r = self._round
                if r is None:
                    continue
                batch, r.pending = r.pending[:10_000], r.pending[10_000:]
                round_ = r.ticket.round
            try:
                resp = self.upstream.report(round_, batch)
            except grpc.RpcError as e:  # the round is no longer open there: these updates are late
                log.warning("relay.report_refused", round=round_, updates=len(batch), details=e.details())
                continue
            if resp.refused:
                self.stats["refused_upstream"] += len(resp.refused)
                log.warning(
                    "relay.updates_refused",
                    round=round_,
                    refused=[(u.node_id, u.reason) for u in resp.refused[:8]],
                    count=len(resp.refused),
                )
                with self._cond:
                    if self._round is r:
                        for u in resp.refused:
                            r.submitted.pop(u.node_id, None)

    def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            interval = min(1.0, self.config.heartbeat_interval / 2) if self._config else 1.0
            with self._cond:
                seen, self._seen = sorted(self._seen), set()
                version = self._members_version
                self._recent = {}
            resp = self.upstream.heartbeat(seen, version)
            with self._cond:
                self._upstream_round = max(self._upstream_round, resp.round)
                if resp.members_changed:
                    self._set_members_locked({**serde.members_of(resp.members), **self._recent}, resp.members_version)
                    self._cond.notify_all()
            self._stop.wait(interval)

    def describe(self) -> dict[str, Any]:
        with self._cond:
            return {"members": len(self._members), "round": self._upstream_round, **self.stats}
