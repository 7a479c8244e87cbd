"""The commit pipeline: each round's state is written by a writer thread while the next round runs.

At most one commit is in flight (the coordinator settles it before the next step), commits land in
round order, and the listeners (metrics, metrics.jsonl) hear of a round once its commit has ended
(``commit_seconds`` 0 when it failed). A failed commit is reported to the coordinator, which halts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from fedgradnorm.services.aggregator.store import Snapshot, StateError, StateStore
from fedgradnorm.services.domain import RoundSummary

log = structlog.get_logger("fedgradnorm.aggregator")


@dataclass
class _Job:
    round: int
    done: threading.Event = field(default_factory=threading.Event)
    error: StateError | None = None


class CommitPipeline:
    def __init__(
        self,
        store: StateStore,
        listeners: list[Callable[[RoundSummary], None]],
        on_done: Callable[[], None],
    ) -> None:
        self.store = store
        self.listeners = listeners
        self._on_done = on_done  # wakes the driver
        self._job: _Job | None = None
        self.committed_round = -1  # the round of the state last written (snapshot.server.round)
        self.last_records: list[dict[str, Any]] = []  # metrics.jsonl rows of that round

    def restore(self, snap: Snapshot) -> None:
        self.committed_round = snap.server.round
        self.last_records = list(snap.records)

    def write(self, snap: Snapshot) -> None:
        """Commit now, in the calling thread (the initial state, a retry while halted); StateError."""
        self.store.save(snap)
        self.committed_round = snap.server.round
        self.last_records = snap.records

    def begin(self, snap: Snapshot, summary: RoundSummary) -> None:
        """Start writing a closed round's state beside the next round."""
        assert self._job is None, "one commit in flight at a time"
        job = _Job(round=summary.round)
        self._job = job
        threading.Thread(target=self._run, args=(job, snap, summary), name=f"commit-{job.round}", daemon=True).start()

    @property
    def in_flight(self) -> bool:
        return self._job is not None

    def done(self) -> bool:
        return self._job is None or self._job.done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        job = self._job
        return job is None or job.done.wait(timeout)

    def settle(self) -> tuple[int, StateError | None] | None:
        """The finished job's (round, error), once; None while none has finished."""
        job = self._job
        if job is None or not job.done.is_set():
            return None
        self._job = None
        return job.round, job.error

    def _run(self, job: _Job, snap: Snapshot, summary: RoundSummary) -> None:
        t0 = time.monotonic()
        try:
            self.write(snap)
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
            self._on_done()
