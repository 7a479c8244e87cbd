"""The edge node's state folder: its identity at the aggregator and its personal model.

``identity.json`` holds the node id and session token (so a restart resumes instead of enrolling
anew); ``client.pt`` holds the head h^(i), its Adam moments and F_0. Both are replaced atomically.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from fedgradnorm.atomic import atomic_write_bytes
from fedgradnorm.errors import FatalError


class NodeStateError(FatalError):
    """A state folder that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Identity:
    node_id: str
    session_token: str
    aggregator: str
    federation: str
    task: str


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` durably, readable by its owner only (it may hold the session token)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data, mode=0o600)


class NodeStore:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.identity_path = self.directory / "identity.json"
        self.client_path = self.directory / "client.pt"

    def load_identity(self) -> Identity | None:
        if not self.identity_path.exists():
            return None
        try:
            raw = json.loads(self.identity_path.read_text())
            if isinstance(raw, dict) and "dataset" in raw:  # written before federations had specs
                raw.setdefault("federation", raw.pop("dataset"))
            return Identity(**{k: str(raw[k]) for k in Identity.__dataclass_fields__})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise NodeStateError(
                f"{self.identity_path}: corrupt node identity ({type(e).__name__}: {e}); "
                "delete the state folder to enrol as a new node"
            ) from e

    def save_identity(self, identity: Identity) -> None:
        _atomic_write(self.identity_path, json.dumps(asdict(identity), indent=2).encode())

    def load_client(self) -> bytes | None:
        if not self.client_path.exists():
            return None
        try:
            return self.client_path.read_bytes()
        except OSError as e:
            raise NodeStateError(f"{self.client_path}: cannot read ({e.strerror})") from e

    def save_client(self, blob: bytes) -> None:
        _atomic_write(self.client_path, blob)
