"""The services' domain values: what an edge node sends (a Submission, built once and handed on as
is), what the aggregator's coordinator hands out and takes in. Plain typed values, no gRPC:
fedgradnorm.services.serde converts them to and from protobuf for both services."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fedgradnorm.algorithm import StepResult, TensorDict
from fedgradnorm.services.aggregator.store import MemberRecord


class Phase(enum.Enum):
    WAITING = "waiting"  # for enough live nodes
    OPEN = "open"  # a round is open for fetches and submits
    STEPPING = "stepping"  # the server step and the commit are running
    DONE = "done"  # the configured number of rounds is reached
    HALTED = "halted"  # a commit failed (retried) or the driver failed (for good): no round advances


@dataclass(frozen=True)
class Registration:
    node_id: str
    session_token: str  # only ever returned to the node itself; never logged
    resumed: bool
    initial_loss: float | None
    weight: float


@dataclass(frozen=True)
class RoundTicket:
    """An open round as a participant sees it: the number, the deadline and omega_k; or, when
    ``final``, the trained model: omega after the last round (``round`` = rounds trained, no deadline)."""

    round: int
    deadline_unix: float
    omega: TensorDict  # read-only: shared by every fetch of the round and by the commit
    final: bool = False
    last_used: int | None = None  # the last round whose step used the node's update; None: unknown


@dataclass(frozen=True)
class RelayTicket:
    """An open round as a relay sees it: omega_k once for its site, and which of its nodes take
    part (with the F_0 the aggregator stored for each, None before a node's first update);
    ``opening`` numbers the openings (a refused round opens again under the same round number).
    When ``final``: the trained model, as in RoundTicket."""

    opening: int
    round: int
    deadline_unix: float
    participants: dict[str, float | None]
    omega: TensorDict
    final: bool = False


@dataclass(frozen=True)
class WeightsOffer:
    """What FetchWeights answers: ``ready`` with an attempt's scales [(node, p/N, p)], ``closed``
    (nothing more for this opening), or neither (not yet)."""

    ready: bool
    closed: bool
    attempt: int = 0
    scales: tuple[tuple[str, float, float], ...] = ()


@dataclass(frozen=True)
class Submission:
    """One node's update of one round, as it arrives (fedgradnorm.services.serde builds it once).
    At the aggregator, an update that came through a relay has no gradient: the relay keeps it and
    sends up its site's partial sum once the weights are known."""

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
    tilde_norm: float = 0.0  # l2 norm on omega_tilde: the weight rule's input (set on admission)
    relay: str = ""  # the relay that holds the gradient (then ``gradient`` is empty here); "" direct


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


@dataclass(frozen=True)
class NodeView:
    """One node in GetState: its record (no token hash), its weight and whether the open round has it."""

    record: MemberRecord
    weight: float
    in_open_round: bool


@dataclass(frozen=True)
class StateView:
    """A consistent copy of the aggregator's state for GetState (one page of nodes)."""

    round: int
    last_committed_round: int
    phase: Phase
    open_round: int | None
    nodes: list[NodeView]
    next_after: str  # the node id to continue after; "" on the last page
    total_nodes: int
    halted_reason: str
