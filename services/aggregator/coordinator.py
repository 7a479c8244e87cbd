"""The round coordinator: membership, rounds, submits and persistence around the library's server step.

No gRPC here. The servicer translates requests into calls on :class:`RoundCoordinator` and maps
its :class:`CoordinatorError` subclasses onto status codes. One driver thread owns every round
transition (open, close, step, commit); RPC threads only register, wait, and deposit updates.

Round life cycle::

    WAITING --(enough live nodes)--> OPEN --(all participants submitted | deadline)--> STEPPING
    STEPPING --(server step + atomic commit)--> WAITING     (or DONE after the last round)
    STEPPING --(the step would poison the state)--> WAITING  (round refused, state kept, reopened)
    STEPPING --(commit failed: disk full, read-only)--> HALTED  (retries the commit; never advances)
    any     --(the driver itself raised: a bug)--> HALTED  (for good: readiness NOT_SERVING)

A live node is a registered one that has fetched or sent a heartbeat since it registered: a name
that only registers never holds a round open.
"""

from __future__ import annotations

import copy
import enum
import hashlib
import hmac
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
import torch

from fedgradnorm.algorithm import (
    MAX_LOSS_RATIO,
    AlgorithmError,
    ClientUpdate,
    ServerConfig,
    ServerState,
    StepResult,
    TensorDict,
    default_omega_tilde,
    norm_outliers,
    server_step,
    update_norm,
    validate_update,
)
from fedgradnorm.models import build_shared
from fedgradnorm.tasks import Federation, federation
from services.aggregator.roundlog import round_records
from services.aggregator.store import MemberRecord, Snapshot, StateError, StateStore

log = structlog.get_logger("fedgradnorm.aggregator")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MAX_SAMPLES = 1_000_000_000
LOSS_RATIO_RTOL = 1e-4
MAX_TEST_METRICS = 8
MAX_FIELD = 256  # longest dataset, task or peer string kept or echoed before it is checked
GETSTATE_PAGE = 1000  # nodes per GetState reply, at most


# ---------------------------------------------------------------------------------------------
# Domain errors: the servicer maps each class onto one gRPC status code; ``reason`` labels metrics.
# ---------------------------------------------------------------------------------------------


class CoordinatorError(Exception):
    reason = "error"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason:
            self.reason = reason


class InvalidArgument(CoordinatorError):
    reason = "invalid_argument"


class Unauthenticated(CoordinatorError):
    reason = "unauthenticated"


class PermissionDenied(CoordinatorError):
    reason = "permission_denied"


class NotFound(CoordinatorError):
    reason = "unknown_node"


class AlreadyExists(CoordinatorError):
    reason = "duplicate"


class FailedPrecondition(CoordinatorError):
    reason = "wrong_round"


class ResourceExhausted(CoordinatorError):
    reason = "resource_exhausted"


class Unavailable(CoordinatorError):
    reason = "unavailable"


class Phase(enum.Enum):
    WAITING = "waiting"  # for enough registered nodes
    OPEN = "open"  # a round is open for fetches and submits
    STEPPING = "stepping"  # the server step and the commit are running
    DONE = "done"  # the configured number of rounds is reached
    HALTED = "halted"  # the last commit failed; the round does not advance until it succeeds


@dataclass(frozen=True)
class CoordinatorConfig:
    dataset: str = "radcom"
    algorithm: str = "fedgradnorm"
    gamma: float = 0.9
    alpha: float = 0.004
    beta: float = 0.0002
    omega_tilde: tuple[str, ...] = ()
    tau_h: int = 5
    tau_omega: int = 5
    batch_size: int = 64
    min_nodes: int = 3
    rounds: int = 0  # 0: train until stopped
    round_timeout: float = 60.0
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 30.0
    seed: int = 0
    max_nodes: int = 1024
    enrollment_token: str = field(default="", repr=False)
    register_burst: int = 5  # registration attempts per (peer, node name) before the rate applies
    register_rate: float = 0.2  # refill per second of that bucket; failed enrolments share one per peer
    new_node_burst: int = 64  # enrolments of new names per peer before new_node_rate applies
    new_node_rate: float = 1.0  # new names per second and peer after the burst
    departed_retention: float = 86400.0  # seconds a departed node's p, F_0 and identity are kept
    max_departed: int = 1024  # departed nodes kept at most (the longest gone are forgotten first)
    update_norm_factor: float = 1e4  # drop an update whose norm exceeds this x the round's median (0: off)

    def __post_init__(self) -> None:
        federation(self.dataset)
        ServerConfig(algorithm=self.algorithm, gamma=self.gamma, alpha=self.alpha, beta=self.beta)  # type: ignore[arg-type]
        if self.min_nodes < 1 or self.max_nodes < self.min_nodes:
            raise ValueError("need 1 <= min_nodes <= max_nodes")
        if self.round_timeout <= 0 or self.heartbeat_interval <= 0 or self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("round_timeout and heartbeat_interval must be positive, heartbeat_timeout larger")
        if self.register_burst < 1 or self.register_rate <= 0 or self.new_node_burst < 1 or self.new_node_rate <= 0:
            raise ValueError("register_burst and new_node_burst must be >= 1, register_rate and new_node_rate positive")
        if self.departed_retention < 0 or self.max_departed < 0:
            raise ValueError("departed_retention and max_departed must be non-negative")
        if not (self.update_norm_factor == 0 or self.update_norm_factor >= 1):
            raise ValueError("update_norm_factor must be 0 (off) or at least 1")
        if self.tau_h < 0 or self.tau_omega < 1 or self.batch_size < 1 or self.rounds < 0:
            raise ValueError("need tau_h >= 0, tau_omega >= 1, batch_size >= 1, rounds >= 0")

    @property
    def federation(self) -> Federation:
        return federation(self.dataset)

    @property
    def network(self) -> str:
        return self.federation.network

    def server_config(self, omega: Mapping[str, torch.Tensor]) -> ServerConfig:
        return ServerConfig(
            algorithm=self.algorithm,  # type: ignore[arg-type]
            gamma=self.gamma,
            alpha=self.alpha,
            beta=self.beta,
            omega_tilde=self.omega_tilde or default_omega_tilde(omega),
        )

    def identity(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "network": self.network, "algorithm": self.algorithm, "seed": self.seed}


@dataclass(frozen=True)
class Registration:
    node_id: str
    session_token: str  # only ever returned to the node itself; never logged
    resumed: bool
    initial_loss: float | None
    weight: float


@dataclass(frozen=True)
class RoundTicket:
    """An open round as a participant sees it: the number, the deadline and omega_k."""

    round: int
    deadline_unix: float
    omega: TensorDict  # read-only snapshot, shared by every fetch of the round


@dataclass(frozen=True)
class Submission:
    node_id: str
    round: int
    gradient: Mapping[str, torch.Tensor]
    loss: float
    initial_loss: float
    loss_ratio: float
    num_samples: int
    test_loss: float | None = None
    test_metrics: Mapping[str, float] = field(default_factory=dict)
    norm: float = 0.0  # l2 norm of the whole gradient (set on admission)


@dataclass(frozen=True)
class RoundSummary:
    """Everything about a closed round, for logs, metrics and metrics.jsonl."""

    round: int
    algorithm: str
    participants: tuple[str, ...]
    submitted: dict[str, Submission]  # the updates the step used
    step: StepResult
    members: dict[str, MemberRecord]
    duration_seconds: float  # opening to the end of the step, when the next round can open
    collect_seconds: float = 0.0  # opening until the last update arrived (or the deadline)
    step_seconds: float = 0.0  # the server step (eq. 6-7 and the omega update)
    commit_seconds: float = 0.0  # writing the state file, beside the next round (0 when it failed)
    closed_unix: float = 0.0  # wall clock at the end of the step


@dataclass
class _PendingCommit:
    """A round's state being written by its writer thread while the next round runs."""

    round: int
    done: threading.Event = field(default_factory=threading.Event)
    error: StateError | None = None


@dataclass
class _OpenRound:
    number: int
    participants: set[str]
    deadline_unix: float
    deadline_mono: float
    opened_mono: float
    omega: TensorDict
    submitted: dict[str, Submission] = field(default_factory=dict)


class RateLimiter:
    """Token buckets by key, bounded in the number of keys it remembers."""

    def __init__(self, rate: float, burst: int, max_keys: int = 10_000) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last time)
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            allowed = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
            if len(self._buckets) > self.max_keys:  # forget the longest idle
                for k, _ in sorted(self._buckets.items(), key=lambda kv: kv[1][1])[: self.max_keys // 10]:
                    del self._buckets[k]
            return allowed


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _finite(name: str, value: float, positive: bool = False) -> float:
    v = float(value)
    if not math.isfinite(v) or (positive and v <= 0) or v < 0:
        kind = "finite and positive" if positive else "finite and non-negative"
        raise InvalidArgument(f"{name} must be {kind}, got {value}", reason="bad_value")
    return v


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
        self.listeners = list(listeners or [])
        self._cond = threading.Condition()
        self._phase = Phase.WAITING
        self._state: ServerState | None = None
        self._members: dict[str, MemberRecord] = {}
        self._tokens: dict[str, str] = {}  # node id -> sha256 of its session token
        self._last_seen: dict[str, float] = {}
        self._live: set[str] = set()  # registered and seen (fetch or heartbeat) since registering
        self._last_records: list[dict[str, Any]] = []  # metrics.jsonl rows of the last committed round
        self._open: _OpenRound | None = None
        self._pending: _PendingCommit | None = None  # the last round's commit, while it is written
        self._committed_round = -1  # the round of the state last written to the store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server_config: ServerConfig | None = None
        self._expected: dict[str, tuple[int, ...]] = {}
        self.halted_reason: str | None = None
        self._crashed = False  # the driver raised: halted until the process is restarted
        self.refused_rounds = 0  # rounds whose step would have made the state non-finite
        self.dropped_updates = 0  # accepted updates left out at the close by the norm bound
        self._attempts = RateLimiter(config.register_rate, config.register_burst)
        self._failures = RateLimiter(config.register_rate, 4 * config.register_burst)
        self._new_names = RateLimiter(config.new_node_rate, config.new_node_burst)

    # -- life cycle -------------------------------------------------------------------------

    def load(self) -> None:
        """Resume from the store, or initialise omega from the seed. Raises StateError."""
        snap = self.store.load()
        if snap is None:
            shared = build_shared(self.config.network, self.config.seed)
            state = ServerState.initial(dict(shared.named_parameters()))
            log.info(
                "state.initialised", network=self.config.network, seed=self.config.seed, store=self.store.describe()
            )
            self._state, self._members = state, {}
            self._commit_locked_snapshot(self._snapshot())
        else:
            if snap.identity != self.config.identity():
                raise StateError(
                    f"{self.store.describe()}: state belongs to {snap.identity}, not {self.config.identity()}; "
                    "use another state directory or the original configuration"
                )
            self._state, self._members = snap.server, snap.members
            self._committed_round = snap.server.round
            self._last_records = list(snap.records)
            log.info("state.resumed", round=snap.server.round, nodes=len(snap.members), store=self.store.describe())
        now = time.monotonic()
        self._tokens = {k: m.token_sha256 for k, m in self._members.items()}
        self._last_seen = {k: now for k, m in self._members.items() if m.registered}
        # After a restart, nodes that have taken part in a round count as live until their
        # heartbeat times out; a name that only ever registered must show up first.
        self._live = {k for k, m in self._members.items() if m.registered and m.last_round >= 0}
        self._server_config = self.config.server_config(self._state.omega)
        self._expected = {k: tuple(v.shape) for k, v in self._state.omega.items()}
        missing = [n for n in self._server_config.omega_tilde if n not in self._expected]
        if missing:
            raise ValueError(f"omega_tilde names {missing} are not parameters of {self.config.network}")
        if self.config.rounds and self._state.round >= self.config.rounds:
            self._phase = Phase.DONE

    @property
    def last_round_records(self) -> list[dict[str, Any]]:
        """The metrics.jsonl rows of the last committed round (empty before the first)."""
        return list(self._last_records)

    @property
    def committed_round(self) -> int:
        """The round of the state last written to the store (-1 before the first commit); while a
        round's commit is being written beside the next round, one less than ``round``."""
        return self._committed_round

    @property
    def loaded(self) -> bool:
        return self._state is not None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._state is None:
            self.load()
        self._thread = threading.Thread(target=self._drive, name="round-driver", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        pending = self._pending
        if pending is not None:  # let the last round's state land before the process goes
            pending.done.wait(timeout=60)

    # -- queries ----------------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def round(self) -> int:
        assert self._state is not None
        return self._state.round

    @property
    def server_config(self) -> ServerConfig:
        assert self._server_config is not None
        return self._server_config

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of omega in order: what every submitted gradient must match."""
        return dict(self._expected)

    def model_bytes(self) -> int:
        return sum(4 * math.prod(s) for s in self._expected.values())

    def view(self, page_size: int = GETSTATE_PAGE, after: str = "") -> dict[str, Any]:
        """A consistent copy of the state for GetState: at most ``page_size`` nodes (capped at
        GETSTATE_PAGE) whose ids sort after ``after``, and the id to continue from."""
        size = GETSTATE_PAGE if page_size <= 0 else min(page_size, GETSTATE_PAGE)
        with self._cond:
            assert self._state is not None
            active = self._open.participants if self._open else set()
            ids = sorted(k for k in self._members if k > after)
            page = ids[:size]
            nodes = []
            for k in page:
                n = copy.deepcopy(self._members[k].__dict__)
                n.pop("token_sha256", None)
                nodes.append({**n, "weight": self._state.weight(k), "active": k in active})
            return {
                "round": self._state.round,
                "last_committed_round": self._committed_round - 1,
                "phase": self._phase.value,
                "open_round": self._open.number if self._open else None,
                "nodes": nodes,
                "next_after": page[-1] if len(ids) > size else "",
                "total_nodes": len(self._members),
                "halted_reason": self.halted_reason,
            }

    def registered_count(self) -> int:
        with self._cond:
            return self._registered_locked()

    def _registered_locked(self) -> int:
        return sum(1 for m in self._members.values() if m.registered)

    # -- node calls -------------------------------------------------------------------------

    def _authenticate(self, node_id: str, token: str) -> MemberRecord:
        """A node may act only as itself: the token must be the one issued to ``node_id``."""
        expected = self._tokens.get(node_id)
        presented = _hash_token(token or "")
        if expected is None:
            # Same work on the unknown-id path, so timing does not tell which ids exist.
            hmac.compare_digest(presented, "0" * 64)
            raise NotFound(f"unknown node id {node_id!r}; register first")
        if not hmac.compare_digest(presented, expected):
            raise Unauthenticated(f"session token does not belong to node {node_id!r}", reason="bad_token")
        member = self._members[node_id]
        if not member.registered:
            raise FailedPrecondition(f"node {node_id!r} is deregistered; register again", reason="deregistered")
        self._last_seen[node_id] = time.monotonic()
        if node_id not in self._live:
            self._live.add(node_id)
            self._cond.notify_all()
        return member

    def authenticate(self, node_id: str, token: str) -> None:
        """Raise unless ``token`` is the session of the registered node ``node_id`` (marks it live)."""
        with self._cond:
            self._authenticate(node_id, token)

    def register(
        self,
        *,
        name: str,
        dataset: str,
        task: str,
        num_samples: int,
        enrollment_token: str = "",
        node_id: str = "",
        session_token: str = "",
        peer: str = "",
    ) -> Registration:
        """Enrol a node or resume one. ``peer`` (the caller's host) keys the attempt rate limits."""
        # Sizes first: nothing a caller sends is kept or echoed before it is known to be small.
        if not NAME_RE.match(name or ""):
            raise InvalidArgument(f"node name {name[:64]!r} must match {NAME_RE.pattern}", reason="bad_name")
        if len(dataset) > MAX_FIELD or len(task) > MAX_FIELD or len(node_id) > MAX_FIELD:
            raise InvalidArgument(f"dataset, task and node_id are at most {MAX_FIELD} characters", reason="bad_value")
        peer = peer[:MAX_FIELD]
        if not self._attempts.allow(f"{peer}|{name}"):
            raise ResourceExhausted(
                f"too many registration attempts for {name!r} from {peer or 'this peer'}; back off and retry",
                reason="rate_limited",
            )
        if self.config.enrollment_token and not hmac.compare_digest(
            _hash_token(enrollment_token or ""), _hash_token(self.config.enrollment_token)
        ):
            if not self._failures.allow(peer):
                raise ResourceExhausted(f"too many failed enrolments from {peer or 'this peer'}", reason="rate_limited")
            raise Unauthenticated("enrollment token is missing or wrong", reason="bad_enrollment")
        if dataset != self.config.dataset:
            raise InvalidArgument(
                f"this aggregator federates {self.config.dataset!r}, not {dataset!r}", reason="bad_task"
            )
        if task not in self.config.federation.task_names:
            raise InvalidArgument(
                f"unknown task {task!r} for {dataset}; tasks: {list(self.config.federation.task_names)}",
                reason="bad_task",
            )
        if not 1 <= num_samples <= MAX_SAMPLES:
            raise InvalidArgument(f"num_samples must be in [1, {MAX_SAMPLES}], got {num_samples}", reason="bad_value")
        with self._cond:
            if node_id:
                expected = self._tokens.get(node_id)
                if expected is None:
                    raise NotFound(f"unknown node id {node_id!r}: cannot resume; register without an id")
                if not hmac.compare_digest(_hash_token(session_token or ""), expected):
                    raise Unauthenticated(f"session token does not belong to node {node_id!r}", reason="bad_token")
                member = self._members[node_id]
                if member.task != task or member.dataset != dataset:
                    raise InvalidArgument(
                        f"node {node_id!r} was registered for task {member.task!r}, not {task!r}", reason="bad_task"
                    )
                if not member.registered and self._registered_locked() >= self.config.max_nodes:
                    raise ResourceExhausted(f"the federation is full ({self.config.max_nodes} nodes)", reason="full")
                member.registered = True
                member.departed_unix = None
                member.num_samples = num_samples
                self._live.discard(node_id)  # live again at its next fetch or heartbeat
                self._last_seen[node_id] = time.monotonic()
                self._cond.notify_all()
                log.info("node.resumed", node=node_id, task=task)
                assert self._state is not None
                return Registration(node_id, session_token, True, member.initial_loss, self._state.weight(node_id))
            if name in self._members:
                raise AlreadyExists(
                    f"node name {name!r} is taken; a restarting node resumes with its stored id and token",
                    reason="name_taken",
                )
            if self._registered_locked() >= self.config.max_nodes:
                raise ResourceExhausted(f"the federation is full ({self.config.max_nodes} nodes)", reason="full")
            if not self._new_names.allow(peer):
                raise ResourceExhausted(
                    f"too many new node names from {peer or 'this peer'}; back off and retry", reason="rate_limited"
                )
            token = secrets.token_urlsafe(32)
            member = MemberRecord(
                node_id=name,
                name=name,
                dataset=dataset,
                task=task,
                token_sha256=_hash_token(token),
                num_samples=num_samples,
                registered=True,
                registered_unix=self._wall(),
            )
            self._members[name] = member
            self._tokens[name] = member.token_sha256
            self._last_seen[name] = time.monotonic()
            self._cond.notify_all()
        log.info("node.registered", node=name, task=task, samples=num_samples)
        return Registration(name, token, False, None, 1.0)

    def heartbeat(self, node_id: str, token: str) -> int:
        with self._cond:
            self._authenticate(node_id, token)
            assert self._state is not None
            return self._state.round

    def deregister(self, node_id: str, token: str) -> None:
        with self._cond:
            self._authenticate(node_id, token)
            self._drop_locked(node_id, "deregistered")

    def _drop_locked(self, node_id: str, why: str) -> None:
        self._members[node_id].registered = False
        self._members[node_id].departed_unix = self._wall()
        self._last_seen.pop(node_id, None)
        self._live.discard(node_id)
        if self._open is not None and node_id not in self._open.submitted:
            self._open.participants.discard(node_id)
        self._cond.notify_all()
        log.info("node.left", node=node_id, why=why)

    def fetch_round(
        self, node_id: str, token: str, wait_seconds: float, alive: Callable[[], bool] = lambda: True
    ) -> RoundTicket | None:
        """Wait up to ``wait_seconds`` for an open round that includes the node and that it has not
        yet submitted to; None when there is none by then (the node asks again) or when ``alive``
        turns false (the caller went away)."""
        end = time.monotonic() + max(0.0, min(wait_seconds, 300.0))
        with self._cond:
            while True:
                self._authenticate(node_id, token)
                o = self._open
                if (
                    self._phase is Phase.OPEN
                    and o is not None
                    and node_id in o.participants
                    and node_id not in o.submitted
                ):
                    return RoundTicket(o.number, o.deadline_unix, o.omega)
                if self._phase is Phase.DONE:
                    return None
                remaining = end - time.monotonic()
                if remaining <= 0 or self._stop.is_set() or not alive():
                    return None
                self._cond.wait(min(remaining, 1.0))

    def check_submit(self, node_id: str, token: str, round_: int) -> float:
        """Everything that can be refused before the payload is read; returns the round's
        deadline (Unix seconds), after which the upload is of no use."""
        with self._cond:
            return self._check_submit_locked(node_id, token, round_).deadline_unix

    def _check_submit_locked(self, node_id: str, token: str, round_: int) -> _OpenRound:
        self._authenticate(node_id, token)
        o = self._open
        if o is None or self._phase is not Phase.OPEN or o.number != round_:
            current = f"round {o.number} is open" if o is not None and self._phase is Phase.OPEN else "no round is open"
            raise FailedPrecondition(f"round {round_} is not open for submits ({current})", reason="wrong_round")
        if node_id in o.submitted:
            raise AlreadyExists(f"node {node_id!r} already submitted to round {round_}", reason="duplicate")
        if node_id not in o.participants:
            raise FailedPrecondition(
                f"node {node_id!r} is not a participant of round {round_}; it joins the next round",
                reason="not_participant",
            )
        return o

    def submit(self, token: str, sub: Submission) -> None:
        """Validate and deposit an update; the round closes when the last participant's arrives."""
        loss = _finite("loss", sub.loss)
        f0 = _finite("initial_loss", sub.initial_loss, positive=True)
        ratio = _finite("loss_ratio", sub.loss_ratio, positive=True)
        if ratio > MAX_LOSS_RATIO:
            raise InvalidArgument(f"loss_ratio {ratio} is above {MAX_LOSS_RATIO:g}", reason="bad_value")
        if abs(ratio - loss / f0) > LOSS_RATIO_RTOL * max(1.0, ratio):
            raise InvalidArgument(f"loss_ratio {ratio} is not loss / initial_loss = {loss / f0}", reason="bad_value")
        if not 1 <= sub.num_samples <= MAX_SAMPLES:
            raise InvalidArgument(
                f"num_samples must be in [1, {MAX_SAMPLES}], got {sub.num_samples}", reason="bad_value"
            )
        if sub.test_loss is not None:
            _finite("test_loss", sub.test_loss)
        if len(sub.test_metrics) > MAX_TEST_METRICS:
            raise InvalidArgument(f"at most {MAX_TEST_METRICS} test metrics per update", reason="bad_value")
        for k, v in sub.test_metrics.items():
            if not NAME_RE.match(k):
                raise InvalidArgument(f"test metric name {k[:64]!r} must match {NAME_RE.pattern}", reason="bad_value")
            _finite(f"test metric {k!r}", v)
        assert self._state is not None
        try:
            validate_update(ClientUpdate(sub.node_id, sub.gradient, ratio), self._state.omega)
        except AlgorithmError as e:
            raise InvalidArgument(str(e), reason="bad_tensor") from e
        sub = replace(sub, norm=update_norm(sub.gradient))
        with self._cond:
            o = self._check_submit_locked(sub.node_id, token, sub.round)
            member = self._members[sub.node_id]
            if member.initial_loss is None:
                # The node's first update: F_0 is this round's loss, so F~ is 1 (Algorithm 2).
                if not math.isclose(loss, f0, rel_tol=1e-6) or abs(ratio - 1.0) > LOSS_RATIO_RTOL:
                    raise InvalidArgument(
                        f"the first update of node {sub.node_id!r} must have loss = initial_loss and loss_ratio 1 "
                        f"(got loss {loss}, initial_loss {f0}, loss_ratio {ratio})",
                        reason="bad_value",
                    )
                member.initial_loss = f0  # F_0 as the aggregator first saw it
            elif not math.isclose(f0, member.initial_loss, rel_tol=1e-6):
                raise InvalidArgument(
                    f"initial_loss {f0} differs from the stored F_0 {member.initial_loss} of node {sub.node_id!r}",
                    reason="bad_value",
                )
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
        self._expire_silent_locked()
        self._expire_departed_locked()
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

    def _expire_silent_locked(self) -> None:
        limit = time.monotonic() - self.config.heartbeat_timeout
        for node_id, seen in list(self._last_seen.items()):
            if seen < limit:
                self._drop_locked(node_id, "heartbeat timeout")

    def _expire_departed_locked(self) -> None:
        """Forget departed nodes after the retention, and the longest gone beyond max_departed
        (their identity, p and F_0: a node that returns later enrols afresh)."""
        assert self._state is not None
        keep = set(self._open.submitted) if self._open is not None else set()
        departed = sorted(
            (m.departed_unix or 0.0, k) for k, m in self._members.items() if not m.registered and k not in keep
        )
        excess = len(departed) - self.config.max_departed
        limit = self._wall() - self.config.departed_retention
        gone = [k for i, (since, k) in enumerate(departed) if i < excess or since < limit]
        if not gone:
            return
        for k in gone:
            del self._members[k]
            self._tokens.pop(k, None)
        self._state.weights = {k: w for k, w in self._state.weights.items() if k in self._members}
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
        active = {k for k in self._live if self._members[k].registered}
        if len(active) < self.config.min_nodes:
            return False
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
            result = server_step(self._state, updates, self.server_config, validate=False)  # checked in submit()
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
            m = self._members[k]
            rep = result.reports[k]
            m.last_round = o.number
            m.train_loss, m.loss_ratio, m.grad_norm = s.loss, s.loss_ratio, rep.grad_norm
            m.test_loss, m.test_metrics = s.test_loss, dict(s.test_metrics)
        members = {k: replace(m) for k, m in self._members.items()}
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
            members=members,
            duration_seconds=t_stepped - o.opened_mono,
            collect_seconds=t_collected - o.opened_mono,
            step_seconds=t_stepped - t_collected,
            closed_unix=self._wall(),
        )
        # The next round opens now, while this round's state is written (it is the state the next
        # round's nodes fetch; the next step waits for the commit, see _drive).
        snap = self._snapshot()
        # The rows go into the committed state too, so a crash after the commit cannot lose them.
        snap.records = [{**r, "commit_seconds": None} for r in round_records(summary)]
        self._pending = self._begin_commit(snap, summary)
        self._phase = Phase.WAITING
        self._cond.notify_all()

    def _begin_commit(self, snap: Snapshot, summary: RoundSummary) -> _PendingCommit:
        job = _PendingCommit(round=summary.round)
        threading.Thread(
            target=self._write_commit, args=(job, snap, summary), name=f"commit-{summary.round}", daemon=True
        ).start()
        return job

    def _write_commit(self, job: _PendingCommit, snap: Snapshot, summary: RoundSummary) -> None:
        """The writer thread: commit, then tell the listeners (in round order: the next commit
        cannot begin before this one is done), then wake the driver."""
        t0 = time.monotonic()
        try:
            self._commit_locked_snapshot(snap)
        except StateError as e:
            job.error = e
        except Exception as e:  # not a storage error we know: still no round may build on it
            log.exception("state.commit_crashed", round=job.round)
            job.error = StateError(f"{self.store.describe()}: commit failed ({type(e).__name__}: {e})")
        seconds = time.monotonic() - t0
        try:
            done = replace(summary, commit_seconds=0.0 if job.error else seconds)
            for listener in self.listeners:
                try:
                    listener(done)
                except Exception:  # a broken dashboard must not stop training
                    log.exception("listener.failed", listener=getattr(listener, "__name__", repr(listener)))
        finally:
            job.done.set()
            with self._cond:
                self._cond.notify_all()

    def _settle_commit_locked(self, wait: bool) -> None:
        """Account for the last round's commit once it is done (``wait``: block until then).
        A failed commit halts the coordinator and withdraws the round opened meanwhile."""
        job = self._pending
        if job is None:
            return
        if not job.done.is_set():
            if not wait:
                return
            self._cond.release()
            try:
                job.done.wait()
            finally:
                self._cond.acquire()
        self._pending = None
        if job.error is not None:
            self._halt_locked(job.error, job.round)

    def _snapshot(self) -> Snapshot:
        assert self._state is not None
        return Snapshot(
            identity=self.config.identity(),
            # omega and the Adam moments are shared, not copied: the step replaces them with new
            # tensors and never writes to the old ones; round and weights are copied.
            server=replace(self._state, weights=dict(self._state.weights)),
            members={k: replace(m, test_metrics=dict(m.test_metrics)) for k, m in self._members.items()},
            records=self._last_records,
        )

    def _commit_locked_snapshot(self, snap: Snapshot) -> None:
        self.store.save(snap)
        self._committed_round = snap.server.round
        self._last_records = snap.records

    def _commit_or_halt_locked(self) -> None:
        """Commit the state now, in this thread (the retry while HALTED); the file is written
        without the lock (only this thread mutates omega and p, and the member records are copied
        into the snapshot first)."""
        snap = self._snapshot()
        self._cond.release()
        try:
            self._commit_locked_snapshot(snap)
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
        self._cond.wait(self.config.heartbeat_interval)
        if not self._stop.is_set():
            self._commit_or_halt_locked()
            if self._phase is Phase.WAITING:
                log.info("state.commit_recovered", round=self.round)
