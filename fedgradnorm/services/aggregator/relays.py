"""The relays the aggregator knows: their sessions, and the weights it offers them when a round closes.

Like :class:`~fedgradnorm.services.aggregator.membership.Membership`, nothing here has a lock of its
own: the coordinator calls it under its lock. Relay sessions live in memory only: after an
aggregator restart a relay attaches again (its nodes' records, p and F_0 are in the committed state).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from fedgradnorm.algorithm import TensorDict
from fedgradnorm.reasons import Reason
from fedgradnorm.services.aggregator.errors import ResourceExhausted
from fedgradnorm.services.aggregator.membership import hash_token, verify_token

MAX_RELAYS = 256


@dataclass
class RelaySession:
    name: str
    token_sha256: str
    attached_unix: float
    last_seen: float = field(default_factory=time.monotonic)  # time.monotonic() of its last call
    partial_sums: int = 0  # accepted partial sums
    lost_rounds: int = 0  # rounds whose partial sum did not arrive in time


@dataclass
class Offer:
    """The aggregation scales of one attempt at closing a round, per relay, and the partial sums
    that arrived for it. A new attempt (a relay was lost) replaces the offer."""

    opening: int
    round: int
    attempt: int
    scales: dict[str, list[tuple[str, float, float]]]  # relay -> [(node, p/N, p)], sorted by node
    partials: dict[str, TensorDict] = field(default_factory=dict)

    def complete(self) -> bool:
        return set(self.partials) >= set(self.scales)


class RelaySessions:
    def __init__(self, max_relays: int = MAX_RELAYS) -> None:
        self.max_relays = max_relays
        self.sessions: dict[str, RelaySession] = {}

    def attach(self, name: str, wall: float) -> str:
        """A new session for relay ``name`` (a relay that attaches again replaces its old session)."""
        if name not in self.sessions and len(self.sessions) >= self.max_relays:
            raise ResourceExhausted(f"{self.max_relays} relays are attached already", Reason.FULL)
        token = secrets.token_urlsafe(32)
        self.sessions[name] = RelaySession(name=name, token_sha256=hash_token(token), attached_unix=wall)
        return token

    def authenticate(self, relay_id: str, token: str) -> RelaySession:
        session = self.sessions.get(relay_id)
        verify_token("relay", relay_id, token, session.token_sha256 if session else None, "attach first")
        assert session is not None
        session.last_seen = time.monotonic()
        return session

    def silent(self, timeout: float) -> list[str]:
        limit = time.monotonic() - timeout
        return [k for k, s in self.sessions.items() if s.last_seen < limit]
