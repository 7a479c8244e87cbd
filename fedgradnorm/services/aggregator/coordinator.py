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
    ClientUpdate,
    ServerConfig,
    ServerState,
    TensorDict,
    norm_outliers,
    server_step,
)
from fedgradnorm.models import Architecture
from fedgradnorm.reasons import Reason
from fedgradnorm.services.aggregator.admission import admit, check_initial_loss
from fedgradnorm.services.aggregator.commit import CommitPipeline
from fedgradnorm.services.aggregator.config import CoordinatorConfig
from fedgradnorm.services.aggregator.errors import AlreadyExists, FailedPrecondition
from fedgradnorm.services.aggregator.membership import Membership
from fedgradnorm.services.aggregator.roundlog import round_records
from fedgradnorm.services.aggregator.store import MemberRecord, Snapshot, StateError, StateStore
from fedgradnorm.services.domain import (
    NodeView,
    Phase,
    Registration,
    RoundSummary,
    RoundTicket,
    StateView,
    Submission,
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
        missing = [n for n in self._server_config.omega_tilde if n not in self._expected]
        if missing:
            raise ValueError(f"omega_tilde names {missing} are not parameters of {self.config.network}")
        if self.config.rounds and self._state.round >= self.config.rounds:
            self._phase = Phase.DONE

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
        return self._state is not None

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
    ) -> Registration:
        """Enrol a node or resume one. ``peer`` (the caller's host) keys the attempt rate limits;
        ``network`` is the shared network the node built (refused unless it is this federation's)."""
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
                member = self.members.resume(node_id, session_token, task, federation, num_samples)
                self._cond.notify_all()
                log.info("node.resumed", node=node_id, task=task)
                return Registration(node_id, session_token, True, member.initial_loss, self._state.weight(node_id))
            member, token = self.members.enrol(name, federation, task, num_samples, peer)
            self._cond.notify_all()
        log.info("node.registered", node=name, task=task, samples=num_samples)
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
                    return RoundTicket(o.number, o.deadline_unix, o.omega)
                if self._phase is Phase.DONE:
                    assert self._state is not None
                    return RoundTicket(self._state.round, 0.0, self._state.omega, final=True)
                remaining = end - time.monotonic()
                if remaining <= 0 or self._stop.is_set() or not alive():
                    return None
                self._cond.wait(min(remaining, 1.0))

    def check_submit(self, node_id: str, token: str, round_: int) -> float:
        """Everything that can be refused before the payload is read; returns the round's
        deadline (Unix seconds), after which the upload is of no use."""
        with self._cond:
            return self._open_round_for_locked(node_id, token, round_).deadline_unix

    def _open_round_for_locked(self, node_id: str, token: str, round_: int) -> _OpenRound:
        self._authenticate_locked(node_id, token)
        o = self._open
        if o is None or self._phase is not Phase.OPEN or o.number != round_:
            current = f"round {o.number} is open" if o is not None and self._phase is Phase.OPEN else "no round is open"
            raise FailedPrecondition(f"round {round_} is not open for submits ({current})", Reason.WRONG_ROUND)
        if node_id in o.submitted:
            raise AlreadyExists(f"node {node_id!r} already submitted to round {round_}", Reason.DUPLICATE)
        if node_id not in o.participants:
            raise FailedPrecondition(
                f"node {node_id!r} is not a participant of round {round_}; it joins the next round",
                Reason.NOT_PARTICIPANT,
            )
        return o

    def submit(self, token: str, sub: Submission) -> None:
        """Admit and deposit an update; the round closes when the last participant's arrives."""
        assert self._state is not None
        sub = admit(sub, self._state.omega)  # without the lock (the expensive part): names and shapes only
        with self._cond:
            o = self._open_round_for_locked(sub.node_id, token, sub.round)
            member = self.members.records[sub.node_id]
            check_initial_loss(member, sub)
            if member.initial_loss is None:
                member.initial_loss = sub.initial_loss  # F_0 as the aggregator first accepted it
            o.submitted[sub.node_id] = sub
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
        self._open = _OpenRound(
            number=self._state.round,
            participants=active,
            deadline_unix=now_wall + self.config.round_timeout,
            deadline_mono=now_mono + self.config.round_timeout,
            opened_mono=now_mono,
            omega=self._state.omega,  # never written to: the step makes new tensors
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
        self._cond.release()  # the step runs without the lock: RPCs keep being answered
        try:
            updates = [ClientUpdate(k, s.gradient, s.loss_ratio) for k, s in submitted.items()]
            result = server_step(self._state, updates, self.server_config, validate=False)  # admitted already
        except AlgorithmError as e:
            result, refusal = None, e
        finally:
            self._cond.acquire()
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
