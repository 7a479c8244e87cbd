"""Who the aggregator knows: member records, session tokens (as hashes), liveness, retention, and
the limits on registering.

:class:`Membership` holds no lock of its own: the coordinator calls it under its lock, except
:meth:`Membership.check_request`, which reads nothing but the configuration and the rate limiters
(each with its own lock), so that refusals cost the round driver nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable, Iterable

from fedgradnorm.models import Architecture
from fedgradnorm.reasons import Reason
from fedgradnorm.services.aggregator.config import NAME_RE, CoordinatorConfig
from fedgradnorm.services.aggregator.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
)
from fedgradnorm.services.aggregator.store import MemberRecord

MAX_SAMPLES = 1_000_000_000
MAX_FIELD = 256  # longest federation, task, node id or peer string kept or echoed before it is checked
MAX_PARAMETERS = 4096  # most parameter tensors a node may declare for its shared network


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

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._buckets)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def verify_token(owner: str, ident: str, token: str, expected_sha256: str | None, hint: str) -> None:
    """Raise unless ``token`` is the session of ``owner`` ``ident`` ("node", "relay"), whose token
    hash is ``expected_sha256`` (None: no such id). The same work on the unknown-id path, so timing
    does not tell which ids exist."""
    presented = hash_token(token or "")
    if expected_sha256 is None:
        hmac.compare_digest(presented, "0" * 64)
        unknown = Reason.UNKNOWN_RELAY if owner == "relay" else Reason.UNKNOWN_NODE
        raise NotFound(f"unknown {owner} id {ident[:64]!r}; {hint}", unknown)
    if not hmac.compare_digest(presented, expected_sha256):
        raise Unauthenticated(f"session token does not belong to {owner} {ident[:64]!r}", Reason.BAD_TOKEN)


class Membership:
    def __init__(self, config: CoordinatorConfig, wall_clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._wall = wall_clock
        self.records: dict[str, MemberRecord] = {}
        self._last_seen: dict[str, float] = {}  # registered nodes: time.monotonic() of their last call
        self._live: set[str] = set()  # registered and seen (fetch or heartbeat) since registering
        self.attempts = RateLimiter(config.register_rate, config.register_burst)
        self._failures = RateLimiter(config.register_rate, 4 * config.register_burst)
        self._new_names = RateLimiter(config.new_node_rate, config.new_node_burst)
        self.version = 0  # bumped by every change a relay's member list can see

    def restore(self, records: dict[str, MemberRecord]) -> None:
        """After a restart: registered nodes count as seen now; those that have taken part in a
        round count as live until their heartbeat times out (a name that only registered must show
        up first)."""
        now = time.monotonic()
        self.records = records
        self._last_seen = {k: now for k, m in records.items() if m.registered}
        self._live = {k for k, m in records.items() if m.registered and m.last_round >= 0}

    # -- registering --------------------------------------------------------------------------

    def check_request(
        self,
        *,
        name: str,
        federation: str,
        network: Architecture,
        task: str,
        num_samples: int,
        enrollment_token: str,
        node_id: str,
        peer: str,
    ) -> str:
        """Everything about a Register call that needs no member record; returns the peer key.
        Sizes come first: nothing a caller sends is kept (a rate-limiter key) or echoed before it
        is known to be small."""
        if not NAME_RE.match(name or ""):
            raise InvalidArgument(f"node name {name[:64]!r} must match {NAME_RE.pattern}", reason=Reason.BAD_NAME)
        if len(federation) > MAX_FIELD or len(task) > MAX_FIELD or len(node_id) > MAX_FIELD:
            raise InvalidArgument(f"federation, task and node_id are at most {MAX_FIELD} characters", Reason.BAD_VALUE)
        peer = peer[:MAX_FIELD]
        if not self.attempts.allow(f"{peer}|{name}"):
            raise ResourceExhausted(
                f"too many registration attempts for {name!r} from {peer or 'this peer'}; back off and retry",
                Reason.RATE_LIMITED,
            )
        self.check_enrollment(enrollment_token, peer)
        spec = self.config.spec
        if len(federation) <= MAX_FIELD and federation == spec.name and task not in spec.task_names:
            raise InvalidArgument(
                f"unknown task {task!r} for {federation}; tasks: {list(spec.task_names)}", Reason.BAD_TASK
            )
        self.check_network(federation, network)
        if not 1 <= num_samples <= MAX_SAMPLES:
            raise InvalidArgument(f"num_samples must be in [1, {MAX_SAMPLES}], got {num_samples}", Reason.BAD_VALUE)
        return peer

    def check_enrollment(self, enrollment_token: str, peer: str) -> None:
        """The federation's enrollment token (if it has one); failures are rate limited per peer."""
        cfg = self.config
        if cfg.enrollment_token and not hmac.compare_digest(
            hash_token(enrollment_token or ""), hash_token(cfg.enrollment_token)
        ):
            if not self._failures.allow(peer):
                raise ResourceExhausted(f"too many failed enrolments from {peer or 'this peer'}", Reason.RATE_LIMITED)
            raise Unauthenticated("enrollment token is missing or wrong", Reason.BAD_ENROLLMENT)

    def check_network(self, federation: str, network: Architecture, caller: str = "node") -> None:
        """The caller federates this aggregator's federation with its shared network."""
        spec = self.config.spec
        if federation != spec.name:
            raise InvalidArgument(
                f"this aggregator federates {spec.name!r}, not {federation[:MAX_FIELD]!r}", Reason.BAD_TASK
            )
        if len(network.parameters) > MAX_PARAMETERS or any(len(n) > MAX_FIELD for n, _, _ in network.parameters):
            raise InvalidArgument(
                f"a network of at most {MAX_PARAMETERS} tensors named in at most {MAX_FIELD} characters",
                Reason.BAD_VALUE,
            )
        if network.fingerprint != spec.architecture.fingerprint:
            raise FailedPrecondition(
                f"the {caller}'s shared network is not this federation's ({federation}: {spec.network.ref}): "
                f"{spec.architecture.difference(network)} (here: the aggregator; there: the {caller})",
                Reason.NETWORK_MISMATCH,
            )

    def resume(
        self, node_id: str, session_token: str, task: str, federation: str, num_samples: int, relay: str = ""
    ) -> MemberRecord:
        """A known node registers again with its stored id and token."""
        expected = self.records.get(node_id)
        if expected is None:
            raise NotFound(f"unknown node id {node_id!r}: cannot resume; register without an id", Reason.UNKNOWN_NODE)
        if not hmac.compare_digest(hash_token(session_token or ""), expected.token_sha256):
            raise Unauthenticated(f"session token does not belong to node {node_id!r}", Reason.BAD_TOKEN)
        member = expected
        if member.task != task or member.federation != federation:
            raise InvalidArgument(
                f"node {node_id!r} was registered for task {member.task!r}, not {task!r}", Reason.BAD_TASK
            )
        if not member.registered:
            self._check_room()
        member.registered = True
        member.departed_unix = None
        member.num_samples = num_samples
        member.relay = relay
        self.version += 1
        self._live.discard(node_id)  # live again at its next fetch or heartbeat
        self._last_seen[node_id] = time.monotonic()
        return member

    def enrol(
        self, name: str, federation: str, task: str, num_samples: int, peer: str, relay: str = ""
    ) -> tuple[MemberRecord, str]:
        """A new node: its record and its session token (returned once, stored only as a hash)."""
        if name in self.records:
            raise AlreadyExists(
                f"node name {name!r} is taken; a restarting node resumes with its stored id and token",
                Reason.NAME_TAKEN,
            )
        self._check_room()
        if not self._new_names.allow(peer):
            raise ResourceExhausted(
                f"too many new node names from {peer or 'this peer'}; back off and retry", Reason.RATE_LIMITED
            )
        token = secrets.token_urlsafe(32)
        member = MemberRecord(
            node_id=name,
            name=name,
            federation=federation,
            task=task,
            token_sha256=hash_token(token),
            num_samples=num_samples,
            registered=True,
            registered_unix=self._wall(),
            relay=relay,
        )
        self.records[name] = member
        self.version += 1
        self._last_seen[name] = time.monotonic()
        return member, token

    def _check_room(self) -> None:
        if self.registered_count() >= self.config.max_nodes:
            raise ResourceExhausted(f"the federation is full ({self.config.max_nodes} nodes)", Reason.FULL)

    # -- sessions -----------------------------------------------------------------------------

    def authenticate(self, node_id: str, token: str) -> tuple[MemberRecord, bool]:
        """A node may act only as itself: the token must be the one issued to ``node_id``. Marks
        the node seen; returns its record and whether this call made it live."""
        member = self.records.get(node_id)
        verify_token("node", node_id, token, member.token_sha256 if member else None, "register first")
        assert member is not None
        if not member.registered:
            raise FailedPrecondition(f"node {node_id!r} is deregistered; register again", Reason.DEREGISTERED)
        self._last_seen[node_id] = time.monotonic()
        became_live = node_id not in self._live
        self._live.add(node_id)
        return member, became_live

    def drop(self, node_id: str) -> None:
        """The node left (deregistered, or silent): kept as departed until its retention ends."""
        member = self.records[node_id]
        member.registered = False
        member.departed_unix = self._wall()
        self._last_seen.pop(node_id, None)
        self._live.discard(node_id)
        self.version += 1

    def touch(self, node_id: str, relay: str) -> bool:
        """A relay saw ``node_id`` (it authenticated the node with the token hash it was given):
        marks the node seen if it is registered through that relay; returns whether it became live."""
        member = self.records.get(node_id)
        if member is None or not member.registered or member.relay != relay:
            return False
        self._last_seen[node_id] = time.monotonic()
        became_live = node_id not in self._live
        self._live.add(node_id)
        return became_live

    def behind(self, relay: str) -> list[MemberRecord]:
        """The registered nodes enrolled through ``relay``, sorted by id."""
        return sorted((m for m in self.records.values() if m.relay == relay and m.registered), key=lambda m: m.node_id)

    def silent(self) -> list[str]:
        """Registered nodes not seen for heartbeat_timeout."""
        limit = time.monotonic() - self.config.heartbeat_timeout
        return [k for k, seen in self._last_seen.items() if seen < limit]

    def forget_departed(self, keep: Iterable[str]) -> list[str]:
        """Forget departed nodes after the retention, and the longest gone beyond max_departed
        (their identity, p and F_0: a node that returns later enrols afresh); never one in ``keep``."""
        kept = set(keep)
        departed = sorted(
            (m.departed_unix or 0.0, k) for k, m in self.records.items() if not m.registered and k not in kept
        )
        excess = len(departed) - self.config.max_departed
        limit = self._wall() - self.config.departed_retention
        gone = [k for i, (since, k) in enumerate(departed) if i < excess or since < limit]
        for k in gone:
            del self.records[k]
        if gone:
            self.version += 1
        return gone

    # -- queries ------------------------------------------------------------------------------

    def live(self) -> set[str]:
        return {k for k in self._live if self.records[k].registered}

    def registered_count(self) -> int:
        return sum(1 for m in self.records.values() if m.registered)
