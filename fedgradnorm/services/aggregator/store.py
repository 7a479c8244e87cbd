"""Where the aggregator's state lives between rounds, behind one small interface.

A snapshot is everything needed to continue bit for bit: omega, omega's Adam moments, every
node's weight p with its Adam moments, every node's record (identity, token hash, F_0) and the
round number. :class:`FileStateStore` commits a snapshot atomically (temporary file, fsync,
rename, fsync of the folder), so a crash at any instant leaves either the previous round's state
or the new one on disk, never a mixture; :class:`MemoryStateStore` is the same contract in memory.
"""

from __future__ import annotations

import abc
import contextlib
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedgradnorm.algorithm import AdamState, ClientWeight, ServerState
from fedgradnorm.atomic import atomic_write
from fedgradnorm.errors import FatalError

FORMAT_VERSION = 1
STATE_FILE = "aggregator-state.pt"


class StateError(FatalError):
    """The stored state cannot be read or written; the message names the file and the problem."""


@dataclass
class MemberRecord:
    """What the aggregator knows of one edge node (kept after it leaves, for a resume)."""

    node_id: str
    name: str
    federation: str
    task: str
    token_sha256: str
    num_samples: int
    registered: bool = True
    registered_unix: float = 0.0
    initial_loss: float | None = None
    last_round: int = -1
    # Last reported figures, for GetState and dashboards.
    train_loss: float | None = None
    loss_ratio: float | None = None
    grad_norm: float | None = None
    test_loss: float | None = None
    test_metrics: dict[str, float] = field(default_factory=dict)
    departed_unix: float | None = None  # when it left (deregistered or silent); None while registered
    relay: str = ""  # the relay it registered through ("" for a node that dials the aggregator)


@dataclass
class Snapshot:
    identity: dict[str, Any]  # network, algorithm, federation, seed: a restart with others is refused
    server: ServerState
    members: dict[str, MemberRecord]
    # The metrics.jsonl rows of the round this state closed, so that a crash between the commit
    # and the append cannot lose them (fedgradnorm/services/aggregator/roundlog.py puts them back).
    records: list[dict[str, Any]] = field(default_factory=list)


def _payload(snap: Snapshot) -> dict[str, Any]:
    s = snap.server
    return {
        "format": FORMAT_VERSION,
        "identity": snap.identity,
        "round": s.round,
        "omega": s.omega,
        "adam_step": s.omega_adam.step,
        "adam_exp_avg": s.omega_adam.exp_avg,
        "adam_exp_avg_sq": s.omega_adam.exp_avg_sq,
        "weights": {k: asdict(w) for k, w in s.weights.items()},
        "members": {k: asdict(m) for k, m in snap.members.items()},
        "records": snap.records,
    }


def encode_snapshot(snap: Snapshot) -> bytes:
    buf = io.BytesIO()
    torch.save(_payload(snap), buf)
    return buf.getvalue()


def decode_snapshot(blob: bytes, origin: str) -> Snapshot:
    try:
        payload = torch.load(io.BytesIO(blob), weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt archive
        raise StateError(f"{origin}: not a readable aggregator state (corrupt or truncated: {type(e).__name__})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise StateError(
            f"{origin}: unknown state format {payload.get('format') if isinstance(payload, dict) else '?'}"
        )
    try:
        server = ServerState(
            round=int(payload["round"]),
            omega=dict(payload["omega"]),
            omega_adam=AdamState(
                step=int(payload["adam_step"]),
                exp_avg=dict(payload["adam_exp_avg"]),
                exp_avg_sq=dict(payload["adam_exp_avg_sq"]),
            ),
            weights={k: ClientWeight(**w) for k, w in payload["weights"].items()},
        )
        members = {k: MemberRecord(**m) for k, m in payload["members"].items()}
        records = [dict(r) for r in payload.get("records", [])]
    except (KeyError, TypeError, ValueError) as e:
        raise StateError(f"{origin}: incomplete aggregator state ({e})") from e
    return Snapshot(identity=dict(payload["identity"]), server=server, members=members, records=records)


class StateStore(abc.ABC):
    """Load the last committed snapshot; commit a new one atomically."""

    @abc.abstractmethod
    def load(self) -> Snapshot | None:
        """The last committed snapshot, or None when nothing was ever committed."""

    @abc.abstractmethod
    def save(self, snapshot: Snapshot) -> None:
        """Commit ``snapshot``; on failure raise StateError and leave the previous one in place."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the state lives, for logs."""


class MemoryStateStore(StateStore):
    """The same contract, in memory (a serialised copy, so later mutation cannot leak in)."""

    def __init__(self) -> None:
        self._blob: bytes | None = None

    def load(self) -> Snapshot | None:
        return None if self._blob is None else decode_snapshot(self._blob, "memory")

    def save(self, snapshot: Snapshot) -> None:
        self._blob = encode_snapshot(snapshot)

    def describe(self) -> str:
        return "memory"


class FileStateStore(StateStore):
    """One file in a state folder, replaced atomically on every commit."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / STATE_FILE

    def describe(self) -> str:
        return str(self.path)

    def load(self) -> Snapshot | None:
        for stale in self.directory.glob(f".{STATE_FILE}.*.tmp"):  # left by a commit killed mid-write
            with contextlib.suppress(OSError):
                stale.unlink()
        if not self.path.exists():
            return None
        try:
            blob = self.path.read_bytes()
        except OSError as e:
            raise StateError(f"{self.path}: cannot read ({e.strerror})") from e
        return decode_snapshot(blob, str(self.path))

    def save(self, snapshot: Snapshot) -> None:
        payload = _payload(snapshot)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # torch.save writes straight into the file: no second copy of the model in memory.
            atomic_write(self.path, lambda f: torch.save(payload, f), mode=0o600)
        except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as RuntimeError
            cause: BaseException | None = e
            while cause is not None and not getattr(cause, "strerror", None):
                cause = cause.__context__
            why = cause.strerror if cause is not None else str(e).splitlines()[0]  # type: ignore[attr-defined]
            raise StateError(f"{self.path}: cannot commit the round's state ({why})") from e
