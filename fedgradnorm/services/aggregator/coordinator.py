"""The round coordinator: the aggregator's round state machine around the library's server step.

No gRPC here. One driver thread owns every round transition (open, close, step, commit); RPC
threads only register, wait on the condition, and deposit updates. Everything else has a module of
its own: who the members are (membership.py), whether an update may enter (admission.py), writing
the state beside the next round (commit.py), refusals (errors.py), the values handed out (domain.py).

Round life cycle::

    WAITING --(enough live nodes)--> OPEN --(all participants submitted | deadline)--> STEPPING
    STEPPING --(server step + atomic commit)--> WAITING     (or DONE after the last round)
    STEPPING --(the step would poison the state)--> WAITING  (round refused, state kept, reopened)
    STEPPING --(commit failed: disk full, read-only)--> HALTED  (retries the commit; never advances)
    any     --(the driver itself raised: a bug)--> HALTED  (for good: readiness NOT_SERVING)

A live node is a registered one that has fetched or sent a heartbeat since it registered: a name
that only registers never holds a round open.

Lock discipline: ``_cond`` guards every field below and the membership; methods named ``*_locked``
run with it held. The server step and the commit's file write run without it.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from fedgradnorm.algorithm import (
    AlgorithmError,
    ServerConfig,
    ServerState,
    StepResult,
    TensorDict,
    WeightPlan,
    apply_step,
    norm_outliers,
    plan_weights,
    weighted_sum,
)
from fedgradnorm.finite import all_finite
from fedgradnorm.models import Architecture
from fedgradnorm.reasons import Reason
from fedgradnorm.services.aggregator.admission import (
    admit,
    admit_relayed,
    check_entry,
    check_initial_loss,
    max_norm,
)
from fedgradnorm.services.aggregator.commit import CommitPipeline
from fedgradnorm.services.aggregator.config import NAME_RE, CoordinatorConfig
from fedgradnorm.services.aggregator.errors import (
    AlreadyExists,
    CoordinatorError,
    FailedPrecondition,
    InvalidArgument,
)
from fedgradnorm.services.aggregator.membership import Membership
from fedgradnorm.services.aggregator.relays import Offer, RelaySessions
from fedgradnorm.services.aggregator.roundlog import round_records
from fedgradnorm.services.aggregator.store import MemberRecord, Snapshot, StateError, StateStore
from fedgradnorm.services.domain import (
    NodeView,
    Phase,
    Registration,
    RelayTicket,
    RoundSummary,
    RoundTicket,
    StateView,
    Submission,
    WeightsOffer,
)
from fedgradnorm.tasks import derive_seed

log = structlog.get_logger("fedgradnorm.aggregator")

GETSTATE_PAGE = 1000  # nodes per GetState reply, at most


@dataclass
class _OpenRound:
    number: int
    participants: set[str]
    deadline_unix: float
    deadline_mono: float
    opened_mono: float
    omega: TensorDict
    opening: int = 0  # counts openings: a refused round opens again with the same number
    via: dict[str, str] = field(default_factory=dict)  # participant -> the relay it is behind
    submitted: dict[str, Submission] = field(default_factory=dict)


class RoundCoordinator:
    """Holds omega and p; runs rounds; commits the state after every step."""

    def __init__(
        self,
        config: CoordinatorConfig,
        store: StateStore,
        *,
        wall_clock: Callable[[], float] = time.time,
        listeners: list[Callable[[RoundSummary], None]] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self._wall = wall_clock
        self._cond = threading.Condition()
        self._phase = Phase.WAITING
        self._state: ServerState | None = None
        self._loaded = False
        self.members = Membership(config, wall_clock)
        self._commits = CommitPipeline(store, list(listeners or []), self._wake)
        self._open: _OpenRound | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server_config: ServerConfig | None = None
        self._expected: dict[str, tuple[int, ...]] = {}
        self.halted_reason: str | None = None
        self._crashed = False  # the driver raised: halted until the process is restarted
        self.refused_rounds = 0  # rounds whose step would have made the state non-finite
        self.dropped_updates = 0  # accepted updates left out at the close by the norm bound
        self.relays = RelaySessions()
        # Openings are numbered from the start time in milliseconds, so that they keep increasing
        # across restarts: a relay waits for an opening after the last one it served.
        self._openings = int(wall_clock() * 1000)
        self._offer: Offer | None = None  # the weights offered to relays while a round closes
        self.lost_relay_updates = 0  # relayed updates left out because their relay's partial sum never came

    # -- life cycle -------------------------------------------------------------------------

    def load(self) -> None:
        """Resume from the store, or initialise omega from the seed. Raises StateError."""
        snap = self.store.load()
        if snap is None:
            shared = self.config.spec.build_shared(self.config.seed)
            self._state = ServerState.initial(dict(shared.named_parameters()))
            log.info(
                "state.initialised", network=self.config.network, seed=self.config.seed, store=self.store.describe()
            )
            self._commits.write(self._snapshot())
        else:
            if snap.identity != self.config.identity():
                raise StateError(
                    f"{self.store.describe()}: state belongs to {snap.identity}, not {self.config.identity()}; "
                    "use another state directory or the original configuration"
                )
            self._state = snap.server
            self.members.restore(snap.members)
            self._commits.restore(snap)
            log.info("state.resumed", round=snap.server.round, nodes=len(snap.members), store=self.store.describe())
        self._server_config = self.config.server_config(self._state.omega)
        self._expected = {k: tuple(v.shape) for k, v in self._state.omega.items()}
        self._omega_tilde = self._server_config.omega_tilde
        self._max_norm = max_norm(self._expected)
        missing = [n for n in self._server_config.omega_tilde if n not in self._expected]
        if missing:
            raise ValueError(f"omega_tilde names {missing} are not parameters of {self.config.network}")
        if self.config.rounds and self._state.round >= self.config.rounds:
            self._phase = Phase.DONE
        self._loaded = True  # last: RPCs are served only once every field above is set

    def start(self) -> None:
        if self._state is None:
            self.load()
        self._thread = threading.Thread(target=self._drive, name="round-driver", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._commits.wait(timeout=60)  # let the last round's state land before the process goes

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- queries ----------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        """The state is loaded and everything derived from it is set: RPCs may be served."""
        return self._loaded

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def round(self) -> int:
        assert self._state is not None
        return self._state.round

    @property
    def committed_round(self) -> int:
        """The round of the state last written to the store (-1 before the first commit); while a
        round's commit is being written beside the next round, one less than ``round``."""
        return self._commits.committed_round

    @property
    def last_round_records(self) -> list[dict[str, Any]]:
        """The metrics.jsonl rows of the last committed round (empty before the first)."""
        return list(self._commits.last_records)

    @property
    def server_config(self) -> ServerConfig:
        assert self._server_config is not None
        return self._server_config

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of omega in order: what every submitted gradient must match."""
        return dict(self._expected)

    def model_bytes(self) -> int:
        return sum(4 * math.prod(s) for s in self._expected.values())

    def registered_count(self) -> int:
        with self._cond:
            return self.members.registered_count()

    def view(self, page_size: int = GETSTATE_PAGE, after: str = "") -> StateView:
        """A consistent copy of the state for GetState: at most ``page_size`` nodes (capped at
        GETSTATE_PAGE) whose ids sort after ``after``, and the id to continue from."""
        size = GETSTATE_PAGE if page_size <= 0 else min(page_size, GETSTATE_PAGE)
        with self._cond:
            assert self._state is not None
            active = self._open.participants if self._open else set()
            records = self.members.records
            ids = sorted(k for k in records if k > after)
            page = ids[:size]
            nodes = [
                NodeView(
                    record=replace(records[k], token_sha256="", test_metrics=dict(records[k].test_metrics)),
                    weight=self._state.weight(k),
                    in_open_round=k in active,
                )
                for k in page
            ]
            return StateView(
                round=self._state.round,
                last_committed_round=self._commits.committed_round - 1,
                phase=self._phase,
                open_round=self._open.number if self._open else None,
                nodes=nodes,
                next_after=page[-1] if len(ids) > size else "",
                total_nodes=len(records),
                halted_reason=self.halted_reason or "",
            )

    # -- node calls -------------------------------------------------------------------------

    def _authenticate_locked(self, node_id: str, token: str) -> MemberRecord:
        member, became_live = self.members.authenticate(node_id, token)
        if became_live:
            self._cond.notify_all()  # the driver may open a round now
        return member

    def authenticate(self, node_id: str, token: str) -> None:
        """Raise unless ``token`` is the session of the registered node ``node_id`` (marks it live)."""
        with self._cond:
            self._authenticate_locked(node_id, token)

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
        """Enrol a node or resume one. ``peer`` (the caller's host) keys the attempt rate limits;
        ``network`` is the shared network the node built (refused unless it is this federation's);
        ``relay`` the relay it registered through ("" when it dials the aggregator itself)."""
        peer = self.members.check_request(
            name=name,
            federation=federation,
            network=network,
            task=task,
            num_samples=num_samples,
            enrollment_token=enrollment_token,
            node_id=node_id,
            peer=peer,
        )
        with self._cond:
            assert self._state is not None
            if node_id:
                member = self.members.resume(node_id, session_token, task, federation, num_samples, relay)
                self._cond.notify_all()
                log.info("node.resumed", node=node_id, task=task)
                return Registration(node_id, session_token, True, member.initial_loss, self._state.weight(node_id))
            member, token = self.members.enrol(name, federation, task, num_samples, peer, relay)
            self._cond.notify_all()
        log.info("node.registered", node=name, task=task, samples=num_samples, **({"relay": relay} if relay else {}))
        return Registration(member.node_id, token, False, None, 1.0)

    def heartbeat(self, node_id: str, token: str) -> int:
        with self._cond:
            self._authenticate_locked(node_id, token)
            assert self._state is not None
            return self._state.round

    def deregister(self, node_id: str, token: str) -> None:
        with self._cond:
            self._authenticate_locked(node_id, token)
            self._drop_locked(node_id, "deregistered")

    def _drop_locked(self, node_id: str, why: str) -> None:
        self.members.drop(node_id)
        if self._open is not None and node_id not in self._open.submitted:
            self._open.participants.discard(node_id)
        self._cond.notify_all()
        log.info("node.left", node=node_id, why=why)

    def fetch_round(
        self, node_id: str, token: str, wait_seconds: float, alive: Callable[[], bool] = lambda: True
    ) -> RoundTicket | None:
        """Wait up to ``wait_seconds`` for an open round that includes the node and that it has not
        yet submitted to; None when there is none by then (the node asks again) or when ``alive``
        turns false (the caller went away). Once training is over: the final model (``final``)."""
        end = time.monotonic() + max(0.0, min(wait_seconds, 300.0))
        with self._cond:
            while True:
                self._authenticate_locked(node_id, token)
                o = self._open
                if self._phase is Phase.OPEN and o is not None and node_id in o.participants - o.submitted.keys():
                    return RoundTicket(o.number, o.deadline_unix, o.omega, last_used=self._last_used_locked(node_id))
                if self._phase is Phase.DONE:
                    assert self._state is not None
                    used = self._last_used_locked(node_id)
                    return RoundTicket(self._state.round, 0.0, self._state.omega, final=True, last_used=used)
                remaining = end - time.monotonic()
                if remaining <= 0 or self._stop.is_set() or not alive():
                    return None
                self._cond.wait(min(remaining, 1.0))

    def _last_used_locked(self, node_id: str) -> int:
        """The last round whose step used the node's update (-1: none yet)."""
        return self.members.records[node_id].last_round

    def check_submit(self, node_id: str, token: str, round_: int) -> float:
        """Everything that can be refused before the payload is read; returns the round's
        deadline (Unix seconds), after which the upload is of no use."""
        with self._cond:
            return self._open_round_for_locked(node_id, token, round_).deadline_unix

    def _open_round_for_locked(self, node_id: str, token: str, round_: int) -> _OpenRound:
        self._authenticate_locked(node_id, token)
        o = self._open if self._phase is Phase.OPEN else None
        check_entry(node_id, round_, o.number if o else None, o.submitted if o else (), o.participants if o else ())
        assert o is not None
        return o

    def submit(self, token: str, sub: Submission) -> None:
        """Admit and deposit an update; the round closes when the last participant's arrives."""
        assert self._state is not None
        sub = admit(sub, self._state.omega, self._omega_tilde)  # without the lock (the expensive part)
        with self._cond:
            o = self._open_round_for_locked(sub.node_id, token, sub.round)
            self._deposit_locked(o, self.members.records[sub.node_id], sub)
            self._cond.notify_all()

    def _deposit_locked(self, o: _OpenRound, member: MemberRecord, sub: Submission) -> None:
        """File an admitted update (direct or relayed) in the open round, checking its F_0."""
        check_initial_loss(member.initial_loss, sub)
        if member.initial_loss is None:
            member.initial_loss = sub.initial_loss  # F_0 as the aggregator first accepted it
        o.submitted[sub.node_id] = sub

    # -- relay calls (the Uplink service) ----------------------------------------------------

    def attach_relay(self, *, name: str, federation: str, network: Architecture, enrollment_token: str) -> str:
        """A relay joins with the federation's enrollment token and network: its session token."""
        if not NAME_RE.match(name or ""):
            raise InvalidArgument(f"relay name {name[:64]!r} must match {NAME_RE.pattern}", Reason.BAD_NAME)
        self.members.check_enrollment(enrollment_token, peer=f"relay:{name}")
        self.members.check_network(federation, network, caller="relay")
        with self._cond:
            token = self.relays.attach(name, self._wall())
        log.info("relay.attached", relay=name)
        return token

    def relay_members(self, relay_id: str, token: str) -> tuple[list[tuple[str, str, float | None]], int]:
        """The registered nodes behind a relay [(node_id, token hash, F_0)] and the list's version."""
        with self._cond:
            self.relays.authenticate(relay_id, token)
            return self._relay_members_locked(relay_id), self.members.version

    def _relay_members_locked(self, relay_id: str) -> list[tuple[str, str, float | None]]:
        return [(m.node_id, m.token_sha256, m.initial_loss) for m in self.members.behind(relay_id)]

    def relay_stats(self) -> dict[str, tuple[int, int, int]]:
        """Per attached relay: (registered nodes behind it, partial sums accepted, rounds lost)."""
        with self._cond:
            counts: dict[str, int] = {}
            for m in self.members.records.values():
                if m.relay and m.registered:
                    counts[m.relay] = counts.get(m.relay, 0) + 1
            return {k: (counts.get(k, 0), r.partial_sums, r.lost_rounds) for k, r in self.relays.sessions.items()}

    def relay_session(self, relay_id: str, token: str) -> None:
        with self._cond:
            self.relays.authenticate(relay_id, token)

    def relay_heartbeat(
        self, relay_id: str, token: str, seen: list[str], version: int
    ) -> tuple[int, list[tuple[str, str, float | None]] | None, int]:
        """The relay saw ``seen`` (they count as seen here); the round, and the relay's members
        when their list changed since ``version`` (else None)."""
        with self._cond:
            self.relays.authenticate(relay_id, token)
            woke = False
            for node_id in seen:
                woke = self.members.touch(node_id, relay_id) or woke
            if woke:
                self._cond.notify_all()
            assert self._state is not None
            changed = version != self.members.version
            members = self._relay_members_locked(relay_id) if changed else None
            return self._state.round, members, self.members.version

    def fetch_relay_round(
        self, relay_id: str, token: str, after_opening: int, wait_seconds: float, alive: Callable[[], bool]
    ) -> RelayTicket | None:
        """Wait for an open round (opened after ``after_opening``) with participants behind the relay;
        once training is over, the final model. None when there is none within ``wait_seconds``."""
        end = time.monotonic() + max(0.0, min(wait_seconds, 300.0))
        with self._cond:
            while True:
                self.relays.authenticate(relay_id, token)
                o = self._open
                if self._phase is Phase.OPEN and o is not None and o.opening > after_opening:
                    mine = sorted(k for k, r in o.via.items() if r == relay_id)
                    if mine:
                        records = self.members.records
                        return RelayTicket(
                            opening=o.opening,
                            round=o.number,
                            deadline_unix=o.deadline_unix,
                            participants={k: records[k].initial_loss for k in mine},
                            omega=o.omega,
                        )
                if self._phase is Phase.DONE:
                    assert self._state is not None
                    return RelayTicket(self._openings, self._state.round, 0.0, {}, self._state.omega, final=True)
                remaining = end - time.monotonic()
                if remaining <= 0 or self._stop.is_set() or not alive():
                    return None
                self._cond.wait(min(remaining, 1.0))

    def report_updates(
        self, relay_id: str, token: str, round_: int, subs: list[Submission]
    ) -> list[tuple[str, CoordinatorError]]:
        """File the updates a relay accepted from its nodes (scalars only; it keeps the gradients).
        Returns (node, refusal) for each update that could not be filed (the others are in the round)."""
        checked: list[Submission | tuple[str, CoordinatorError]] = []
        for sub in subs:  # the numbers first, without the lock
            try:
                checked.append(admit_relayed(replace(sub, relay=relay_id), self._max_norm))
            except CoordinatorError as e:
                checked.append((sub.node_id, e))
        refused: list[tuple[str, CoordinatorError]] = []
        with self._cond:
            self.relays.authenticate(relay_id, token)
            o = self._open
            if o is None or self._phase is not Phase.OPEN or o.number != round_:
                current = (
                    f"round {o.number} is open" if o is not None and self._phase is Phase.OPEN else "no round is open"
                )
                raise FailedPrecondition(f"round {round_} is not open for reports ({current})", Reason.WRONG_ROUND)
            for item in checked:
                if isinstance(item, tuple):
                    refused.append(item)
                    continue
                try:
                    self._file_relayed_locked(o, relay_id, item)
                except CoordinatorError as e:
                    refused.append((item.node_id, e))
            self._cond.notify_all()
        return refused

    def _file_relayed_locked(self, o: _OpenRound, relay_id: str, sub: Submission) -> None:
        if o.via.get(sub.node_id) != relay_id:
            raise FailedPrecondition(
                f"node {sub.node_id[:64]!r} is not a participant of round {o.number} behind relay {relay_id!r}",
                Reason.NOT_PARTICIPANT,
            )
        if sub.node_id in o.submitted:
            raise AlreadyExists(f"node {sub.node_id!r} already submitted to round {o.number}", Reason.DUPLICATE)
        member = self.members.records.get(sub.node_id)
        if member is None or not member.registered:
            raise FailedPrecondition(f"node {sub.node_id!r} is not registered", Reason.DEREGISTERED)
        self._deposit_locked(o, member, sub)

    def fetch_weights(
        self,
        relay_id: str,
        token: str,
        opening: int,
        after_attempt: int,
        wait_seconds: float,
        alive: Callable[[], bool],
    ) -> WeightsOffer:
        """Wait for the scales of the relay's nodes in the closing round ``opening`` (an attempt
        after ``after_attempt``); ``closed`` once that round is over for the relay."""
        end = time.monotonic() + max(0.0, min(wait_seconds, 300.0))
        with self._cond:
            while True:
                self.relays.authenticate(relay_id, token)
                offer, o = self._offer, self._open
                if offer is not None and offer.opening == opening:
                    if relay_id not in offer.scales:
                        return WeightsOffer(ready=False, closed=True)
                    if offer.attempt > after_attempt:
                        return WeightsOffer(True, False, offer.attempt, tuple(offer.scales[relay_id]))
                elif o is None or o.opening != opening:
                    return WeightsOffer(ready=False, closed=True)  # stepped, refused, or withdrawn
                remaining = end - time.monotonic()
                if remaining <= 0 or self._stop.is_set() or not alive():
                    return WeightsOffer(ready=False, closed=False)
                self._cond.wait(min(remaining, 1.0))

    def check_partial_sum(self, relay_id: str, token: str, opening: int, attempt: int) -> None:
        """Everything about a partial sum that can be refused before its payload is read."""
        with self._cond:
            self._offer_for_locked(relay_id, token, opening, attempt)

    def _offer_for_locked(self, relay_id: str, token: str, opening: int, attempt: int) -> Offer:
        self.relays.authenticate(relay_id, token)
        offer = self._offer
        if offer is None or offer.opening != opening or offer.attempt != attempt or relay_id not in offer.scales:
            raise FailedPrecondition(
                f"no weights of opening {opening}, attempt {attempt} are offered to relay {relay_id!r}",
                Reason.WRONG_ATTEMPT,
            )
        if relay_id in offer.partials:
            raise AlreadyExists(f"relay {relay_id!r} already sent its partial sum", Reason.DUPLICATE)
        return offer

    def submit_partial_sum(self, relay_id: str, token: str, opening: int, attempt: int, partial: TensorDict) -> None:
        """File a relay's partial sum for an attempt (checked: omega's names and shapes, finite)."""
        if set(partial) != set(self._expected) or any(tuple(t.shape) != self._expected[k] for k, t in partial.items()):
            raise InvalidArgument("the partial sum's tensors are not omega's", Reason.BAD_TENSOR)
        bad = next((k for k, t in partial.items() if not all_finite(t)), None)
        if bad is not None:
            raise InvalidArgument(f"the partial sum's {bad!r} is not finite", Reason.NOT_FINITE)
        with self._cond:
            offer = self._offer_for_locked(relay_id, token, opening, attempt)
            offer.partials[relay_id] = partial
            self.relays.sessions[relay_id].partial_sums += 1
            self._cond.notify_all()

    # -- the driver -------------------------------------------------------------------------

    def _drive(self) -> None:
        with self._cond:
            while not self._stop.is_set():
                try:
                    self._drive_once_locked()
                except Exception as e:  # a bug: never a silent zombie that answers SERVING
                    self._crash_locked(e)

    def _crash_locked(self, error: Exception) -> None:
        log.exception("driver.crashed", error=f"{type(error).__name__}: {error}", phase=self._phase.value)
        self._crashed = True
        self.halted_reason = f"the round driver failed ({type(error).__name__}: {error}); restart the aggregator"
        self._phase = Phase.HALTED
        self._open = None
        self._cond.notify_all()

    def _drive_once_locked(self) -> None:
        self._expire_locked()
        self._settle_commit_locked(wait=False)
        if self._phase is Phase.WAITING:
            if not self._try_open_locked():
                self._cond.wait(self.config.heartbeat_interval)
        elif self._phase is Phase.OPEN:
            o = self._open
            assert o is not None
            remaining = o.deadline_mono - time.monotonic()
            if o.participants <= set(o.submitted) or remaining <= 0:
                # No round builds on a state that is not on disk: the last round's commit must
                # have landed first; if it failed, this round is withdrawn (HALTED).
                self._settle_commit_locked(wait=True)
                if self._phase is Phase.OPEN:
                    self._close_locked()
            else:
                self._cond.wait(min(remaining, self.config.heartbeat_interval))
        elif self._phase is Phase.HALTED:
            if self._crashed:
                self._cond.wait(self.config.heartbeat_interval)
            else:
                self._retry_commit_locked()
        else:  # DONE
            self._cond.wait(self.config.heartbeat_interval)

    def _expire_locked(self) -> None:
        """Drop nodes silent for heartbeat_timeout; forget departed ones after their retention."""
        assert self._state is not None
        for node_id in self.members.silent():
            self._drop_locked(node_id, "heartbeat timeout")
        for relay in self.relays.silent(self.config.heartbeat_timeout):
            del self.relays.sessions[relay]
            log.warning("relay.silent", relay=relay, why="no call for heartbeat_timeout: its session ends")
        gone = self.members.forget_departed(keep=self._open.submitted if self._open else ())
        if gone:
            self._state.weights = {k: w for k, w in self._state.weights.items() if k in self.members.records}
            log.info("nodes.forgotten", count=len(gone), retention_seconds=self.config.departed_retention)

    def _try_open_locked(self) -> bool:
        assert self._state is not None
        if self.config.rounds and self._state.round >= self.config.rounds:
            self._settle_commit_locked(wait=True)  # DONE only once the last round is on disk
            if self._phase is Phase.HALTED:
                return True
            self._phase = Phase.DONE
            self._cond.notify_all()
            log.info("training.done", rounds=self._state.round)
            return True
        live = self.members.live()
        if len(live) < self.config.min_nodes:
            return False
        active = self._sample_locked(live, self._state.round)
        now_mono, now_wall = time.monotonic(), self._wall()
        self._openings += 1
        records = self.members.records
        self._open = _OpenRound(
            number=self._state.round,
            participants=active,
            deadline_unix=now_wall + self.config.round_timeout,
            deadline_mono=now_mono + self.config.round_timeout,
            opened_mono=now_mono,
            omega=self._state.omega,  # never written to: the step makes new tensors
            opening=self._openings,
            via={k: records[k].relay for k in active if records[k].relay},
        )
        self._phase = Phase.OPEN
        self._cond.notify_all()
        log.info("round.open", round=self._open.number, participants=sorted(active))
        return True

    def _sample_locked(self, live: set[str], round_: int) -> set[str]:
        """The round's participants: every live node, or (partial participation) a sample of
        ``participation`` of them drawn from the seed and the round, the same on every restart."""
        k = self.config.participants_of(len(live))
        if k >= len(live):
            return live
        rng = random.Random(derive_seed(self.config.seed, "participants", round_))
        return set(rng.sample(sorted(live), k))

    def _close_locked(self) -> None:
        o = self._open
        assert o is not None and self._state is not None
        submitted = dict(o.submitted)
        if not submitted:
            log.warning("round.empty", round=o.number, participants=sorted(o.participants))
            self._open, self._phase = None, Phase.WAITING
            return
        stragglers = sorted(o.participants - set(submitted))
        dropped = norm_outliers({k: s.norm for k, s in submitted.items()}, self.config.update_norm_factor)
        for k in sorted(dropped):
            log.error("update.dropped", round=o.number, node=k, norm=submitted[k].norm, why="norm above the bound")
            del submitted[k]
        self.dropped_updates += len(dropped)
        self._phase = Phase.STEPPING
        t_collected = time.monotonic()
        plan = self._settle_relays_locked(o, submitted)  # waits (lock released) for the relays' partial sums
        if plan is None:
            log.warning("round.empty", round=o.number, participants=sorted(o.participants), why="no update left")
            self._open, self._offer, self._phase = None, None, Phase.WAITING
            self._cond.notify_all()
            return
        partials = dict(self._offer.partials) if self._offer is not None else {}
        self._cond.release()  # the step runs without the lock: RPCs keep being answered
        try:
            result: StepResult | None = self._step(plan, submitted, partials)
        except AlgorithmError as e:
            result, refusal = None, e
        finally:
            self._cond.acquire()
        self._offer = None  # the relays waiting on FetchWeights learn that the round is over
        self._cond.notify_all()
        if result is None:  # the state is untouched: the same round opens again
            self.refused_rounds += 1
            log.error("round.refused", round=o.number, error=str(refusal), submitted=sorted(submitted))
            self._open, self._phase = None, Phase.WAITING
            self._cond.notify_all()
            return
        t_stepped = time.monotonic()
        for k, s in submitted.items():
            m = self.members.records[k]
            m.last_round = o.number
            m.train_loss, m.loss_ratio, m.grad_norm = s.loss, s.loss_ratio, result.reports[k].grad_norm
            m.test_loss, m.test_metrics = s.test_loss, dict(s.test_metrics)
        self._open = None
        log.info(
            "round.closed",
            round=o.number,
            submitted=sorted(submitted),
            stragglers=stragglers,
            weights={k: round(r.weight, 4) for k, r in result.reports.items()},
        )
        summary = RoundSummary(
            round=o.number,
            algorithm=self.config.algorithm,
            participants=tuple(sorted(o.participants)),
            submitted=submitted,
            step=result,
            members={k: replace(m) for k, m in self.members.records.items()},
            duration_seconds=t_stepped - o.opened_mono,
            collect_seconds=t_collected - o.opened_mono,
            step_seconds=t_stepped - t_collected,
            closed_unix=self._wall(),
        )
        # The next round opens now, while this round's state is written (it is the state the next
        # round's nodes fetch; the next step waits for the commit, see _drive_once_locked). The
        # round's metrics.jsonl rows go into the committed state too, so a crash after the commit
        # cannot lose them.
        snap = self._snapshot()
        snap.records = [{**r, "commit_seconds": None} for r in round_records(summary)]
        self._commits.begin(snap, summary)
        self._phase = Phase.WAITING
        self._cond.notify_all()

    def _settle_relays_locked(self, o: _OpenRound, submitted: dict[str, Submission]) -> WeightPlan | None:
        """The weight rule over every update's scalars (direct and relayed); with relayed updates,
        offer each relay its nodes' scales and wait up to relay_timeout for its partial sum. A relay
        whose sum does not come costs its nodes' updates (removed from ``submitted``) and the rule
        runs again without them (a new attempt). None when no update is left."""
        attempt = 0
        while submitted:
            plan = plan_weights(
                self._state,  # type: ignore[arg-type]
                {k: s.tilde_norm for k, s in submitted.items()},
                {k: s.loss_ratio for k, s in submitted.items()},
                self.server_config,
            )
            by_relay: dict[str, list[tuple[str, float, float]]] = {}
            for c in plan.clients:
                if submitted[c].relay:
                    by_relay.setdefault(submitted[c].relay, []).append((c, plan.scale(c), plan.weights[c].p))
            if not by_relay:
                self._offer = None
                return plan
            attempt += 1
            offer = Offer(opening=o.opening, round=o.number, attempt=attempt, scales=by_relay)
            self._offer = offer
            self._cond.notify_all()
            end = time.monotonic() + self.config.relay_timeout
            while not offer.complete() and not self._stop.is_set() and (remaining := end - time.monotonic()) > 0:
                self._cond.wait(min(remaining, 1.0))
            if offer.complete():
                return plan
            for relay in sorted(set(by_relay) - set(offer.partials)):
                nodes = [c for c, _, _ in by_relay[relay]]
                for c in nodes:
                    del submitted[c]
                self.lost_relay_updates += len(nodes)
                if relay in self.relays.sessions:
                    self.relays.sessions[relay].lost_rounds += 1
                log.error(
                    "relay.lost",
                    round=o.number,
                    relay=relay,
                    nodes=len(nodes),
                    attempt=attempt,
                    why="its partial sum did not arrive within relay_timeout: its nodes' updates are left out",
                )
        self._offer = None
        return None

    def _step(self, plan: WeightPlan, submitted: dict[str, Submission], partials: dict[str, TensorDict]) -> StepResult:
        """Sum the direct nodes' gradients in id order, add the relays' partial sums in relay-name
        order, and step omega (without the lock; the state is replaced only if the step is finite)."""
        assert self._state is not None
        direct = ((plan.scale(c), submitted[c].gradient) for c in plan.clients if not submitted[c].relay)
        g = weighted_sum(direct, self._state.omega)
        for relay in sorted(partials):
            weighted_sum([(1.0, partials[relay])], self._state.omega, out=g)
        return apply_step(self._state, plan, g, self.server_config)

    def _settle_commit_locked(self, wait: bool) -> None:
        """Account for the last round's commit once it is done (``wait``: block until then).
        A failed commit halts the coordinator and withdraws the round opened meanwhile."""
        if not self._commits.in_flight:
            return
        if not self._commits.done():
            if not wait:
                return
            self._cond.release()
            try:
                self._commits.wait()
            finally:
                self._cond.acquire()
        settled = self._commits.settle()
        if settled is not None and settled[1] is not None:
            self._halt_locked(settled[1], settled[0])

    def _snapshot(self) -> Snapshot:
        assert self._state is not None
        return Snapshot(
            identity=self.config.identity(),
            # omega and the Adam moments are shared, not copied: the step replaces them with new
            # tensors and never writes to the old ones; round and weights are copied.
            server=replace(self._state, weights=dict(self._state.weights)),
            members={k: replace(m, test_metrics=dict(m.test_metrics)) for k, m in self.members.records.items()},
            records=self._commits.last_records,
        )

    def _halt_locked(self, error: StateError, round_: int) -> None:
        """A commit failed: no round may build on the state it did not write."""
        self.halted_reason = str(error)
        self._phase = Phase.HALTED
        log.error("state.commit_failed", error=str(error), round=round_)
        if self._open is not None:
            log.warning("round.withdrawn", round=self._open.number, why="the previous round's state was not committed")
            self._open = None
        self._cond.notify_all()

    def _retry_commit_locked(self) -> None:
        """While halted by a failed commit: write the state again, in this thread, every heartbeat
        interval (the file is written without the lock; the snapshot copies what RPCs may change)."""
        self._cond.wait(self.config.heartbeat_interval)
        if self._stop.is_set():
            return
        snap = self._snapshot()
        self._cond.release()
        try:
            self._commits.write(snap)
            error = None
        except StateError as e:
            error = e
        finally:
            self._cond.acquire()
        if error is not None:
            self._halt_locked(error, self.round)
            return
        self.halted_reason = None
        self._phase = Phase.WAITING
        self._cond.notify_all()
        log.info("state.commit_recovered", round=self.round)
